"""Check one round of a backend against the spec (epcomm.reference): the recipe the demo, the benchmark, the smoke
test and the test workers share.

    rnd = Round.random(cfg, rank=me, seed=7, routing="skewed", experts="distinct")
    x, ids, weights = rnd.inputs()                        # this rank's inputs of a world every rank rebuilds
    out = buf.dispatch(x, ids)
    problems = rnd.check_dispatch(out)                    # bit-exact, shapes and element sizes too
    y = buf.combine(put(rnd.expert_y(out, poison_tail=True)), out.handle, weights)
    problems += rnd.check_combine(y)                      # within bf16 rounding of the exact fp32 sum

Every rank rebuilds the whole world from one seed, so it states its own expected outputs without a gather. Experts
are "identity" (expert_y = the rows themselves, dequantised) or "distinct" (each expert scales its rows by its own
factor, so a combine that mixes up slots or weights fails; epcomm.workload.distinct_experts).
local_only=True computes only what this rank can observe (dispatch: the slots routed to this rank; combine: this
rank's tokens): the same answers at a fraction of the numpy work, for the benchmark's large shapes.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import reference
from .arrays import to_numpy
from .config import EPConfig
from .results import DispatchResult
from .workload import World, distinct_experts, identity_experts, make_world


def identity(cfg: EPConfig, result: DispatchResult) -> np.ndarray:
    """expert_y of identity experts for a dispatch result (any array kind): the rows, dequantised, bf16."""
    return identity_experts(cfg, to_numpy(result.expert_x), to_numpy(result.expert_scales))


EXPERTS = {"identity": identity, "distinct": distinct_experts}


def received_rows(result: DispatchResult) -> int:
    """Rows dispatch delivered (row_offsets[-1]) of a result of any array kind."""
    return int(np.asarray(to_numpy(result.row_offsets))[-1])


def _trimmed(result: DispatchResult) -> DispatchResult:
    """The result with expert_x / expert_scales cut to the received rows (all the spec's combine reads). Layout
    "grouped" only: the batched layout's slabs stay whole (its received rows are no prefix of the first axis)."""
    if np.ndim(result.expert_x) != 2:
        return result
    n = int(result.row_offsets[-1])
    return dataclasses.replace(result, expert_x=result.expert_x[:n],
                               expert_scales=None if result.expert_scales is None else result.expert_scales[:n])


class Round:
    """What one rank must get from one dispatch + combine round of `world`, and the checks against it."""

    def __init__(self, cfg: EPConfig, world: World, rank: int, experts: str = "identity", local_only: bool = False):
        if experts not in EXPERTS:
            raise ValueError(f"experts must be one of {sorted(EXPERTS)}, got {experts!r}")
        self.cfg, self.world, self.rank, self.local_only = cfg, world, rank, local_only
        self.experts = EXPERTS[experts]

    @classmethod
    def random(cls, cfg: EPConfig, rank: int, seed: int, routing: str = "uniform", num_tokens=None,
               **kw) -> "Round":
        """A round of a fresh random world (epcomm.workload.make_world; the same on every rank for one seed)."""
        return cls(cfg, make_world(cfg, seed, routing, num_tokens), rank, **kw)

    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (x, topk_ids, topk_weights), numpy."""
        w, r = self.world, self.rank
        return w.xs[r], w.topk_ids[r], w.topk_weights[r]

    # ---------------------------------------------------------------- the spec's answers
    @functools.cached_property
    def _all_dispatched(self) -> list[DispatchResult]:
        return reference.dispatch(self.cfg, self.world.xs, self.world.topk_ids)

    @functools.cached_property
    def dispatch(self) -> DispatchResult:
        """This rank's expected dispatch output (local_only: slots bound elsewhere masked to -1, same rows here)."""
        if not self.local_only:
            return self._all_dispatched[self.rank]
        n_local = self.cfg.n_local_experts
        ids = [np.where((i >= 0) & (i // n_local == self.rank), i, -1).astype(np.int32) for i in self.world.topk_ids]
        return reference.dispatch(self.cfg, self.world.xs, ids)[self.rank]

    @functools.cached_property
    def _combine(self) -> tuple[np.ndarray, np.ndarray]:
        cfg, w, me = self.cfg, self.world, self.rank
        if self.local_only:   # other ranks' tokens do not contribute to this rank's y
            ids = [i if s == me else np.full_like(i, -1) for s, i in enumerate(w.topk_ids)]
            results = reference.dispatch(cfg, w.xs, ids)
        else:
            results = self._all_dispatched
        ys = [self.experts(cfg, _trimmed(res)) for res in results]
        exact, mags = reference.combine_exact(cfg, ys, results, w.topk_weights)
        return exact[me], mags[me]

    @property
    def y_exact(self) -> np.ndarray:
        """This rank's combine output in fp32, unrounded."""
        return self._combine[0]

    @property
    def magnitude(self) -> np.ndarray:
        """Sum of |terms| of each output element (the scale of its rounding error)."""
        return self._combine[1]

    def expert_y(self, result: DispatchResult | None = None, poison_tail: bool = False) -> np.ndarray:
        """expert_y for combine, numpy bf16 [max_recv_rows, hidden]: the experts applied to `result` (a backend's
        dispatch output, any kind; default the expected one). poison_tail: rows that hold no token (past the received
        ones, alignment padding, unused slab rows of the batched layout) are NaN, which a combine must never read."""
        res = self.dispatch if result is None else result
        y = self.experts(self.cfg, res)
        if poison_tail:
            y = y.copy()
            y[np.asarray(to_numpy(res.src_info))[..., 0] < 0] = np.float32("nan")
        return y

    # ---------------------------------------------------------------- checks (empty list = right)
    def check_dispatch(self, actual: DispatchResult, rows_trimmed: bool = False) -> list[str]:
        """rows_trimmed: compare only the received rows of expert_x / expert_scales (the benchmark's large shapes).
        Layout "grouped" only: the received rows of the batched layout's slabs are no prefix, so there it is ignored
        (the whole slabs are compared, shapes included)."""
        rows_trimmed = rows_trimmed and self.cfg.layout == "grouped"
        if rows_trimmed:
            n = int(self.dispatch.row_offsets[-1])
            actual = dataclasses.replace(actual, expert_x=actual.expert_x[:n], expert_scales=None
                                         if actual.expert_scales is None else actual.expert_scales[:n])
        return reference.compare_dispatch(self.cfg, actual, self.dispatch, rows_trimmed=rows_trimmed)

    def check_combine(self, y) -> list[str]:
        return reference.compare_combine(y, self.y_exact, self.magnitude)
