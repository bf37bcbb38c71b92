"""DeepEP's low-latency mode on epcomm: low_latency_dispatch / low_latency_combine in the batched layout
[local experts, M * ranks, hidden], get_next_low_latency_combine_buffer, clean_low_latency_buffer.

An epcomm buffer in mode "ll" (or "ht": Buffer(low_latency_epcomm_mode=)) per (hidden, topk, num_experts,
num_max_dispatch_tokens_per_rank, format); the batched layout is built from epcomm's grouped output by
layouts.batched_from_grouped (a gather on the device); EPBuffer's own layout="batched" (issue 13) is to replace it.
No call here synchronises with the host.
"""
from __future__ import annotations

import torch

from ...errors import EPInputError
from . import layouts as L
from .base import IDS, BufferBase
from .bridge import Pool, check_tensor, from_backend, to_backend
from .handles import LowLatencyHandle


class LowLatencyMode(BufferBase):
    """Buffer's low-latency calls (mixed into Buffer)."""

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: epcomm's signal words carry the round, so stale ones are harmless."""
        self._usable()

    def _ll_pool(self, hidden, topk, num_experts, m, fmt) -> Pool:
        key = ("ll", hidden, topk, num_experts, m, fmt)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        return self._pool(key, self._cfg(hidden=hidden, topk=topk, num_experts=num_experts, max_tokens_per_rank=m,
                                         token_format=fmt, mode=self._ll_mode))

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """(recv_x | (recv_x_fp8, scales), recv_count, handle, event, hook) in the batched layout
        [num_local_experts, M * num_ranks, hidden]. With return_recv_hook the tensors are filled by hook()."""
        self._usable()
        check_tensor("x", x, (torch.bfloat16,), 2, "low_latency_dispatch")
        check_tensor("topk_idx", topk_idx, IDS, 2, "low_latency_dispatch")
        self._check_device(x)
        t, hidden = x.shape
        m, r = num_max_dispatch_tokens_per_rank, self.group_size
        if topk_idx.shape[0] != t:
            raise EPInputError(f"low_latency_dispatch: topk_idx must be [T={t}, topk], got {list(topk_idx.shape)}")
        if t > m:
            raise EPInputError(f"low_latency_dispatch: {t} tokens > num_max_dispatch_tokens_per_rank={m}")
        if num_experts % r:
            raise EPInputError(f"low_latency_dispatch: num_experts={num_experts} not divisible by {r} ranks")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise EPInputError("low_latency_dispatch: use_ue8m0 needs use_fp8=True and round_scale=True")
        if use_fp8 and hidden % (512 if use_ue8m0 else L.BLOCK):
            raise EPInputError(f"low_latency_dispatch: fp8 needs hidden % {512 if use_ue8m0 else 128} == 0, "
                               f"got {hidden}")
        # round_scale: epcomm quantises with exact scales, so tokens go as bf16 and are quantised here on receipt.
        fmt = "fp8" if use_fp8 and not round_scale else "bf16"
        pool = self._ll_pool(hidden, topk_idx.shape[1], num_experts, m, fmt)
        g, cap, dev = num_experts // r, m * r, x.device
        if use_fp8:
            recv_x = torch.empty(g, cap, hidden, dtype=torch.float8_e4m3fn, device=dev)
            cols = hidden // 512 if use_ue8m0 else hidden // L.BLOCK
            # column-major in the last two dims (TMA-friendly), as DeepEP returns them
            scales = torch.empty(g, cols, cap, dtype=torch.int32 if use_ue8m0 else torch.float32,
                                 device=dev).transpose(1, 2)
        else:
            recv_x, scales = torch.empty(g, cap, hidden, dtype=torch.bfloat16, device=dev), None
        recv_count = torch.empty(g, dtype=torch.int32, device=dev)
        handle = LowLatencyHandle(src_info=torch.empty(g, cap, dtype=torch.int32, device=dev),
                                  layout_range=torch.empty(g, r, dtype=torch.int64, device=dev),
                                  num_max_dispatch_tokens_per_rank=m, hidden=hidden, num_experts=num_experts,
                                  key=("ll", hidden, topk_idx.shape[1], num_experts, m, fmt),
                                  # clamped before narrowing: an int64 id past the int32 range must stay out of
                                  # range (dropped), not wrap into a valid expert
                                  topk_ids=topk_idx.clamp(-1, num_experts).to(torch.int32).contiguous())
        lane = pool.lane_for_dispatch()
        out, rnd = lane.dispatch(x, handle.topk_ids, self._host, async_=return_recv_hook)
        handle.lane, handle.round = lane, rnd

        def fill(res):
            handle.ep_handle = res.handle
            handle.row_offsets = from_backend(res.row_offsets)
            self._fill_batched(res, handle, recv_x, scales, recv_count, use_fp8, round_scale, use_ue8m0)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
            handle.ready = True

        def receive():
            if not handle.ready:
                fill(lane.ep.dispatch_wait(out))

        hook = receive if return_recv_hook else None
        if not return_recv_hook:
            fill(out)
        packed = (recv_x, scales) if use_fp8 else recv_x
        return packed, recv_count, handle, self._event(async_finish, (x, topk_idx, recv_x, recv_count)), hook

    def _fill_batched(self, res, handle, recv_x, scales, recv_count, use_fp8, round_scale, use_ue8m0):
        g, cap, hidden = recv_x.shape
        grouped = from_backend(res.expert_x)
        idx = L.batched_from_grouped(handle.row_offsets, cap, grouped.shape[0])
        counts = from_backend(res.tokens_per_expert).to(torch.int32)
        recv_count.copy_(counts)
        if use_fp8 and round_scale:
            q, s = L.quantize_pow2(grouped.index_select(0, idx).view(g, cap, hidden), use_ue8m0)
            recv_x.view(torch.uint8).copy_(q.view(torch.uint8))
            scales.copy_(s)
        else:
            recv_x.view(torch.uint8).view(g * cap, -1).copy_(grouped.view(torch.uint8).index_select(0, idx))
            if use_fp8:
                scales.copy_(from_backend(res.expert_scales).index_select(0, idx).view(g, cap, -1))
        info = from_backend(res.src_info).index_select(0, idx).view(g, cap, 3)
        valid = L.batched_valid(counts, cap)
        handle.src_info.copy_(torch.where(valid, info[..., 1], torch.full_like(info[..., 1], -1)))
        handle.layout_range.copy_(L.layout_ranges(info[..., 0], valid, self.group_size))

    def _ll_lane(self, handle: LowLatencyHandle):
        if not isinstance(handle, LowLatencyHandle):
            raise EPInputError(f"low_latency_combine: handle must come from low_latency_dispatch, "
                               f"got {type(handle).__name__}")
        if not handle.ready:
            raise EPInputError("low_latency_combine: call the dispatch's receive hook first")
        if handle.lane is None or not handle.lane.can_combine(handle.round):
            res = self._redispatch(handle, handle.hidden)
            handle.row_offsets = from_backend(res.row_offsets)
        return handle.lane

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """A bf16 [local experts, M * ranks, hidden] tensor to write expert outputs into for a zero_copy combine of
        this handle. One per lane (two per shape), so the two micro-batches of an overlapped pair do not share one."""
        if not isinstance(handle, LowLatencyHandle):
            raise EPInputError("get_next_low_latency_combine_buffer: handle must come from low_latency_dispatch")
        if handle.combine_input is None:
            lane = handle.lane
            if lane.zero_copy_input is None:
                g = handle.num_experts // self.group_size
                lane.zero_copy_input = torch.zeros(g, handle.num_max_dispatch_tokens_per_rank * self.group_size,
                                                   handle.hidden, dtype=torch.bfloat16, device=handle.src_info.device)
            handle.combine_input = lane.zero_copy_input
        return handle.combine_input

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: torch.Tensor | None = None, combine_wait_recv_cost_stats=None):
        """(combined_x [T, hidden] bf16, event, hook): y[t] = sum_k topk_weights[t, k] * x[expert, slot of (t, k)]."""
        self._usable()
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        check_tensor("x", x, (torch.bfloat16,), 3, "low_latency_combine")
        check_tensor("topk_weights", topk_weights, (torch.float32,), 2, "low_latency_combine")
        check_tensor("topk_idx", topk_idx, IDS, 2, "low_latency_combine")
        g, cap = handle.num_experts // self.group_size, handle.num_max_dispatch_tokens_per_rank * self.group_size
        if tuple(x.shape) != (g, cap, handle.hidden):
            raise EPInputError(f"low_latency_combine: x must be [{g}, {cap}, {handle.hidden}], got {list(x.shape)}")
        ids = handle.topk_ids
        if tuple(topk_idx.shape) != tuple(ids.shape) or tuple(topk_weights.shape) != tuple(ids.shape):
            raise EPInputError(f"low_latency_combine: topk_idx / topk_weights must be {list(ids.shape)} (the "
                               f"dispatch's), got {list(topk_idx.shape)} / {list(topk_weights.shape)}")
        if out is not None:
            check_tensor("out", out, (torch.bfloat16,), 2, "low_latency_combine")
            if tuple(out.shape) != (ids.shape[0], handle.hidden):
                raise EPInputError(f"low_latency_combine: out must be [{ids.shape[0]}, {handle.hidden}], "
                                   f"got {list(out.shape)}")
        lane = self._ll_lane(handle)
        rows = lane.ep.cfg.max_recv_rows
        gidx = L.grouped_from_batched(handle.row_offsets, cap, rows)
        expert_y = x.reshape(g * cap, handle.hidden).index_select(0, gidx)
        args = (to_backend(expert_y, self._host), handle.ep_handle, to_backend(topk_weights.contiguous(), self._host))
        result = out if out is not None else torch.empty(ids.shape[0], handle.hidden, dtype=torch.bfloat16,
                                                         device=x.device)
        hook = None
        if return_recv_hook:
            pending = lane.ep.combine_async(*args)
            lane.open_round = None
            done = []

            def receive():
                if not done:
                    result.copy_(from_backend(lane.ep.combine_wait(pending)))
                    done.append(True)
            hook = receive
        else:
            result.copy_(from_backend(lane.ep.combine(*args)))
            lane.open_round = None
        return result, self._event(async_finish, (x, topk_idx, topk_weights, result)), hook
