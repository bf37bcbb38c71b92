"""The EPConfigs epcomm.compat.deep_ep makes compile for sm_90 (CPU-only nvcc build, like tests/unit/
test_kernels_compile.py): normal mode asks for shapes no other caller does (one expert per rank, carrier widths such
as 384, top-k 1), so they are built here. Skipped without nvcc / the NVSHMEM device library. Low-latency mode's
configs (layout "batched" with DeepEP's capacity, column-major fp32 / UE8M0 scales, mode "ll") are the server
configs tests/unit/test_kernels_compile.py builds, at other sizes: only their fields are checked here."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from epcomm import EPConfig
from epcomm.backends.gpu import jit

pytest.importorskip("torch")


def normal_mode_config(hidden: int, topk: int, ranks: int, tokens: int) -> EPConfig:
    """The EPConfig Buffer.dispatch makes for this shape (see epcomm/compat/deep_ep/normal.py _normal_pool)."""
    from epcomm.compat.deep_ep.layouts import Carrier
    width = min(topk, ranks) if topk else ranks
    return EPConfig(hidden=Carrier(hidden, topk).width, topk=width, num_experts=ranks, max_tokens_per_rank=tokens,
                    world_size=ranks, token_format="bf16", mode="ht")


def low_latency_config(hidden: int, topk: int, experts: int, ranks: int, m: int, fp8: bool, pow2: bool) -> EPConfig:
    """The EPConfig Buffer.low_latency_dispatch makes for this shape (low_latency.py ll_shape)."""
    from epcomm.compat.deep_ep.low_latency import ll_shape
    return EPConfig(world_size=ranks, mode="ll", **ll_shape(("ll", hidden, topk, experts, m, fp8, pow2), ranks))


def test_low_latency_config_is_deepeps_layout():
    cfg = low_latency_config(7168, 8, 256, 8, 128, True, True)       # DeepSeek-V3 decode with use_ue8m0
    assert cfg.layout == "batched" and cfg.rows_shape == (32, 1024) and cfg.token_format.quantized
    assert (cfg.scale_format, cfg.scale_layout) == ("ue8m0", "col")
    assert low_latency_config(7168, 8, 256, 8, 128, True, False).scale_format == "fp32"
    bf16 = low_latency_config(2880, 4, 16, 2, 7, False, False)
    assert bf16.rows_shape == (8, 14) and bf16.scale_layout == "row" and not bf16.token_format.quantized


def _need_compiler():
    try:
        jit.find_nvcc()
        jit.nvshmem_home()
    except jit.BuildError as e:
        pytest.skip(f"no CUDA compiler / NVSHMEM device library: {e}")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("nvcc needs a host C++ compiler (g++) and none is installed")


def _build_all(configs):
    with ThreadPoolExecutor(2) as ex:
        built = list(ex.map(lambda c: jit.build(jit.defines_for(c), "sm_90"), configs))
    assert all(b.cubin for b in built)


def test_normal_mode_shapes_compile():
    _need_compiler()
    configs = [normal_mode_config(256, 1, 2, 16),      # top-1: fewer routes than ranks
               normal_mode_config(7168, 8, 8, 4096)]   # DeepSeek-V3 prefill on 8 ranks: carrier 7296 channels
    assert configs[1].hidden == 7296 and configs[0].num_experts == configs[0].world_size
    _build_all(configs)
