"""EPConfig: the shape of one expert-parallel layer, and the worst-case buffer sizes derived from it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import EPInputError
from .formats import FORMAT_NAMES, FORMATS, SCALE_FORMATS, TokenFormat

MODES = ("ht", "ll")  # high-throughput (a token crosses once per destination rank) / low-latency (per-expert slots)
LAYOUTS = ("grouped", "batched")   # expert_x rows packed group after group / one fixed-capacity slab per expert
SCALE_LAYOUTS = ("row", "col")     # expert_scales row-major / column-major with TMA-aligned columns


@dataclass(frozen=True)
class EPConfig:
    """One MoE layer's communication shape.

    hidden: channels per token (a multiple of 8 for bf16, of 16 for fp8: 16-byte rows). topk: experts per token.
    num_experts: routed experts in the world,
    divisible by world_size. max_tokens_per_rank: the most tokens one rank may dispatch at once; every buffer is sized
    from it, so output shapes never depend on routing. token_format: "bf16" or "fp8" (blockwise, quantised in dispatch);
    the name is resolved to its epcomm.formats.TokenFormat (which still compares equal to the name).
    mode: "ht" or "ll". fused_shared_expert: group 0 of the output holds the rank's own tokens for the shared expert.
    skip_a2a: tokens go only to experts that live on their own rank (experts replicated; an outside all-reduce
    finishes the sum). allreduce_world_size: ranks that share that all-reduce (shared-expert rows are split among them).
    timeout_s: deadline of every wait for a peer. num_sms: the most SMs (thread blocks of the persistent grid) the
    GPU kernels may use, leaving the rest to overlapped compute; None = all that this context can keep resident (one
    per SM; fewer under MPS / green contexts / ranks sharing a GPU, and a larger value is clamped to that: see
    docs/ARCHITECTURE.md "Grid size"). The host backend ignores it.

    Receive capacity (docs/MEMORY.md): recv_capacity is the most routed rows (token, expert) one rank may receive in
    one dispatch round; expert_x, its scales, src_info, the caller's expert_y and the GPU receive buffers are sized
    by it. None (default) = the exact worst case when a token's expert ids are distinct: sources x
    max_tokens_per_rank x min(topk, local experts) (`worst_case_recv_rows`). recv_capacity_factor sets it instead as
    a factor of the balanced mean, ceil(F x max_tokens_per_rank x topk) rows (F = 2: twice the load of uniform
    routing). Either is capped at the worst case. A round that would need more rows on any rank delivers nothing and
    raises EPCapacityError on every rank (naming the rank, the rows needed and the capacity); the buffer stays usable.

    Output layout (docs/ARCHITECTURE.md "Output layouts"): layout "grouped" packs the groups one after the other in
    expert_x [max_recv_rows, hidden] (expert_alignment=N pads every group to a multiple of N rows, e.g. 128 for
    DeepGEMM's contiguous grouped GEMM); layout "batched" gives every local expert a slab of expert_capacity rows,
    expert_x [n_local_experts, expert_capacity, hidden], with tokens_per_expert as the mask (masked / batched expert
    GEMMs). expert_capacity: None = sources x max_tokens_per_rank (enough unless a token lists one expert twice).
    fp8 scales: scale_format "fp32" or "ue8m0" (power of two, rounded up), scale_layout "row" or "col" (column-major,
    each column padded to a multiple of 4 rows: TMA-aligned).

    How the two combine: the receive capacity counts routed rows only. Alignment pad rows are not routed rows: a
    grouped buffer holds max_recv_rows = recv_rows + shared rows + num_groups x (expert_alignment - 1), so a round
    within the capacity always fits with its padding. In layout "batched" the slabs are sized by expert_capacity
    alone (n_local_experts x expert_capacity rows, whatever the receive capacity); the receive capacity still bounds
    the rows a rank may receive in all (and the GPU's receive buffer and staging). Two different overflows, both
    caught and named: more routed rows on a rank than recv_rows (EPCapacityError on every rank, the buffer stays
    usable), and more rows for one local expert than expert_capacity (an EPError naming the rank and the expert;
    the rows past the slab are never written).
    """

    hidden: int
    topk: int
    num_experts: int
    max_tokens_per_rank: int
    world_size: int
    token_format: TokenFormat | str = "bf16"
    mode: str = "ht"
    fused_shared_expert: bool = False
    skip_a2a: bool = False
    allreduce_world_size: int = 1
    timeout_s: float = 30.0
    num_sms: int | None = None
    recv_capacity: int | None = None
    recv_capacity_factor: float | None = None
    layout: str = "grouped"
    expert_alignment: int = 1
    expert_capacity: int | None = None
    scale_format: str = "fp32"
    scale_layout: str = "row"

    def __post_init__(self):
        fmt = FORMATS.get(self.token_format) if isinstance(self.token_format, str) else None
        if fmt is not None:
            object.__setattr__(self, "token_format", fmt)   # frozen: set once, here
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, field: str, why: str):
            if not ok:
                raise EPInputError(f"EPConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("hidden", "topk", "num_experts", "max_tokens_per_rank", "world_size", "allreduce_world_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), name, "must be an int")
        need(self.world_size >= 1, "world_size", "must be >= 1")
        need(self.num_experts >= 1, "num_experts", "must be >= 1")
        need(self.num_experts % self.world_size == 0, "num_experts",
             f"must be divisible by world_size={self.world_size}")
        need(1 <= self.topk <= self.num_experts, "topk", f"must be in 1..num_experts={self.num_experts}")
        need(self.max_tokens_per_rank >= 1, "max_tokens_per_rank", "must be >= 1")
        need(isinstance(self.token_format, TokenFormat), "token_format", f"must be one of {FORMAT_NAMES}")
        multiple = self.token_format.hidden_multiple
        need(self.hidden > 0 and self.hidden % multiple == 0, "hidden",
             f"must be a positive multiple of {multiple} for {self.token_format} (16-byte rows)")
        self._validate_output_layout(need)
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(self.allreduce_world_size >= 1, "allreduce_world_size", "must be >= 1")
        need(self.allreduce_world_size == 1 or self.skip_a2a, "allreduce_world_size",
             "only means something with skip_a2a=True")
        need(isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0, "timeout_s", "must be > 0 seconds")
        need(self.num_sms is None or (isinstance(self.num_sms, int) and self.num_sms >= 1), "num_sms",
             "must be None (all SMs) or an int >= 1")
        cap, factor = self.recv_capacity, self.recv_capacity_factor
        need(cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1), "recv_capacity",
             "must be None (the worst case) or an int >= 1 (rows)")
        need(factor is None or (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0),
             "recv_capacity_factor", "must be None or a number > 0 (times max_tokens_per_rank * topk)")
        need(cap is None or factor is None, "recv_capacity_factor",
             "give recv_capacity or recv_capacity_factor, not both")

    def _validate_output_layout(self, need) -> None:
        need(self.layout in LAYOUTS, "layout", f"must be one of {LAYOUTS}")
        need(isinstance(self.expert_alignment, int) and not isinstance(self.expert_alignment, bool)
             and self.expert_alignment >= 1, "expert_alignment", "must be an int >= 1 (rows)")
        need(self.expert_alignment == 1 or self.layout == "grouped", "expert_alignment",
             "pads the groups of layout 'grouped' (the batched layout has fixed slabs: set expert_capacity)")
        cap = self.expert_capacity
        need(cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1), "expert_capacity",
             "must be None (sources x max_tokens_per_rank) or an int >= 1 (rows per local expert)")
        need(cap is None or self.layout == "batched", "expert_capacity", "only means something with layout='batched'")
        need(not (self.layout == "batched" and self.fused_shared_expert), "layout",
             "'batched' holds routed experts only: run the shared expert on your own tokens "
             "(fused_shared_expert=False)")
        need(self.scale_format in SCALE_FORMATS, "scale_format", f"must be one of {SCALE_FORMATS}")
        need(self.scale_layout in SCALE_LAYOUTS, "scale_layout", f"must be one of {SCALE_LAYOUTS}")
        if not self.token_format.quantized:
            need(self.scale_format == "fp32", "scale_format", f"means something only for a quantised format, "
                 f"not {self.token_format}")
            need(self.scale_layout == "row", "scale_layout", f"means something only for a quantised format, "
                 f"not {self.token_format}")

    def replace(self, **changes) -> "EPConfig":
        return dataclasses.replace(self, **changes)

    @property
    def n_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def num_groups(self) -> int:
        """Output groups per rank: one per local expert, plus the shared expert when fused."""
        return self.n_local_experts + int(self.fused_shared_expert)

    @property
    def scale_cols(self) -> int:
        """fp8 scales per row: ceil(hidden / 128) (the last block may be partial)."""
        return -(-self.hidden // 128)

    @property
    def worst_case_recv_rows(self) -> int:
        """The most routed rows one rank can receive in a round when each token's expert ids are distinct: every token
        of every source rank, once per local expert it picks (at most min(topk, local experts))."""
        sources = 1 if self.skip_a2a else self.world_size
        return sources * self.max_tokens_per_rank * min(self.topk, self.n_local_experts)

    @property
    def recv_rows(self) -> int:
        """The receive capacity in routed rows (recv_capacity / recv_capacity_factor / the worst case, capped at it)."""
        worst = self.worst_case_recv_rows
        if self.recv_capacity is not None:
            return min(self.recv_capacity, worst)
        if self.recv_capacity_factor is not None:
            return max(1, min(math.ceil(self.recv_capacity_factor * self.max_tokens_per_rank * self.topk), worst))
        return worst

    @property
    def max_recv_rows(self) -> int:
        """Rows of expert_x (and src_info, expert_y) on one rank in layout "grouped": the receive capacity, plus the
        shared rows, plus the worst-case alignment padding (pad rows are not routed rows: the capacity does not count
        them)."""
        shared = self.max_tokens_per_rank if self.fused_shared_expert else 0
        return self.recv_rows + shared + self.alignment_pad_rows

    @property
    def alignment_pad_rows(self) -> int:
        """Worst-case pad rows of layout "grouped" with expert_alignment N: N - 1 per group."""
        return self.num_groups * (self.expert_alignment - 1)

    @property
    def batched_capacity(self) -> int:
        """Rows per local expert in layout "batched": expert_capacity, or every token of every source once."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        return (1 if self.skip_a2a else self.world_size) * self.max_tokens_per_rank

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """Leading dimensions of expert_x, expert_scales, src_info and expert_y: (max_recv_rows,) in layout "grouped",
        (n_local_experts, batched_capacity) in layout "batched"."""
        if self.layout == "batched":
            return (self.n_local_experts, self.batched_capacity)
        return (self.max_recv_rows,)

    def expert_rank(self, expert: int) -> int:
        return expert // self.n_local_experts

    def experts_of(self, rank: int) -> range:
        """The global ids of the experts that live on `rank` (how errors name what a stalled peer holds)."""
        n = self.n_local_experts
        return range(rank * n, (rank + 1) * n)

    def holds(self, rank: int) -> str:
        """'experts 32..63': the expert group of `rank`, for messages."""
        ex = self.experts_of(rank)
        return f"experts {ex.start}..{ex.stop - 1}"

    def token_bytes(self) -> int:
        """Bytes of one token on the wire in this format (data + fp8 scales)."""
        return self.token_format.row_bytes(self.hidden)

    def shared_share(self, rank: int, num_tokens: int) -> range:
        """Tokens of `rank` whose shared-expert row this rank computes (all of them unless skip_a2a splits them)."""
        if not self.skip_a2a or self.allreduce_world_size == 1:
            return range(num_tokens)
        w = self.allreduce_world_size
        i = rank % w
        base, extra = divmod(num_tokens, w)
        start = i * base + min(i, extra)
        return range(start, start + base + (1 if i < extra else 0))
