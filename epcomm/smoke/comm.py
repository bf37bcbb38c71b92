"""Messages between smoke ranks with a deadline on every wait (never a bare blocking collective).

Point-to-point pickled messages on MPI.COMM_WORLD: isend + Test polling for sends, improbe polling for receives.
Tags are per stage and per message kind, so a late message of one stage never matches a wait of another.
`guarded(fn, timeout)` runs a step that may block (a collective window allocation, an EP call) in a worker thread
and gives up at the deadline, so the rank can still report that it is stuck.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

TAG_BASE = 23000
READY, START, RESULT, TURN, TURN_DONE, FINISH = range(6)
STOP_TAG = TAG_BASE + 15 * 16


def tag(stage_index: int, kind: int) -> int:
    return TAG_BASE + stage_index * 16 + kind


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


class _Backoff:
    """Sleep a little longer each idle poll (20 us .. 2 ms): idle ranks must not steal the CPU of measuring ones."""
    def __init__(self):
        self.s = 2e-5

    def __call__(self):
        time.sleep(self.s)
        self.s = min(self.s * 2, 2e-3)

    def reset(self):
        self.s = 2e-5


class Messenger:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._pending: list = []   # send requests kept alive until done (their buffers must not be freed)

    def send(self, obj: Any, dest: int, tag_: int) -> None:
        """Start a send; it completes in the background (small messages go eagerly)."""
        self._pending.append(self.comm.isend(obj, dest=dest, tag=tag_))
        self._reap()

    def send_all(self, obj: Any, dests: Iterable[int], tag_: int) -> None:
        for d in dests:
            self.send(obj, d, tag_)

    def _reap(self) -> None:
        keep = []
        for req in self._pending:
            try:
                if not req.Test():
                    keep.append(req)
            except Exception:  # a failed send to a dead peer: drop it
                pass
        self._pending = keep

    def flush(self, deadline: Deadline) -> bool:
        """Wait (polling) for the started sends; False when some are still pending at the deadline."""
        wait = _Backoff()
        while self._pending:
            self._reap()
            if not self._pending:
                break
            if deadline.expired():
                return False
            wait()
        return True

    def poll(self, source: int, tags: Iterable[int]):
        """(tag, obj) of a message from `source` with one of `tags`, or None."""
        for t in tags:
            msg = self.comm.improbe(source=source, tag=t)
            if msg is not None:
                return t, msg.recv()
        return None

    def wait_one(self, source: int, tags: Iterable[int], deadline: Deadline, idle: Callable[[], None] | None = None):
        """(tag, obj) of the first message from `source` with one of `tags`; None at the deadline."""
        tags = list(tags)
        wait = _Backoff()
        while True:
            got = self.poll(source, tags)
            if got is not None:
                return got
            self._reap()
            if idle is not None:
                idle()
            if deadline.expired():
                return None
            wait()

    def collect(self, sources: Iterable[int], tag_: int, deadline: Deadline) -> tuple[dict[int, Any], list[int]]:
        """({source: obj}, missing sources) for one message of `tag_` from each source, until the deadline."""
        pending = set(sources)
        got: dict[int, Any] = {}
        wait = _Backoff()
        while pending:
            progressed = False
            for s in sorted(pending):
                msg = self.comm.improbe(source=s, tag=tag_)
                if msg is not None:
                    got[s] = msg.recv()
                    pending.discard(s)
                    progressed = True
            if not pending:
                break
            self._reap()
            if deadline.expired():
                break
            if progressed:
                wait.reset()
            else:
                wait()
        return got, sorted(pending)


class StageTimeout(Exception):
    """A rank gave up waiting. `waited_on` names the peer it waited for, when it knows: that rank, not this one,
    is the first suspect."""
    def __init__(self, message: str, waited_on: int | None = None):
        super().__init__(message)
        self.waited_on = waited_on


def guarded(fn: Callable[[], Any], timeout: float, what: str, threaded: bool = True) -> Any:
    """fn() with a deadline: run in a daemon thread; raise StageTimeout(what) when it does not finish in time.

    An exception of fn is re-raised here. Without MPI_THREAD_MULTIPLE (threaded=False) fn runs inline and only
    its own internal deadlines apply.
    """
    if not threaded:
        return fn()
    box: dict[str, Any] = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - carried to the caller
            box["error"] = e

    th = threading.Thread(target=body, name=f"smoke-{what}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise StageTimeout(f"{what}: no progress after {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
