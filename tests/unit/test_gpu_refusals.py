"""CPU-only: the GPU backend's side of a refused call (issue 15 item 1; the kernels' part runs in
tests/gpu/refusals.py on a GPU). A refusing rank launches its round empty and marked; a peer's combine that missed
a refusing rank's rows is raised as EPPeerRejectedError from the refusal record, once, by check / synchronize only;
DispatchResult.rejected_ranks is read from the output set's status words when (and only when) it is used."""
from __future__ import annotations

import ctypes
import itertools
from types import SimpleNamespace

import pytest

from epcomm.backends.gpu import backend as gpu_backend
from epcomm.backends.gpu.backend import GpuBackend, RejectedRanks
from epcomm.backends.gpu.layout import (RECORD_WORDS, REFUSAL_RECORD_WORD, REFUSED_COMBINE, REFUSED_DISPATCH,
                                        REFUSED_LOST, ST_REJECTED, call_word, device_arrays, params_struct)
from epcomm.backends.gpu.runtime import HostErrorRecord
from epcomm.config import EPConfig
from epcomm.errors import EPError, EPPeerRejectedError, EPRankLostError

CFG = EPConfig(hidden=256, topk=2, num_experts=8, max_tokens_per_rank=16, world_size=4, mode="ht")


def record_block() -> HostErrorRecord:
    rec = object.__new__(HostErrorRecord)   # no CUDA: plain memory in place of the host-mapped block
    rec.words = (ctypes.c_int32 * RECORD_WORDS)()
    rec.refusals_seen = 0
    return rec


def backend(err=None) -> GpuBackend:
    be = object.__new__(GpuBackend)
    be.cfg, be.me = CFG, 0
    be.node_of = lambda r: r // 2
    be.ctx = SimpleNamespace(device=0, describe=lambda r: f"rank {r} (node {r // 2})")
    be.err = err or record_block()
    be._closed = False
    return be


def refusal(rec: HostErrorRecord, rnd, rank, what, tokens, combines=1):
    """What the kernel writes for `combines` more combines with a refusal: the latest one's fields, then the count."""
    w = REFUSAL_RECORD_WORD
    for i, v in enumerate((rnd, rank, what, tokens)):
        rec.words[w + 1 + i] = v
    rec.words[w] += combines


@pytest.mark.parametrize("what,why", [(REFUSED_DISPATCH, "refused its dispatch input, so its experts did not run"),
                                      (REFUSED_COMBINE, "refused its combine input")])
def test_a_peer_refusal_is_raised_once_by_check_never_by_a_launch(what, why):
    be = backend()
    refusal(be.err, rnd=6, rank=3, what=what, tokens=5, combines=2)
    be._check_open()                      # what launching calls check: failures only (ranks keep issuing the same)
    with pytest.raises(EPPeerRejectedError, match=rf"rank 3 \(node 1\) {why} in round 5: 5 token\(s\) of this rank "
                                                  rf"went to its experts \(experts 6..7\)") as e:
        be.raise_pending()
    assert (e.value.rank, e.value.node, e.value.round) == (3, 1, 5)
    assert e.value.what == ("dispatch" if what == REFUSED_DISPATCH else "combine")
    assert "1 earlier combine(s)" in str(e.value) and "\n" not in str(e.value)
    be.raise_pending()                    # raised once: the buffer is usable
    be._check_open()
    refusal(be.err, rnd=7, rank=1, what=what, tokens=1)   # the next combine with a refusal: raised again
    with pytest.raises(EPPeerRejectedError, match="in round 6: 1 token") as e:
        be.raise_pending()
    assert "earlier" not in str(e.value)


def test_the_record_is_raised_when_its_count_moves_and_the_host_never_writes_it():
    be = backend()
    refusal(be.err, rnd=4, rank=2, what=REFUSED_COMBINE, tokens=3, combines=0)   # fields, count not moved: nothing
    be.raise_pending()
    refusal(be.err, rnd=4, rank=2, what=REFUSED_COMBINE, tokens=3)
    before = list(be.err.words)
    assert be.err.read_refusal() == dict(count=1, round=4, rank=2, what=REFUSED_COMBINE, tokens=3, more=0)
    assert be.err.read_refusal() is None and list(be.err.words) == before


class _Flags:
    """A device array's stand-in: counts the device-to-host reads."""

    def __init__(self, vals):
        self.vals, self.reads = vals, 0

    def cpu(self):
        self.reads += 1
        return SimpleNamespace(tolist=lambda: list(self.vals))


