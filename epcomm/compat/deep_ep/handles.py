"""The handles the DeepEP Buffer's dispatches return: what a later combine (or cached dispatch) needs.

DeepEP's normal-mode handle is an opaque tuple, so DispatchHandle reproduces none of its internals; the low-latency
handle is indexed by callers (handle[0] src_info, ...), so LowLatencyHandle answers to DeepEP's five-tuple indexing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import EPInputError
from .layouts import layout_ranges


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
    """DeepEP's low-latency handle, indexed as its tuple: handle[0] src_info [G, M*R] int32 (source token of each
    batched slot, -1 when empty), handle[1] layout_range [G, R] int64 (begin << 32 | count per source rank),
    handle[2..4] M, hidden, num_experts.

    src_info is a view of the dispatch's epcomm src_info (source rank, token, slot per slot); layout_range is
    computed from it on first use (combine needs neither: epcomm's own handle routes the rows back). Both read the
    dispatch's outputs, so they follow DeepEP's rule for results: valid until the second later dispatch of the
    shape. With return_recv_hook they exist once the hook has run."""
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_ranks: int
    key: tuple = ()
    topk_ids: torch.Tensor | None = None
    lane: Any = None
    round: int = -1
    ep_handle: Any = None
    result: Any = None     # the EPBuffer's DispatchResult (layout "batched"), once received
    ready: bool = False
    combine_input: torch.Tensor | None = None   # what get_next_low_latency_combine_buffer gave for this handle
    _src: torch.Tensor | None = None            # int32 [G, M*R, 3] (source rank, token, slot), -1 rows: no token
    _layout_range: torch.Tensor | None = None

    def received(self, result, src: torch.Tensor) -> None:
        self.result, self.ep_handle, self._src, self._layout_range = result, result.handle, src, None
        self.ready = True

    def _source(self) -> torch.Tensor:
        if self._src is None:
            raise EPInputError("low-latency handle: its tensors exist once the dispatch's receive hook has run")
        return self._src

    @property
    def src_info(self) -> torch.Tensor:
        return self._source()[..., 1]

    @property
    def layout_range(self) -> torch.Tensor:
        if self._layout_range is None:
            self._layout_range = layout_ranges(self._source()[..., 0], self.num_ranks)
        return self._layout_range

    def __getitem__(self, i):
        fields = ("src_info", "layout_range", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts")
        if isinstance(i, slice):
            return tuple(getattr(self, f) for f in fields[i])
        return getattr(self, fields[i])    # one at a time: layout_range is computed only when asked for

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(self[i] for i in range(5))
