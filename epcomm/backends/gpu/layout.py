"""The GPU backend's memory layout: the one source of truth shared by GpuBackend, the kernels and epcomm.memory.

* `Layout`: the derived sizes of one EPConfig (message bytes, count-row ints, chunk table, weight stride, ...) and the
  offsets of the regions of the NVSHMEM symmetric buffer.
* `kernel_defines(cfg)`: those sizes as -D defines for the kernels (jit.defines_for adds them); the kernels derive each
  one again from the shape and `static_assert` that they agree, so the CPU compile test
  (tests/unit/test_kernels_compile.py) proves the agreement for every specialisation.
* `params_struct(ranks)`: the ctypes mirror of the kernels' `Params` (kernels/common.cuh); its size and the offsets of
  its last fields are kernel defines too.
* `device_arrays(cfg)`: every ordinary device array GpuBackend allocates (outputs, handle, counters); GpuBackend
  allocates from this list and epcomm.memory sums it.
* `ErrorCode` / `Phase`: the device error record's codes and phases (kernels: `ERR_*`, `PHASE_*`, checked the same way).

Pure Python: importing this module needs no CUDA package (epcomm.memory plans memory on any machine).
"""
from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

from . import variants

ALIGN = 256                 # every symmetric region starts 256-byte aligned
# NVSHMEM_SYMMETRIC_SIZE of a process = what its first buffer needs + HEAP_MARGIN, at least HEAP_MIN (NVSHMEM's
# default size). A process that makes several buffers sets NVSHMEM_SYMMETRIC_SIZE (or the topology's
# nvshmem.symmetric_size) to the sum. NVSHMEM_SYMMETRIC_SIZE is what the process may allocate: NVSHMEM adds its own
# objects (teams, psync and reduce areas, its g buffers) on top of it (NVSHMEM 3.4.5, mem_heap.cpp
# set_heap_size_attr: "heapextra", which also reserves 20 x 512 B of alignment for user allocations; heap.py counts
# it). So the margin covers only the allocator's alignment of our one allocation and whatever small symmetric objects
# nvshmem4py makes: 16 MiB (dev/device/heap_margin.py tries 0 to 128 MiB on the GPU).
HEAP_MARGIN = 16 << 20
HEAP_MIN = 1 << 30
QONCE_MIN_TOKENS = 512      # ht fp8: the dispatch quantises once from this many tokens (kernel: QONCE_MIN_TOKENS)
MAX_ITEM_TOKENS = 64        # most tokens per send work item (kernel: MAX_ITEM_TOKENS; bounds its shared memory)


class ErrorCode(enum.IntEnum):
    """`code` of the device error record (kernels: ERR_*)."""
    TIMEOUT = 1          # a peer did not arrive before the deadline
    SLOT_OVERFLOW = 2    # ll: more rows for one (expert, source) than max_tokens_per_rank slots
    SLAB_OVERFLOW = 5    # layout "batched": more rows for one local expert than expert_capacity (the rest dropped)
    BAD_SOURCE = 3       # combine: a handle entry (source rank, token, slot, row) out of range
    ABORT = 4            # a peer aborted (its abort word is set)
    FENCED = 6           # fencing: a peer declared this rank dead (peer = that peer; kernels/fence.cuh)


# The receive-capacity record (not an error: the buffer stays usable) follows the 8 words of the error record in the
# same host-mapped block: flag (the device round, 0 = none), rank, rows needed, capacity, ranks over capacity.
CAPACITY_RECORD_WORD = 8
CAPACITY_FIELDS = ("flag", "rank", "needed", "capacity", "over")
# The refusal record (issue 15; not an error either) follows it: a combine whose tokens went to the experts of a rank
# that refused its input for that round. count (such combines so far, written last; only the device writes the
# record), then of the latest one: round (device round), rank, what (REFUSED_DISPATCH / REFUSED_COMBINE), tokens.
# REFUSED_LOST (fencing, issue 15 item 4; no kernel writes it yet): the rank was declared dead during the round and
# its rows never came; the host raises EPRankLostError from it instead of EPPeerRejectedError.
REFUSAL_RECORD_WORD = 16
REFUSAL_FIELDS = ("count", "round", "rank", "what", "tokens")
REFUSED_DISPATCH, REFUSED_COMBINE, REFUSED_LOST = 1, 2, 3
# A dispatch output set's status words (kernels: ST_*): [0] void round (then [1..3] the rank most over, its rows, the
# capacity), [ST_ROUND] the dispatch's device round, [ST_REJECTED + s] source s refused its input this round, then
# (fencing) [st_masked(R) + r] rank r was masked (fenced off) in that round (the snapshot of kernels/fence.cuh).
ST_ROUND, ST_REJECTED = 4, 8


