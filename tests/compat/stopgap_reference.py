"""The low-latency path of epcomm.compat.deep_ep as it ran before it used EPBuffer's own batched layout (up to
a26de83), kept as a reference: a grouped EPBuffer of the same shape, DeepEP's batched layout gathered from its
grouped output (index_select of x, scales and src_info), expert outputs gathered back for combine, and round_scale
quantised on receipt from bf16. tests/compat/deepep_checks.py runs it next to the native path and compares the two
bit for bit (they must agree: same routing order, same quantisation, same combine sums).
"""
from __future__ import annotations

import torch

from epcomm.compat.deep_ep.bridge import from_backend, to_backend

BLOCK, FP8_MAX, SCALE_FLOOR = 128, 448.0, 1e-4


def batched_from_grouped(row_offsets: torch.Tensor, capacity: int, num_rows: int) -> torch.Tensor:
    """Grouped row of every batched slot (group g, position p), flattened [G * capacity]: row_offsets[g] + p (slots
    past a group's count point at some other row, clamped into the buffer)."""
    ro = row_offsets.long()
    p = torch.arange(capacity, device=ro.device, dtype=torch.int64)
    return (ro[:-1, None] + p[None, :]).clamp_(max=num_rows - 1).reshape(-1)


def grouped_from_batched(row_offsets: torch.Tensor, capacity: int, num_rows: int) -> torch.Tensor:
    """Batched slot of every grouped row, [num_rows]: g * capacity + (i - row_offsets[g]); rows past the last group
    point at slot 0."""
    ro = row_offsets.long()
    groups = ro.numel() - 1
    i = torch.arange(num_rows, device=ro.device, dtype=torch.int64)
    g = torch.searchsorted(ro[1:].contiguous(), i, right=True)
    gc = g.clamp(max=max(groups - 1, 0))
    pos = i - ro[gc]
    ok = (g < groups) & (pos < capacity)
    return torch.where(ok, gc * capacity + pos, torch.zeros_like(i))


def layout_ranges(src_rank: torch.Tensor, valid: torch.Tensor, num_ranks: int) -> torch.Tensor:
    g = src_rank.shape[0]
    src = torch.where(valid, src_rank.long(), torch.full_like(src_rank, num_ranks, dtype=torch.int64))
    counts = torch.zeros(g, num_ranks + 1, dtype=torch.int64, device=src_rank.device)
    counts.scatter_add_(1, src, torch.ones_like(src))
    counts = counts[:, :num_ranks]
    begin = counts.cumsum(1) - counts
    return (begin << 32) | counts


def quantize_pow2(x: torch.Tensor, ue8m0: bool):
    """e4m3 with power-of-two scales (the smallest >= max(amax, 1e-4) / 448) per 128 channels: (q, fp32 scales) or,
    with ue8m0, (q, the scales' biased exponents packed four per int32, block 4i + j in byte j)."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    amax = xf.abs().amax(dim=-1).clamp(min=SCALE_FLOOR)
    mant, exp = torch.frexp(amax / FP8_MAX)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    scales = torch.ldexp(torch.ones_like(amax), exp)
    q = (xf / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(shape)
    if not ue8m0:
        return q, scales
    return q, (exp + 127).to(torch.uint8).contiguous().view(torch.int32)


class StopgapLowLatency:
    """The old path on grouped EPBuffers of a Buffer's context, one per (shape, wire format), made collectively on
    first use. dispatch -> (recv_x, scales, recv_count, src_info, layout_range); combine(y, weights) of the latest
    dispatch -> combined_x."""

    def __init__(self, buf):
        self.buf, self.eps, self.last = buf, {}, None

    def _ep(self, hidden, topk, num_experts, m, fmt):
        key = (hidden, topk, num_experts, m, fmt)
        if key not in self.eps:
            b = self.buf
            self.eps[key] = b._new_ep(b._cfg(hidden=hidden, topk=topk, num_experts=num_experts, max_tokens_per_rank=m,
                                             token_format=fmt, mode=b._ll_mode))
        return self.eps[key]

    def dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale=False, ue8m0=False):
        host, r, hidden = self.buf._host, self.buf.group_size, x.shape[1]
        g, cap = num_experts // r, m * r
        ep = self._ep(hidden, topk_idx.shape[1], num_experts, m, "fp8" if use_fp8 and not round_scale else "bf16")
        ids = topk_idx.clamp(-1, num_experts).to(torch.int32).contiguous()
        res = ep.dispatch(to_backend(x, host), to_backend(ids, host))
        grouped, ro = from_backend(res.expert_x), from_backend(res.row_offsets)
        idx = batched_from_grouped(ro, cap, grouped.shape[0])
        counts = from_backend(res.tokens_per_expert).to(torch.int32)
        scales = None
        if use_fp8 and round_scale:
            recv_x, scales = quantize_pow2(grouped.index_select(0, idx).view(g, cap, hidden), ue8m0)
        else:
            recv_x = grouped.view(torch.uint8).index_select(0, idx).view(g, cap, -1).view(grouped.dtype)
            if use_fp8:
                scales = from_backend(res.expert_scales).index_select(0, idx).view(g, cap, -1)
        info = from_backend(res.src_info).index_select(0, idx).view(g, cap, 3)
        valid = torch.arange(cap, device=counts.device)[None, :] < counts.long()[:, None]
        src_info = torch.where(valid, info[..., 1], torch.full_like(info[..., 1], -1))
        self.last = (ep, res, ro, grouped.shape[0])
        return recv_x, scales, counts, src_info, layout_ranges(info[..., 0], valid, r)

    def combine(self, y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        ep, res, ro, rows = self.last
        host = self.buf._host
        expert_y = y.reshape(-1, y.shape[2]).index_select(0, grouped_from_batched(ro, y.shape[1], rows))
        out = ep.combine(to_backend(expert_y, host), res.handle, to_backend(topk_weights.contiguous(), host))
        return from_backend(out).clone()

    def close(self):
        for key in sorted(self.eps, key=repr):
            self.eps[key].close()
        self.eps = {}
