"""Kernel variants under measurement: compile-time alternatives picked by the environment, for A/B runs.

`EPCOMM_VARIANT=name[,name...]` (unset or empty: the baseline) turns each name into a -D define of the kernels
(jit.defines_for adds them, so the kernel cache keys on them) and, where a variant needs it, into host behaviour
(GpuBackend: dynamic shared memory for "tma", the grid for small batches for "tgrid"). One device call can then run
the same bench with and without a variant, side by side. A variant becomes the default only once measured
(dev/GPU-LOG.md has each one's prediction and outcome); until then nothing changes unless the variable is set.

Pure Python: no CUDA package needed (the CPU compile test builds every specialisation under every variant).
"""
from __future__ import annotations

import os

from ...errors import EPInputError

ENV = "EPCOMM_VARIANT"

# name -> (kernel define, what it changes)
VARIANTS: dict[str, tuple[str, str]] = {
    "cfast": ("EP_V_CFAST", "ht combine, expert side: the valid rows of a (token, rank) compacted, up to 4 of them x "
                            "3 warp steps of loads in flight per round trip (baseline: 2 steps x all K slots)"),
    "qfast": ("EP_V_QFAST", "fp8 quantiser: the quotient x / scale from one reciprocal per block and an exact fma "
                            "correction (bit-exact with the division), two e4m3 conversions per instruction"),
    "tma": ("EP_V_TMA", "ht dispatch receive (large batches): each warp moves a message with bulk asynchronous "
                        "copies (TMA) through shared memory, one load and one store per local expert row"),
    "tgrid": ("EP_V_TGRID", "host: a launch of T tokens uses ~T/4 blocks (at least 16, enough for the ht receive's "
                            "slice units) when that is below the grid: small batches pass fewer per-block hand-overs"),
}


def active(environ=None) -> tuple[str, ...]:
    """The variant names in EPCOMM_VARIANT, sorted (an unknown name is an EPInputError naming the known ones)."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    names = sorted({n.strip() for n in raw.replace("+", ",").split(",") if n.strip()})
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise EPInputError(f"{ENV}={raw!r}: unknown variant(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(VARIANTS))}")
    return tuple(names)


def defines(names=None) -> dict[str, int]:
    """-D defines of these variants (default: the active ones), each = 1. The baseline adds none, so its kernels
    keep the cache key (and PTX) they had before variants existed; the kernels default every EP_V_* to 0."""
    on = active() if names is None else tuple(sorted(names))
    unknown = [n for n in on if n not in VARIANTS]
    if unknown:
        raise EPInputError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIANTS))}")
    return {VARIANTS[n][0]: 1 for n in on}


def label(names=None) -> str:
    """'baseline' or the names joined with '+' (for logs and bench notes)."""
    on = active() if names is None else tuple(sorted(names))
    return "+".join(on) if on else "baseline"


# ------------------------------------------------------------------------------------------------ tgrid (host side)
TGRID_TOKENS_PER_BLOCK = 4
TGRID_MIN_BLOCKS = 16


def row_slices(hidden: int) -> int:
    """Slices of a row in the kernels' small-batch copies (layout.cuh ROW_SLICES): 16-byte chunks of a bf16 row in
    warp steps of 32, SLICE_STEPS steps a slice."""
    steps = -(-(hidden // 8) // 32)
    per = steps // 8 if steps >= 8 else 1
    return -(-steps // per)


def small_batch_grid(tokens: int, grid: int, sources: int = 1, slices: int = 1, warps: int = 16) -> int:
    """Blocks of a launch of `tokens` tokens under "tgrid": about one block per TGRID_TOKENS_PER_BLOCK tokens, at
    least TGRID_MIN_BLOCKS, never more than the grid (large batches keep the whole grid); and enough warps that the
    ht dispatch receive of sources x tokens messages keeps its (message, slice) units (at most 4 per warp: beyond,
    it takes whole messages, which at 128 tokens measured 26 instead of 18 us, dev/GPU-LOG.md call 15)."""
    t = max(0, int(tokens))
    want = max(TGRID_MIN_BLOCKS, -(-t // TGRID_TOKENS_PER_BLOCK), -(-(sources * t * slices) // (4 * warps)))
    return max(1, min(int(grid), want))


# ------------------------------------------------------------------------------------------------ tma (host side)
BULK_PIECE_MAX = 8192   # kernels/bulk.cuh: bytes of a warp's shared-memory slot


def bulk_smem_bytes(data_bytes: int, threads: int) -> int:
    """Dynamic shared memory of the "tma" receive (kernels/bulk.cuh BULK_SMEM_BYTES, checked there by a define): one
    slot per warp, the message data in equal 16-byte pieces of at most BULK_PIECE_MAX, then the warp's mbarrier."""
    pieces = -(-data_bytes // BULK_PIECE_MAX)
    piece = -(-(data_bytes // 16) // pieces) * 16
    return (threads // 32) * (piece + 16)
