"""CPU-only: the GPU backend's placement rules (epcomm/placement.py) are EPBuffer's front-end checks: a CPU tensor, a
strided view or a misaligned slice is an EPInputError before anything reaches the backend (fake backend: the calls
it sees are recorded; torch CPU tensors stand in for device arrays)."""
from __future__ import annotations

import types
import weakref

import pytest

import epcomm.backends
from epcomm import EPBuffer, EPConfig, EPInputError
from epcomm.results import DispatchResult
from tests.fakes import QuietBackend

torch = pytest.importorskip("torch")


class Backend(QuietBackend):
    broken = None
    sms_used = None

    def __init__(self):
        self.calls = []

    def dispatch(self, x, ids, *extra):
        self.calls.append("dispatch")
        return DispatchResult(expert_x=None, expert_scales=None, row_offsets=None, expert_ids=None, src_info=None,
                              tokens_per_expert=None, handle="h")

    def combine(self, ey, handle, w, *extra):
        self.calls.append("combine")
        return "y"



def gpu_buffer(monkeypatch, **kw):
    be = Backend()
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: be)
    ctx = types.SimpleNamespace(world_size=2, backend="gpu", device=0, _buffers=weakref.WeakSet())
    cfg = EPConfig(hidden=256, topk=2, num_experts=4, max_tokens_per_rank=8, world_size=2, timeout_s=1.0, **kw)
    b = EPBuffer(cfg, ctx)
    b.be = be
    return b


def ids(t=4):
    return torch.zeros((t, 2), dtype=torch.int32)


def test_a_cpu_tensor_is_refused_before_anything_is_sent(monkeypatch):
    buf = gpu_buffer(monkeypatch)
    with pytest.raises(EPInputError, match=r"dispatch: x must be on this rank's GPU \(cuda:0\)"):
        buf.dispatch(torch.zeros((4, 256), dtype=torch.bfloat16), ids())
    assert "dispatch" not in buf.be.calls


def test_a_misaligned_x_is_refused(monkeypatch):
    buf = gpu_buffer(monkeypatch)
    flat = torch.zeros(5 * 256 + 1, dtype=torch.bfloat16)
    x = flat[1:].view(5, 256)[:4]                  # contiguous, but 2 bytes past a 16-byte boundary
    assert x.is_contiguous() and x.data_ptr() % 16 == 2
    with pytest.raises(EPInputError, match="x must start at a 16-byte aligned address"):
        buf.dispatch(x, ids())
    assert "dispatch" not in buf.be.calls


def test_strided_ids_are_refused(monkeypatch):
    buf = gpu_buffer(monkeypatch)
    with pytest.raises(EPInputError, match=r"topk_ids must be contiguous \(row-major\)"):
        buf.dispatch(torch.zeros((4, 256), dtype=torch.bfloat16), torch.zeros((2, 4), dtype=torch.int32).t())
    assert "dispatch" not in buf.be.calls


def test_column_major_x_scales_are_refused(monkeypatch):
    """Caller-quantised input: x_scales must be row-major [T, scale_cols] (a column-major view, as DeepGEMM's
    scale layout gives, is not what the kernels read)."""
    buf = gpu_buffer(monkeypatch, token_format="fp8")
    q = torch.zeros((4, 256), dtype=torch.float8_e4m3fn)
    scales = torch.ones((2, 4), dtype=torch.float32).t()      # [4, 2], column-major
    with pytest.raises(EPInputError, match="x_scales must be contiguous"):
        buf.dispatch((q, scales), ids())
    assert "dispatch" not in buf.be.calls


def test_combine_arrays_are_checked_too(monkeypatch):
    buf = gpu_buffer(monkeypatch)
    monkeypatch.setattr(buf, "_check_placement", lambda *a: None)   # let a CPU dispatch through to get a handle
    res = buf.dispatch(torch.zeros((4, 256), dtype=torch.bfloat16), ids())
    monkeypatch.undo()
    rows = buf.cfg.max_recv_rows
    w = torch.zeros((4, 2), dtype=torch.float32)
    flat = torch.zeros(rows * 256 + 8, dtype=torch.bfloat16)
    with pytest.raises(EPInputError, match="expert_y must start at a 16-byte aligned address"):
        buf.combine(flat[4:4 + rows * 256].view(rows, 256), res.handle, w)
    assert buf.be.calls == ["dispatch", "abort"]      # the GPU backend cannot take part with nothing: it aborts


def test_out_must_be_contiguous_and_on_the_gpu(monkeypatch):
    from epcomm.placement import check_device_arrays
    y = torch.zeros((256, 4), dtype=torch.bfloat16).t()
    with pytest.raises(EPInputError, match="out must be contiguous"):
        check_device_arrays("combine", 0, [(None, "x", True), (y, "out", True)])
    with pytest.raises(EPInputError, match=r"out must be on this rank's GPU"):
        check_device_arrays("combine", 0, [(y.contiguous(), "out", True)])


def test_the_host_backend_is_not_concerned(monkeypatch):
    """The placement rules are the GPU backend's; a host-backend buffer takes numpy arrays as they are."""
    import numpy as np
    from epcomm.formats import BF16
    buf = gpu_buffer(monkeypatch)
    buf.ctx.backend = "host"
    x = np.zeros((8, 256), BF16)[::2]                 # strided numpy view
    buf.dispatch(x, np.zeros((4, 2), np.int32))
    assert buf.be.calls == ["dispatch"]
