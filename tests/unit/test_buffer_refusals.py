"""EPBuffer's refused calls with a recording fake backend (no MPI): what is sent for a refusal, and that a peer's
refusal (EPPeerRejectedError) leaves the buffer usable. The real protocol under mpirun: tests/mpi/test_refusals.py."""
from __future__ import annotations

import types
import weakref

import numpy as np
import pytest

import epcomm.backends
from epcomm import EPBuffer, EPConfig, EPInputError, EPPeerRejectedError
from epcomm.formats import BF16
from tests.fakes import QuietBackend

CFG = EPConfig(hidden=128, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2, timeout_s=1.0)


class Recorder(QuietBackend):
    """Records the calls EPBuffer makes; can take part in a round with nothing (dispatch_rejected)."""
    broken = None
    sms_used = None

    def __init__(self, refusing_peer: bool = False):
        self.calls: list[str] = []
        self.refusing_peer = refusing_peer   # combine_wait raises as if the peer had refused

    def dispatch(self, x, ids):
        return self.dispatch_wait(self.dispatch_async(x, ids))

    def dispatch_async(self, x, ids):
        self.calls.append(f"dispatch_async T={len(x)}")
        return "pending"

    def dispatch_rejected(self):
        self.calls.append("dispatch_rejected")
        return "pending"

    def dispatch_wait(self, p):
        self.calls.append("dispatch_wait")
        return types.SimpleNamespace(handle=object(), rejected_ranks=())

    def combine(self, ey, h, w):
        return self.combine_wait(self.combine_async(ey, h, w))

    def combine_async(self, ey, h, w):
        self.calls.append("combine_async")
        return "pending"

    def combine_wait(self, p):
        self.calls.append("combine_wait")
        if self.refusing_peer:
            raise EPPeerRejectedError("rank 1 (node 0) refused its combine input", rank=1, node=0, round=0,
                                      what="combine")
        return np.zeros((2, 128), BF16)

    def combine_rejected(self, r):
        self.calls.append(f"combine_rejected {r}")

    def close(self):
        self.calls.append("close")


def make(monkeypatch, be) -> EPBuffer:
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: be)
    return EPBuffer(CFG, types.SimpleNamespace(world_size=2, backend="host", _buffers=weakref.WeakSet()))


def good():
    return np.zeros((2, 128), BF16), np.zeros((2, 2), np.int32)


def combine_args(out):
    return np.zeros((CFG.max_recv_rows, 128), BF16), out.handle, np.zeros((2, 2), np.float32)


def test_refused_dispatch_takes_part_empty_with_its_combine(monkeypatch):
    be = Recorder()
    buf = make(monkeypatch, be)
    x, ids = good()
    with pytest.raises(EPInputError, match="int32"):
        buf.dispatch(x, ids.astype(np.int16))
    # the round's receive runs as usual; its combine goes out at once (this rank's experts will not run)
    assert be.calls == ["dispatch_rejected", "dispatch_wait", "combine_rejected 0"] and buf.round == 1
    with pytest.raises(EPInputError, match="handle must be"):   # no handle of round 0 exists; nothing more is sent
        buf.combine(np.zeros((CFG.max_recv_rows, 128), BF16), None, np.zeros((2, 2), np.float32))
    buf.dispatch(x, ids)
    assert be.calls[3:] == ["dispatch_async T=2", "dispatch_wait"] and "abort" not in be.calls


def test_refused_combine_is_sent_empty_at_once_and_only_once(monkeypatch):
    be = Recorder()
    buf = make(monkeypatch, be)
    out = buf.dispatch(*good())
    ey, h, w = combine_args(out)
    with pytest.raises(EPInputError, match="float32"):
        buf.combine(ey, h, w.astype(np.float64))
    assert be.calls[-1] == "combine_rejected 0"
    with pytest.raises(EPInputError, match="already combined"):   # nobody waits for this one: nothing sent
        buf.combine(ey, h, w)
    assert be.calls.count("combine_rejected 0") == 1 and "abort" not in be.calls


def test_a_bad_handle_refuses_the_latest_round_unless_it_was_combined(monkeypatch):
    be = Recorder()
    buf = make(monkeypatch, be)
    old = buf.dispatch(*good())
    new = buf.dispatch(*good())
    buf.combine(*combine_args(old))            # two micro-batches: the older dispatch combines first
    with pytest.raises(EPInputError, match="already combined"):
        buf.combine(*combine_args(old))
    assert be.calls[-1] == "combine_rejected 1"
    del new


