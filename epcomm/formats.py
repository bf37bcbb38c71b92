"""Token formats on the wire and in expert_x: bf16, and fp8 e4m3 with one fp32 scale per 128 channels.

numpy has no bf16 / fp8 dtypes of its own; ml_dtypes (maintained with JAX) provides them with IEEE round-to-nearest-even
conversions, which is what the GPU conversion instructions do too.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FORMATS = ("bf16", "fp8")
BLOCK = 128          # channels that share one fp8 scale
FP8_MAX = 448.0      # largest finite e4m3 value
SCALE_FLOOR = 1e-4   # amax below this is treated as this, so all-zero blocks get a finite scale


def check_format(name: str) -> str:
    if name not in FORMATS:
        from .errors import EPInputError
        raise EPInputError(f"token_format must be one of {FORMATS}, got {name!r}")
    return name


def quantize_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise fp8 of rows x[..., H] -> (q[..., H] e4m3, scales[..., H/128] fp32).

    scale = max(amax, 1e-4) / 448 in fp32; q = e4m3(x_fp32 / scale), rounded to nearest even, saturating.
    """
    xf = np.asarray(x).astype(np.float32)
    h = xf.shape[-1]
    if h % BLOCK:
        raise ValueError(f"hidden {h} is not a multiple of {BLOCK}")
    blocks = xf.reshape(*xf.shape[:-1], h // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1, initial=0.0)
    scales = (np.maximum(amax, np.float32(SCALE_FLOOR)) / np.float32(FP8_MAX)).astype(np.float32)
    ratio = (blocks / scales[..., None]).astype(np.float32)
    # x/scale can exceed 448 by a rounding step; saturate like the GPU's satfinite conversion.
    ratio = np.clip(ratio, -FP8_MAX, FP8_MAX)
    q = ratio.astype(FP8).reshape(xf.shape)
    return q, scales


def dequantize_fp8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of quantize_fp8, in fp32."""
    qf = np.asarray(q).astype(np.float32)
    h = qf.shape[-1]
    blocks = qf.reshape(*qf.shape[:-1], h // BLOCK, BLOCK)
    return (blocks * np.asarray(scales, np.float32)[..., None]).reshape(qf.shape)


def random_tokens(rng: np.random.Generator, t: int, hidden: int, scale: float = 1.0) -> np.ndarray:
    """bf16 test tokens with varied magnitudes per row, so fp8 scales differ between blocks."""
    rows = rng.standard_normal((t, hidden), dtype=np.float32) * scale
    rows *= np.exp2(rng.integers(-4, 5, size=(t, 1))).astype(np.float32)
    return rows.astype(BF16)
