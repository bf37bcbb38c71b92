"""EPBuffer issues every backend send / receive pair in issue order, whatever order the user waits in (fake backend:
the calls it sees are recorded)."""
from __future__ import annotations

import types
import weakref

import numpy as np
import pytest

import epcomm.backends
from epcomm import EPBuffer, EPConfig, EPInputError
from epcomm.formats import BF16
from epcomm.results import DispatchResult


class RecordingBackend:
    """Dispatch / combine that only record the order of calls; results name the send they belong to."""
    broken = None
    sms_used = None

    def __init__(self):
        self.calls: list[str] = []
        self.sent = 0

    def _result(self, tag):
        return DispatchResult(expert_x=tag, expert_scales=None, row_offsets=None, expert_ids=None, src_info=None,
                              tokens_per_expert=None, handle=tag)

    def dispatch(self, x, ids):
        self.sent += 1
        self.calls.append(f"dispatch {self.sent}")
        return self._result(f"d{self.sent}")

    def dispatch_async(self, x, ids):
        self.sent += 1
        self.calls.append(f"send {self.sent}")
        return f"d{self.sent}"

    def dispatch_wait(self, inner):
        self.calls.append(f"recv {inner}")
        return self._result(inner)

    def combine(self, ey, handle, w):
        self.calls.append(f"combine {handle}")
        return f"y of {handle}"

    def combine_async(self, ey, handle, w):
        self.calls.append(f"csend {handle}")
        return handle

    def combine_wait(self, inner):
        self.calls.append(f"crecv {inner}")
        return f"y of {inner}"

    def synchronize(self):
        pass

    def raise_pending(self):
        pass

    def abort(self, reason):
        pass

    def close(self):
        pass


@pytest.fixture
def buf(monkeypatch):
    be = RecordingBackend()
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: be)
    ctx = types.SimpleNamespace(world_size=2, backend="host", _buffers=weakref.WeakSet())
    cfg = EPConfig(hidden=128, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2, timeout_s=1.0)
    b = EPBuffer(cfg, ctx)
    b.be = be
    return b


def x_ids():
    return np.zeros((2, 128), BF16), np.zeros((2, 2), np.int32)


def ey_w(b):
    return np.zeros((b.cfg.max_recv_rows, 128), BF16), np.zeros((2, 2), np.float32)


def test_a_new_operation_completes_the_outstanding_one_first(buf):
    p = buf.dispatch_async(*x_ids())
    r2 = buf.dispatch(*x_ids())                   # the receive of round 0 runs before round 1 is sent
    assert buf.be.calls == ["send 1", "recv d1", "dispatch 2"]
    r1 = buf.dispatch_wait(p)                     # kept result: no second receive
    assert r1.expert_x == "d1" and r2.expert_x == "d2" and buf.be.calls[-1] == "dispatch 2"
    with pytest.raises(EPInputError, match="already waited"):
        buf.dispatch_wait(p)


def test_waits_in_reverse_order_still_receive_in_issue_order(buf):
    p1 = buf.dispatch_async(*x_ids())
    p2 = buf.dispatch_async(*x_ids())             # completes p1 first
    r2 = buf.dispatch_wait(p2)
    r1 = buf.dispatch_wait(p1)
    assert buf.be.calls == ["send 1", "recv d1", "send 2", "recv d2"]
    assert (r1.expert_x, r2.expert_x) == ("d1", "d2")


def test_combine_async_left_outstanding_is_completed_by_the_next_dispatch(buf):
    r = buf.dispatch(*x_ids())
    ey, w = ey_w(buf)
    q = buf.combine_async(ey, r.handle, w)
    buf.dispatch(*x_ids())
    assert buf.be.calls == ["dispatch 1", "csend d1", "crecv d1", "dispatch 2"]
    assert buf.combine_wait(q) == "y of d1" and buf.be.calls[-1] == "dispatch 2"


def test_synchronize_and_close_run_the_outstanding_receives(buf):
    """EPBuffer, not the backend, completes what is outstanding (the host backend once did it itself)."""
    p = buf.dispatch_async(*x_ids())
    buf.synchronize()
    assert buf.be.calls == ["send 1", "recv d1"]
    assert buf.dispatch_wait(p).expert_x == "d1" and buf.be.calls == ["send 1", "recv d1"]
    buf.dispatch_async(*x_ids())
    buf.close()
    assert buf.be.calls[-2:] == ["send 2", "recv d2"]


def test_a_round_over_capacity_leaves_the_buffer_usable(buf):
    """EPCapacityError is the round's own error: no abort, no failed state, the round is used up, and an outstanding
    round over capacity raises at its own wait, not in the operation that completed it."""
    from epcomm import EPCapacityError
    over = EPCapacityError("over", rank=1, needed=9, capacity=8)
    aborted = []
    buf.be.abort = aborted.append
    real_wait, real_dispatch = buf.be.dispatch_wait, buf.be.dispatch

    def dispatch(x, ids):
        buf.be.dispatch = real_dispatch
        raise over
    buf.be.dispatch = dispatch
    with pytest.raises(EPCapacityError):
        buf.dispatch(*x_ids())
    assert buf.round == 1 and not aborted
    r = buf.dispatch(*x_ids())                        # the next round works, with the next round number
    assert r.handle.round == 1 and buf.round == 2
    buf.release(r.handle)                             # not combined here: round 3 may reuse its set

    def wait(inner):
        buf.be.dispatch_wait = real_wait
        raise over
    buf.be.dispatch_wait = wait
    p = buf.dispatch_async(*x_ids())
    r2 = buf.dispatch(*x_ids())                       # completes p (over capacity) without raising here
    assert r2.expert_x == "d3"
    with pytest.raises(EPCapacityError):
        buf.dispatch_wait(p)
    assert not aborted and buf.round == 4
    # the void round p never counts as a live dispatch (no handle came of it), though the caller still holds p:
    # round 4, which reuses p's set, is admitted while r2 (round 3) is live
    r4 = buf.dispatch(*x_ids())
    assert r4.handle.round == 4 and p is not None and r2.handle.round == 3
