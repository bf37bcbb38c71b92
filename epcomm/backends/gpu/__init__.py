"""GPU backend: CUDA kernels for dispatch / combine over NVSHMEM (peer pointers inside a node, put + signal across).

Imported lazily by epcomm.backends.make_backend; needs cuda-core, cuda-bindings, nvshmem4py and nvidia-nvshmem-cu13.
"""
from __future__ import annotations


def __getattr__(name):
    if name == "GpuBackend":
        from .backend import GpuBackend
        return GpuBackend
    if name == "Runtime":
        from .runtime import Runtime
        return Runtime
    raise AttributeError(name)


__all__ = ["GpuBackend", "Runtime"]
