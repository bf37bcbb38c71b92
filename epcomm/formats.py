"""Token formats on the wire and in expert_x: bf16, and fp8 e4m3 with one fp32 scale per 128 channels.

fp8 scales come in two formats (SCALE_FORMATS, `EPConfig.scale_format`): "fp32" (amax / 448) and "ue8m0" (that scale
rounded up to a power of two, so no value saturates: what DeepGEMM's UE8M0 paths consume; still stored as fp32).
A hidden size that is not a multiple of 128 has a partial last block (its scale covers the channels that exist).

A TokenFormat says everything the code needs to know about one format: bytes per row, its scales, its numpy dtype,
how the spec quantises and dequantises it, and the define the kernels are built with. `EPConfig.token_format` is one
of these objects (users may pass the name). Adding a format means adding one TokenFormat here (and its kernel code);
nothing outside this module compares format names.

numpy has no bf16 / fp8 dtypes of its own; ml_dtypes (maintained with JAX) provides them with IEEE round-to-nearest-even
conversions, which is what the GPU conversion instructions do too. Both are imported on first use, not with this
module: EPConfig (and through `epcomm/__init__` every `epcomm.*` import, the launcher's included) needs only the
constants here.
"""
from __future__ import annotations

import functools
from typing import Any

BLOCK = 128          # channels that share one fp8 scale
FP8_MAX = 448.0      # largest finite e4m3 value
SCALE_FLOOR = 1e-4   # amax below this is treated as this, so all-zero blocks get a finite scale
SCALE_BYTES = 4      # one fp32 scale
SCALE_FORMATS = ("fp32", "ue8m0")   # plain amax / 448, or that rounded up to a power of two


class TokenFormat(str):
    """One token format. It is its name (a str: "bf16", "fp8"), so configs, JSON records and messages keep saying the
    name; the attributes say everything else.

    element_bytes: bytes per channel of expert_x. quantized: dispatch quantises the bf16 tokens into this format, with
    one fp32 scale per BLOCK channels (expert_scales), and dequantize turns rows back into numbers. kernel_define:
    the -D defines the kernels are specialised with for this format. hidden_multiple: hidden must be a multiple of
    this (rows of 16 bytes: the transports move 16-byte vectors).
    """

    element_bytes: int
    quantized: bool
    kernel_define: dict[str, int]
    hidden_multiple: int
    _dtype_name: str

    def __new__(cls, name: str, *, element_bytes: int, quantized: bool, kernel_define: dict[str, int],
                dtype_name: str):
        self = super().__new__(cls, name)
        self.element_bytes, self.quantized, self._dtype_name = element_bytes, quantized, dtype_name
        self.hidden_multiple = 16 // element_bytes
        self.kernel_define = dict(kernel_define)
        return self

    def __reduce__(self):          # pickles (e.g. an EPConfig sent over MPI) resolve to the one object of the name
        return resolve, (str(self),)

    @property
    def name(self) -> str:
        return str(self)

    @property
    def dtype(self):
        """numpy dtype of expert_x rows (ml_dtypes' bfloat16 / float8_e4m3fn)."""
        return _numpy_dtype(self._dtype_name)

    def scale_cols(self, hidden: int) -> int:
        """fp32 scales per row (0 without scales); a partial last block has a scale of its own."""
        return -(-hidden // BLOCK) if self.quantized else 0

    def scale_shape(self, rows: int, hidden: int) -> tuple[int, int] | None:
        """Shape of expert_scales for `rows` rows, None for a format without scales."""
        return (rows, self.scale_cols(hidden)) if self.quantized else None

    def row_bytes(self, hidden: int) -> int:
        """Bytes of one token on the wire: data + scales."""
        return self.element_bytes * hidden + SCALE_BYTES * self.scale_cols(hidden)

    def quantize(self, x, scale_format: str = "fp32") -> tuple[Any, Any]:
        """bf16 rows x[..., H] -> (rows in this format, fp32 scales[..., ceil(H/128)] or None): what dispatch
        delivers. scale_format: "fp32" or "ue8m0" (see quantize_fp8)."""
        if self.quantized:
            return quantize_fp8(x, pow2=scale_format == "ue8m0")
        import numpy as np
        return np.asarray(x, self.dtype), None

    def dequantize(self, rows, scales=None):
        """Rows in this format (and their scales) -> fp32 numbers."""
        if self.quantized:
            return dequantize_fp8(rows, scales)
        import numpy as np
        return np.asarray(rows).astype(np.float32)


BF16_FORMAT = TokenFormat("bf16", element_bytes=2, quantized=False, kernel_define={"EP_FP8": 0},
                          dtype_name="bfloat16")
FP8_FORMAT = TokenFormat("fp8", element_bytes=1, quantized=True, kernel_define={"EP_FP8": 1},
                         dtype_name="float8_e4m3fn")
FORMATS: dict[str, TokenFormat] = {f.name: f for f in (BF16_FORMAT, FP8_FORMAT)}
FORMAT_NAMES = tuple(FORMATS)


def resolve(fmt) -> TokenFormat:
    """The TokenFormat of a name ("bf16", "fp8") or of a TokenFormat; EPInputError for anything else."""
    found = FORMATS.get(fmt) if isinstance(fmt, str) else None
    if found is None:
        from .errors import EPInputError
        raise EPInputError(f"token_format must be one of {FORMAT_NAMES}, got {fmt!r}")
    return found


# ------------------------------------------------------------------------------------ numpy side (loaded on first use)

@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str):
    import ml_dtypes
    import numpy as np
    return np.dtype(getattr(ml_dtypes, name))


