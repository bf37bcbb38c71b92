"""CPU-only: the GPU backend's side of fencing off a dead rank (issue 15 item 4; the kernels' part runs in
tests/gpu/fence_live.py and tests/gpu/fence_one_rank.py on a GPU). With fencing, every dispatch launch is preceded by
the one-block mask snapshot on the same stream and then reads the set's masked ids; DispatchResult.dropped and
.masked_ranks come from the output set; fence() writes the death notices; close() is local once a rank is fenced
off. Without fencing nothing of it happens."""
from __future__ import annotations

import itertools
import re
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from epcomm.backends.gpu import backend as gpu_backend
from epcomm.backends.gpu import jit
from epcomm.backends.gpu.backend import GpuBackend
from epcomm.backends.gpu.layout import (ST_REJECTED, Layout, device_arrays, kernel_defines, params_struct, st_masked,
                                        status_ints)
from epcomm.config import EPConfig

CFG = EPConfig(hidden=256, topk=2, num_experts=8, max_tokens_per_rank=16, world_size=4, mode="ll")
M, K, R = CFG.max_tokens_per_rank, CFG.topk, CFG.world_size


class _Array:
    """A device array's stand-in: a numpy array with a fake device address."""
    _next = itertools.count(0x1000, 0x1000)

    def __init__(self, a):
        self.a, self.ptr = a, next(self._next)
        self.shape = getattr(a, "shape", ())

    def __getitem__(self, i):
        return self.a[i]

    def cpu(self):
        return SimpleNamespace(tolist=lambda: self.a.tolist())


def backend(monkeypatch, fencing: bool) -> tuple[GpuBackend, list]:
    be = object.__new__(GpuBackend)
    be.cfg, be.me, be.ctx, be._closed = CFG, 1, SimpleNamespace(device=0), False
    be.err = SimpleNamespace(read=lambda: None)
    be.sets = []
    for _ in range(2):
        status = np.zeros(status_ints(R), np.int32)
        status[st_masked(R) + 3] = 1            # what a snapshot that saw a notice for rank 3 wrote
        be.sets.append({n: _Array(v) for n, v in (
            ("ex", np.zeros((4, 256))), ("row_offsets", np.zeros(3)), ("expert_ids", np.zeros(2)),
            ("src_info", np.zeros((4, 3))), ("tpe", np.zeros(2)), ("hids", np.zeros(M * K, np.int32)),
            ("hdropped", np.zeros((M, K), bool)), ("hstatus", status))})
    be._rejected_flags = [s["hstatus"].a[ST_REJECTED:ST_REJECTED + R] for s in be.sets]
    be._masked_flags = [_Array(s["hstatus"].a[st_masked(R):st_masked(R) + R]) for s in be.sets]
    be._dispatches, be._call_ids, be._eager_calls = [0, 0], itertools.count(1), [0, 0]
    be.fencing = fencing
    be.alloc = SimpleNamespace(ptr=lambda a: a.ptr, view=lambda a, kind: a, torch=None)
    be._base_params = lambda hp, T: SimpleNamespace(set=hp, T=T, ids=0, x=0, call=0, rejected=0)
    launches = []
    be._launch = lambda name, p, st, blocks=None, threads=None: launches.append((name, p.ids, st, blocks))
    for name, fake in (("array_kind", lambda a: "torch"), ("is_capturing", lambda kind: False),
                       ("describe", lambda a: None), ("device_pointer", lambda a, kind, dev: a.ptr),
                       ("aligned", lambda ptr, what: ptr), ("current_stream", lambda kind, dev: 77)):
        monkeypatch.setattr(gpu_backend, name, fake)
    return be, launches


def test_a_fencing_dispatch_is_the_snapshot_then_the_dispatch_on_the_masked_ids(monkeypatch):
    be, launches = backend(monkeypatch, fencing=True)
    x, ids = _Array(np.zeros((5, 256))), _Array(np.zeros((5, K), np.int32))
    res = be.dispatch(x, ids)
    hids = be.sets[0]["hids"].ptr
    # one block first, on the caller's stream (graph-safe, no sync), reading the caller's ids; then the dispatch
    assert launches == [("ep_fence_snapshot", ids.ptr, 77, 1), ("ep_dispatch", hids, 77, None)]
    assert res.dropped.shape == (5, K)            # the set's [M, K] slots, cut to T
    assert tuple(res.masked_ranks) == (3,)        # read from the set's status words when used
    launches.clear()
    pending = be.dispatch_async(x, ids)           # the next set: its own snapshot, its own ids
    assert launches == [("ep_fence_snapshot", ids.ptr, 77, 1), ("ep_dispatch_send", be.sets[1]["hids"].ptr, 77, None)]
    assert pending.params.ids == be.sets[1]["hids"].ptr   # the receive reads the same masked ids


