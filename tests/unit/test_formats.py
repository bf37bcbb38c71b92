"""Token formats are objects (epcomm.formats.TokenFormat); the config, the launcher and the topology import without
numpy; no module outside epcomm/formats.py compares format names."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epcomm import formats
from epcomm.config import EPConfig
from epcomm.errors import EPInputError

ROOT = Path(__file__).resolve().parents[2]


def cfg(**kw):
    args = dict(hidden=256, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2)
    args.update(kw)
    return EPConfig(**args)


def test_the_config_resolves_the_name_to_the_format_object():
    c = cfg(token_format="fp8")
    assert c.token_format is formats.FP8_FORMAT and c.token_format == "fp8"
    assert c.replace(token_format="bf16").token_format is formats.BF16_FORMAT
    assert cfg(token_format=formats.FP8_FORMAT) == c
    again = pickle.loads(pickle.dumps(c))      # configs travel over MPI pickled
    assert again == c and again.token_format is formats.FP8_FORMAT
    assert json.loads(json.dumps({"format": c.token_format})) == {"format": "fp8"}


def test_format_sizes_and_dtypes():
    bf16, fp8 = formats.BF16_FORMAT, formats.FP8_FORMAT
    assert (bf16.row_bytes(7168), fp8.row_bytes(7168)) == (2 * 7168, 7168 + 4 * 56)
    assert (bf16.scale_shape(5, 256), fp8.scale_shape(5, 256)) == (None, (5, 2))
    assert (bf16.dtype, fp8.dtype) == (formats.BF16, formats.FP8)
    assert (bf16.kernel_define, fp8.kernel_define) == ({"EP_FP8": 0}, {"EP_FP8": 1})


def test_quantize_then_dequantize_for_each_format():
    x = formats.random_tokens(np.random.default_rng(3), 4, 256)
    rows, scales = formats.BF16_FORMAT.quantize(x)
    assert scales is None and rows.dtype == formats.BF16 and np.array_equal(rows.view(np.uint16), x.view(np.uint16))
    assert np.array_equal(formats.BF16_FORMAT.dequantize(rows), x.astype(np.float32))
    q, s = formats.FP8_FORMAT.quantize(x)
    assert q.dtype == formats.FP8 and s.shape == (4, 2)
    back = formats.FP8_FORMAT.dequantize(q, s)
    assert np.allclose(back, x.astype(np.float32), rtol=2.0 ** -3, atol=1e-6)


def test_unknown_format_is_an_input_error():
    with pytest.raises(EPInputError, match="token_format"):
        formats.resolve("fp4")


def test_launcher_and_topology_import_without_numpy():
    code = ("import sys, launch.rank_env, launch.mpicmd, epcomm.topology, epcomm.config; "
            "bad = [m for m in ('numpy', 'ml_dtypes') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_format_name_comparisons_outside_the_formats_module():
    # gpu/jit.py: the kernel-build owner switches it to cfg.token_format.kernel_define
    allowed = {"epcomm/formats.py", "epcomm/backends/gpu/jit.py"}
    pattern = re.compile(r"""[!=]=\s*["'](bf16|fp8)["']|["'](bf16|fp8)["']\s*[!=]=""")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "epcomm").rglob("*.py"))
             if str(p.relative_to(ROOT)) not in allowed
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"compare cfg.token_format's attributes instead: {found}"