def test_rejected_ranks_are_read_when_used_and_once():
    flags = _Flags([0, 1, 0, 1])
    ranks = RejectedRanks(flags)
    assert flags.reads == 0               # making the result reads nothing (no sync on the hot path)
    assert tuple(ranks) == (1, 3) and ranks == (1, 3) and ranks == [1, 3] and 3 in ranks and len(ranks) == 2
    assert repr(ranks) == "(1, 3)" and flags.reads == 1
    assert RejectedRanks(_Flags([0, 0, 0, 0])) == () and not RejectedRanks(_Flags([0, 0]))


class _Launches:
    def __init__(self, be, monkeypatch, eager_dispatches, capturing=False):
        self.calls = []
        be._dispatches, be._combines = [eager_dispatches, 7], [0, 0]   # captured calls are counted apart
        be._call_ids = itertools.count(100)
        be._eager_calls = [call_word(11, 0, True), call_word(12, 1, True)]
        be._base_params = lambda hp, T: SimpleNamespace(set=hp, T=T, rejected=0, call=0)
        be._launch = lambda name, p, st: self.calls.append((name, p.set, p.T, p.rejected, p.call))
        be.alloc = SimpleNamespace(torch=None)
        monkeypatch.setattr(gpu_backend, "current_stream", lambda kind, dev: 0)
        monkeypatch.setattr(gpu_backend, "is_capturing", lambda kind: capturing)


def test_a_refused_dispatch_is_one_empty_marked_launch_on_the_next_set(monkeypatch):
    """An eager dispatch to the device (kernels/results.cuh): a fresh call word on the next eager output set, kept
    for that round's refused combine."""
    be = backend()
    rec = _Launches(be, monkeypatch, eager_dispatches=3)
    p = be.dispatch_rejected()
    word = call_word(100, 1, eager=True)
    assert rec.calls == [("ep_dispatch_send", 1, 0, 1, word)] and be._dispatches == [4, 7]
    assert be._eager_calls[1] == word
    assert (p.op, p.hp, p.num_tokens) == ("dispatch", 1, 0)   # its dispatch_wait runs the receive as usual


def test_a_refused_combine_is_one_marked_launch_on_its_rounds_set(monkeypatch):
    """It carries the call word of its round's dispatch (the device admits it as that result's combine) and takes
    no y buffer."""
    be = backend()
    rec = _Launches(be, monkeypatch, eager_dispatches=5)
    be.combine_rejected(4)
    be.combine_rejected(3)
    assert rec.calls == [("ep_combine", 0, 0, 1, call_word(11, 0, True)),
                         ("ep_combine", 1, 0, 1, call_word(12, 1, True))]
    assert be._combines == [0, 0]
    with pytest.raises(EPError, match="only the latest 2 dispatch rounds"):
        be.combine_rejected(2)            # its output set holds round 4 now


def test_a_refusal_inside_a_graph_capture_cannot_take_part(monkeypatch):
    """Its empty round would be captured and replayed: the backend says so (EPBuffer then fails the buffer)."""
    be = backend()
    rec = _Launches(be, monkeypatch, eager_dispatches=2, capturing=True)
    with pytest.raises(EPError, match="inside a CUDA-graph capture"):
        be.dispatch_rejected()
    with pytest.raises(EPError, match="inside a CUDA-graph capture"):
        be.combine_rejected(1)
    assert rec.calls == [] and be._dispatches == [2, 7]


def test_the_front_end_lets_the_gpu_backend_take_part_empty():
    """EPBuffer refuses a call without failing the buffer where the backend has both methods (buffer.py)."""
    assert all(callable(getattr(GpuBackend, m, None)) for m in ("dispatch_rejected", "combine_rejected"))


def test_status_words_and_params_carry_the_mark():
    status = next(a for a in device_arrays(CFG) if a.name == "status")
    assert status.shape == (ST_REJECTED + 2 * CFG.world_size,) and status.copies == "dispatch"   # (+ the mask)
    assert "rejected" in dict(params_struct(4)._fields_)


def test_a_lost_round_in_the_refusal_record_is_raised_once_as_rank_lost():
    """Fencing groundwork (issue 15 item 4): the refusal record with what = REFUSED_LOST (a peer declared dead
    during the round; no kernel writes it yet) is raised as EPRankLostError, with the host backend's message, once,
    by check / synchronize, never by a launching call; the buffer stays usable."""
    be = backend()
    refusal(be.err, rnd=3, rank=3, what=REFUSED_LOST, tokens=4)
    be._check_open()
    with pytest.raises(EPRankLostError, match=r"rank 0 \(node 0\): rank 3 \(node 1\) was lost \(declared dead and "
                                              r"fenced off\) in round 2: 4 token\(s\) of this rank went to its "
                                              r"experts \(experts 6..7\)") as e:
        be.raise_pending()
    assert (e.value.rank, e.value.node, e.value.experts, e.value.round, e.value.tokens) == (3, 1, range(6, 8), 2, 4)
    be.raise_pending()
    assert not be._closed