def test_a_refused_dispatch_takes_its_snapshot_too(monkeypatch):
    """Its round's receive and combine read the mask of its set like any other."""
    be, launches = backend(monkeypatch, fencing=True)
    be.dispatch_rejected()
    assert [(n, b) for n, _, _, b in launches] == [("ep_fence_snapshot", 1), ("ep_dispatch_send", None)]


def test_without_fencing_nothing_changes(monkeypatch):
    be, launches = backend(monkeypatch, fencing=False)
    x, ids = _Array(np.zeros((5, 256))), _Array(np.zeros((5, K), np.int32))
    res = be.dispatch(x, ids)
    assert launches == [("ep_dispatch", ids.ptr, 77, None)]
    assert res.dropped is None and res.masked_ranks == ()
    be.dispatch_rejected()
    assert [n for n, *_ in launches] == ["ep_dispatch", "ep_dispatch_send"]
    assert be.masked_ranks == () and not be._fenced()


def test_fence_writes_the_notices_and_masked_ranks_follow_them(monkeypatch):
    be, _ = backend(monkeypatch, fencing=True)
    be._declared = set()
    declared, notices = [], {}
    be.declare_dead = lambda ranks: declared.append(list(ranks)) or True
    be.read_dead_words = lambda: dict(notices)
    assert be.masked_ranks == () and not be._fenced()
    notices[2] = 0                                 # rank 0 declared rank 2 dead: its notice in this rank's region
    assert be.masked_ranks == (2,) and be._fenced()
    be.fence([3, 1, 3])                            # this rank itself is never declared
    assert declared == [[3]] and be.masked_ranks == (2, 3)
    be.read_dead_words = lambda: None              # the notices cannot be read: what this rank declared
    assert be.masked_ranks == (3,) and be._fenced()


def test_close_is_local_once_a_rank_is_fenced_off(monkeypatch):
    """A collective would include the dead rank: the symmetric memory goes with the process."""
    for notices, declared, collective in (({}, set(), True), ({3: 0}, set(), False), ({}, {2}, False),
                                          (None, set(), False)):
        be, _ = backend(monkeypatch, fencing=True)
        be._declared, be.broken = declared, None
        be.read_dead_words = lambda n=notices: n
        calls = []
        be.rt = SimpleNamespace(barrier=lambda: calls.append("barrier"), free=lambda b: calls.append("free"))
        be._sym_buf, be._join_events = object(), {}
        be.kernels = SimpleNamespace(close=lambda: None)
        be.err = SimpleNamespace(close=lambda: None)
        driver = types.SimpleNamespace(cuCtxSynchronize=lambda: None)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        bindings.driver, cuda.bindings = driver, bindings
        for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.driver", driver)):
            monkeypatch.setitem(sys.modules, name, mod)   # no CUDA here
        be.close()
        assert calls == (["barrier", "free"] if collective else []), (notices, declared)


def test_enable_fencing_reaches_the_kernels_parameters():
    """Params.fence (the kernels' runtime flag) is 1 in every launch's parameters once fencing is on."""
    be = object.__new__(GpuBackend)
    be.cfg, be.me = CFG, 0
    be.layout = Layout(CFG)
    be.Params = params_struct(R)
    be.sets = [{"hids": _Array(None), "hdropped": _Array(None)}]
    be.alloc = SimpleNamespace(ptr=lambda a: a.ptr)
    be.state = be.hist_acc = be.dbase = be.fdec = _Array(None)
    be.sym, be.err, be.peers = 0x100000, SimpleNamespace(dev=0x2000), [0] * R
    be.grid, be._send_waves, be._crecv_blocks, be._tmpl, be.variants = 4, 1, 0, {}, ()
    assert be._base_params(0, 3).fence == 0
    be.enable_fencing()
    p = be._base_params(0, 3)
    assert p.fence == 1 and p.hdropped == be.sets[0]["hdropped"].ptr and p.fdec == be.fdec.ptr and p.T == 3


