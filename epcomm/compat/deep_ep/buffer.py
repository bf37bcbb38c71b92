"""deep_ep.Buffer on epcomm: DeepEP's legacy Buffer API (normal and low-latency modes) over epcomm EPBuffers.

    from epcomm.compat import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)          # sizes are hints: epcomm sizes itself

How the calls map (details and every argument in docs/COMPAT-DEEPEP.md):
* EPBuffers are made lazily, one pool per shape key, on the first call that needs them. That first call of a new
  shape is collective (every rank of the group must make it: they do, since dispatch is collective anyway), and it
  checks that all ranks agree on the shape.
* Normal mode (dispatch / combine / get_dispatch_layout): normal.py. Low-latency mode: low_latency.py. What both
  share (the pools, events, re-dispatch): base.py. The handles: handles.py.
* Handles may be reused (cached dispatch, several combines). epcomm combines only the latest dispatch of a buffer,
  so each shape has two lanes (two outstanding dispatches, e.g. dual micro-batch overlap); a handle whose dispatch
  is no longer combinable is re-dispatched (routing only, zero payload) before its combine: correct, one extra
  dispatch.
This module: construction, DeepEP's static helpers, destroy, and the calls epcomm refuses.
"""
from __future__ import annotations

import torch

from ...errors import EPInputError
from .bridge import Group, Pool, choose_backend, make_context, unsupported
from .events import Config, EventOverlap, record_event
from .handles import DispatchHandle, LowLatencyHandle
from .low_latency import LowLatencyMode
from .normal import NormalMode

topk_idx_t = torch.int64
__all__ = ["Buffer", "DispatchHandle", "LowLatencyHandle", "topk_idx_t"]


class Buffer(NormalMode, LowLatencyMode):
    """DeepEP's Buffer (legacy NVSHMEM API) on epcomm. See the module doc and docs/COMPAT-DEEPEP.md."""

    num_sms: int = 20

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
