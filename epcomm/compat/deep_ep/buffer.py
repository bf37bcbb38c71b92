"""deep_ep.Buffer on epcomm: DeepEP's legacy Buffer API (normal and low-latency modes) over epcomm EPBuffers.

    from epcomm.compat import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)          # sizes are hints: epcomm sizes itself

How the calls map (details and every argument in docs/COMPAT-DEEPEP.md):
* EPBuffers are made lazily, one pool per shape key, on the first call that needs them. That first call of a new
  shape is collective (every rank of the group must make it: they do, since dispatch is collective anyway), and it
  checks that all ranks agree on the shape.
* Normal mode (dispatch / combine): each rank is one "expert" of an epcomm buffer in mode "ht" (a token crosses to a
  rank once), so epcomm's grouped output *is* DeepEP's token-major layout (rows ordered by source rank, then source
  token). Per-token fields DeepEP sends along (top-k ids and weights, caller-quantised fp8 with its scales) travel in
  a bf16 carrier row. combine sums a token's rows over ranks (no weights), as DeepEP's does.
  Capacity (max tokens per rank) comes from, in order: Buffer(num_max_tokens_per_rank=...), num_worst_tokens /
  num_ranks, else a max over the group on every call (one small all-reduce: DeepEP's normal dispatch waits on the
  host for counts too); it grows to the next power of two when a call needs more (collectively).
* Low-latency mode: an epcomm buffer in mode "ll" per (hidden, topk, num_experts, num_max_dispatch_tokens_per_rank,
  format); the batched [local experts, M * ranks, hidden] layout is built from epcomm's grouped output by
  layouts.batched_from_grouped (a gather on the device); EPBuffer's own layout="batched" (issue 13) is to replace it.
* Host synchronisation: dispatch without num_worst_tokens syncs once (received rows and per-expert counts, which it
  returns as a Python list), and once more for the capacity all-reduce when no capacity hint is given.
  get_dispatch_layout, cached dispatch, combine and the low-latency calls do not sync.
* Handles may be reused (cached dispatch, several combines). epcomm combines only the latest dispatch of a buffer,
  so each shape has two lanes (two outstanding dispatches, e.g. dual micro-batch overlap); a handle whose dispatch
  is no longer combinable is re-dispatched (routing only, zero payload) before its combine: correct, one extra
  dispatch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...config import EPConfig
from ...errors import EPInputError
from . import layouts as L
from .bridge import Group, Pool, check_tensor, choose_backend, from_backend, make_context, to_backend, unsupported
from .events import Config, EventOverlap, record_event, wait_previous

topk_idx_t = torch.int64
_IDS = (torch.int64, torch.int32)


@dataclass(eq=False)
class DispatchHandle:
    """What normal-mode combine and cached dispatch need (opaque: DeepEP's tuple internals are not reproduced)."""
    key: tuple
    routes: torch.Tensor               # int32 [T, W]: the ranks each of this rank's tokens went to, -1 padded
    num_tokens: int
    num_recv_rows: int                 # rows dispatch returned (received tokens, or num_worst_tokens)
    num_worst_tokens: int
    is_token_in_rank: torch.Tensor
    topk: int
    lane: Any = None
    round: int = -1
    ep_handle: Any = None
    recv_src_idx: torch.Tensor | None = None   # source token of every received row (DeepEP's recv_src_idx)


@dataclass(eq=False)
class LowLatencyHandle:
    """handle[0] src_info [G, M*R] int32 (source token of each batched slot, -1 when empty), handle[1] layout_range
    [G, R] int64 (begin << 32 | count per source rank), handle[2..4] M, hidden, num_experts, as DeepEP's tuple."""
    src_info: torch.Tensor
    layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    key: tuple = ()
    topk_ids: torch.Tensor | None = None
    lane: Any = None
    round: int = -1
    ep_handle: Any = None
    row_offsets: torch.Tensor | None = None
    ready: bool = False
    combine_input: torch.Tensor | None = None   # what get_next_low_latency_combine_buffer gave for this handle

    def __getitem__(self, i):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)[i]

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(self[i] for i in range(5))


