"""Backends behind EPBuffer. make_backend(cfg, ctx) picks one by ctx.backend; the GPU one is imported only when asked
for, so CPU machines never need CUDA packages.

A backend implements: dispatch, dispatch_async, dispatch_wait, combine, combine_async, combine_wait, synchronize,
close, and abort(reason) (tell every peer this rank gave up; best effort, never raises). See docs/CONTRACT.md.
"""
from __future__ import annotations

from ..errors import EPInputError


def make_backend(cfg, ctx):
    name = ctx.backend
    if name == "host":
        from .host import HostBackend
        return HostBackend(cfg, ctx)
    if name == "gpu":
        from .gpu import GpuBackend  # lazy: needs CUDA / NVSHMEM packages
        return GpuBackend(cfg, ctx)
    raise EPInputError(f"unknown backend {name!r} (expected 'host' or 'gpu')")
