"""CPU-only: every kernel specialisation that the GPU tests, the example and the benchmark use compiles for sm_90.

Needs no GPU and no driver: nvcc (-rdc, then -dlink -cubin against libnvshmem_device.a). The compiler comes from the
system CUDA toolkit if there is one, else from the pip wheels nvidia-cuda-nvcc + nvidia-cuda-cccl; NVSHMEM headers and
the device library from nvidia-nvshmem-cu13. Skips (with the reason) only when no compiler / NVSHMEM is installed.
Cubins land in the epcomm cache ($EPCOMM_CACHE or ~/.cache/epcomm), so a re-run with unchanged sources is quick.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from epcomm.backends.gpu import jit, specs, variants
from epcomm.errors import EPInputError


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


def test_layout_defines_reach_every_specialisation():
    """The host layout (layout.py) hands every derived size to the kernels as a define; the kernels static_assert each
    against their own derivation (kernels/layout.cuh), so test_every_specialisation_compiles_for_sm90 proves that the
    two agree for every spec. Here: every define the kernels check is present and consistent with the Layout."""
    from epcomm.backends.gpu.layout import Layout, params_struct
    checked = set(re.findall(r"EP_AGREES\([^,]+, (EP_\w+)\)", (jit.KERNEL_DIR / "layout.cuh").read_text()))
    assert len(checked) >= 30
    for cfg in specs.all_configs(2):
        d = jit.defines_for(cfg)
        lay = Layout(cfg, any_remote=True)
        assert checked - set(d) <= ({"EP_REGION_BYTES_DRECV"} if lay.ht else set()), checked - set(d)   # #if !EP_HT
        assert d["EP_MSG_BYTES"] == lay.msg_bytes and d["EP_MAX_CHUNKS"] == lay.max_chunks
        assert lay.msg_bytes % 16 == 0 and all(v % 256 == 0 for v in lay.offset.values())
        # every region but those sized by the receive capacity at run time (cstage's rows; ht's receive buffer) is
        # a checked define
        run_time = ("cstage", "drecv") if lay.ht else ("cstage",)
        assert all(lay.region_bytes[n] == d[f"EP_REGION_BYTES_{n.upper()}"] for n in lay.region_bytes
                   if n not in run_time)
        assert not lay.ht or lay.region_bytes["drecv"] == 2 * lay.recv_tokens * lay.msg_bytes
        assert lay.region_bytes["cstage"] == d["EP_CSTAGE_WEIGHT_BYTES"] + (lay.recv_tokens * lay.combine_row_bytes
                                                                           if lay.ht else 0)
        assert d["EP_PARAMS_BYTES"] == ctypes.sizeof(params_struct(cfg.world_size))
    # 24 pointers + timeout + call word + 16 offsets (8 B each), 9 ints (+ 4 B padding), peer[R]
    assert ctypes.sizeof(params_struct(2)) == 8 * 42 + 40 + 8 * 2


def test_a_disagreeing_layout_fails_the_build(tmp_path, monkeypatch):
    """The agreement check can fail: a host message size one vector off is a compile error naming it."""
    _toolchain_or_skip()
    monkeypatch.setenv("EPCOMM_CACHE", str(tmp_path / "cache"))
    d = jit.defines_for(specs.test_configs(2)[0])
    d["EP_MSG_BYTES"] += 16
    with pytest.raises(jit.BuildError, match="EP_MSG_BYTES"):
        jit.build(d, "sm_90")


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


def test_every_specialisation_compiles_under_every_variant():
    """The kernel variants under measurement (variants.py, EPCOMM_VARIANT) are independent #if blocks: every
    specialisation built with all of them on at once (the baseline is the test above), so an A/B device call never
    meets a variant that does not compile (dev/GPU-LOG.md has each one's prediction)."""
    if not variants.VARIANTS:
        pytest.skip("no kernel variant under measurement")
    _toolchain_or_skip()
    names = tuple(sorted(variants.VARIANTS))
    defs = {}
    for c in specs.all_configs(2):
        d = jit.defines_for(c, variant_names=names)
        defs[tuple(sorted(d.items()))] = d
    assert all(d[variants.VARIANTS[n][0]] == 1 for d in defs.values() for n in names)
    jobs = max(1, min(len(defs), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as ex:
        built = list(ex.map(lambda d: jit.build(d, "sm_90"), defs.values()))
    for b in built:
        assert b.cubin.read_bytes()[:4] == b"\x7fELF", b.cubin


@pytest.mark.parametrize("names", [("qonceall",), ("probe",), ("oneshot",), ("oneshot", "probe")], ids="+".join)
def test_each_variant_compiles_alone(names):
    """Each variant alone on an ht spec (both ht receives, the count item, the quantise-once pass) and an ll one: the
    A/B and the stamps runs build them one at a time, which the all-at-once build above does not compile."""
    _toolchain_or_skip()
    assert set(names) <= set(variants.VARIANTS)
    cfgs = [next(c for c in specs.test_configs(2) if c.mode == m) for m in ("ht", "ll")]
    for c in cfgs:
        d = jit.defines_for(c, variant_names=names)
        assert all(d[variants.VARIANTS[n][0]] == 1 for n in names)
        assert jit.build(d, "sm_90").cubin.read_bytes()[:4] == b"\x7fELF"


def test_variant_defines_and_cache_key(monkeypatch):
    """The baseline (unset or empty) adds no define (its cache key and PTX stay what they were); a variant adds its
    define (so the cache keys on it); an unknown name is refused naming the known ones: the settled names too
    (cfast, qfast, qonce, sbase, cmeta, bscan, cload: the code; tma, tgrid, rdyn, nap, lean, sch, qpipe: deleted)."""
    cfg = specs.test_configs(2)[0]
    monkeypatch.delenv(variants.ENV, raising=False)
    base = jit.defines_for(cfg)
    assert not any(k.startswith("EP_V_") for k in base) and variants.label() == "baseline"
    monkeypatch.setenv(variants.ENV, " , ")
    assert variants.active() == () and jit.defines_for(cfg) == base
    for settled in ("cfast", "qfast", "qonce", "sbase", "cmeta", "bscan", "cload", "tma", "tgrid", "rdyn", "nap",
                    "lean", "sch", "qpipe"):
        monkeypatch.setenv(variants.ENV, settled)
        with pytest.raises(EPInputError, match=f"unknown variant.*{settled}"):
            jit.defines_for(cfg)
    # the mechanism, with two stand-in variants
    monkeypatch.setattr(variants, "VARIANTS", {"aa": ("EP_V_AA", "test"), "bb": ("EP_V_BB", "test")})
    monkeypatch.setenv(variants.ENV, "bb, aa")
    assert variants.active() == ("aa", "bb") and variants.label() == "aa+bb"
    d = jit.defines_for(cfg)
    assert d["EP_V_AA"] == 1 and d["EP_V_BB"] == 1
    assert {k: v for k, v in d.items() if not k.startswith("EP_V_")} == base
    assert jit.defines_for(cfg, variant_names=("aa",)) == {**base, "EP_V_AA": 1}
    monkeypatch.setenv(variants.ENV, "aa,nosuch")
    with pytest.raises(EPInputError, match="nosuch.*known: aa, bb"):
        jit.defines_for(cfg)
    with pytest.raises(EPInputError, match="nosuch"):
        variants.defines(("nosuch",))


def test_compile_error_is_reported(tmp_path, monkeypatch):
    """A kernel syntax error (here in an included part) must fail loudly (BuildError with the compiler's message),
    not be skipped; the cache key covers every kernel file."""
    _toolchain_or_skip()
    bad = tmp_path / "kernels"
    bad.mkdir()
    for src in jit.sources():
        (bad / src.name).write_bytes(src.read_bytes())
    (bad / "combine.cuh").write_text((jit.KERNEL_DIR / "combine.cuh").read_text() + "\nthis is not C++;\n")
    monkeypatch.setattr(jit, "KERNEL_DIR", bad)
    monkeypatch.setenv("EPCOMM_CACHE", str(tmp_path / "cache"))
    assert {p.name for p in jit.sources()} >= {"ep.cu", "layout.cuh", "common.cuh", "dispatch.cuh", "combine.cuh"}
    with pytest.raises(jit.BuildError, match="error"):
        jit.build(jit.defines_for(specs.test_configs(2)[0]), "sm_90")
