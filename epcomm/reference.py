"""The executable spec: world-level dispatch and combine in numpy.

Every backend and every test is checked against these functions. They take the inputs of ALL ranks (lists indexed by
rank) and return every rank's outputs, so one process can state what the whole world must produce.

masked_ranks (fencing, docs/FAILURES.md): ranks fenced off as dead. They take no part: their inputs are ignored and
their outputs are None; a top-k slot of a live rank's token whose expert lives on a masked rank is dropped (as if
its id were -1: no row anywhere, and combine sums the live experts only). `masked_slots` says which slots.
"""
from __future__ import annotations

import numpy as np

from . import layouts
from .arrays import to_numpy
from .config import EPConfig
from .errors import EPCapacityError
from .formats import BF16
from .results import DispatchResult


def wire_rows(cfg: EPConfig, x) -> tuple[np.ndarray, np.ndarray | None]:
    """A rank's tokens as dispatch delivers them: bf16 x [T, H] quantised in cfg's token and scale format, or a
    caller-quantised pair (x_fp8 [T, H], x_scales [T, scale_cols] fp32) passed on unchanged."""
    if isinstance(x, tuple):
        q, s = x
        return (np.asarray(q, cfg.token_format.dtype).reshape(-1, cfg.hidden),
                np.asarray(s, np.float32).reshape(-1, cfg.scale_cols))
    return cfg.token_format.quantize(np.asarray(x, BF16).reshape(-1, cfg.hidden), cfg.scale_format)


def _routed_rows(cfg: EPConfig, dest: int, topk_ids: list[np.ndarray]):
    """(source rank, token, slot) of every row of each routed group of `dest`, in the spec's order."""
    sources = [dest] if cfg.skip_a2a else range(cfg.world_size)
    groups = []
    for local in range(cfg.n_local_experts):
        expert = dest * cfg.n_local_experts + local
        parts = []
        for src in sources:
            t, k = np.nonzero(np.asarray(topk_ids[src]) == expert)  # row-major: ordered by token, then slot
            parts.append(np.stack([np.full_like(t, src), t, k], axis=1))
        groups.append(np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, 3), np.int32))
    return groups


