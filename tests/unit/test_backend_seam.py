"""Both backends provide the seam of epcomm/backends/base.py (checked on the classes: GpuBackend cannot be built
without a GPU), and EPBuffer talks to them through it only."""
from __future__ import annotations

import inspect
import types

import pytest

from epcomm.backends.base import Backend
from epcomm.backends.gpu.backend import GpuBackend
from epcomm.backends.host import HostBackend
from epcomm.config import EPConfig

MEMBERS = sorted({n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__))


def parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("cls", [HostBackend, GpuBackend], ids=lambda c: c.__name__)
def test_backend_class_has_every_member_of_the_seam(cls):
    assert {"dispatch", "combine_wait", "raise_pending", "broken", "sms_used"} <= set(MEMBERS)
    for name in MEMBERS:
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        want, got = inspect.getattr_static(Backend, name, None), inspect.getattr_static(cls, name)
        if isinstance(want, property):
            assert isinstance(got, property), f"{cls.__name__}.{name} must be a property"
        elif callable(want):
            assert callable(got), f"{cls.__name__}.{name} must be a method"
            assert parameters(got) == parameters(want), f"{cls.__name__}.{name}{inspect.signature(got)}"


def test_a_host_backend_instance_is_a_backend():
    cfg = EPConfig(hidden=128, topk=1, num_experts=2, max_tokens_per_rank=2, world_size=1, skip_a2a=True)
    be = HostBackend(cfg, types.SimpleNamespace(comm=None, rank=0))   # skip_a2a: no MPI window
    assert isinstance(be, Backend) and be.broken is None and be.sms_used is None


def test_contexts_without_mpi_are_reachable_from_the_package():
    import epcomm
    from epcomm.backends.gpu import runtime
    assert epcomm.torch_context is runtime.torch_context and epcomm.uid_context is runtime.uid_context


def test_both_backends_word_a_timeout_the_same_way():
    from epcomm.errors import EPTimeoutError
    e = EPTimeoutError.peer_missing(waiter=0, waiter_node=0, peer=5, node=1, experts=range(160, 192),
                                    what="dispatch tokens", round=7, timeout_s=30.0, missing=[5, 6, 5])
    assert str(e) == ("rank 0 (node 0) timed out after 30 s waiting for dispatch tokens (round 7) from rank 5 "
                      "(node 1), which never signalled (it holds experts 160..191); all missing: [5, 6]")
    assert (e.rank, e.node, e.experts, e.what, e.waiter) == (5, 1, range(160, 192), "dispatch tokens round 7", 0)
