"""The benchmark's inputs and its check against the spec: the same input sets on every rank (rotated through so
caches do not serve repeated data), each rank's expected outputs (epcomm.checks.Round, this rank's part only), and
the expert_y a combine gets. Every shape is checked on its first iteration before it is timed."""
from __future__ import annotations

import numpy as np

from ..checks import Round, identity, received_rows
from ..formats import random_tokens
from ..workload import make_world
from .gpu import dequant_fp8_into


class Verifier:
    def __init__(self, args, rank: int, comm, arrays, torch=None, device=None):
        self.args, self.rank, self.comm, self.arrays = args, rank, comm, arrays
        self.torch, self.device = torch, device
        self.gpu = torch is not None
        self._worlds: dict = {}
        self._expected: dict = {}

    def world_sets(self, cfg, t: int) -> list:
        """The n_sets worlds of t tokens per rank (same on every rank; shared by every case and format)."""
        key = t
        if key not in self._worlds:
            self._worlds[key] = [make_world(cfg, self.args.seed * 100003 + 7919 * t + k, self.args.routing,
                                            num_tokens=t) for k in range(self.args.sets)]
        return self._worlds[key]

    def round(self, cfg, t: int, k: int) -> Round:
        """Input set k of t tokens against the spec, for this rank only (computed once per format, layout and
        shape)."""
        # the spec does not depend on the mode; its output shapes do on the layout and the receive capacity
        key = (cfg.token_format, cfg.layout, tuple(cfg.rows_shape), t, k)
        if key not in self._expected:
            self._expected[key] = Round(cfg, self.world_sets(cfg, t)[k], self.rank, local_only=True)
        return self._expected[key]

    def device_sets(self, cfg, t: int) -> list[dict]:
        out = []
        for w in self.world_sets(cfg, t):
            put = self.arrays.put
            out.append({"x": put(w.xs[self.rank]), "ids": put(w.topk_ids[self.rank]),
                        "w": put(w.topk_weights[self.rank])})
        return out

    def agree(self, problems: list[str]) -> list[str]:
        """Every rank's problems, prefixed with the rank (same list on every rank)."""
        allp = self.comm.allgather(list(problems))
        return [f"rank {r}: {p}" for r, ps in enumerate(allp) for p in ps]

    def precompute(self, cfg, t: int, combine: bool, extra_set: bool = False) -> None:
        """Compute the reference before any device call of this shape, then line the ranks up: no rank sits in a
        device wait (with its deadline) while a peer is still busy in numpy."""
        self.round(cfg, t, 0).dispatch
        if combine:
            self.round(cfg, t, 0).y_exact
        if extra_set:
            self.round(cfg, t, 1 % self.args.sets).dispatch
        self.comm.Barrier()

    def check_dispatch(self, cfg, res, t: int, k: int) -> list[str]:
        return self.round(cfg, t, k).check_dispatch(res, rows_trimmed=True)

    def check_combine(self, cfg, y, t: int, k: int) -> list[str]:
        return self.round(cfg, t, k).check_combine(y)

    def identity_y(self, cfg, res, out=None):
        """expert_y for identity experts: the bf16 rows themselves, or the fp8 rows dequantised (into `out`)."""
        if not cfg.token_format.quantized:
            return res.expert_x
        if not self.gpu:
            return identity(cfg, res)
        if cfg.layout == "grouped":
            dequant_fp8_into(self.torch, out, res.expert_x, res.expert_scales, received_rows(res))
        else:   # slabs: the received rows are not a prefix, so every row (the unused ones hold no token)
            h = cfg.hidden
            dequant_fp8_into(self.torch, out.view(-1, h), res.expert_x.reshape(-1, h),
                             res.expert_scales.reshape(-1, cfg.scale_cols), out.numel() // h)
        return out

    def new_expert_y(self, cfg):
        """A preallocated bf16 expert_y (random values) for fp8 shapes: combine's input after dequantisation, in the
        config's layout ([*cfg.rows_shape, hidden])."""
        if not cfg.token_format.quantized:
            return None
        if self.gpu:
            ey = self.torch.empty((*cfg.rows_shape, cfg.hidden), dtype=self.torch.bfloat16, device=self.device)
            ey.normal_()
            return ey
        rows = int(np.prod(cfg.rows_shape))
        return random_tokens(np.random.default_rng(self.rank), rows, cfg.hidden).reshape(*cfg.rows_shape, cfg.hidden)