def __getattr__(name):  # BF16 / FP8: the numpy dtypes, without importing numpy with this module
    if name in ("BF16", "FP8"):
        dtype = (BF16_FORMAT if name == "BF16" else FP8_FORMAT).dtype
        globals()[name] = dtype
        return dtype
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _blocks(xf, fill=0.0):
    """x[..., H] fp32 -> [..., ceil(H/128), 128], a partial last block padded with `fill` (zeros change no amax)."""
    import numpy as np
    h = xf.shape[-1]
    n = -(-h // BLOCK)
    if n * BLOCK != h:
        pad = np.full((*xf.shape[:-1], n * BLOCK - h), fill, np.float32)
        xf = np.concatenate([xf, pad], axis=-1)
    return xf.reshape(*xf.shape[:-1], n, BLOCK)


def pow2_ceil(s):
    """The smallest power of two >= s (s > 0, fp32), exactly: s = m * 2**e with m in [0.5, 1)."""
    import numpy as np
    m, e = np.frexp(np.asarray(s, np.float32))
    return np.ldexp(np.float32(1.0), np.where(m == 0.5, e - 1, e)).astype(np.float32)


def quantize_fp8(x, pow2: bool = False):
    """Blockwise fp8 of rows x[..., H] -> (q[..., H] e4m3, scales[..., ceil(H/128)] fp32).

    scale = max(amax, 1e-4) / 448 in fp32 (pow2: rounded up to a power of two, the "ue8m0" scale format, so
    amax / scale <= 448 and nothing saturates); q = e4m3(x_fp32 / scale), rounded to nearest even, saturating.
    A partial last block (H not a multiple of 128) takes its amax over the channels it has.
    """
    import numpy as np
    xf = np.asarray(x).astype(np.float32)
    h = xf.shape[-1]
    blocks = _blocks(xf)
    amax = np.abs(blocks).max(axis=-1, initial=0.0)
    scales = (np.maximum(amax, np.float32(SCALE_FLOOR)) / np.float32(FP8_MAX)).astype(np.float32)
    if pow2:
        scales = pow2_ceil(scales)
    ratio = (blocks / scales[..., None]).astype(np.float32)
    # x/scale can exceed 448 by a rounding step; saturate like the GPU's satfinite conversion.
    ratio = np.clip(ratio, -FP8_MAX, FP8_MAX)
    q = ratio.reshape(*xf.shape[:-1], blocks.shape[-2] * BLOCK)[..., :h].astype(FP8_FORMAT.dtype)
    return q, scales


def dequantize_fp8(q, scales):
    """Inverse of quantize_fp8, in fp32."""
    import numpy as np
    qf = np.asarray(q).astype(np.float32)
    h = qf.shape[-1]
    blocks = _blocks(qf)
    out = blocks * np.asarray(scales, np.float32)[..., None]
    return out.reshape(*qf.shape[:-1], blocks.shape[-2] * BLOCK)[..., :h]


def random_tokens(rng, t: int, hidden: int, scale: float = 1.0):
    """bf16 test tokens with varied magnitudes per row, so fp8 scales differ between blocks."""
    import numpy as np
    rows = rng.standard_normal((t, hidden), dtype=np.float32) * scale
    rows *= np.exp2(rng.integers(-4, 5, size=(t, 1))).astype(np.float32)
    return rows.astype(BF16_FORMAT.dtype)
