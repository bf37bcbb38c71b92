"""CPU-only: the GPU backend turns each device error record (layout.ErrorCode / Phase) into the named exception."""
from __future__ import annotations

import pytest

from epcomm.backends.gpu.backend import GpuBackend
from epcomm.backends.gpu.layout import ErrorCode, Phase, Refusal, RefusedOp, call_word
from epcomm.config import EPConfig
from epcomm.errors import EPError, EPOverwriteError, EPTimeoutError


class _Record:
    def __init__(self, **rec):
        self.rec = rec

    def read(self):
        return self.rec

    def read_refusal(self):   # no peer refused (tests/unit/test_gpu_refusals.py)
        return None

    def read_overwrite(self):  # no launch refused because of a live result
        return None


def backend_with(code, phase=Phase.DISPATCH, peer=1, what=0, waiter=0, rnd=3):
    be = object.__new__(GpuBackend)     # no GPU: only the error decoding is exercised
    be.cfg = EPConfig(hidden=256, topk=2, num_experts=8, max_tokens_per_rank=256, world_size=4,
                      recv_capacity=256)
    be.me = 0
    be.node_of = lambda r: r // 2
    be.err = _Record(flag=1, code=code, peer=peer, what=what, waiter=waiter, round=rnd, phase=phase, pad=0)
    return be


def test_timeout_names_the_peer_its_node_and_experts():
    with pytest.raises(EPTimeoutError, match=r"rank 0 \(node 0\) timed out after 30 s waiting for combine \(weights\) "
                                             r"\(round 3\) from rank 3 \(node 1\)") as e:
        backend_with(ErrorCode.TIMEOUT, Phase.COMBINE_WEIGHTS, peer=3)._raise_recorded()
    assert (e.value.rank, e.value.node, e.value.waiter, e.value.experts) == (3, 1, 0, range(6, 8))


def test_a_wait_for_itself_names_the_grid():
    with pytest.raises(EPTimeoutError, match="blocks of this rank's own grid did not all run") as e:
        backend_with(ErrorCode.TIMEOUT, peer=0, waiter=0)._raise_recorded()
    assert (e.value.rank, e.value.waiter) == (0, 0)


@pytest.mark.parametrize("code,words", [(ErrorCode.ABORT, r"rank 1 \(node 0\) aborted"),
                                        (ErrorCode.SLOT_OVERFLOW, "max_tokens_per_rank slots"),
                                        (ErrorCode.BAD_SOURCE, "out-of-range source entry")])
def test_each_code_has_its_message(code, words):
    with pytest.raises(EPError, match=words):
        backend_with(code)._raise_recorded()


def test_unknown_records_are_not_swallowed():
    with pytest.raises(EPError, match="device error record"):
        backend_with(99, phase=7)._raise_recorded()
    assert backend_with(ErrorCode.TIMEOUT).err.read()["code"] == 1   # IntEnum: equal to the kernel's number


class _CapacityRecord(_Record):
    def __init__(self, cap):
        super().__init__()
        self.rec, self.cap = None, cap

    def read_capacity(self):
        cap, self.cap = self.cap, None      # raised once
        return cap

    def read_overwrite(self):
        return None


def test_a_void_round_is_raised_once_by_check_never_by_a_launch():
    from epcomm import EPCapacityError
    be = backend_with(ErrorCode.TIMEOUT)
    be.err = _CapacityRecord(dict(flag=5, rank=2, needed=300, capacity=256, over=3))
    be.ctx = None
    be._raise_recorded()                   # what launching calls check: failures only
    with pytest.raises(EPCapacityError, match=r"dispatch round 4: rank 2 would receive 300 routed rows > "
                                              r"recv_capacity 256 \(3 ranks over capacity\)") as e:
        be.raise_pending()
    assert (e.value.rank, e.value.needed, e.value.capacity, e.value.round) == (2, 300, 256, 4)
    be.raise_pending()                     # once: the buffer is usable again


