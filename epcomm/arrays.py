"""What kind of array is this? shape / dtype / device of numpy, torch and cupy arrays without copying or syncing.

Only attributes that live on the host are read (shape, dtype, device), so describing a GPU array never waits for
the GPU. dtype names are normalised to numpy-style strings: "bfloat16", "float8_e4m3fn", "int32", "float32", ...

bf16 on cupy: cupy has no bfloat16 dtype, so a cupy array of uint16 / int16 is accepted wherever bf16 is expected and
read as raw bf16 bits (``describe(a).dtype`` stays "uint16"/"int16"; ``is_bf16`` says yes). numpy and torch must use
their real bf16 dtypes (ml_dtypes.bfloat16, torch.bfloat16): a uint16 numpy array is rejected, not reinterpreted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    The inverse of epcomm.reference.to_numpy. Imports torch on first use."""
    import torch

    from .formats import BF16, FP8
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    elif a.dtype == FP8:
        t = torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        t = torch.from_numpy(a)
    return t.to(device)


def type_name(a) -> str:
    """Short description for error messages."""
    info = describe(a)
    return str(info) if info is not None else type(a).__name__
