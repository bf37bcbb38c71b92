"""DeepEP's small value types: Config (tuning knobs, accepted and ignored) and EventOverlap (a CUDA event wrapper)."""
from __future__ import annotations

from typing import Any


class Config:
    """DeepEP's performance config. epcomm sizes and schedules its kernels itself, so a Config is accepted wherever
    DeepEP takes one and only kept for inspection; the size hints are what a server passes back to Buffer (which
    takes sizes as hints too)."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """A byte count in the spirit of DeepEP's (chunk queues of every peer); Buffer does not need it."""
        return int(hidden_bytes) * int(num_ranks) * self.num_max_nvl_chunked_recv_tokens

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return int(hidden_bytes) * int(num_ranks) * self.num_max_rdma_chunked_recv_tokens

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl_send={self.num_max_nvl_chunked_send_tokens}, "
                f"nvl_recv={self.num_max_nvl_chunked_recv_tokens}, rdma_send={self.num_max_rdma_chunked_send_tokens}, "
                f"rdma_recv={self.num_max_rdma_chunked_recv_tokens})")


class EventOverlap:
    """A CUDA event recorded after a call (or None), with tensors to keep alive until it is waited for.

    epcomm runs every call on the caller's current stream, so an event returned by an `async_finish=True` call is
    already ordered before later work on that stream; waiting for it matters only for other streams. On CPU tensors
    (host backend) there are no events: waiting is a no-op."""

    def __init__(self, event: Any = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            import torch
            torch.cuda.current_stream().wait_event(self.event)
        self.extra_tensors = None

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.event is not None:
            self.current_stream_wait()


def record_event(on_gpu: bool, extra_tensors: tuple | None = None) -> EventOverlap:
    """An EventOverlap of an event recorded now on the current stream (GPU), or an empty one (CPU)."""
    if not on_gpu:
        return EventOverlap(None, None)
    import torch
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    return EventOverlap(ev, extra_tensors)


def wait_previous(previous_event: EventOverlap | None) -> None:
    """DeepEP's previous_event: the call's work starts after it. epcomm works on the current stream, so that stream
    waits for the event."""
    if previous_event is not None:
        previous_event.current_stream_wait()