def test_wait_misuse_is_refused_without_a_word_to_anyone(monkeypatch):
    be = Recorder()
    buf = make(monkeypatch, be)
    p = buf.dispatch_async(*good())
    buf.dispatch_wait(p)
    n = len(be.calls)
    with pytest.raises(EPInputError, match="already waited"):
        buf.dispatch_wait(p)
    assert len(be.calls) == n
    buf.dispatch(*good())                         # still usable


def test_a_peer_refusal_leaves_the_buffer_usable(monkeypatch):
    be = Recorder(refusing_peer=True)
    buf = make(monkeypatch, be)
    out = buf.dispatch(*good())
    with pytest.raises(EPPeerRejectedError):
        buf.combine(*combine_args(out))
    out = buf.dispatch(*good())                   # the next round works; nothing aborted
    p = buf.combine_async(*combine_args(out))
    buf.dispatch(*good())                         # runs that combine's receive: its error is kept for its wait
    with pytest.raises(EPPeerRejectedError):
        buf.combine_wait(p)
    assert "abort" not in be.calls


def test_a_backend_that_cannot_take_part_empty_still_aborts(monkeypatch):
    class GpuLike(Recorder):   # no "rejected" mark in its protocol (the GPU backend today)
        dispatch_rejected = None

    be = GpuLike()
    buf = make(monkeypatch, be)
    with pytest.raises(EPInputError):
        buf.dispatch(np.zeros((2, 256), BF16), good()[1])
    assert be.calls == ["abort"]
    with pytest.raises(epcomm.EPError, match="unusable"):
        buf.dispatch(*good())


def test_a_backends_own_input_check_is_refused_like_the_front_ends(monkeypatch):
    """The GPU backend checks device, contiguity and alignment itself, before it sends anything (backends/base.py):
    such an EPInputError is refused like a front-end one, the buffer stays usable."""
    class Picky(Recorder):
        def dispatch_async(self, x, ids):
            if len(x) == 3:
                raise EPInputError("gpu backend: tensor must be contiguous")
            return super().dispatch_async(x, ids)

        def combine_async(self, ey, h, w):
            if w.shape[0] == 0:
                raise EPInputError("gpu backend: out must start at a 16-byte aligned address")
            return super().combine_async(ey, h, w)

    be = Picky()
    buf = make(monkeypatch, be)
    with pytest.raises(EPInputError, match="contiguous"):
        buf.dispatch(np.zeros((3, 128), BF16), np.zeros((3, 2), np.int32))
    assert be.calls == ["dispatch_rejected", "dispatch_wait", "combine_rejected 0"] and buf.round == 1
    out = buf.dispatch(np.zeros((0, 128), BF16), np.zeros((0, 2), np.int32))
    with pytest.raises(EPInputError, match="aligned"):
        buf.combine(np.zeros((CFG.max_recv_rows, 128), BF16), out.handle, np.zeros((0, 2), np.float32))
    assert be.calls[-1] == "combine_rejected 1" and "abort" not in be.calls
    buf.dispatch(*good())                         # still usable


def test_a_refused_combine_of_a_captured_result_fails_the_buffer(monkeypatch):
    """Refusals take part empty on the eager side only (the GPU backend's launches inside a capture would be
    replayed): a refused combine of a handle captured in a CUDA graph fails the buffer and tells the peers, and never
    sends an eager round's combine in its place (captured and eager rounds are numbered apart)."""
    from epcomm.buffer import Handle

    be = Recorder()
    buf = make(monkeypatch, be)
    buf.dispatch(*good())                                      # eager round 0 is live: a captured round 0 is not it
    captured = Handle(buf._serial, 0, 2, object(), captured=True)
    with pytest.raises(EPInputError, match="captured in a CUDA graph"):
        buf.combine(np.zeros((CFG.max_recv_rows, 128), BF16), captured, np.zeros((2, 2), np.float64))
    assert be.calls[-1] == "abort" and not any(c.startswith("combine_rejected") for c in be.calls)
    with pytest.raises(epcomm.EPError, match="unusable"):
        buf.dispatch(*good())
