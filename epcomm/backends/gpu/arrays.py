"""Device arrays of the GPU backend: which kind a caller's array is, its device pointer and current stream, and the
preallocated buffers (torch when present, else cupy) with zero-copy views in the caller's kind.

Only what the kernels need: no copies, no synchronisation (epcomm.arrays has the host-side interop).
"""
from __future__ import annotations

from ...errors import EPInputError


def array_kind(a) -> str:
    mod = type(a).__module__ or ""
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    if hasattr(a, "__cuda_array_interface__"):
        return "cai"
    raise EPInputError(f"gpu backend takes torch tensors or cupy arrays on the GPU, got {type(a).__name__}")


def aligned(ptr: int, what: str) -> int:
    """x and expert_y are read with 16-byte loads: a view that starts mid-vector would fault the whole context."""
    if ptr % 16:
        raise EPInputError(f"gpu backend: {what} must start at a 16-byte aligned address (a view with an element "
                           f"offset that is not a multiple of 8?); pass a fresh or .clone()d tensor")
    return ptr


def device_pointer(a, kind: str, device: int | None = None) -> int:
    if kind == "cupy" and device is not None and a.device.id != device:
        raise EPInputError(f"gpu backend: array is on GPU {a.device.id}, this rank uses GPU {device}")
    if kind == "torch":
        if not a.is_cuda:
            raise EPInputError("gpu backend: tensor is on the CPU; pass a CUDA tensor")
        if device is not None and a.device.index != device:
            raise EPInputError(f"gpu backend: tensor is on cuda:{a.device.index}, this rank uses cuda:{device}")
        if not a.is_contiguous():
            raise EPInputError("gpu backend: tensor must be contiguous")
        return a.data_ptr()
    if kind == "cupy":
        if not a.flags.c_contiguous:
            raise EPInputError("gpu backend: array must be C-contiguous")
        return int(a.data.ptr)
    return int(a.__cuda_array_interface__["data"][0])


def current_stream(kind: str, device: int) -> int:
    if kind == "torch":
        import torch
        return int(torch.cuda.current_stream(device).cuda_stream)
    if kind == "cupy":
        import cupy
        return int(cupy.cuda.get_current_stream().ptr)
    return 0


class DeviceArrays:
    """Preallocated device arrays (torch if present, else cupy) and zero-copy views in the caller's kind."""

    def __init__(self, device: int):
        self.device = device
        try:
            import torch
            self.torch = torch
        except ImportError:  # cupy-only environment
            self.torch = None
        self._cupy_cache = {}

    def empty(self, shape, dtype: str):
        if self.torch is not None:
            t = self.torch
            dt = {"bf16": t.bfloat16, "fp8": t.float8_e4m3fn, "f32": t.float32, "i32": t.int32,
                  "u32": t.uint32, "i64": t.int64, "bool": t.bool}[dtype]
            return t.empty(shape, dtype=dt, device=f"cuda:{self.device}")
        import cupy
        dt = {"bf16": cupy.uint16, "fp8": cupy.uint8, "f32": cupy.float32, "i32": cupy.int32,
              "u32": cupy.uint32, "i64": cupy.int64, "bool": cupy.bool_}[dtype]
        with cupy.cuda.Device(self.device):
            return cupy.empty(shape, dtype=dt)

    def zeros(self, shape, dtype):
        a = self.empty(shape, dtype)
        if self.torch is not None:
            a.zero_()
        else:
            a.fill(0)
        return a

    @staticmethod
    def ptr(a) -> int:
        return a.data_ptr() if hasattr(a, "data_ptr") else int(a.data.ptr)

    def view(self, a, kind: str):
        """a (own storage) as the caller's kind, no copy."""
        if a is None:
            return None
        own = "torch" if self.torch is not None else "cupy"
        if kind == own or kind == "cai":
            return a
        key = (id(a), kind)
        v = self._cupy_cache.get(key)
        if v is None:
            if kind == "cupy":
                import cupy
                t = self.torch
                if a.dtype == t.bfloat16:
                    v = cupy.from_dlpack(a.view(t.int16)).view(cupy.uint16)
                elif a.dtype == t.float8_e4m3fn:
                    v = cupy.from_dlpack(a.view(t.uint8))
                elif a.dtype == t.uint32:
                    v = cupy.from_dlpack(a.view(t.int32)).view(cupy.uint32)
                else:
                    v = cupy.from_dlpack(a)
            else:
                raise EPInputError("torch tensors given to a cupy-only gpu backend")
            self._cupy_cache[key] = (v, a)
            return v
        return v[0]
