"""DeepEP's normal mode on epcomm: get_dispatch_layout, dispatch (token-major, cached-handle path too) and combine.

Each rank is one "expert" of an epcomm buffer in mode "ht" (a token crosses to a rank once), so epcomm's grouped
output *is* DeepEP's token-major layout (rows ordered by source rank, then source token). Per-token fields DeepEP
sends along (top-k ids and weights, caller-quantised fp8 with its scales) travel in a bf16 carrier row
(layouts.Carrier). combine sums a token's rows over ranks (no weights), as DeepEP's does.
Capacity (max tokens per rank) comes from, in order: Buffer(num_max_tokens_per_rank=...), num_worst_tokens /
num_ranks, else a max over the group on every call (one small all-reduce: DeepEP's normal dispatch waits on the
host for counts too); it grows to the next power of two when a call needs more (collectively).
Host synchronisation: dispatch without num_worst_tokens syncs once (received rows and per-expert counts, which it
returns as a Python list), and once more for the capacity all-reduce when no capacity hint is given.
get_dispatch_layout, cached dispatch and combine do not sync.
"""
from __future__ import annotations

import math

import torch

from ...errors import EPInputError
from . import layouts as L
from .base import IDS, BufferBase
from .bridge import Pool, check_tensor, from_backend, to_backend
from .events import Config, EventOverlap, wait_previous
from .handles import DispatchHandle


