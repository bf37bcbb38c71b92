"""CPU-only: every kernel specialisation that the GPU tests, the example and the benchmark use compiles for sm_90.

Needs no GPU and no driver: nvcc (-rdc, then -dlink -cubin against libnvshmem_device.a). The compiler comes from the
system CUDA toolkit if there is one, else from the pip wheels nvidia-cuda-nvcc + nvidia-cuda-cccl; NVSHMEM headers and
the device library from nvidia-nvshmem-cu13. Skips (with the reason) only when no compiler / NVSHMEM is installed.
Cubins land in the epcomm cache ($EPCOMM_CACHE or ~/.cache/epcomm), so a re-run with unchanged sources is quick.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from epcomm.backends.gpu import jit, specs


def _toolchain_or_skip():
    try:
        nvcc = jit.find_nvcc()
        home = jit.nvshmem_home()
    except jit.BuildError as e:
        pytest.skip(f"no CUDA compiler / NVSHMEM device library: {e}")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("nvcc needs a host C++ compiler (g++) and none is installed")
    return nvcc, home


def _unique(configs):
    out = {}
    for c in configs:
        d = jit.defines_for(c)
        out[tuple(sorted(d.items()))] = d
    return list(out.values())


def test_layout_matches_kernel_constants():
    from epcomm.backends.gpu.backend import Layout, _params_struct
    import ctypes
    for cfg in specs.all_configs(2):
        lay = Layout(cfg, any_remote=True)
        assert lay.MSG % 16 == 0 and all(v % 256 == 0 for v in lay.off.values())
    # 19 pointers + timeout + 13 offsets (8 B each), 5 ints (+ 4 B padding), peer[R]
    assert ctypes.sizeof(_params_struct(2)) == 8 * 33 + 24 + 8 * 2


def test_every_specialisation_compiles_for_sm90():
    _toolchain_or_skip()
    defs = _unique(specs.all_configs(2))
    jobs = max(1, min(len(defs), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as ex:
        built = list(ex.map(lambda d: jit.build(d, "sm_90"), defs))
    for b in built:
        data = b.cubin.read_bytes()
        assert data[:4] == b"\x7fELF", b.cubin
        for name in jit.Kernels.NAMES:
            assert name.encode() in data, f"{name} missing from {b.cubin}"


def test_compile_error_is_reported(tmp_path, monkeypatch):
    """A kernel syntax error must fail loudly (BuildError with the compiler's message), not be skipped."""
    _toolchain_or_skip()
    bad = tmp_path / "kernels"
    bad.mkdir()
    (bad / "ep.cu").write_text((jit.KERNEL_DIR / "ep.cu").read_text() + "\nthis is not C++;\n")
    monkeypatch.setattr(jit, "KERNEL_DIR", bad)
    monkeypatch.setenv("EPCOMM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(jit.BuildError, match="error"):
        jit.build(jit.defines_for(specs.test_configs(2)[0]), "sm_90")
