"""The handles the DeepEP Buffer's dispatches return: what a later combine (or cached dispatch) needs.

DeepEP's normal-mode handle is an opaque tuple, so DispatchHandle reproduces none of its internals; the low-latency
handle is indexed by callers (handle[0] src_info, ...), so LowLatencyHandle answers to DeepEP's five-tuple indexing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
