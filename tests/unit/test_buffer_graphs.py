"""CPU-only: EPBuffer's bookkeeping of eager calls and calls captured in CUDA graphs on one buffer (fake backend; a
flag stands in for "the current stream is capturing"). The two kinds count their rounds and live dispatches apart,
an *_async never waits across a capture boundary, and release() reaches the backend (which frees the output set on
the device). What replays do is checked on the device (kernels/results.cuh; tests/gpu/server_checks.py)."""
from __future__ import annotations

import types
import weakref

import numpy as np
import pytest

import epcomm.backends
import epcomm.buffer
from epcomm import EPBuffer, EPConfig, EPInputError
from epcomm.formats import BF16
from epcomm.results import DispatchResult
from tests.fakes import QuietBackend


class Backend(QuietBackend):
    broken = None
    sms_used = None

    def __init__(self):
        self.calls, self.released, self.n = [], [], 0

    def _res(self, tag):
        return DispatchResult(expert_x=tag, expert_scales=None, row_offsets=None, expert_ids=None, src_info=None,
                              tokens_per_expert=None, handle=tag)

    def dispatch(self, x, ids):
        self.n += 1
        self.calls.append(f"dispatch {self.n}")
        return self._res(f"d{self.n}")

    def dispatch_async(self, x, ids):
        self.n += 1
        self.calls.append(f"send {self.n}")
        return f"d{self.n}"

    def dispatch_wait(self, inner):
        self.calls.append(f"recv {inner}")
        return self._res(inner)

    def combine(self, ey, handle, w):
        self.calls.append(f"combine {handle}")
        return f"y of {handle}"

    def release(self, handles):
        self.released.append(list(handles))



@pytest.fixture
def env(monkeypatch):
    be = Backend()
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: be)
    capture = types.SimpleNamespace(on=False)
    monkeypatch.setattr(epcomm.buffer, "_capturing", lambda a: capture.on)
    ctx = types.SimpleNamespace(world_size=2, backend="host", _buffers=weakref.WeakSet())
    cfg = EPConfig(hidden=128, topk=2, num_experts=4, max_tokens_per_rank=4, world_size=2, timeout_s=1.0)
    return EPBuffer(cfg, ctx), be, capture


def x_ids():
    return np.zeros((2, 128), BF16), np.zeros((2, 2), np.int32)


def ey_w(b):
    return np.zeros((b.cfg.max_recv_rows, 128), BF16), np.zeros((2, 2), np.float32)


def test_an_eager_result_held_across_a_capture_does_not_block_it(env):
    """vLLM / DBO: an eager dispatch is live while a decode graph with two micro-batches is captured; the captured
    calls count apart (replays are checked on the device), and eager calls after the capture go on counting theirs."""
    buf, be, capture = env
    x = buf.dispatch(*x_ids())                        # eager round 0, live
    capture.on = True
    a, b = buf.dispatch(*x_ids()), buf.dispatch(*x_ids())
    assert (a.handle.captured, a.handle.round, b.handle.round) == (True, 0, 1)
    buf.combine(*ey_w(buf)[:1], a.handle, ey_w(buf)[1])
    buf.combine(*ey_w(buf)[:1], b.handle, ey_w(buf)[1])
    capture.on = False
    y = buf.dispatch(*x_ids())                        # eager round 1: x and y live
    assert (y.handle.captured, y.handle.round, buf.round) == (False, 1, 4)
    with pytest.raises(EPInputError, match="at most 2 dispatches"):
        buf.dispatch(*x_ids())                        # a third live eager dispatch is still refused
    assert x is not None


def test_a_third_live_dispatch_inside_a_capture_is_refused_at_capture(env):
    buf, be, capture = env
    capture.on = True
    a, b = buf.dispatch(*x_ids()), buf.dispatch(*x_ids())
    with pytest.raises(EPInputError, match="at most 2 dispatches"):
        buf.dispatch(*x_ids())
    assert a and b


def test_a_captured_handle_is_combined_in_its_own_count(env):
    """A graph with the dispatch and another with its combine (the bench's pattern): the captured handle is checked
    against the captured rounds, whatever the eager calls did meanwhile."""
    buf, be, capture = env
    capture.on = True
    a = buf.dispatch(*x_ids())
    capture.on = False
    for _ in range(3):                                # eager rounds in between (combined)
        r = buf.dispatch(*x_ids())
        buf.combine(ey_w(buf)[0], r.handle, ey_w(buf)[1])
    capture.on = True
    assert buf.combine(ey_w(buf)[0], a.handle, ey_w(buf)[1]) == "y of d1"
    with pytest.raises(EPInputError, match="already combined"):
        buf.combine(ey_w(buf)[0], a.handle, ey_w(buf)[1])


@pytest.mark.parametrize("async_inside", [False, True])
def test_an_async_never_waits_across_a_capture_boundary(env, async_inside):
    """A receive run by a call on the other side of a capture would be captured (replayed every time) or missing
    from the graph: refused before anything is sent."""
    buf, be, capture = env
    capture.on = async_inside
    buf.dispatch_async(*x_ids())
    capture.on = not async_inside
    with pytest.raises(EPInputError, match="must run (inside|outside) it too"):
        buf.dispatch(*x_ids())
    assert be.calls == ["send 1", "abort"]            # no receive launched on the wrong side


def test_release_frees_the_sets_on_the_backend_too(env):
    buf, be, capture = env
    r0 = buf.dispatch(*x_ids())
    capture.on = True
    g = buf.dispatch(*x_ids())
    capture.on = False
    buf.release(g.handle)
    assert be.released == [["d2"]]
    p = buf.dispatch_async(*x_ids())                  # live, but no handle yet: nothing to free on the device
    buf.release()
    assert be.released[-1] == ["d1"] and r0 and p
    r3 = buf.dispatch(*x_ids())                        # every earlier round released: admitted
    assert r3.handle.round == 2
