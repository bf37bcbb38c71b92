"""Torch ops that turn epcomm's dispatch output into DeepEP's layouts and back, on the tensors' device.

Nothing here synchronises with the host: every function works on whole fixed-size buffers (rows past the received
count hold unspecified data, as in DeepEP), so the callers decide where a host sync happens.

* token-major (DeepEP's normal dispatch): one row per received token. epcomm delivers that directly when each rank is
  one "expert" (see normal.py): the grouped output of that routing has one group whose rows are ordered by
  (source rank, source token). The DeepEP per-token fields (top-k ids and weights, caller-quantised fp8 and scales)
  travel in a bf16 *carrier* row next to the token's bytes, because epcomm moves token rows only.
* batched (DeepEP's low-latency dispatch): EPBuffer's own layout "batched" is DeepEP's, row for row, so only the
  handle's layout ranges and the packed UE8M0 scales are computed here.
"""
from __future__ import annotations

import torch

BLOCK = 128                # channels per fp8 scale (epcomm.formats.BLOCK)


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ------------------------------------------------------------------------------------------ routing at rank level
def rank_routes(is_token_in_rank: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [T, width]: the ranks each token goes to, ascending, -1 padded (epcomm ids with one expert per rank).

    A token in more than `width` ranks keeps its `width` lowest ranks: width is min(topk, ranks), which a mask made
    from the token's top-k ids never exceeds."""
    t, r = is_token_in_rank.shape
    ar = torch.arange(r, device=is_token_in_rank.device, dtype=torch.int32).expand(t, r)
    key = torch.where(is_token_in_rank.bool(), ar, ar + r)        # chosen ranks sort first, in rank order
    key = key.sort(dim=1).values[:, :width]
    return torch.where(key < r, key, torch.full_like(key, -1)).to(torch.int32).contiguous()


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int):
    """DeepEP's get_dispatch_layout on the device: (per rank, per node or None, per expert, is_token_in_rank)."""
    dev = topk_idx.device
    t = topk_idx.shape[0]
    per_rank_experts = num_experts // num_ranks
    idx = topk_idx.long()
    valid = (idx >= 0) & (idx < num_experts)
    ones = torch.ones_like(idx, dtype=torch.int32)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    per_expert.scatter_add_(0, torch.where(valid, idx, num_experts).reshape(-1), ones.reshape(-1))
    rank_of = torch.where(valid, idx // per_rank_experts, num_ranks)
    in_rank = torch.zeros(t, num_ranks + 1, dtype=torch.bool, device=dev)
    in_rank.scatter_(1, rank_of, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    per_rank = in_rank.sum(0, dtype=torch.int32)
    per_node = None
    if num_nodes > 1:
        in_node = in_rank.view(t, num_nodes, num_ranks // num_nodes).any(dim=2)
        per_node = in_node.sum(0, dtype=torch.int32)
    return per_rank, per_node, per_expert[:num_experts].contiguous(), in_rank


# ------------------------------------------------------------------------------------------ carrier rows
class Carrier:
    """Byte layout of one carrier row (bf16 channels): [top-k weights fp32 | top-k ids int32 | token | fp8 scales].

    The width depends only on (hidden, topk), so bf16 and fp8 dispatches and the combine of one shape share an
    EPBuffer. Combine rows are [token bf16 | weights split into three bf16 parts (hi, mid, lo)]: each is summed over
    ranks by epcomm's combine, and a slot's weight comes back exactly when one rank sends it non-zero."""

    def __init__(self, hidden: int, topk: int):
        self.hidden, self.topk = hidden, topk
        self.width = round_up(hidden + 4 * topk, BLOCK)       # bf16 channels; fits every payload below
        self.w_at, self.ids_at, self.x_at = 0, 4 * topk, 8 * topk   # byte offsets

    def pack(self, x: torch.Tensor, scales: torch.Tensor | None, weights: torch.Tensor | None,
             ids: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[0]
        parts = []
        if self.topk:
            parts.append(_bytes(weights, torch.float32) if weights is not None
                         else torch.zeros(t, 4 * self.topk, dtype=torch.uint8, device=x.device))
            parts.append(_bytes(ids, torch.int32) if ids is not None
                         else torch.zeros(t, 4 * self.topk, dtype=torch.uint8, device=x.device))
        parts.append(_bytes(x, x.dtype))
        if scales is not None:
            parts.append(_bytes(scales, torch.float32))
        used = sum(p.shape[1] for p in parts)
        parts.append(torch.zeros(t, 2 * self.width - used, dtype=torch.uint8, device=x.device))
        return torch.cat(parts, dim=1).view(torch.bfloat16)

    def unpack(self, rows: torch.Tensor, fp8: bool):
        """(x, scales | None, weights, ids) copies out of carrier rows [n, width] (weights / ids None without top-k)."""
        b = rows.view(torch.uint8)
        h, k = self.hidden, self.topk
        weights = b[:, self.w_at:self.w_at + 4 * k].view(torch.float32).clone() if k else None
        ids = b[:, self.ids_at:self.ids_at + 4 * k].view(torch.int32).clone() if k else None
        if fp8:
            x = b[:, self.x_at:self.x_at + h].clone().view(torch.float8_e4m3fn)
            s_at = self.x_at + h
            scales = b[:, s_at:s_at + 4 * (h // BLOCK)].view(torch.float32).clone()
            return x, scales, weights, ids
        x = b[:, self.x_at:self.x_at + 2 * h].view(torch.bfloat16).clone()
        return x, None, weights, ids

    def fill_combine_rows(self, rows: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        n, h = x.shape[0], self.hidden
        rows[:n, :h] = x
        if weights is not None:
            hi, mid, lo = split_fp32(weights)
            k = self.topk
            rows[:n, h:h + k], rows[:n, h + k:h + 2 * k], rows[:n, h + 2 * k:h + 3 * k] = hi, mid, lo

    def combined(self, y: torch.Tensor, with_weights: bool):
        h, k = self.hidden, self.topk
        x = y[:, :h].clone()
        if not with_weights:
            return x, None
        return x, join_fp32(y[:, h:h + k], y[:, h + k:h + 2 * k], y[:, h + 2 * k:h + 3 * k])


def _bytes(t: torch.Tensor, dtype) -> torch.Tensor:
    """Rows of t as raw bytes [T, row bytes] (a copy only where t is not already dtype and contiguous)."""
    t = t.to(dtype)
    width = t.shape[1] * t.element_size()
    if t.numel() == 0:
        return torch.empty(t.shape[0], width, dtype=torch.uint8, device=t.device)
    return t.reshape(-1).view(torch.uint8).reshape(t.shape[0], width)


def split_fp32(w: torch.Tensor):
    """fp32 -> three bf16 parts whose fp32 sum is w again (8 + 8 + 8 mantissa bits; each residual is exact)."""
    w = w.float()
    hi = w.to(torch.bfloat16)
    r = w - hi.float()
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)
    return hi, mid, lo


def join_fp32(hi, mid, lo) -> torch.Tensor:
    return (hi.float() + mid.float()) + lo.float()


def local_expert_ids(global_ids: torch.Tensor, rank: int, per_rank: int, dtype) -> torch.Tensor:
    """Global expert ids -> ids of this rank's experts (0..per_rank-1), -1 for experts elsewhere."""
    g = global_ids.long()
    mine = (g >= rank * per_rank) & (g < (rank + 1) * per_rank)
    return torch.where(mine, g - rank * per_rank, torch.full_like(g, -1)).to(dtype)


def expert_counts(local_ids: torch.Tensor, per_rank: int) -> torch.Tensor:
    """int32 [per_rank]: entries of each local expert in local_ids (-1 entries ignored), on the device."""
    flat = local_ids.reshape(-1).long()
    counts = torch.zeros(per_rank + 1, dtype=torch.int32, device=local_ids.device)
    counts.scatter_add_(0, torch.where(flat >= 0, flat, per_rank), torch.ones_like(flat, dtype=torch.int32))
    return counts[:per_rank]


# ------------------------------------------------------------------------------------------ batched layout
def layout_ranges(src_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """DeepEP's layout range per (local expert, source rank), int64 [G, R]: begin << 32 | count, from the source rank
    of every slot [G, capacity] (-1: no token). Rows of a slab are ordered by source rank, so each source's rows are
    contiguous."""
    g = src_rank.shape[0]
    src = src_rank.long()
    src = torch.where(src >= 0, src, torch.full_like(src, num_ranks))
    counts = torch.zeros(g, num_ranks + 1, dtype=torch.int64, device=src_rank.device)
    counts.scatter_add_(1, src, torch.ones_like(src))
    counts = counts[:, :num_ranks]
    begin = counts.cumsum(1) - counts
    return (begin << 32) | counts


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """DeepEP's use_ue8m0 scales from power-of-two fp32 scales [G, C, H/128] (EPConfig scale_format "ue8m0"): each
    scale's biased exponent as one byte, four per int32 (block 4i + j in byte j of word i), [G, C, H/512], column-major
    in the last two dims as DeepEP returns them. Reads the scales once; the tokens are not touched."""
    g, c, cols = scales.shape
    by_col = scales.transpose(1, 2)                                        # [G, cols, C]
    exps = (by_col.contiguous().view(torch.int32) >> 23).to(torch.int64) & 0xFF   # a power of two: mantissa 0
    b = exps.view(g, cols // 4, 4, c)
    words = b[:, :, 0] | (b[:, :, 1] << 8) | (b[:, :, 2] << 16) | (b[:, :, 3] << 24)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # as int32 bits
    return words.transpose(1, 2)                                           # [G, C, cols/4], stride(1) == 1
