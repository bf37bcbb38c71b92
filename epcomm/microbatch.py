"""Which dispatches of one EPBuffer may still be combined: at most two at a time (two micro-batches in flight).

A server overlapping two micro-batches (vLLM DBO, SGLang TBO) runs dispatch A, dispatch B, combine A, combine B on
one buffer. The buffer has two output / protocol sets, used by consecutive dispatch rounds in turn, so a dispatch's
outputs and the state its combine needs live until the second dispatch after it. Hence:

* a dispatch is *live* from its call until it is combined, released (EPBuffer.release: it will not be combined),
  or until nothing can combine it any more: its handle (or, before its *_wait, its pending object) has been dropped
  (garbage-collected), so dispatch-only loops that discard their results never count;
* dispatch round r reuses the set of round r - 2: while round r - 2 is live, dispatch r is refused (EPInputError,
  before anything is sent), since it would overwrite that round's outputs before its combine. With rounds issued
  back to back that is "a third dispatch while two are live";
* combine takes the handle of either live dispatch, in any order (every rank in the same order), once.

This is host bookkeeping. EPBuffer keeps one LiveDispatches for its eager calls and one for the calls captured in
CUDA graphs (checked at capture, in capture order): the two kinds take the output sets in turn each, counted apart.
Replays are invisible here; the GPU device knows which call's result each set holds and refuses a launch that would
overwrite a live one (docs/ARCHITECTURE.md "Micro-batches, graphs and eager calls").
"""
from __future__ import annotations

import weakref

from .errors import EPInputError

LIVE_LIMIT = 2


class LiveDispatches:
    def __init__(self):
        self._live: dict[int, weakref.ref] = {}     # round -> weak reference to what can still combine it
        self._combined: set[int] = set()            # rounds combined (the latest few), for was_combined

    def _prune(self) -> None:
        for r in [r for r, ref in self._live.items() if ref() is None]:
            del self._live[r]

    def admit(self, round_: int) -> None:
        """Before dispatch `round_` is sent: refuse it while round_ - 2 (whose set it reuses) is live."""
        self._prune()
        old = round_ - LIVE_LIMIT
        if old in self._live:
            raise EPInputError(
                f"dispatch: round {old} of this buffer is dispatched and not yet combined, and dispatch round "
                f"{round_} would reuse its buffers; at most {LIVE_LIMIT} dispatches may be outstanding (two "
                f"micro-batches): combine round {old} first, or drop its result (del result) if it will not be "
                f"combined")

    def track(self, round_: int, owner) -> None:
        """`owner` (a Pending, then the Handle) is what can still combine dispatch `round_`."""
        self._live[round_] = weakref.ref(owner)

    def check_combine(self, round_: int, latest: int) -> None:
        """Before combine of dispatch `round_` (latest = the newest dispatch round of the buffer)."""
        if round_ < latest - (LIVE_LIMIT - 1):
            raise EPInputError(
                f"combine: handle is from dispatch round {round_}, but this buffer has dispatched up to round {latest}"
                f": only the latest {LIVE_LIMIT} dispatches can be combined (their buffers are reused after that)")
        if round_ not in self._live:
            raise EPInputError(f"combine: dispatch round {round_} was already combined (a handle is good for one "
                               f"combine)")

    def release(self, round_: int | None = None) -> None:
        """Round `round_` (None: every live round) will not be combined."""
        if round_ is None:
            self._live.clear()
        else:
            self._live.pop(round_, None)

    def combined(self, round_: int) -> None:
        self._live.pop(round_, None)
        self._combined.add(round_)
        self._combined -= {r for r in self._combined if r < round_ - 2 * LIVE_LIMIT}

    def was_combined(self, round_: int) -> bool:
        return round_ in self._combined

    def rounds(self) -> list[int]:
        self._prune()
        return sorted(self._live)

    def owners(self) -> list:
        """What can still combine each live round (Pending or Handle objects), in round order."""
        self._prune()
        return [o for o in (self._live[r]() for r in sorted(self._live)) if o is not None]
