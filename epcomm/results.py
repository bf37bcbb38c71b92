"""What dispatch returns. The same dataclass for every backend; arrays are of the kind the caller passed in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DispatchResult:
    """Tokens laid out for a grouped matmul on this rank.

    expert_x [max_recv_rows, hidden] (bf16 or fp8), expert_scales [max_recv_rows, ceil(hidden/128)] fp32 (fp8 only,
    else None), row_offsets [num_groups+1] uint32 (rows of group g are row_offsets[g]:row_offsets[g+1]),
    expert_ids [num_groups] int32 (global expert id, -1 for the fused shared expert), src_info [max_recv_rows, 3]
    int32 (source rank, source token, top-k slot; k = -1 for shared rows; -1 past the last row), tokens_per_expert
    [n_local_experts] int32.
    handle: what combine needs to send rows back (backend specific; pass it to combine unchanged).
    That is layout "grouped"; in layout "batched" expert_x / expert_scales / src_info are [n_local_experts, capacity,
    ...], row_offsets[g] = g * capacity and tokens_per_expert is the mask (docs/ARCHITECTURE.md "Output layouts").
    A src_info row of -1 holds no token (padding, unused slab rows, past the end).
    rejected_ranks: ranks that refused their own input for this round (EPInputError there) and sent nothing; the
    result holds every other rank's tokens (GPU backend: a sequence read from the device when first used, which
    waits for the dispatch on the current stream; read it before the second dispatch after this one).
    dropped: [T, topk] bool, this rank's top-k slots that were not sent because their expert lives on a fenced-off
    rank (None where the backend does not fence); combine leaves them out of the sum. masked_ranks: the ranks
    fenced off as of this round (they sent nothing and got nothing; docs/FAILURES.md).
    """

    expert_x: Any
    expert_scales: Any
    row_offsets: Any
    expert_ids: Any
    src_info: Any
    tokens_per_expert: Any
    handle: Any = None
    rejected_ranks: tuple = ()
    dropped: Any = None
    masked_ranks: tuple = ()