def masked_slots(cfg: EPConfig, topk_ids: np.ndarray, masked_ranks=()) -> np.ndarray:
    """[T, K] bool: the top-k slots whose expert lives on a masked rank (dropped: DispatchResult.dropped)."""
    ids = np.asarray(topk_ids)
    if not len(masked_ranks):
        return np.zeros(ids.shape, bool)
    return (ids >= 0) & (ids < cfg.num_experts) & np.isin(np.where(ids >= 0, ids // cfg.n_local_experts, -1),
                                                          list(masked_ranks))


def _without_masked(cfg: EPConfig, xs, topk_ids, masked_ranks):
    """The inputs the live ranks exchange: masked ranks send nothing, slots on their experts become -1."""
    xs2, ids2 = [], []
    for r, (x, ids) in enumerate(zip(xs, topk_ids)):
        if r in masked_ranks:
            xs2.append(np.zeros((0, cfg.hidden), BF16))
            ids2.append(np.zeros((0, cfg.topk), np.int32))
        else:
            ids = np.asarray(ids, np.int64)
            xs2.append(x)
            ids2.append(np.where(masked_slots(cfg, ids, masked_ranks), -1, ids))
    return xs2, ids2


def recv_rows_needed(cfg: EPConfig, topk_ids: list[np.ndarray]) -> np.ndarray:
    """Routed rows each rank receives in a round (int64 [world_size]): its (token, slot) entries from every source
    (skip_a2a: from itself only)."""
    need = np.zeros(cfg.world_size, np.int64)
    for src, ids in enumerate(topk_ids):
        ids = np.asarray(ids).reshape(-1)
        dest = ids[(ids >= 0) & (ids < cfg.num_experts)] // cfg.n_local_experts
        if cfg.skip_a2a:
            dest = dest[dest == src]
        need += np.bincount(dest, minlength=cfg.world_size)
    return need


def check_capacity(cfg: EPConfig, topk_ids: list[np.ndarray], round: int | None = None) -> None:
    """The capacity rule: a round in which any rank would receive more than cfg.recv_rows routed rows delivers nothing
    and raises EPCapacityError (on every rank; with skip_a2a, where ranks exchange nothing, on the rank itself).
    Alignment pad rows (expert_alignment) are not routed rows: max_recv_rows holds them on top of the capacity."""
    need = recv_rows_needed(cfg, topk_ids)
    if (need > cfg.recv_rows).any():
        raise EPCapacityError.for_round(cfg, need, round)


def dispatch(cfg: EPConfig, xs: list, topk_ids: list[np.ndarray], masked_ranks=()) -> list[DispatchResult | None]:
    """Every rank's dispatch outputs, in cfg's layout (epcomm.layouts). xs[r]: bf16 [T_r, H], or (fp8 [T_r, H],
    scales [T_r, scale_cols]) already quantised; topk_ids[r]: int32 or int64 [T_r, K], -1 = no expert.
    Raises EPCapacityError (check_capacity) when a rank would receive more routed rows than cfg.recv_rows.
    masked_ranks: fenced-off ranks (module doc); their entries are None."""
    r_count = cfg.world_size
    if len(xs) != r_count or len(topk_ids) != r_count:
        raise ValueError(f"need inputs of all {r_count} ranks")
    if len(masked_ranks):
        xs, topk_ids = _without_masked(cfg, xs, topk_ids, masked_ranks)
        full = dispatch(cfg, xs, topk_ids)
        return [None if r in masked_ranks else res for r, res in enumerate(full)]
    check_capacity(cfg, topk_ids)
    fmt = cfg.token_format
    wire = [wire_rows(cfg, x) for x in xs]      # rows as dispatch delivers them, and their scales (None for bf16)
    starts = np.concatenate([[0], np.cumsum([len(q) for q, _ in wire])]).astype(np.int64)
    all_q = np.concatenate([q for q, _ in wire])
    all_s = np.concatenate([s for _, s in wire]) if fmt.quantized else None
    results = []
    for dest in range(r_count):
        groups = []
        if cfg.fused_shared_expert:
            own = np.array(list(cfg.shared_share(dest, len(wire[dest][0]))), dtype=np.int32)
            groups.append(np.stack([np.full_like(own, dest), own, np.full_like(own, -1)], axis=1).reshape(-1, 3))
        groups += _routed_rows(cfg, dest, topk_ids)
        counts = np.array([len(g) for g in groups], dtype=np.int64)
        n_rows = int(counts.sum())
        rows = np.concatenate(groups).astype(np.int32) if groups else np.zeros((0, 3), np.int32)
        # Gather rows from all ranks' tokens at once: flat index = offset of the source rank + token.
        flat = starts[rows[:, 0]] + rows[:, 1] if n_rows else np.zeros(0, np.int64)
        expert_x, scales, row_offsets, src_info = layouts.arrange(
            cfg, counts, rows, all_q[flat], all_s[flat] if fmt.quantized else None)
        first_routed = int(cfg.fused_shared_expert)
        expert_ids = np.array(([-1] if cfg.fused_shared_expert else [])
                              + [dest * cfg.n_local_experts + g for g in range(cfg.n_local_experts)], dtype=np.int32)
        results.append(DispatchResult(
            expert_x=expert_x, expert_scales=scales, row_offsets=row_offsets, expert_ids=expert_ids,
            src_info=src_info, tokens_per_expert=counts[first_routed:].astype(np.int32),
            handle={"num_tokens": [len(q) for q, _ in wire]}))
    return results


def combine_exact(cfg: EPConfig, expert_ys: list[np.ndarray], results: list[DispatchResult | None],
                  topk_weights: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Combine in fp32 without rounding to bf16: (y[r] [T_r, H], magnitude[r] = sum of |w * row|) for error bounds.

    fp32 sums of at most topk + 1 terms are ~1e-7 relative, far inside the bf16 tolerance of compare_combine; fp32
    keeps the 4096-token shapes of the benchmark fast and small enough to check on every rank.
    results from dispatch(..., masked_ranks): a masked rank (None) has no expert rows and gets None back."""
    ys = [np.zeros((len(w), cfg.hidden), np.float32) for w in topk_weights]
    mags = [np.zeros_like(y) for y in ys]
    for dest, res in enumerate(results):
        if res is None:
            continue
        info = np.asarray(res.src_info).reshape(-1, 3)
        used = np.nonzero(info[:, 0] >= 0)[0]          # rows that hold a token (any layout; never pad rows)
        info = info[used]
        rows = np.asarray(expert_ys[dest]).reshape(-1, cfg.hidden)[used].astype(np.float32)
        for src in np.unique(info[:, 0]) if len(used) else []:
            from_src = info[:, 0] == src
            w_src = np.asarray(topk_weights[src], np.float32)
            # Within one slot every token appears at most once, so plain fancy-index += is exact (no np.add.at).
            for slot in np.unique(info[from_src, 2]):
                sel = from_src & (info[:, 2] == slot)
                tok = info[sel, 1]
                contrib = rows[sel] if slot < 0 else rows[sel] * w_src[tok, slot][:, None]
                ys[src][tok] += contrib
                mags[src][tok] += np.abs(contrib)
    masked = [r for r, res in enumerate(results) if res is None]
    return [None if r in masked else y for r, y in enumerate(ys)], \
        [None if r in masked else m for r, m in enumerate(mags)]


def combine(cfg: EPConfig, expert_ys: list[np.ndarray], results: list[DispatchResult],
            topk_weights: list[np.ndarray]) -> list[np.ndarray]:
    """Every rank's combine output, bf16 [T_r, H]: y[t] = sum_k w[t,k] * expert_y[row(t,k)] (+ shared row)."""
    ys, _ = combine_exact(cfg, expert_ys, results, topk_weights)
    return [None if y is None else y.astype(np.float32).astype(BF16) for y in ys]


# ---------------------------------------------------------------- comparing a backend's outputs with the spec's

def _layout_problems(cfg: EPConfig, actual: DispatchResult, expected: DispatchResult, rows_trimmed: bool) -> list[str]:
    """Shapes and element sizes: outputs are [*cfg.rows_shape, ...] whatever the routing (rows_trimmed, layout
    "grouped" only: the caller copied only the received rows of expert_x / expert_scales); column-major scales
    when cfg.scale_layout is "col"."""
    out = []
    arrays = [("expert_x", actual.expert_x, expected.expert_x), ("src_info", actual.src_info, expected.src_info)]
    if cfg.token_format.quantized:
        if actual.expert_scales is None:
            return ["expert_scales missing (fp8 needs them)"]
        arrays.append(("expert_scales", actual.expert_scales, expected.expert_scales))
        if cfg.scale_layout == "col" and not rows_trimmed and not _column_major(actual.expert_scales):
            out.append("expert_scales are not column-major (scale_layout='col')")
    trim_ok = rows_trimmed and cfg.layout == "grouped"
    for name, a, e in arrays:
        a = to_numpy(a)
        shape_ok = a.shape[1:] == e.shape[1:] and (a.shape[0] == e.shape[0] or
                                                   (trim_ok and name != "src_info"
                                                    and a.shape[0] >= int(expected.row_offsets[-1])))
        if not shape_ok:
            out.append(f"{name} has shape {list(a.shape)}, expected {list(e.shape)}")
        elif a.dtype.itemsize != e.dtype.itemsize:
            out.append(f"{name} has {a.dtype.itemsize}-byte elements ({a.dtype}), "
                       f"expected {e.dtype.itemsize} ({e.dtype})")
    return out


def _column_major(a) -> bool:
    """Is the last-but-one axis of `a` (numpy / torch / cupy) the contiguous one?"""
    if hasattr(a, "stride") and callable(a.stride):      # torch
        return a.shape[-2] <= 1 or a.stride(-2) == 1
    return a.shape[-2] <= 1 or a.strides[-2] == a.itemsize


def compare_dispatch(cfg: EPConfig, actual: DispatchResult, expected: DispatchResult,
                     rows_trimmed: bool = False) -> list[str]:
    """Mismatches between one rank's dispatch output and the reference (empty list = equal). bf16 and fp8 bit-exact;
    shapes and element sizes too (rows_trimmed: expert_x / expert_scales hold only the received rows). Rows without
    a token (src_info -1: padding, unused slab rows, past the end) must say so in src_info; their data is free."""
    problems = _layout_problems(cfg, actual, expected, rows_trimmed)
    if problems:
        return problems
    ro_a = to_numpy(actual.row_offsets).astype(np.int64)
    ro_e = expected.row_offsets.astype(np.int64)
    if not np.array_equal(ro_a, ro_e):
        return [f"row_offsets {ro_a.tolist()} != expected {ro_e.tolist()}"]
    for name in ("expert_ids", "tokens_per_expert"):
        a, e = to_numpy(getattr(actual, name)), getattr(expected, name)
        if not np.array_equal(np.asarray(a).astype(np.int64), e.astype(np.int64)):
            problems.append(f"{name} {np.asarray(a).tolist()} != expected {e.tolist()}")
    info_e = expected.src_info.reshape(-1, 3)
    info_a = to_numpy(actual.src_info).reshape(-1, 3)
    used = np.nonzero(info_e[:, 0] >= 0)[0]
    bad = np.nonzero((info_a != info_e).any(axis=1))[0]
    if len(bad):
        i = bad[0]
        what = "a row without a token is not -1" if info_e[i, 0] < 0 else "differs"
        problems.append(f"src_info {what} in {len(bad)} rows, first flat row {i}: {info_a[i].tolist()} != "
                        f"{info_e[i].tolist()}")
    xa = to_numpy(actual.expert_x).reshape(-1, cfg.hidden)[used].view(np.uint8)
    xe = expected.expert_x.reshape(-1, cfg.hidden)[used].view(np.uint8)
    bad = np.nonzero((xa != xe).any(axis=1))[0]
    if len(bad):
        problems.append(f"expert_x differs in {len(bad)} of {len(used)} rows, first flat row {used[bad[0]]} "
                        f"(src {info_e[used[bad[0]]].tolist()})")
    if cfg.token_format.quantized:
        sa = np.ascontiguousarray(to_numpy(actual.expert_scales)).reshape(-1, cfg.scale_cols)[used]
        se = np.ascontiguousarray(expected.expert_scales).reshape(-1, cfg.scale_cols)[used]
        if not np.array_equal(sa.view(np.uint32), se.view(np.uint32)):
            problems.append("expert_scales differ")
    return problems


def compare_combine(y_actual, y_exact: np.ndarray, magnitude: np.ndarray) -> list[str]:
    """Combine output vs combine_exact (fp32, unrounded), within bf16 rounding of the result and of per-rank partial
    sums."""
    ya = to_numpy(y_actual).astype(np.float64)
    if ya.shape != y_exact.shape:
        return [f"combine shape {ya.shape} != expected {y_exact.shape}"]
    if not np.isfinite(ya).all():
        return ["combine output has NaN/inf"]
    if not np.isfinite(y_exact).all():   # err > tol is False for NaN: such an expectation would pass anything
        return ["the expected combine output has NaN/inf: non-finite inputs are not a defined case"]
    tol = 2.0 ** -8 * np.abs(y_exact) + 2.0 ** -7 * magnitude + 1e-6
    err = np.abs(ya - y_exact)
    bad = np.argwhere(err > tol)
    if len(bad):
        t, h = bad[0]
        return [f"combine differs in {len(bad)} elements, first y[{t},{h}]={ya[t, h]!r} expected {y_exact[t, h]!r}"]
    return []
