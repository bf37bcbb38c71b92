"""The seam between EPBuffer and a backend, as code: what every backend (host, gpu) provides.

EPBuffer owns everything around the calls: input checks, the order of outstanding *_async operations (it runs each
*_wait once, in issue order, before any later operation), and the buffer's failed / closed state. A backend only
moves data and raises; it may assume a well-formed, ordered sequence of calls. A backend that makes checks of its
own (the GPU backend: device, contiguity, alignment) raises EPInputError only before it has sent or counted
anything, so that EPBuffer can refuse the call like one of its own checks. Optional: dispatch_rejected() /
combine_rejected(round) take part in a round with nothing, marked "rejected" (a refused call then harms no one;
docs/FAILURES.md); without them a refused call aborts. tests/unit/test_backend_seam.py checks
that HostBackend and GpuBackend match this Protocol.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..results import DispatchResult


@runtime_checkable
class Backend(Protocol):
    broken: str | None
    """Set by EPBuffer to the reason of a failure: peers may be gone, so close() must skip every collective."""

    @property
    def sms_used(self) -> int | None:
        """SMs the kernels of this buffer run on (None where that means nothing, e.g. the host backend)."""

    def dispatch(self, x, topk_ids, stats_out=None) -> DispatchResult:
        """Send and receive in one call (one kernel launch on GPUs). x: bf16 [T, H] or a caller-quantised
        (x_fp8, x_scales) pair; topk_ids int32 or int64; stats_out: counters to add tokens_per_expert to, or None."""

    def dispatch_async(self, x, topk_ids, stats_out=None) -> Any:
        """Send only; returns what dispatch_wait takes."""

    def dispatch_wait(self, pending) -> DispatchResult:
        """Receive of a dispatch_async (called once per pending, in issue order)."""

    def combine(self, expert_y, handle, topk_weights, out=None) -> Any:
        """Send expert rows back and reduce them in one call; returns y [T, hidden] bf16 (out, when given)."""

    def combine_async(self, expert_y, handle, topk_weights, out=None) -> Any:
        """Send only; returns what combine_wait takes."""

    def combine_wait(self, pending) -> Any:
        """Receive and reduce of a combine_async; returns y."""

    def synchronize(self) -> None:
        """Wait for all issued work; raise an error a kernel recorded (EPTimeoutError / EPError)."""

    def raise_pending(self) -> None:
        """Raise an error recorded since the calls returned, without synchronising (no-op where none is recorded)."""

    def abort(self, reason: str) -> None:
        """Tell every peer this rank gave up (best effort, never raises)."""

    def close(self) -> None:
        """Free the buffer: collective unless `broken` is set."""
