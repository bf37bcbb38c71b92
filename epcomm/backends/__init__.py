"""Backends behind EPBuffer. make_backend(cfg, ctx) picks one by ctx.backend; the GPU one is imported only when asked
for, so CPU machines never need CUDA packages.

Every backend provides the Protocol of base.py (dispatch, dispatch_async, dispatch_wait, combine, combine_async,
combine_wait, synchronize, raise_pending, abort, close, broken, sms_used); EPBuffer owns the order of the calls and
the failed / closed state. See docs/CONTRACT.md.
"""
from __future__ import annotations

from ..errors import EPInputError
from .base import Backend


def make_backend(cfg, ctx) -> Backend:
    name = ctx.backend
    if name == "host":
        from .host import HostBackend
        return HostBackend(cfg, ctx)
    if name == "gpu":
        from .gpu import GpuBackend  # lazy: needs CUDA / NVSHMEM packages
        return GpuBackend(cfg, ctx)
    raise EPInputError(f"unknown backend {name!r} (expected 'host' or 'gpu')")
