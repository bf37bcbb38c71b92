"""EPBuffer's failure handling with a fake backend: which errors abort the peers, and close() after a failure."""
from __future__ import annotations

import types
import weakref

import numpy as np
import pytest

import epcomm.backends
from epcomm import EPBuffer, EPConfig, EPError, EPInputError, EPTimeoutError
from epcomm.formats import BF16


class FakeBackend:
    def __init__(self, error=None, abort_raises=False):
        self.error, self.abort_raises = error, abort_raises
        self.aborts: list[str] = []
        self.broken = None
        self.closed_broken = "not closed"

    def _fail(self, *args):
        raise self.error

    dispatch = dispatch_wait = combine = combine_wait = synchronize = _fail

    def dispatch_async(self, *args):
        return object()

    def raise_pending(self):   # nothing recorded (a test sets it to _fail)
        pass

    def abort(self, reason):
        self.aborts.append(reason)
        if self.abort_raises:
            raise RuntimeError("abort itself failed")

    def close(self):
        self.closed_broken = self.broken   # None here would mean a collective free with peers possibly gone


def make(monkeypatch, backend):
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: backend)
    ctx = types.SimpleNamespace(world_size=2, backend="host", _buffers=weakref.WeakSet())
    cfg = EPConfig(hidden=128, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2, timeout_s=1.0)
    return EPBuffer(cfg, ctx)


def inputs():
    return np.zeros((2, 128), BF16), np.zeros((2, 2), np.int32)


CALLS = {
    "dispatch": lambda b: b.dispatch(*inputs()),
    "dispatch_wait": lambda b: b.dispatch_wait(b.dispatch_async(*inputs())),
    "synchronize": lambda b: b.synchronize(),
}


def timeout_error():
    return EPTimeoutError("rank 0 (node 0) timed out after 1 s waiting for dispatch tokens (round 0) from "
                          "rank 1 (node 0), which never signalled", rank=1, node=0, what="dispatch tokens round 0",
                          waiter=0)


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("abort_raises", [False, True])
def test_timeout_aborts_the_peers_and_close_stays_local(monkeypatch, call, abort_raises):
    err = timeout_error()
    be = FakeBackend(err, abort_raises)
    buf = make(monkeypatch, be)
    with pytest.raises(EPTimeoutError) as got:
        CALLS[call](buf)
    assert got.value is err                          # raised unchanged, even when the abort itself fails
    assert be.aborts == [f"EPTimeoutError: {err}"]
    with pytest.raises(EPError, match="unusable after an earlier failure"):
        buf.synchronize()
    buf.close()
    assert be.closed_broken == str(err)              # close() skipped the collective free
    assert be.aborts == [f"EPTimeoutError: {err}"]   # and did not abort a second time


def test_a_peers_abort_is_not_passed_on(monkeypatch):
    be = FakeBackend(EPError("rank 1 (node 0) aborted: EPInputError: bad x"))
    buf = make(monkeypatch, be)
    with pytest.raises(EPError, match="aborted"):
        buf.synchronize()
    assert be.aborts == []
    buf.close()
    assert be.closed_broken is not None


def test_check_raises_a_recorded_device_error_and_aborts(monkeypatch):
    be = FakeBackend(EPTimeoutError("rank 1 (node 0) did not arrive", rank=1, node=0))
    be.raise_pending = be._fail
    buf = make(monkeypatch, be)
    with pytest.raises(EPTimeoutError, match="did not arrive"):
        buf.check()
    assert be.aborts and "did not arrive" in be.aborts[0]
    with pytest.raises(EPError, match="unusable after an earlier failure"):
        buf.check()


def test_check_without_a_device_record_is_a_no_op(monkeypatch):
    buf = make(monkeypatch, FakeBackend())   # like the host backend: nothing recorded
    buf.check()


def test_check_ids_inside_a_graph_capture_is_refused_clearly(monkeypatch):
    """Reading ids back during stream capture would invalidate the capture with a CUDA error; say what to do."""
    import sys

    class Dev:
        type, index = "cuda", 0

    class Tensor:   # just enough of a torch tensor for EPBuffer's checks
        __module__ = "torch"

        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.device = shape, dtype, Dev()

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_current_stream_capturing=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: FakeBackend())
    ctx = types.SimpleNamespace(world_size=2, backend="gpu", device=0, _buffers=weakref.WeakSet())
    cfg = EPConfig(hidden=128, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2, timeout_s=1.0)
    buf = EPBuffer(cfg, ctx, check_ids=True)
    with pytest.raises(EPInputError, match="CUDA-graph capture forbids"):
        buf.dispatch(Tensor((2, 128), "torch.bfloat16"), Tensor((2, 2), "torch.int32"))