def test_int64_ids_on_the_cpu_get_the_named_input_error():
    """int64 ids are cast on the device before the pointer checks run: a CPU tensor must still be refused by name
    (EPInputError), before any cast is queued."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from epcomm.errors import EPInputError
    be = backend_with(ErrorCode.TIMEOUT)
    be.ctx = SimpleNamespace(device=0)
    with pytest.raises(EPInputError, match="tensor is on the CPU"):
        be._narrow_ids(torch.zeros((2, 2), dtype=torch.int64), 0, 2, "torch")


class _OverwriteRecord(_Record):
    def __init__(self, overwrite):
        super().__init__()
        self.rec, self.overwrite = None, overwrite

    def read_capacity(self):
        return None

    def read_overwrite(self):
        r, self.overwrite = self.overwrite, None   # raised once
        return r


@pytest.mark.parametrize("op,why,call,holder,want", [
    # a replayed dispatch (call word: id 7, set 1, captured) over an eager result still live in its set
    (RefusedOp.DISPATCH, Refusal.LIVE, call_word(7, 1, eager=False), call_word(3, 1, eager=True),
     dict(op="dispatch", reason="live", output_set=1, captured=True, holder="eager")),
    # an eager dispatch over a replayed (captured) result not combined yet
    (RefusedOp.DISPATCH, Refusal.LIVE, call_word(9, 0, eager=True), call_word(2, 0, eager=False),
     dict(op="dispatch", reason="live", output_set=0, captured=False, holder="captured")),
    (RefusedOp.COMBINE, Refusal.NOT_LIVE, call_word(7, 1, eager=False), 0,
     dict(op="combine", reason="not_live", output_set=1, captured=True, holder=None)),
    (RefusedOp.DISPATCH, Refusal.PENDING, call_word(8, 0, eager=False), 0,
     dict(op="dispatch", reason="pending", output_set=0, captured=True, holder=None)),
])
def test_a_refused_launch_is_raised_once_as_the_named_error(op, why, call, holder, want):
    """A launch refused on the device because of a live result (kernels/results.cuh) is EPOverwriteError, raised by
    check / synchronize (never by a launch: every rank refused the same one), once; the buffer stays usable."""
    be = backend_with(ErrorCode.TIMEOUT)
    be.err = _OverwriteRecord(dict(count=2, op=int(op), why=int(why), holder=holder, call=call))
    be._raise_recorded()                   # what launching calls check: failures only
    with pytest.raises(EPOverwriteError, match="was refused") as e:
        be.raise_pending()
    got = {k: getattr(e.value, k) for k in want}
    assert got == want and e.value.count == 2 and "1 more call refused since" in str(e.value)
    assert "buffer stays usable" in str(e.value)
    be.raise_pending()                     # once


def test_the_overwrite_record_words_round_trip():
    """The host's reading of OverwriteRec (int32 words, u64 call words low word first), as the kernels write it; the
    peer-refusal record before it (RefusalRec, issue 15) is not touched."""
    import ctypes

    from epcomm.backends.gpu.layout import OVERWRITE_RECORD_WORD, RECORD_WORDS
    from epcomm.backends.gpu.runtime import HostErrorRecord
    rec = object.__new__(HostErrorRecord)
    rec.words = (ctypes.c_int32 * RECORD_WORDS)()
    rec.refusals_seen = 0
    assert rec.read_overwrite() is None
    call, holder = call_word(2 ** 33 + 5, 1, eager=False), call_word(2 ** 31 + 1, 1, eager=True)
    raw = (ctypes.c_uint64 * 2)(holder, call)
    w = OVERWRITE_RECORD_WORD
    rec.words[w + 1], rec.words[w + 2], rec.words[w + 3] = 3, int(RefusedOp.COMBINE), int(Refusal.NOT_LIVE)
    ctypes.memmove(ctypes.addressof(rec.words) + 4 * (w + 4), raw, 16)
    rec.words[w] = 1
    assert rec.read_refusal() is None      # another record
    assert rec.read_overwrite() == dict(count=3, op=2, why=3, holder=holder, call=call)
    assert rec.read_overwrite() is None and rec.words[w + 1] == 0
