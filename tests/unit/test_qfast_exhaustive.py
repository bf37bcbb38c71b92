"""The fp8 quantiser (kernels/payload.cuh quant_lane8): its reciprocal + fma-correction quotient
gives the same e4m3 byte as the spec's correctly rounded division for every bf16 input that can occur (every finite
bf16 block maximum, every bf16 x below it, both scale formats). The check is C (dev/qfast_exhaustive.c: IEEE float
and fmaf as on the GPU, 1.07 G pairs per format, a few CPU seconds); the same arithmetic without its correction step
differs in ~40 000 pairs, which the check reports (so it can fail)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "dev" / "qfast_exhaustive.c"


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("qfast") / "qfast"
    subprocess.run([cc, "-O2", "-ffp-contract=off", "-o", str(exe), str(SOURCE), "-lm"], check=True)
    return exe


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_qfast_quotient_is_bit_exact(checker, fmt):
    r = subprocess.run([str(checker)] + (["ue8m0"] if fmt == "ue8m0" else []), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout
    assert "1065402238 pairs, 0 e4m3 differences" in r.stdout


def test_the_check_fails_without_the_correction(checker, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    src = SOURCE.read_text().replace("const float q = e == 0.0f ? q0 : fmaf(e, r, q0);", "const float q = q0;")
    assert "const float q = q0;" in src
    (tmp_path / "bad.c").write_text(src)
    subprocess.run([cc, "-O2", "-ffp-contract=off", "-o", str(tmp_path / "bad"), str(tmp_path / "bad.c"), "-lm"],
                   check=True)
    r = subprocess.run([str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "differs:" in r.stdout
