"""CPU-only: what GpuBackend.abort() writes where, with the CUDA driver and nvshmem4py replaced by recorders.

The GPU run of the same path is abort_test / the timeout check in tests/gpu/worker.py (sim-2node: other-node peers).
"""
from __future__ import annotations

import ctypes
import sys
import types

import pytest

from epcomm.backends.gpu.backend import GpuBackend
from epcomm.backends.gpu.layout import ErrorCode, Phase
from epcomm.config import EPConfig
from epcomm.errors import EPError, EPTimeoutError

ABORT_OFF = 4096
DEAD_OFF = 8192
SYM = 0x10_0000            # this rank's symmetric region
PEER_BASE = {1: 0x20_0000}  # same-node peer pointers (rank 0's view); ranks 2, 3 are on node 1


class FakeDriver:
    class CUresult:
        CUDA_SUCCESS = 0
        CUDA_ERROR_NOT_READY = 600

    class CUstream_flags:
        CU_STREAM_NON_BLOCKING = 1

    def __init__(self, device_words: dict[int, int]):
        self.copies: list[tuple[int, int]] = []        # (device address, value) host -> device
        self.device_words = device_words               # device address -> value, for device -> host reads
        self.destroyed = 0

    def cuStreamCreate(self, flags):
        return 0, 77

    def cuMemcpyHtoDAsync(self, dst, src, n, st):
        assert n == 8 and st == 77
        self.copies.append((dst, ctypes.c_uint64.from_address(src).value))
        return (0,)

    def cuMemcpyDtoHAsync(self, dst, src, n, st):
        for i in range(0, n, 8):
            ctypes.c_uint64.from_address(dst + i).value = self.device_words.get(src + i, 0)
        return (0,)

    def cuStreamQuery(self, st):
        return (0,)

    def cuStreamDestroy(self, st):
        self.destroyed += 1


class FakeNvshmem:
    class Signal_op:
        SIGNAL_SET = 9

    def __init__(self):
        self.signals: list[tuple[int, int, int, int]] = []   # (symmetric address, value, op, pe)
        self.quiets = 0

    def signal_op_on_stream(self, addr, value, op, pe, st):
        assert st == 77
        self.signals.append((addr, value, op, pe))

    def quiet_on_stream(self, st):
        self.quiets += 1


@pytest.fixture
def fakes(monkeypatch):
    drv, nv = FakeDriver({}), FakeNvshmem()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.driver, cuda.bindings = drv, bindings
    nvshmem = types.ModuleType("nvshmem")
    nvshmem.bindings = nv
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.driver", drv),
                      ("nvshmem", nvshmem), ("nvshmem.bindings", nv)):
        monkeypatch.setitem(sys.modules, name, mod)
    return drv, nv


def backend(record=None) -> GpuBackend:
    """Rank 0 of 4 ranks on 2 nodes (0, 1 | 2, 3), without a GPU."""
    be = object.__new__(GpuBackend)
    be.cfg = EPConfig(hidden=128, topk=2, num_experts=8, max_tokens_per_rank=4, world_size=4, timeout_s=2.0)
    be.me, be.sym, be._closed = 0, SYM, False
    be.peers = [SYM, PEER_BASE[1], 0, 0]
    be.node_of = lambda r: r // 2
    be.layout = types.SimpleNamespace(offset={"abort": ABORT_OFF, "dead": DEAD_OFF})
    be.err = types.SimpleNamespace(read=lambda: record)
    return be


def word(base: int, rank: int) -> int:
    return base + ABORT_OFF + 8 * rank


def test_abort_reaches_same_node_peers_by_copy_and_other_nodes_by_nvshmem(fakes):
    drv, nv = fakes
    backend().abort("EPInputError: bad x")
    assert drv.copies == [(word(PEER_BASE[1], 0), 1)]
    assert sorted(nv.signals) == [(word(SYM, 0), 1, 9, 2), (word(SYM, 0), 1, 9, 3)]
    assert nv.quiets == 1 and drv.destroyed == 1


def test_after_a_timeout_the_silent_peer_is_given_up_on_everywhere_but_at_itself(fakes):
    drv, nv = fakes
    be = backend({"flag": 1, "code": ErrorCode.TIMEOUT, "peer": 2, "what": 0, "waiter": 0, "round": 3,
                  "phase": Phase.DISPATCH, "pad": 0})
    with pytest.raises(EPTimeoutError) as e:
        be.raise_pending()
    assert e.value.rank == 2
    be.abort(f"EPTimeoutError: {e.value}")
    assert sorted(drv.copies) == sorted([(word(PEER_BASE[1], 0), 1), (word(PEER_BASE[1], 2), 2)])
    assert sorted(nv.signals) == sorted([(word(SYM, 0), 1, 9, 2), (word(SYM, 0), 1, 9, 3),
                                         (word(SYM, 2), 2, 9, 3)])   # rank 2 itself gets only rank 0's word


def test_a_peer_that_was_given_up_on_is_named_with_who_gave_up(fakes):
    drv, _ = fakes
    rec = {"flag": 4, "code": ErrorCode.ABORT, "peer": 2, "what": 0, "waiter": 0, "round": 3, "phase": Phase.COMBINE,
           "pad": 0}
    drv.device_words[word(SYM, 2)] = 2 + 1        # rank 1 gave up on rank 2
    with pytest.raises(EPError, match=r"rank 2 \(node 1\) did not arrive: rank 1 \(node 0\) gave up on it at its "
                                      r"deadline \(seen by rank 0 in combine round 3\)"):
        backend(rec).raise_pending()
    drv.device_words[word(SYM, 2)] = 1            # rank 2 aborted itself
    with pytest.raises(EPError, match=r"rank 2 \(node 1\) aborted \(seen by rank 0 in combine round 3\)"):
        backend(rec).raise_pending()


def test_abort_without_nvshmem4py_still_tells_same_node_peers(fakes, monkeypatch):
    drv, _ = fakes
    monkeypatch.setitem(sys.modules, "nvshmem.bindings", None)   # import fails
    monkeypatch.setattr(sys.modules["nvshmem"], "bindings", None, raising=False)
    backend().abort("x")
    assert drv.copies == [(word(PEER_BASE[1], 0), 1)] and drv.destroyed == 1


def dead_word(base: int, rank: int) -> int:
    return base + DEAD_OFF + 8 * rank


def test_death_notices_reach_this_rank_every_live_peer_and_last_the_dead_rank(fakes):
    """Fencing groundwork (issue 15 item 4): GpuBackend.declare_dead writes dead[D] = declarer + 1 with the abort
    word's transports (own region and same-node peers by copy, other nodes by NVSHMEM), the declared rank last."""
    drv, nv = fakes
    assert backend().declare_dead([3])
    assert drv.copies == [(dead_word(SYM, 3), 1), (dead_word(PEER_BASE[1], 3), 1)]
    assert nv.signals == [(dead_word(SYM, 3), 1, 9, 2), (dead_word(SYM, 3), 1, 9, 3)]   # rank 3 itself: last
    assert nv.quiets == 1 and drv.destroyed == 1


def test_the_death_notices_in_this_ranks_region_are_read_as_rank_and_declarer(fakes):
    drv, _ = fakes
    assert backend().read_dead_words() == {}
    drv.device_words.update({dead_word(SYM, 2): 1 + 1, dead_word(SYM, 3): 0 + 1})
    assert backend().read_dead_words() == {2: 1, 3: 0}