class NormalMode(BufferBase):
    """Buffer's normal-mode calls (mixed into Buffer)."""

    def _normal_pool(self, width: int, carrier: L.Carrier, num_worst_tokens: int,
                     group_max_tokens: int | None) -> Pool:
        """The pool of a normal-mode shape, with its capacity: the Buffer's hint, else num_worst_tokens / ranks, else
        the group's largest T (all-reduced by the caller), rounded up to a power of two and never shrinking."""
        key = ("normal", carrier.width, width)
        pool = self._pools.get(key)
        have = pool.cfg.max_tokens_per_rank if pool is not None else 0
        if self._max_tokens is not None:
            cap = self._max_tokens
        elif group_max_tokens is None:
            cap = max(have, math.ceil(num_worst_tokens / self.group_size))
        else:
            cap = have if have >= group_max_tokens else 1 << max(group_max_tokens - 1, 0).bit_length()
        if pool is not None and pool.cfg.max_tokens_per_rank == cap:
            return pool
        return self._pool(key, self._cfg(hidden=carrier.width, topk=width, num_experts=self.group_size,
                                         max_tokens_per_rank=cap, token_format="bf16", mode="ht"))

    # ------------------------------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: EventOverlap | None = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank, num_tokens_per_rdma_rank | None, num_tokens_per_expert, is_token_in_rank, event);
        torch ops on the device, no communication, no sync."""
        self._usable()
        check_tensor("topk_idx", topk_idx, IDS, 2, "get_dispatch_layout")
        if num_experts % self.group_size:
            raise EPInputError(f"get_dispatch_layout: num_experts={num_experts} must be divisible by the "
                               f"{self.group_size} ranks")
        wait_previous(previous_event)
        per_rank, per_node, per_expert, in_rank = L.dispatch_layout(topk_idx, num_experts, self.group_size,
                                                                    self.ctx.num_nodes)
        return per_rank, per_node, per_expert, in_rank, self._event(async_finish, (topk_idx,))

    # ------------------------------------------------------------------------------------------ normal dispatch
    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event), token-major."""
        self._usable()
        if handle is not None:
            x, x_scales = self._split_x(x)
            wait_previous(previous_event)
            return self._cached_dispatch(x, x_scales, handle, topk_idx, topk_weights, async_finish)
        problem, shape = None, (0, 0, 0)
        try:
            x, x_scales, topk, num_experts = self._check_dispatch(x, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                                                  topk_weights, expert_alignment, num_worst_tokens)
            shape = (x.shape[0], x.shape[1], topk)
        except EPInputError as e:
            problem = e
        group_max_tokens = None
        if self._max_tokens is None and not (isinstance(num_worst_tokens, int) and num_worst_tokens > 0):
            # DeepEP's normal dispatch syncs on the host anyway; one small all-reduce agrees on the capacity, checks
            # the shape, and fails every rank at once when one rank's input was refused (none is left waiting here)
            t_, h_, k_ = shape
            mx = self._group.allreduce_max([t_, h_, k_, -h_, -k_, int(problem is not None)])
            if mx[5]:
                raise problem or EPInputError("dispatch: another rank's input was refused (its error says why); "
                                              "nothing was sent")
            if mx[1] != -mx[3] or mx[2] != -mx[4]:
                raise EPInputError(f"dispatch: ranks disagree on hidden ({-mx[3]}..{mx[1]}) or top-k "
                                   f"({-mx[4]}..{mx[2]})")
            group_max_tokens = mx[0]
        elif problem is not None:
            raise problem
        wait_previous(previous_event)
        t, hidden = x.shape
        width = min(topk, self.group_size) if topk else self.group_size
        carrier = L.Carrier(hidden, topk)
        pool = self._normal_pool(width, carrier, num_worst_tokens, group_max_tokens)
        routes = L.rank_routes(is_token_in_rank, width)
        ids32 = topk_idx.to(torch.int32) if topk_idx is not None else None
        rows = carrier.pack(x, x_scales, topk_weights, ids32)
        lane = pool.lane_for_dispatch()
        res, rnd = lane.dispatch(rows, routes, self._host)
        grouped = from_backend(res.expert_x)
        n_dev = from_backend(res.row_offsets)[-1]
        src_tok = from_backend(res.src_info)[:, 1]
        max_rows = grouped.shape[0]
        fp8 = x_scales is not None

        per_rank = num_experts // self.group_size if num_experts else 0
        if topk:
            ids_bytes = grouped.view(torch.uint8)[:, carrier.ids_at:carrier.ids_at + 4 * topk]
            local_all = L.local_expert_ids(ids_bytes.view(torch.int32), self.rank, per_rank, torch.int32)
            valid = torch.arange(max_rows, device=local_all.device) < n_dev
            local_all = torch.where(valid[:, None], local_all, torch.full_like(local_all, -1))
            counts = L.expert_counts(local_all, per_rank)
        if num_worst_tokens:
            n, count_list = num_worst_tokens, []
        else:
            # the one host sync: rows received and per-expert counts (a Python list in DeepEP's API)
            head = torch.cat([n_dev.reshape(1).long()] + ([counts.long()] if topk else []))
            n, *count_list = head.tolist()
            if not topk and num_experts:
                # no ids travel: the per-expert counts are the senders' num_tokens_per_expert, summed
                every = self._group.allreduce_sum([int(c) for c in num_tokens_per_expert.tolist()])
                count_list = every[self.rank * per_rank:(self.rank + 1) * per_rank]
            count_list = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in count_list]
        take = min(n, max_rows)
        recv_x, recv_scales, recv_w, recv_ids = carrier.unpack(grouped[:take], fp8)
        recv_x = _pad_rows(recv_x, n)
        recv_scales = _pad_rows(recv_scales, n)
        recv_topk_idx = recv_topk_weights = None
        if topk:
            local = _pad_rows(local_all[:take], n, fill=-1).to(topk_idx.dtype)
            recv_topk_idx = local
            recv_topk_weights = torch.where(local >= 0, _pad_rows(recv_w, n), torch.zeros((), dtype=torch.float32,
                                                                                          device=local.device))
        handle = DispatchHandle(key=("normal", carrier.width, width), routes=routes, num_tokens=t, num_recv_rows=n,
                                num_worst_tokens=num_worst_tokens, is_token_in_rank=is_token_in_rank, topk=topk,
                                lane=lane, round=rnd, ep_handle=res.handle,
                                recv_src_idx=_pad_rows(src_tok[:take].clone(), n, fill=-1))
        if fp8:
            recv_scales = _col_major_like(recv_scales, x_scales)
        out_x = (recv_x, recv_scales) if fp8 else recv_x
        return (out_x, recv_topk_idx, recv_topk_weights, count_list, handle,
                self._event(async_finish, (recv_x,)))

    def _check_dispatch(self, x, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                        expert_alignment, num_worst_tokens):
        """Local checks of a dispatch without handle: (x, x_scales, topk, num_experts) or EPInputError."""
        x, x_scales = self._split_x(x)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise EPInputError(f"dispatch: expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise EPInputError(f"dispatch: num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")
        t = x.shape[0]
        if is_token_in_rank is None:
            raise EPInputError("dispatch: is_token_in_rank is required without a handle (get_dispatch_layout gives it)")
        check_tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), 2, "dispatch")
        if tuple(is_token_in_rank.shape) != (t, self.group_size):
            raise EPInputError(f"dispatch: is_token_in_rank must be [T={t}, ranks={self.group_size}], "
                               f"got {list(is_token_in_rank.shape)}")
        if (topk_idx is None) != (topk_weights is None):
            raise EPInputError("dispatch: pass topk_idx and topk_weights together (or neither)")
        topk = 0
        if topk_idx is not None:
            check_tensor("topk_idx", topk_idx, IDS, 2, "dispatch")
            check_tensor("topk_weights", topk_weights, (torch.float32,), 2, "dispatch")
            topk = topk_idx.shape[1]
            if topk_idx.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_idx.shape):
                raise EPInputError(f"dispatch: topk_idx and topk_weights must be [T={t}, topk], got "
                                   f"{list(topk_idx.shape)} and {list(topk_weights.shape)}")
            if num_tokens_per_expert is None:
                raise EPInputError("dispatch: num_tokens_per_expert is required with topk_idx (get_dispatch_layout "
                                   "gives it; its length is the number of experts)")
        num_experts = num_tokens_per_expert.numel() if num_tokens_per_expert is not None else 0
        if num_experts % self.group_size:
            raise EPInputError(f"dispatch: {num_experts} experts are not divisible by {self.group_size} ranks")
        return x, x_scales, topk, num_experts

    def _split_x(self, x):
        if isinstance(x, tuple):
            if len(x) != 2:
                raise EPInputError("dispatch: x must be a bf16 tensor or a tuple (x_fp8, x_scales)")
            q, s = x
            check_tensor("x_fp8", q, (torch.float8_e4m3fn,), 2, "dispatch")
            check_tensor("x_scales", s, (torch.float32,), 2, "dispatch")
            if q.shape[1] % L.BLOCK or tuple(s.shape) != (q.shape[0], q.shape[1] // L.BLOCK):
                raise EPInputError(f"dispatch: fp8 x [T, H] needs H % 128 == 0 and scales [T, H/128] float32, got "
                                   f"{list(q.shape)} and {list(s.shape)}")
            self._check_device(q)
            return q, s
        check_tensor("x", x, (torch.bfloat16,), 2, "dispatch")
        self._check_device(x)
        return x, None

    def _cached_dispatch(self, x, x_scales, handle, topk_idx, topk_weights, async_finish):
        if not isinstance(handle, DispatchHandle):
            raise EPInputError(f"dispatch: handle must come from this Buffer's dispatch, got {type(handle).__name__}")
        if topk_idx is not None or topk_weights is not None:
            raise EPInputError("dispatch with a handle reuses its layout: pass no topk_idx / topk_weights")
        if x.shape[0] != handle.num_tokens:
            raise EPInputError(f"dispatch: x has {x.shape[0]} tokens, the handle's dispatch had {handle.num_tokens}")
        carrier = L.Carrier(x.shape[1], handle.topk)
        if ("normal", carrier.width, handle.routes.shape[1]) != handle.key:
            raise EPInputError("dispatch: x's hidden size differs from the handle's dispatch")
        pool = self._pools.get(handle.key)
        if pool is None:
            raise EPInputError("dispatch: the handle's buffer is gone (Buffer destroyed?)")
        if handle.lane is not None and handle.lane.open_round == handle.round:
            handle.lane.open_round = None      # the handle moves to this dispatch; its old one is not combined
        lane = pool.lane_for_dispatch()
        res, rnd = lane.dispatch(carrier.pack(x, x_scales, None, None), handle.routes, self._host)
        handle.lane, handle.round, handle.ep_handle = lane, rnd, res.handle
        n = handle.num_recv_rows
        grouped = from_backend(res.expert_x)
        take = min(n, grouped.shape[0])
        recv_x, recv_scales, _, _ = carrier.unpack(grouped[:take], x_scales is not None)
        recv_x = _pad_rows(recv_x, n)
        if x_scales is not None:
            out = (recv_x, _col_major_like(_pad_rows(recv_scales, n), x_scales))
        else:
            out = recv_x
        return out, None, None, None, None, self._event(async_finish, (recv_x,))

    # ------------------------------------------------------------------------------------------ normal combine
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None = None,
                bias=None, config: Config | None = None, previous_event: EventOverlap | None = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(combined_x, combined_topk_weights | None, event): each token's rows summed over the ranks it went to."""
        self._usable()
        if not isinstance(handle, DispatchHandle):
            raise EPInputError(f"combine: handle must come from this Buffer's dispatch, got {type(handle).__name__}")
        check_tensor("x", x, (torch.bfloat16,), 2, "combine")
        self._check_device(x)
        n = handle.num_recv_rows
        carrier = L.Carrier(x.shape[1], handle.topk)
        if x.shape[0] != n or carrier.width != handle.key[1]:
            raise EPInputError(f"combine: x must be [{n} (rows the dispatch returned), hidden of the dispatch], "
                               f"got {list(x.shape)}")
        if topk_weights is not None:
            if not handle.topk:
                raise EPInputError("combine: topk_weights given, but the dispatch carried no top-k")
            check_tensor("topk_weights", topk_weights, (torch.float32,), 2, "combine")
            if tuple(topk_weights.shape) != (n, handle.topk):
                raise EPInputError(f"combine: topk_weights must be [{n}, {handle.topk}], got "
                                   f"{list(topk_weights.shape)}")
        bias_0, bias_1 = (bias if isinstance(bias, tuple) else (bias, None))
        wait_previous(previous_event)
        lane = handle.lane
        if lane is None or not lane.can_combine(handle.round):
            self._redispatch(handle, handle.key[1])
            lane = handle.lane
        rows = lane.scratch
        if rows is None:
            rows = lane.scratch = torch.zeros(lane.ep.cfg.max_recv_rows, lane.ep.cfg.hidden, dtype=torch.bfloat16,
                                              device=x.device)
        take = min(n, rows.shape[0])
        carrier.fill_combine_rows(rows, x[:take], topk_weights[:take] if topk_weights is not None else None)
        weights = (handle.routes >= 0).to(torch.float32)   # one row per (token, rank): the sum over ranks
        y = from_backend(lane.ep.combine(to_backend(rows, self._host), handle.ep_handle,
                                         to_backend(weights, self._host)))
        lane.open_round = None
        combined_x, combined_w = carrier.combined(y, topk_weights is not None)
        if bias_0 is not None or bias_1 is not None:
            acc = combined_x.float()
            for b in (bias_0, bias_1):
                if b is not None:
                    acc = acc + b.float()
            combined_x = acc.to(torch.bfloat16)
        return combined_x, combined_w, self._event(async_finish, (combined_x,))


def _pad_rows(t: torch.Tensor | None, n: int, fill=0):
    """t with rows appended up to n (num_worst_tokens larger than the buffer's row count)."""
    if t is None or t.shape[0] >= n:
        return t
    pad = torch.full((n - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device) if fill else \
        torch.zeros((n - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _col_major_like(scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Received fp8 scales in the caller's layout: column-major when the caller's were (DeepEP keeps the layout)."""
    if like.dim() == 2 and like.stride(0) == 1 and like.shape[1] > 1:
        return scales.t().contiguous().t()
    return scales
