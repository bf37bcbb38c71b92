"""numpy / torch / cupy interop: what kind of array is this (shape / dtype / device without copying or syncing),
copies between numpy and the device kinds (for checks, tests, benchmarks and demos), and the small adapter those
callers use to put inputs where the backend takes them, wait for the device and time a call.

Only attributes that live on the host are read (shape, dtype, device), so describing a GPU array never waits for
the GPU. dtype names are normalised to numpy-style strings: "bfloat16", "float8_e4m3fn", "int32", "float32", ...

bf16 on cupy: cupy has no bfloat16 dtype, so a cupy array of uint16 / int16 is accepted wherever bf16 is expected and
read as raw bf16 bits (``describe(a).dtype`` stays "uint16"/"int16"; ``is_bf16`` says yes). numpy and torch must use
their real bf16 dtypes (ml_dtypes.bfloat16, torch.bfloat16): a uint16 numpy array is rejected, not reinterpreted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .formats import BF16, FP8


@dataclass(frozen=True)
class ArrayInfo:
    kind: str            # "numpy" | "torch" | "cupy"
    shape: tuple
    dtype: str           # normalised dtype name
    device: str          # "cpu" or "cuda:N"

    @property
    def on_host(self) -> bool:
        return self.device == "cpu"

    def __str__(self) -> str:
        return f"{self.kind} {self.dtype}{list(self.shape)} on {self.device}"


def kind_of(a) -> str | None:
    if isinstance(a, np.ndarray):
        return "numpy"
    mod = type(a).__module__ or ""
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    return None


def describe(a) -> ArrayInfo | None:
    """ArrayInfo of a numpy / torch / cupy array, or None for anything else."""
    kind = kind_of(a)
    if kind == "numpy":
        return ArrayInfo("numpy", tuple(a.shape), np.dtype(a.dtype).name, "cpu")
    if kind == "torch":
        dt = str(a.dtype).replace("torch.", "")
        dev = a.device
        device = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index if dev.index is not None else 0}"
        return ArrayInfo("torch", tuple(a.shape), dt, device)
    if kind == "cupy":
        return ArrayInfo("cupy", tuple(a.shape), np.dtype(a.dtype).name, f"cuda:{a.device.id}")
    return None


def is_bf16(info: ArrayInfo) -> bool:
    return info.dtype == "bfloat16" or (info.kind == "cupy" and info.dtype in ("uint16", "int16"))


def to_torch(a, device):
    """numpy array -> torch tensor of the same dtype on `device` (a copy; for tests, benchmarks and demos).

    torch.from_numpy knows neither ml_dtypes type, so bf16 and fp8 e4m3 travel as raw bits and are viewed back.
    The inverse of to_numpy. Imports torch on first use."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    elif a.dtype == FP8:
        t = torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        t = torch.from_numpy(a)
    return t.to(device)


def to_numpy(a):
    """numpy view of a numpy / torch / cupy array (copies device arrays to host; for tests and checks only)."""
    if a is None or isinstance(a, np.ndarray):
        return a
    kind = kind_of(a)
    if kind == "torch":
        import torch
        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BF16)
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy().view(FP8)
        if t.dtype == torch.uint32:
            return t.view(torch.int32).numpy().view(np.uint32)
        return t.numpy()
    if kind == "cupy":
        return a.get()
    return np.asarray(a)


def is_capturing(kind: str) -> bool:
    """Is the caller's current stream being captured into a CUDA graph (torch / cupy)?"""
    if kind == "torch":
        import torch
        return bool(torch.cuda.is_current_stream_capturing())
    if kind == "cupy":
        import cupy
        return bool(getattr(cupy.cuda.get_current_stream(), "is_capturing", lambda: False)())
    return False


def type_name(a) -> str:
    """Short description for error messages."""
    info = describe(a)
    return str(info) if info is not None else type(a).__name__


# ------------------------------------------------------------------ where inputs go: one adapter per array kind
# put(a): a numpy input as the backend takes it; sync(): wait for the device; timer(): start timing, returns a
# function giving the microseconds since.

class HostArrays:
    """numpy in and out (host backend); wall-clock timing after a barrier, so every rank's time covers the whole
    exchange."""
    kind = "numpy"

    def __init__(self, comm=None):
        self.comm = comm

    def put(self, a):
        return a

    def sync(self) -> None:
        pass

    def timer(self):
        if self.comm is not None:
            self.comm.Barrier()
        start = time.perf_counter()
        return lambda: (time.perf_counter() - start) * 1e6


class TorchArrays:
    """torch tensors on this rank's GPU; CUDA-event timing on the current stream (no host sync inside the op)."""
    kind = "torch"

    def __init__(self, device: int):
        import torch
        self.torch = torch
        self.device = torch.device(f"cuda:{device}")
        torch.cuda.set_device(self.device)

    def put(self, a):
        return None if a is None else to_torch(a, self.device)

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def timer(self):
        torch = self.torch
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def done():
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) * 1e3
        return done


class CupyArrays:
    """cupy arrays on this rank's GPU (bf16 as uint16 bits, fp8 as uint8); CUDA-event timing on the current stream."""
    kind = "cupy"

    def __init__(self, device: int):
        import cupy
        self.cupy = cupy
        self.device = device
        cupy.cuda.Device(device).use()

    def put(self, a):
        if a is None:
            return None
        a = np.ascontiguousarray(a)
        if a.dtype == BF16:
            a = a.view(np.uint16)
        elif a.dtype == FP8:
            a = a.view(np.uint8)
        with self.cupy.cuda.Device(self.device):
            return self.cupy.asarray(a)

    def sync(self) -> None:
        self.cupy.cuda.Device(self.device).synchronize()

    def timer(self):
        cuda = self.cupy.cuda
        start, stop = cuda.Event(), cuda.Event()
        start.record()

        def done():
            stop.record()
            stop.synchronize()
            return cuda.get_elapsed_time(start, stop) * 1e3
        return done


def arrays_for(ctx, kind: str | None = None):
    """The adapter for a Context: numpy on the host backend, torch (or `kind` "cupy") on the GPU backend."""
    if ctx.backend != "gpu":
        return HostArrays(ctx.comm)
    return CupyArrays(ctx.device) if kind == "cupy" else TorchArrays(ctx.device)
