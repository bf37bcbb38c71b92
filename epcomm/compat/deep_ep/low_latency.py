"""DeepEP's low-latency mode on epcomm: low_latency_dispatch / low_latency_combine in the batched layout
[local experts, M * ranks, hidden], get_next_low_latency_combine_buffer, clean_low_latency_buffer.

One pool of EPBuffers per (hidden, topk, num_experts, M, format), in mode "ll" (or "ht": Buffer(
low_latency_epcomm_mode=)), made in EPBuffer's own layout "batched" with expert_capacity M * ranks. Its expert_x,
expert_scales (scale_layout "col": column-major, as DeepEP's) and tokens_per_expert are DeepEP's recv_x, scales and
recv_count, returned as views with no copy; fp8 with round_scale uses scale_format "ue8m0" (power-of-two scales,
quantised by epcomm's dispatch), and use_ue8m0 packs those scales' exponents four per int32 (the one tensor computed
here). combine hands the caller's x to EPBuffer.combine as expert_y unchanged and lets it write the result into out=
(or a fresh tensor), and cumulative_local_expert_recv_stats is dispatch's stats_out=.

Views follow DeepEP's rule for low-latency results (its docstring: at most two held at a time): they stay valid until
the second later dispatch of the same shape. With return_recv_hook the tensors are returned before anything has been
received, so they are fresh ones, filled by the hook with one copy.
No call here synchronises with the host.
"""
from __future__ import annotations

import torch

from ...errors import EPInputError
from . import layouts as L
from .base import IDS, BufferBase
from .bridge import Pool, check_tensor, from_backend, to_backend, writable
from .handles import LowLatencyHandle

STATS = (torch.int32, torch.int64)    # counter dtypes EPBuffer adds to itself (others are added to after the receive)


class LowLatencyMode(BufferBase):
    """Buffer's low-latency calls (mixed into Buffer)."""

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: epcomm's signal words carry the round, so stale ones are harmless."""
        self._usable()

    def _ll_pool(self, key: tuple) -> Pool:
        """The pool of a low-latency shape key, made on first use."""
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        return self._pool(key, self._cfg(mode=self._ll_mode, **ll_shape(key, self.group_size)))

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
        g = num_experts // r
        stats = cumulative_local_expert_recv_stats
        stats_out = self._stats_out(stats, g, x.device)
        # round_scale: power-of-two scales (EPConfig scale_format "ue8m0"), quantised by epcomm's dispatch
        key = ("ll", hidden, topk_idx.shape[1], num_experts, m, bool(use_fp8), bool(use_fp8 and round_scale))
        pool = self._ll_pool(key)
        handle = LowLatencyHandle(num_max_dispatch_tokens_per_rank=m, hidden=hidden, num_experts=num_experts,
                                  num_ranks=r, key=key,
                                  # clamped before narrowing: an int64 id past the int32 range must stay out of
                                  # range (dropped), not wrap into a valid expert
                                  topk_ids=topk_idx.clamp(-1, num_experts).to(torch.int32).contiguous())
        lane = pool.lane_for_dispatch()
        out, rnd = lane.dispatch(x, handle.topk_ids, self._host, async_=return_recv_hook, stats_out=stats_out)
        handle.lane, handle.round = lane, rnd

        def received(res):
            handle.received(res, from_backend(res.src_info))
            recv = _recv_tensors(res, use_fp8, use_ue8m0)
            if stats is not None and stats_out is None:       # a counter EPBuffer cannot add to in place
                stats.add_(recv[2].to(stats.dtype))
            return recv

        hook = None
        if return_recv_hook:
            # returned before anything is received: fresh tensors, filled by the hook (one copy each)
            recv_x, scales, recv_count = _empty_recv(g, m * r, hidden, use_fp8, use_ue8m0, x.device)

            def receive():
                if not handle.ready:
                    got = received(lane.ep.dispatch_wait(out))
                    for mine, theirs in zip((recv_x, scales, recv_count), got):
                        if mine is not None:
                            mine.copy_(theirs)
            hook = receive
        else:
            recv_x, scales, recv_count = received(out)
        packed = (recv_x, scales) if use_fp8 else recv_x
        return packed, recv_count, handle, self._event(async_finish, (x, topk_idx, recv_x, recv_count)), hook

    def _stats_out(self, stats, num_local: int, device):
        """cumulative_local_expert_recv_stats as dispatch's stats_out (EPBuffer adds to it in place), or None when
        there is none or EPBuffer cannot write it in place (another dtype, not contiguous: added after receipt)."""
        if stats is None:
            return None
        check_tensor("cumulative_local_expert_recv_stats", stats, (), 1, "low_latency_dispatch")
        if stats.shape[0] != num_local or stats.device != device:
            raise EPInputError(f"low_latency_dispatch: cumulative_local_expert_recv_stats must be [{num_local} local "
                               f"experts] on {device}, got {list(stats.shape)} on {stats.device}")
        return writable(stats, self._host) if stats.dtype in STATS else None

    def _ll_lane(self, handle: LowLatencyHandle):
        if not isinstance(handle, LowLatencyHandle):
            raise EPInputError(f"low_latency_combine: handle must come from low_latency_dispatch, "
                               f"got {type(handle).__name__}")
        if not handle.ready:
            raise EPInputError("low_latency_combine: call the dispatch's receive hook first")
        if handle.lane is None or not handle.lane.can_combine(handle.round):
            # same routing, same slots: the batched layout places rows by (source rank, token, slot) alone, so the
            # caller's x, laid out for the first dispatch, fits the re-dispatch as it is
            self._redispatch(handle, handle.hidden)
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
                                                   handle.hidden, dtype=torch.bfloat16,
                                                   device=handle.topk_ids.device)
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
        self._check_device(x)
        if not isinstance(handle, LowLatencyHandle):
            raise EPInputError(f"low_latency_combine: handle must come from low_latency_dispatch, "
                               f"got {type(handle).__name__}")
        g, cap = handle.num_experts // self.group_size, handle.num_max_dispatch_tokens_per_rank * self.group_size
        if tuple(x.shape) != (g, cap, handle.hidden):
            raise EPInputError(f"low_latency_combine: x must be [{g}, {cap}, {handle.hidden}], got {list(x.shape)}")
        ids = handle.topk_ids
        if tuple(topk_idx.shape) != tuple(ids.shape) or tuple(topk_weights.shape) != tuple(ids.shape):
            raise EPInputError(f"low_latency_combine: topk_idx / topk_weights must be {list(ids.shape)} (the "
                               f"dispatch's), got {list(topk_idx.shape)} / {list(topk_weights.shape)}")
        if out is not None:
            check_tensor("out", out, (torch.bfloat16,), 2, "low_latency_combine")
            self._check_device(out)
            if tuple(out.shape) != (ids.shape[0], handle.hidden):
                raise EPInputError(f"low_latency_combine: out must be [{ids.shape[0]}, {handle.hidden}], "
                                   f"got {list(out.shape)}")
        lane = self._ll_lane(handle)
        # y goes straight into out= (or a fresh tensor, as DeepEP returns); only an out EPBuffer cannot write in
        # place (strided, misaligned) gets the result through a fresh tensor and one copy
        result = out if out is not None else torch.empty(ids.shape[0], handle.hidden, dtype=torch.bfloat16,
                                                         device=x.device)
        target = writable(result, self._host, 16)
        staging = None
        if target is None:
            staging = torch.empty(result.shape, dtype=torch.bfloat16, device=result.device)
            target = to_backend(staging, self._host)
        args = (to_backend(x, self._host), handle.ep_handle, to_backend(topk_weights.contiguous(), self._host))
        hook = None
        if return_recv_hook:
            pending = lane.ep.combine_async(*args, out=target)
            lane.open_round = None
            done = []

            def receive():
                if not done:
                    lane.ep.combine_wait(pending)
                    if staging is not None:
                        result.copy_(staging)
                    done.append(True)
            hook = receive
        else:
            lane.ep.combine(*args, out=target)
            lane.open_round = None
            if staging is not None:
                result.copy_(staging)
        return result, self._event(async_finish, (x, topk_idx, topk_weights, result)), hook