def test_the_front_end_can_fence_on_the_gpu_backend():
    assert all(callable(getattr(GpuBackend, m, None)) for m in ("enable_fencing", "fence", "declare_dead"))
    assert isinstance(GpuBackend.masked_ranks, property)


def test_the_mask_lives_in_the_output_sets_status_words():
    """One mask per round, kept with the round's outputs (its combine reads what its dispatch masked)."""
    status = next(a for a in device_arrays(CFG) if a.name == "status")
    dropped = next(a for a in device_arrays(CFG) if a.name == "dropped")
    assert status.shape == (ST_REJECTED + 2 * R,) and status.copies == "dispatch"
    assert dropped.shape == (M, K) and dropped.dtype == "bool" and dropped.copies == "dispatch"
    d = kernel_defines(CFG)
    assert d["EP_ST_MASKED"] == st_masked(R) == ST_REJECTED + R and d["EP_STATUS_INTS"] == status_ints(R)
    assert "ep_fence_snapshot" in jit.Kernels.NAMES


def test_no_kernel_reads_the_death_notices_but_through_fence_cuh():
    """Blocks of one kernel must not disagree on who is masked: the `dead` words are read (and written) only in
    kernels/fence.cuh; every other kernel asks fenced_off (the round's snapshot)."""
    users = {p.name for p in jit.sources() if re.search(r"\bp\.off_dead\b", p.read_text())}
    assert users == {"fence.cuh"}


def test_a_notice_naming_this_rank_is_raised_as_fenced():
    """The snapshot found dead[me] set (a peer declared this rank dead; kernels/fence.cuh: it then takes part with
    nobody) and recorded ERR_FENCED: the next call raises EPFencedError naming who declared it."""
    from epcomm.backends.gpu.layout import ErrorCode, Phase
    from epcomm.errors import EPFencedError
    be = object.__new__(GpuBackend)
    be.cfg, be.me, be.node_of = CFG, 3, (lambda r: r // 2)
    be.ctx = SimpleNamespace(describe=lambda r: f"rank {r} (node {r // 2})")
    rec = dict(flag=1, code=ErrorCode.FENCED, peer=0, what=0, waiter=3, round=4, phase=Phase.DISPATCH, pad=0)
    be.err = SimpleNamespace(read=lambda: rec)
    with pytest.raises(EPFencedError, match=r"rank 3 \(node 1\) was fenced off by rank 0 \(node 0\)") as e:
        be._raise_recorded()
    assert (e.value.rank, e.value.by) == (3, 0)


def test_every_launch_carries_the_verdict_words():
    """Params.fdec: the round's verdict on each source per phase (fence.cuh fence_decide), one array of the buffer."""
    words = next(a for a in device_arrays(CFG) if a.name == "fence_decisions")
    assert words.param == "fdec" and words.shape == (3 * R,) and words.dtype == "i64" and words.zeroed
    assert words.copies == "one"
    assert "fdec" in dict(params_struct(R)._fields_)


def test_every_wait_on_a_peer_has_the_fencing_path():
    """A wait on peers without the fencing path would end a round with a dead rank in EPTimeoutError (the buffer
    dead) instead of fencing it off: every block_wait passes its lost[] with fencing and settles the round's verdict
    (fence_settle) right after; every chunk-flag wait either finds a dead peer (&lost) or follows a verdict that
    already waited for all of that source's chunks (ht dispatch: fence_wait_chunks)."""
    text = {p.name: p.read_text() for p in jit.sources()}
    waits = [(n, m) for n, t in text.items() if n != "common.cuh"
             for m in re.finditer(r"block_wait\(p, (?:[^()]|\([^()]*\))*\)", t)]
    assert len(waits) == 3
    for name, m in waits:
        assert m.group(0).endswith("p.fence ? s_lost : nullptr)"), (name, m.group(0))
        assert "fence_settle(p, " in text[name][m.end():m.end() + 200], (name, m.group(0))
    flag_waits = [(n, m.group(0)) for n, t in text.items() if n != "common.cuh"
                  for m in re.finditer(r"thread_wait\(p, (?:[^()]|\([^()]*\))*\)", t)]
    assert sorted(n for n, w in flag_waits if not w.endswith(", &dead)") and not w.endswith(", &gone)")) == \
        ["dispatch.cuh"]   # the ht dispatch expansion: after fence_wait_chunks
