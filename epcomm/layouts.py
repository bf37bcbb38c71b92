"""Output layouts: where dispatch puts each received row, and where combine finds it again (numpy; the spec and the
host backend share it, the GPU kernels compute the same placement).

Every backend first knows the received rows packed group after group, in the spec's order (`counts[g]` rows per
group). The layout then says where packed row i of group g lives:

* "grouped": group g starts at row_offsets[g]; with expert_alignment N every group is padded to a multiple of N
  rows, so every row_offsets[g] is a multiple of N (DeepGEMM's contiguous grouped GEMM wants 128). Pad rows carry
  src_info (-1, -1, -1) like the rows past the end.
* "batched": group g is slab g of expert_x [n_local, capacity, H]; row i of it is packed row i. row_offsets[g] =
  g * capacity (flat row of the slab's start); tokens_per_expert[g] is how many rows of slab g are valid (the mask).

A src_info row of -1 means "no token here" (padding, an unused slab row, past the end): combine never reads it.

fp8 scales: scale_layout "row" is [rows..., cols] row-major; "col" is the same shape as a column-major view of a
buffer whose columns are padded to a multiple of 4 rows (16 bytes: what TMA loads need), per slab in the batched
layout. Both are numpy views with the logical shape; `.strides` tell them apart.
"""
from __future__ import annotations

import numpy as np

from .errors import EPError

TMA_ALIGN_ROWS = 4   # fp32 scales per 16 bytes


def tma_aligned(rows: int) -> int:
    """Rows of one column of column-major scales: `rows` rounded up to a multiple of 4 (16-byte aligned columns)."""
    return -(-rows // TMA_ALIGN_ROWS) * TMA_ALIGN_ROWS


def check_capacity(cfg, counts, rank: int | None = None) -> None:
    """Layout "batched": every local expert's rows must fit its slab (EPError naming the expert otherwise)."""
    if cfg.layout != "batched":
        return
    cap = cfg.batched_capacity
    over = np.nonzero(np.asarray(counts) > cap)[0]
    if len(over):
        g = int(over[0])
        where = f"rank {rank}: " if rank is not None else ""
        raise EPError(f"{where}local expert {g} received {int(counts[g])} rows > expert_capacity={cap} of layout "
                      f"'batched' (a token that lists one expert twice needs two rows; raise expert_capacity)")


def group_starts(cfg, counts) -> np.ndarray:
    """Flat row (of expert_x reshaped to [-1, H]) where each group starts, int64 [num groups + 1]: the last entry is
    the end of the last group (grouped) or the slab count times the capacity (batched)."""
    counts = np.asarray(counts, np.int64)
    if cfg.layout == "batched":
        return np.arange(len(counts) + 1, dtype=np.int64) * cfg.batched_capacity
    n = cfg.expert_alignment
    padded = -(-counts // n) * n
    return np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)


def row_offsets(cfg, counts) -> np.ndarray:
    """DispatchResult.row_offsets (uint32) for groups of `counts` rows."""
    return group_starts(cfg, counts).astype(np.uint32)


def placement(cfg, counts) -> np.ndarray:
    """Flat row of every packed row (group after group, spec order inside a group), int64."""
    counts = np.asarray(counts, np.int64)
    starts = group_starts(cfg, counts)[:-1]
    if not counts.sum():
        return np.zeros(0, np.int64)
    group = np.repeat(np.arange(len(counts)), counts)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    return starts[group] + np.arange(int(counts.sum()), dtype=np.int64) - first[group]


def _empty_scales(cfg) -> np.ndarray:
    """Zeroed expert_scales in cfg's scale layout, with the logical shape [*rows_shape, scale_cols]."""
    lead, cols = cfg.rows_shape, cfg.scale_cols
    if cfg.scale_layout == "row":
        return np.zeros((*lead, cols), np.float32)
    # column-major per slab: storage [slabs..., cols, aligned rows], viewed back as [slabs..., rows, cols]
    *slabs, rows = lead
    store = np.zeros((*slabs, cols, tma_aligned(rows)), np.float32)
    return np.swapaxes(store[..., :rows], -1, -2)


def arrange(cfg, counts, info: np.ndarray, rows: np.ndarray, scales: np.ndarray | None):
    """(expert_x, expert_scales, row_offsets, src_info) of a rank from its packed rows: info [n, 3] int32 (source
    rank, token, slot), rows [n, H] in the token format, scales [n, scale_cols] fp32 or None."""
    check_capacity(cfg, counts)
    where = placement(cfg, counts)
    lead, fmt = cfg.rows_shape, cfg.token_format
    expert_x = np.zeros((*lead, cfg.hidden), fmt.dtype)
    expert_x.reshape(-1, cfg.hidden)[where] = rows
    src_info = np.full((*lead, 3), -1, np.int32)
    src_info.reshape(-1, 3)[where] = info
    expert_scales = None
    if fmt.quantized:
        expert_scales = _empty_scales(cfg)
        flat = expert_scales.reshape(-1, cfg.scale_cols)   # a view for "row"; for "col" a copy, written back below
        if np.shares_memory(flat, expert_scales):
            flat[where] = scales
        else:
            idx = np.unravel_index(where, lead)
            expert_scales[idx] = scales
    return expert_x, expert_scales, row_offsets(cfg, counts), src_info


def packed(cfg, arr, counts) -> np.ndarray:
    """The packed rows (group after group) of an array in cfg's layout ([*rows_shape, ...], e.g. expert_y)."""
    arr = np.asarray(arr)
    lead = cfg.rows_shape
    idx = np.unravel_index(placement(cfg, counts), lead)
    return arr[idx]


def valid_rows(src_info) -> np.ndarray:
    """Mask [*rows_shape] of the rows that hold a token (src_info source >= 0)."""
    return np.asarray(src_info)[..., 0] >= 0