class Buffer:
    """DeepEP's Buffer (legacy NVSHMEM API) on epcomm. See the module doc and docs/COMPAT-DEEPEP.md."""

    num_sms: int = 20
    _sms_set: Optional[int] = None      # set_num_sms was called: epcomm buffers made afterwards use that many SMs

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, num_max_tokens_per_rank: int | None = None,
                 timeout_s: float = 30.0, epcomm_backend: str = "auto", low_latency_epcomm_mode: str = "ll",
                 lanes_per_shape: int = 2):
        if enable_shrink:
            unsupported("enable_shrink (masking ranks out of a running job)")
        if num_max_tokens_per_rank is not None and (not isinstance(num_max_tokens_per_rank, int)
                                                    or num_max_tokens_per_rank < 1):
            raise EPInputError(f"Buffer: num_max_tokens_per_rank must be an int >= 1, got {num_max_tokens_per_rank!r}")
        if not isinstance(lanes_per_shape, int) or lanes_per_shape < 1:
            raise EPInputError(f"Buffer: lanes_per_shape must be an int >= 1, got {lanes_per_shape!r}")
        if low_latency_epcomm_mode not in ("ll", "ht"):
            raise EPInputError(f"Buffer: low_latency_epcomm_mode must be 'll' or 'ht', got {low_latency_epcomm_mode!r}")
        self._group = Group(group, comm)
        self.group = group if group is not None else comm
        self.rank, self.group_size = self._group.rank, self._group.size
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = False
        self._backend = choose_backend(epcomm_backend)
        self._host = self._backend == "host"
        self._max_tokens = num_max_tokens_per_rank
        self._timeout_s = float(timeout_s)
        self._ll_mode = low_latency_epcomm_mode
        self._lanes = lanes_per_shape
        hint = self.num_nvl_bytes + self.num_rdma_bytes
        self.ctx = make_context(self._group, self._backend, max(hint, 4 << 30))
        self._pools: dict[tuple, Pool] = {}
        self._destroyed = False

    # ------------------------------------------------------------------------------------------ static helpers
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs for epcomm buffers made after this call (EPConfig.num_sms); DeepEP requires an even count."""
        if not isinstance(new_num_sms, int) or new_num_sms < 2 or new_num_sms % 2:
            raise EPInputError(f"set_num_sms: the SM count must be an even int >= 2, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms
        Buffer._sms_set = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return record_event(torch.cuda.is_available())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of DeepEP's low-latency RDMA buffer for this shape (bf16, two buffer sets); Buffer takes it as a hint.
        epcomm's own per-rank footprint is `python -m epcomm.memory` / epcomm.memory.estimate."""
        m, r = num_max_dispatch_tokens_per_rank, num_ranks
        per_msg = 2 * hidden + 32                          # token bytes + a small header, rounded
        send = m * per_msg
        recv = (num_experts // max(r, 1)) * r * m * per_msg
        combine = num_experts * m * 2 * hidden
        return 2 * (send + recv + combine) + (1 << 20)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def get_comm_stream(self):
        """epcomm has no communication stream of its own: calls run on the caller's current stream."""
        return torch.cuda.current_stream() if not self._host else None

    def get_local_buffer_tensor(self, *args, **kwargs):
        unsupported("get_local_buffer_tensor (epcomm's buffers are laid out by epcomm)")

    def destroy(self) -> None:
        """Close every epcomm buffer of this Buffer (collective). DeepEP allows it only with explicitly_destroy=True."""
        if not self.explicitly_destroy:
            raise EPInputError("destroy: construct the Buffer with explicitly_destroy=True to destroy it explicitly")
        self._close()

    def _close(self):
        if self._destroyed:
            return
        self._destroyed = True
        for key in sorted(self._pools, key=repr):
            self._pools[key].close()
        self._pools.clear()

    # ------------------------------------------------------------------------------------------ pools
    def _usable(self):
        if self._destroyed:
            raise EPInputError("Buffer was destroyed")

    def _new_ep(self, cfg: EPConfig):
        """Collective: every rank makes the buffer; a rank whose shape differs gets a clear error on every rank."""
        from ...buffer import EPBuffer
        mine = (cfg.hidden, cfg.topk, cfg.num_experts, cfg.max_tokens_per_rank, cfg.token_format, cfg.mode)
        every = self._group.allgather(mine)
        if any(k != mine for k in every):
            raise EPInputError("epcomm.compat.deep_ep: ranks disagree on a new shape (hidden, topk, num_experts, "
                               f"max tokens, format, mode): {every}")
        return EPBuffer(cfg, self.ctx)

    def _pool(self, key: tuple, cfg: EPConfig) -> Pool:
        pool = self._pools.get(key)
        if pool is None or pool.cfg != cfg:
            if pool is not None:
                pool.close()
            pool = self._pools[key] = Pool(self._new_ep, cfg, self._lanes)
        return pool

    def _cfg(self, **kw) -> EPConfig:
        return EPConfig(world_size=self.group_size, timeout_s=self._timeout_s, num_sms=Buffer._sms_set, **kw)

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
        check_tensor("topk_idx", topk_idx, _IDS, 2, "get_dispatch_layout")
        if num_experts % self.group_size:
            raise EPInputError(f"get_dispatch_layout: num_experts={num_experts} must be divisible by the "
                               f"{self.group_size} ranks")
        wait_previous(previous_event)
        per_rank, per_node, per_expert, in_rank = L.dispatch_layout(topk_idx, num_experts, self.group_size,
                                                                    self.ctx.num_nodes)
        return per_rank, per_node, per_expert, in_rank, self._event(async_finish, (topk_idx,))

    def _event(self, async_finish: bool, tensors: tuple = ()) -> EventOverlap:
        return record_event(not self._host and async_finish, tensors if async_finish else None)

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
            check_tensor("topk_idx", topk_idx, _IDS, 2, "dispatch")
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

    def _check_device(self, t: torch.Tensor):
        if self._host and t.device.type != "cpu":
            raise EPInputError(f"the host backend (no CUDA here) takes CPU tensors, got one on {t.device}")
        if not self._host and t.device.type != "cuda":
            raise EPInputError(f"the GPU backend takes CUDA tensors, got one on {t.device}")

    def _redispatch(self, handle, payload_width: int, dtype=torch.bfloat16):
        """Make `handle` combinable again: dispatch its routing (zero payload) on a lane of its shape."""
        pool = self._pools.get(handle.key)
        if pool is None:
            raise EPInputError("combine: the handle's shape has no buffer any more (Buffer destroyed?)")
        routes = handle.routes if isinstance(handle, DispatchHandle) else handle.topk_ids
        zeros = torch.zeros(routes.shape[0], payload_width, dtype=dtype, device=routes.device)
        lane = pool.lane_for_dispatch()
        res, rnd = lane.dispatch(zeros, routes, self._host)
        handle.lane, handle.round, handle.ep_handle = lane, rnd, res.handle
        return res

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

    # ------------------------------------------------------------------------------------------ low latency
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
        check_tensor("topk_idx", topk_idx, _IDS, 2, "low_latency_dispatch")
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
        check_tensor("topk_idx", topk_idx, _IDS, 2, "low_latency_combine")
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

    # ------------------------------------------------------------------------------------------ not in epcomm
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        unsupported("rank masking (low_latency_update_mask_buffer)")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor):
        unsupported("rank masking (low_latency_query_mask_buffer)")

    def low_latency_clean_mask_buffer(self):
        unsupported("rank masking (low_latency_clean_mask_buffer)")

    def internode_dispatch(self, *args, **kwargs):
        unsupported("internode_dispatch (call dispatch: epcomm picks the path from the topology)")

    def internode_combine(self, *args, **kwargs):
        unsupported("internode_combine (call combine: epcomm picks the path from the topology)")


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