def ll_shape(key: tuple, num_ranks: int) -> dict:
    """EPConfig fields of a low-latency pool ("ll", hidden, topk, num_experts, M, use_fp8, power-of-two scales):
    layout "batched" with DeepEP's capacity M * ranks per local expert; fp8 scales column-major."""
    _, hidden, topk, num_experts, m, fp8, pow2 = key
    fp8_options = dict(scale_format="ue8m0" if pow2 else "fp32", scale_layout="col") if fp8 else {}
    return dict(hidden=hidden, topk=topk, num_experts=num_experts, max_tokens_per_rank=m,
                token_format="fp8" if fp8 else "bf16", layout="batched", expert_capacity=m * num_ranks, **fp8_options)


def _recv_tensors(res, use_fp8: bool, use_ue8m0: bool):
    """(recv_x, scales or None, recv_count) of an EPBuffer result in layout "batched": views of its outputs, except
    use_ue8m0's packed exponents."""
    scales = None
    if use_fp8:
        scales = from_backend(res.expert_scales)                  # [G, C, H/128], column-major per slab
        if use_ue8m0:
            scales = L.pack_ue8m0(scales)
    return from_backend(res.expert_x), scales, from_backend(res.tokens_per_expert)


def _empty_recv(g: int, cap: int, hidden: int, use_fp8: bool, use_ue8m0: bool, device):
    """Fresh (recv_x, scales, recv_count) in DeepEP's dtypes and strides, for the hook path."""
    scales = None
    if use_fp8:
        recv_x = torch.empty(g, cap, hidden, dtype=torch.float8_e4m3fn, device=device)
        cols = hidden // 512 if use_ue8m0 else hidden // L.BLOCK
        # column-major in the last two dims (TMA-friendly), as DeepEP returns them
        scales = torch.empty(g, cols, cap, dtype=torch.int32 if use_ue8m0 else torch.float32,
                             device=device).transpose(1, 2)
    else:
        recv_x = torch.empty(g, cap, hidden, dtype=torch.bfloat16, device=device)
    return recv_x, scales, torch.empty(g, dtype=torch.int32, device=device)
