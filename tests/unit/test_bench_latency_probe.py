"""The latency probe's kernels (epcomm/bench/latency.cu) compile for sm_90 with NVSHMEM's device library, like the
EP kernels (tests/unit/test_kernels_compile.py); running them needs GPUs (the bench's latency case)."""
import pytest

from epcomm.bench import latency


def _toolchain():
    from epcomm.backends.gpu import jit
    try:
        jit.find_nvcc()
        jit.nvshmem_home()
    except jit.BuildError as e:
        pytest.skip(str(e))


def test_probe_builds_with_both_kernels_and_is_cached(tmp_path, monkeypatch):
    _toolchain()
    monkeypatch.setenv("EPCOMM_CACHE", str(tmp_path))
    cubin = latency.build()
    data = cubin.read_bytes()
    assert cubin.parent == tmp_path and cubin.name.startswith("probe-sm_90-")
    for name in latency.KERNELS:
        assert name.encode() in data
    assert b"nvshmemi_device_state_d" in data or b"nvshmem" in data   # linked with NVSHMEM's device library
    mtime = cubin.stat().st_mtime_ns
    assert latency.build() == cubin and cubin.stat().st_mtime_ns == mtime   # cached: not rebuilt


def test_probe_build_error_is_named(tmp_path, monkeypatch):
    _toolchain()
    monkeypatch.setenv("EPCOMM_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not CUDA\n")
    monkeypatch.setattr(latency, "SOURCE", bad)
    with pytest.raises(latency.ProbeError, match="latency probe build failed"):
        latency.build()


def test_kernel_args_keep_their_values_alive():
    import ctypes
    args = latency._args(ctypes.c_uint64(7), ctypes.c_int(3))
    assert len(args) == 2 and ctypes.c_uint64.from_address(args[0]).value == 7