def st_masked(ranks: int) -> int:
    """The first of the status words that say which ranks were masked in the round (kernels: ST_MASKED)."""
    return ST_REJECTED + ranks


def status_ints(ranks: int) -> int:
    """int32 status words of a dispatch output set (kernels: STATUS_INTS)."""
    return st_masked(ranks) + ranks
# Then the overwrite record (OverwriteRec; kernels/results.cuh): a launch refused because of a live result. int32
# words: flag, count, op, why, then the holder's and the refused call's Params.call (u64 each, low word first).
OVERWRITE_RECORD_WORD = 24
RECORD_WORDS = 32           # int32 words of the host-mapped block: ErrRec, CapacityRec, RefusalRec, OverwriteRec


class RefusedOp(enum.IntEnum):
    """`op` of the overwrite record (kernels: OP_*)."""
    DISPATCH = 0
    DISPATCH_RECV = 1
    COMBINE = 2
    COMBINE_RECV = 3


class Refusal(enum.IntEnum):
    """`why` of the overwrite record (kernels: WHY_*)."""
    LIVE = 1          # a dispatch: its output set holds the live result of another call
    PENDING = 2       # an *_async of this buffer still waited for its *_wait
    NOT_LIVE = 3      # a combine: the result its handle names is not live (refused, combined or released)


def call_word(call_id: int, output_set: int, eager: bool) -> int:
    """Params.call: which call a launch is, the output set it uses, eager or captured (kernels/results.cuh)."""
    return (call_id << 2) | (output_set << 1) | int(bool(eager))


class Phase(enum.IntEnum):
    """`phase` of the device error record (kernels: PHASE_*): what was being waited for."""
    DISPATCH = 0
    COMBINE = 1
    COMBINE_WEIGHTS = 2

    @property
    def label(self) -> str:
        return {0: "dispatch", 1: "combine", 2: "combine (weights)"}[int(self)]


def _align(x: int, a: int = ALIGN) -> int:
    return (x + a - 1) // a * a


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


def _round4(x: int) -> int:
    return (x + 3) // 4 * 4


# Regions of the symmetric buffer, in address order; each is double buffered by round parity where it receives.
REGIONS = ("drecv", "dhist", "dsig", "stage", "hstage", "crecv", "csig", "wrecv", "wsig", "cstage", "abort", "dflag",
           "cflag", "dresv", "dead", "beat")


