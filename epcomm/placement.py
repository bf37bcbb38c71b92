"""Where the GPU backend takes arrays: on this rank's GPU, contiguous, and 16-byte aligned where the kernels read or
write 16-byte vectors. EPBuffer checks it up front (host-only information: device, strides, the data pointer), so
a CPU tensor, a strided view or a misaligned slice is an EPInputError before anything is sent, not a failure of the
buffer from inside the backend.

The host backend takes numpy arrays as they are (EPBuffer._check_kind): nothing here applies to it.
"""
from __future__ import annotations

from .arrays import describe
from .errors import EPInputError

VECTOR_BYTES = 16      # x, expert_y and out are moved with 16-byte loads / stores (uint4)


def _contiguous(a) -> bool:
    if hasattr(a, "is_contiguous"):
        return bool(a.is_contiguous())
    flags = getattr(a, "flags", None)
    return bool(flags is None or flags["C_CONTIGUOUS"])


def _data_ptr(a) -> int | None:
    if hasattr(a, "data_ptr"):
        return int(a.data_ptr())
    data = getattr(a, "data", None)
    return int(data.ptr) if hasattr(data, "ptr") else None


def check_layout(a, name: str, where: str, vectors: bool = False) -> None:
    """`a` (a torch / cupy array) laid out as the kernels read it: contiguous (row-major), and 16-byte aligned when
    they move it in 16-byte vectors."""
    info = describe(a)
    if info is None:
        return                       # the shape checks name a non-array
    if not _contiguous(a):
        raise EPInputError(f"{where}: {name} must be contiguous (row-major), got a strided view {info}; pass "
                           f"{name}.contiguous()")
    ptr = _data_ptr(a)
    if vectors and ptr is not None and ptr % VECTOR_BYTES:
        raise EPInputError(f"{where}: {name} must start at a {VECTOR_BYTES}-byte aligned address (the kernels move "
                           f"it in {VECTOR_BYTES}-byte vectors), got one {ptr % VECTOR_BYTES} bytes past (a slice "
                           f"that starts mid-vector?); pass a fresh or .clone()d tensor")


def check_device(a, name: str, where: str, device: int) -> None:
    """`a` on GPU `device` (this rank's)."""
    info = describe(a)
    if info is not None and info.device != f"cuda:{device}":
        raise EPInputError(f"{where}: {name} must be on this rank's GPU (cuda:{device}) for the GPU backend, got "
                           f"{info}")


def check_device_arrays(where: str, device: int, arrays) -> None:
    """Every (array or None, name, moved in 16-byte vectors) of one call: layouts first, then devices (so a message
    names the first layout problem even of arrays that are also elsewhere)."""
    given = [(a, name, vectors) for a, name, vectors in arrays if a is not None]
    for a, name, vectors in given:
        check_layout(a, name, where, vectors)
    for a, name, _ in given:
        check_device(a, name, where, device)
