"""What both modes of the DeepEP Buffer share: the pools of epcomm EPBuffers per shape, events, device checks, and
the re-dispatch that makes an old handle combinable again.

BufferBase is not used alone: Buffer (buffer.py) sets the state it reads in its constructor (_group, group_size,
ctx, _host, _timeout_s, _lanes, _pools, _destroyed) and mixes it with the two modes (normal.py, low_latency.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...config import EPConfig
from ...errors import EPInputError
from .bridge import Pool
from .events import EventOverlap, record_event
from .handles import DispatchHandle

IDS = (torch.int64, torch.int32)     # top-k id dtypes accepted (DeepEP's topk_idx_t is int64)


class BufferBase:
    _sms_set: Optional[int] = None      # set_num_sms was called: epcomm buffers made afterwards use that many SMs

    def _usable(self):
        if self._destroyed:
            raise EPInputError("Buffer was destroyed")

    def _new_ep(self, cfg: EPConfig):
        """Collective: every rank makes the buffer; a rank whose shape differs gets a clear error on every rank."""
        from ...buffer import EPBuffer
        mine = (cfg.hidden, cfg.topk, cfg.num_experts, cfg.max_tokens_per_rank, cfg.token_format, cfg.mode,
                cfg.layout, cfg.scale_format)
        every = self._group.allgather(mine)
        if any(k != mine for k in every):
            raise EPInputError("epcomm.compat.deep_ep: ranks disagree on a new shape (hidden, topk, num_experts, "
                               f"max tokens, format, mode, layout, scale format): {every}")
        return EPBuffer(cfg, self.ctx)

    def _pool(self, key: tuple, cfg: EPConfig) -> Pool:
        pool = self._pools.get(key)
        if pool is None or pool.cfg != cfg:
            if pool is not None:
                pool.close()
            pool = self._pools[key] = Pool(self._new_ep, cfg, self._lanes)
        return pool

    def _cfg(self, **kw) -> EPConfig:
        return EPConfig(world_size=self.group_size, timeout_s=self._timeout_s, num_sms=self._sms_set, **kw)

    def _event(self, async_finish: bool, tensors: tuple = ()) -> EventOverlap:
        return record_event(not self._host and async_finish, tensors if async_finish else None)

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