class Layout:
    """Derived sizes of one EPConfig and the symmetric-region offsets (`offset[name]`, `total` bytes).

    any_remote: some pair of ranks is on different nodes (puts to them are staged in symmetric memory)."""

    def __init__(self, cfg, any_remote: bool = True):
        H, K, R, M = cfg.hidden, cfg.topk, cfg.world_size, cfg.max_tokens_per_rank
        fmt = cfg.token_format             # a formats.TokenFormat
        ht = cfg.mode == "ht"
        self.ht = ht
        self.any_remote = any_remote
        self.local_experts = NL = cfg.n_local_experts
        self.groups = cfg.num_groups                       # output groups: local experts (+ the shared expert)
        self.scale_cols = -(-H // 128)                     # fp8 scales per row (the last block may be partial)
        self.data_bytes = fmt.element_bytes * H            # data bytes of one row in the dispatch format
        self.scale_bytes = fmt.row_bytes(H) - self.data_bytes   # its fp32 scales, ceil(H / 128) (none in bf16)
        self.meta_bytes = _align16(8 + 8 * K) if ht else 16   # ht: token, pad, K expert ids, K slot ranks; ll: token, k
        self.msg_bytes = _align16(self.data_bytes + self.scale_bytes + self.meta_bytes)   # one dispatch message
        # ll count row (source -> destination): [NL] counts, tokens, then [R] the source's routed rows to every rank
        self.hist_row_ints = _round4(NL + 1 + R)
        # ht: a source's tokens are cut into at most max_chunks send items, each with a ready flag on the destination;
        # its count message: [NL] per-expert counts, tokens, chunks, token prefix by chunk [chunks + 1], then [R] the
        # source's routed rows to every rank (so every rank reaches the same receive-capacity verdict)
        self.max_chunks = max(256 if R <= 32 else 128, -(-M // MAX_ITEM_TOKENS)) if ht else 1
        # ht: then the start of the source's messages in the destination's receive buffer (its reservation)
        self.count_row_ints = _round4(NL + 2 + self.max_chunks + 1 + R + 1) if ht else self.hist_row_ints
        self.count_rows_at = NL + 3 + self.max_chunks if ht else NL + 1   # where the [R] routed rows start
        self.count_base_at = self.count_rows_at + R if ht else 0
        self.combine_row_bytes = 2 * H                     # bf16 row of the combine
        sources = 1 if cfg.skip_a2a else R
        # ht: the most token messages a rank receives in a round within the capacity (a token brings >= 1 row)
        self.recv_tokens = min(sources * M, cfg.recv_rows)
        # ht: the most ranks one token goes to; its combine rows come back packed [token][index of the rank among the
        # token's ranks], and its staged messages to other nodes likewise: min(K, R) rows a token, not R
        self.max_dest_ranks = min(K, R)
        # ht combine: floats of one source's [M, K] weights, padded to 16 bytes (copied with 16-byte stores)
        self.weight_stride = _round4(M * K)
        self.region_bytes = self._region_bytes(cfg, any_remote)
        self.offset: dict[str, int] = {}
        off = 0
        for name in REGIONS:
            self.offset[name] = off
            off += _align(max(self.region_bytes[name], 16))
        self.total = off

    def _region_bytes(self, cfg, any_remote: bool) -> dict[str, int]:
        """Bytes of each region (staging for puts to other nodes only where some peer is on another node)."""
        R, M, K = cfg.world_size, cfg.max_tokens_per_rank, cfg.topk
        NL, MSG, RB, WST = self.local_experts, self.msg_bytes, self.combine_row_bytes, self.weight_stride
        ht = self.ht
        return {
            # ht: [parity][recv_tokens] messages, each source's packed at the offset it reserved (capacity-bound);
            # ll: [parity][expert][source][slot]
            "drecv": 2 * self.recv_tokens * MSG if ht else 2 * NL * R * M * MSG,
            "dhist": 2 * R * self.count_row_ints * 4,                     # count messages [parity][source]
            "dsig": 2 * R * 8,
            # to other nodes; ht fp8 from QONCE_MIN_TOKENS (kernels' qonce): also every token's quantised row, at its
            # rank index 0
            "stage": (M * self.max_dest_ranks * MSG if ht else M * K * MSG) if any_remote or self._qonce(cfg) else 0,
            "hstage": R * self.count_row_ints * 4,                        # staged count messages
            "crecv": 2 * M * (self.max_dest_ranks if ht else K) * RB,     # combine rows [parity][token][rank index / k]
            "csig": 2 * R * 8,
            "wrecv": 2 * R * WST * 4 if ht else 0,                        # ht: every source's weights
            "wsig": 2 * R * 8,
            # ht: the staged weights [weight_stride] floats (one copy: every other-node destination gets the same
            # [T, K] weights, put from it), then (other nodes) the staged combine rows, one per received token message
            # (packed over sources: at most recv_tokens, the capacity's bound)
            "cstage": (WST * 4 + (self.recv_tokens * RB if any_remote else 0)) if ht else 0,
            "abort": R * 8,
            "dflag": 2 * R * self.max_chunks * 8 if ht else 0,            # ht: chunk ready flags of dispatch
            "cflag": 2 * R * self.max_chunks * 8 if ht else 0,            # ... and of combine
            "dresv": 2 * 8,                                               # ht: [parity] receive-buffer reservations
            # fencing (issue 15 item 4, kernels/fence.cuh): dead[D] = declarer + 1 once rank D is declared dead (a
            # death notice, written like the abort word), and one heartbeat counter per rank
            "dead": R * 8,
            "beat": R * 8,
        }

    @staticmethod
    def _qonce(cfg) -> bool:
        """An ht fp8 buffer whose dispatch quantises each token once into the stage region (kernels: qonce_on; from
        QONCE_MIN_TOKENS tokens per rank, at any size under the test variant qonceall)."""
        ht_fp8 = cfg.mode == "ht" and cfg.token_format.quantized
        return ht_fp8 and (cfg.max_tokens_per_rank >= QONCE_MIN_TOKENS or "qonceall" in variants.active())

    def regions(self) -> dict[str, int]:
        """Bytes of each region with its alignment padding (they add up to `total`)."""
        ends = [self.offset[n] for n in REGIONS[1:]] + [self.total]
        return {n: e - self.offset[n] for n, e in zip(REGIONS, ends)}


def heap_bytes(symmetric_bytes: int) -> int:
    """NVSHMEM_SYMMETRIC_SIZE for a process whose buffers need symmetric_bytes of symmetric memory."""
    return max(int(symmetric_bytes) + HEAP_MARGIN, HEAP_MIN)


def kernel_defines(cfg) -> dict[str, int]:
    """The derived sizes, for the kernels' static_asserts. Region sizes are those with peers on other nodes (staging
    included): one cubin serves every placement; the region offsets reach the kernels at run time (Params.off_*)."""
    lay = Layout(cfg, any_remote=True)
    out = {
        "EP_LOCAL_EXPERTS": lay.local_experts, "EP_GROUPS": lay.groups, "EP_SCALE_COLS": lay.scale_cols,
        "EP_DATA_BYTES": lay.data_bytes, "EP_SCALE_BYTES": lay.scale_bytes, "EP_META_BYTES": lay.meta_bytes,
        "EP_MSG_BYTES": lay.msg_bytes, "EP_HIST_ROW_INTS": lay.hist_row_ints, "EP_MAX_CHUNKS": lay.max_chunks,
        "EP_COUNT_ROW_INTS": lay.count_row_ints, "EP_COMBINE_ROW_BYTES": lay.combine_row_bytes,
        "EP_WEIGHT_STRIDE": lay.weight_stride, "EP_MAX_ITEM_TOKENS": MAX_ITEM_TOKENS,
        "EP_COUNT_ROWS_AT": lay.count_rows_at, "EP_CAPACITY_RECORD_WORD": CAPACITY_RECORD_WORD,
        "EP_COUNT_BASE_AT": lay.count_base_at,
        "EP_REFUSAL_RECORD_WORD": REFUSAL_RECORD_WORD, "EP_STATUS_INTS": status_ints(cfg.world_size),
        "EP_ST_MASKED": st_masked(cfg.world_size),
        "EP_ST_ROUND": ST_ROUND, "EP_ST_REJECTED": ST_REJECTED, "EP_REFUSED_DISPATCH": REFUSED_DISPATCH,
        "EP_REFUSED_COMBINE": REFUSED_COMBINE, "EP_REFUSED_LOST": REFUSED_LOST,
        "EP_OVERWRITE_RECORD_WORD": OVERWRITE_RECORD_WORD,
        "EP_PARAMS_BYTES": ctypes.sizeof(params_struct(cfg.world_size)),
        "EP_PARAMS_OFFSET_T": params_struct(cfg.world_size).T.offset,
        "EP_PARAMS_OFFSET_PEER": params_struct(cfg.world_size).peer.offset,
    }
    # cstage's rows are sized by the receive capacity at run time (the kernels index them below the received tokens);
    # its weights part is fixed
    # ht's receive buffer likewise (recv_tokens messages)
    run_time = ("cstage", "drecv") if lay.ht else ("cstage",)
    out.update({f"EP_REGION_BYTES_{n.upper()}": v for n, v in lay.region_bytes.items() if n not in run_time})
    out["EP_CSTAGE_WEIGHT_BYTES"] = lay.weight_stride * 4 if lay.ht else 0
    out["EP_MAX_DEST_RANKS"] = lay.max_dest_ranks
    out.update({f"EP_ERR_{c.name}": int(c) for c in ErrorCode})
    out.update({f"EP_PHASE_{p.name}": int(p) for p in Phase})
    out.update({f"EP_OP_{o.name}": int(o) for o in RefusedOp})
    out.update({f"EP_WHY_{w.name}": int(w) for w in Refusal})
    return out


def send_chunk_tokens(T: int, ndest: int, grid: int, ht: bool, max_chunks: int, waves: int = 1) -> int:
    """Tokens per send work item (Params.ch; the kernel's chunk_tokens() clamps the same way): about `waves` items
    per block, 1..MAX_ITEM_TOKENS tokens; ht: at most `max_chunks` chunks per source (the receiver's chunk table)."""
    per_block = -(-T * ndest // grid)
    if ht:
        per_block = per_block if per_block <= 16 else -(-per_block // max(1, waves))
        per_block = max(per_block, -(-T // max_chunks))
    return max(1, min(MAX_ITEM_TOKENS, per_block))


# Params (kernels/layout.cuh), in field order: device pointers, the deadline, the call word, region offsets, ints,
# peer bases.
PARAM_POINTERS = ("x", "ids", "weights", "expert_y", "y", "ex", "escale", "row_offsets", "expert_ids", "src_info",
                  "tpe", "hids", "hinfo", "hcount", "sym", "state", "hist_acc", "err", "hchunk", "hstatus",
                  "dbase", "x_scales", "hdropped", "fdec")
PARAM_INTS = ("T", "me", "maxr", "ch", "crb", "cap", "recv_tokens", "rejected", "fence")


def params_struct(ranks: int):
    """ctypes mirror of the kernels' Params for `ranks` ranks."""
    u64, i32 = ctypes.c_uint64, ctypes.c_int32
    fields = ([(n, u64) for n in PARAM_POINTERS] + [("timeout_ns", u64), ("call", u64)]
              + [("off_" + n, u64) for n in REGIONS]
              + [(n, i32) for n in PARAM_INTS] + [("peer", u64 * ranks)])

    class Params(ctypes.Structure):
        _fields_ = fields
    return Params


@dataclass(frozen=True)
class DeviceArray:
    """One ordinary device array of a GpuBackend.

    name: its name in epcomm.memory's report; param: the Params pointer it feeds (None: not a kernel parameter);
    copies: "one" (shared), "dispatch" (one per dispatch output set) or "combine" (one per combine output)."""
    name: str
    param: str | None
    shape: tuple[int, ...]
    dtype: str            # "bf16" "fp8" "f32" "i32" "u32" "i64" "bool"
    zeroed: bool
    copies: str = "one"

    def label(self, copy: int = 0) -> str:
        return {"one": self.name, "dispatch": f"set{copy}.{self.name}", "combine": f"{self.name}{copy}"}[self.copies]


OUTPUT_SETS = 2   # outputs are double buffered: a result stays valid until the second call after it


def scale_storage_shape(cfg) -> tuple[int, ...]:
    """Shape of expert_scales' storage: [*rows, cols] row-major; column-major (scale_layout "col"): [*slabs, cols,
    rows rounded up to 4] (16-byte aligned columns, epcomm/layouts.py), handed out as a transposed view."""
    *slabs, rows = cfg.rows_shape
    cols = -(-cfg.hidden // 128)
    if cfg.scale_layout == "col":
        return (*slabs, cols, -(-rows // 4) * 4)
    return (*slabs, rows, cols)


def device_arrays(cfg) -> list[DeviceArray]:
    """Every device array GpuBackend allocates outside the symmetric heap (each "dispatch" / "combine" entry
    OUTPUT_SETS times)."""
    lay = Layout(cfg)
    H, K, M, R = cfg.hidden, cfg.topk, cfg.max_tokens_per_rank, cfg.world_size
    maxr = cfg.rows_shape     # (rows,) grouped, (local experts, capacity) batched: epcomm/layouts.py
    fmt = cfg.token_format    # its name is the dtype tag ("bf16" / "fp8")
    out = [DeviceArray("state", "state", (64,), "i32", True),
           # fencing: the round's verdict on each source, per phase (u64 [3][R]: round << 2 | arrived 1 / lost 2)
           DeviceArray("fence_decisions", "fdec", (3 * R,), "i64", True),
           DeviceArray("hist_acc", "hist_acc", (R * lay.hist_row_ints,), "i32", True),
           # ht: where this rank's messages to each rank start this round (u64: round << 32 | offset)
           DeviceArray("dispatch_base", "dbase", (2 * R,), "i32", True),
           DeviceArray("expert_x", "ex", (*maxr, H), str(fmt), False, "dispatch")]
    if fmt.quantized:
        out.append(DeviceArray("expert_scales", "escale", scale_storage_shape(cfg), "f32", False, "dispatch"))
    out += [DeviceArray("row_offsets", "row_offsets", (lay.groups + 1,), "u32", True, "dispatch"),
            DeviceArray("expert_ids", "expert_ids", (lay.groups,), "i32", True, "dispatch"),
            DeviceArray("src_info", "src_info", (*maxr, 3), "i32", True, "dispatch"),
            DeviceArray("tokens_per_expert", "tpe", (lay.local_experts,), "i32", True, "dispatch"),
            DeviceArray("ids", "hids", (M * K,), "i32", True, "dispatch"),
            # ht: per received token message [recv_tokens][2 + K] (packed over sources in rank order: bounded by the
            # receive capacity, like the receive buffer); ll: a placeholder (its combine reads src_info)
            DeviceArray("hinfo", "hinfo", ((lay.recv_tokens if lay.ht else 1) * (2 + K),), "i32", True, "dispatch"),
            DeviceArray("hcount", "hcount", (R,), "i32", True, "dispatch"),
            DeviceArray("hchunk", "hchunk", (R * (lay.max_chunks + 1) + R,), "i32", True, "dispatch"),
            # ST_*: void round, the dispatch's round, the sources that refused their input, the masked ranks
            DeviceArray("status", "hstatus", (status_ints(R),), "i32", True, "dispatch"),
            # fencing: the top-k slots of the dispatch not sent (their expert's rank masked): DispatchResult.dropped
            DeviceArray("dropped", "hdropped", (M, K), "bool", True, "dispatch"),
            DeviceArray("y", None, (M, H), "bf16", False, "combine")]
    return out
