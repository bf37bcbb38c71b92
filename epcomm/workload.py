"""Inputs for tests, benchmarks and smoke runs: the same world on every rank from one seed.

Each rank can rebuild every other rank's inputs from the seed, so checks against epcomm.reference need no gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import to_numpy
from .config import EPConfig
from .formats import BF16, random_tokens

ROUTINGS = ("uniform", "hot", "empty_rank", "minus1", "all_minus1", "local", "skewed")


@dataclass
class World:
    xs: list[np.ndarray]            # bf16 [T_r, H]
    topk_ids: list[np.ndarray]      # int32 [T_r, K]
    topk_weights: list[np.ndarray]  # fp32 [T_r, K]


def _distinct_experts(rng: np.random.Generator, t: int, k: int, choices: np.ndarray) -> np.ndarray:
    """t rows of k distinct experts drawn from `choices` (padded with -1 when there are fewer than k)."""
    out = np.full((t, k), -1, dtype=np.int32)
    take = min(k, len(choices))
    if take == 0 or t == 0:
        return out
    keys = rng.random((t, len(choices)))
    picks = np.argsort(keys, axis=1)[:, :take]
    out[:, :take] = choices[picks]
    return out


def routing(cfg: EPConfig, rng: np.random.Generator, rank: int, t: int, kind: str) -> np.ndarray:
    experts = np.arange(cfg.num_experts, dtype=np.int32)
    k = cfg.topk
    if kind == "uniform":
        return _distinct_experts(rng, t, k, experts)
    if kind == "hot":  # every token picks expert 0, the rest at random
        ids = _distinct_experts(rng, t, k, experts[1:])
        if t:
            ids[:, 0] = 0
        return ids
    if kind == "empty_rank":  # the last rank receives nothing
        keep = experts[cfg.expert_rank(experts) != cfg.world_size - 1] if cfg.world_size > 1 else experts
        return _distinct_experts(rng, t, k, keep)
    if kind == "minus1":  # about a third of the slots are empty
        ids = _distinct_experts(rng, t, k, experts)
        ids[rng.random(ids.shape) < 0.35] = -1
        return ids
    if kind == "all_minus1":
        return np.full((t, k), -1, dtype=np.int32)
    if kind == "local":  # only experts on the sender's own rank
        mine = experts[cfg.expert_rank(experts) == rank]
        return _distinct_experts(rng, t, k, mine)
    if kind == "skewed":  # Zipf-like popularity: a few experts get most tokens
        p = 1.0 / np.arange(1, cfg.num_experts + 1) ** 1.2
        perm = rng.permutation(cfg.num_experts)
        ids = np.stack([rng.choice(cfg.num_experts, size=k, replace=False, p=p / p.sum()) for _ in range(t)]) \
            if t else np.zeros((0, k), np.int64)
        return perm[ids].astype(np.int32).reshape(t, k)
    raise ValueError(f"unknown routing {kind!r}; choose from {ROUTINGS}")


def make_world(cfg: EPConfig, seed: int, routing_kind: str = "uniform", num_tokens=None) -> World:
    """Inputs of every rank. num_tokens: None (= max_tokens_per_rank everywhere), an int, a list per rank, or
    "ragged" (random counts in 0..max, rank 0 always empty when world_size > 1)."""
    rng = np.random.default_rng(seed)
    m = cfg.max_tokens_per_rank
    if num_tokens is None:
        counts = [m] * cfg.world_size
    elif num_tokens == "ragged":
        counts = [int(c) for c in rng.integers(0, m + 1, size=cfg.world_size)]
        if cfg.world_size > 1:
            counts[0] = 0
    elif isinstance(num_tokens, int):
        counts = [num_tokens] * cfg.world_size
    else:
        counts = list(num_tokens)
    xs, ids, ws = [], [], []
    for r, t in enumerate(counts):
        xs.append(random_tokens(rng, t, cfg.hidden))
        ids.append(routing(cfg, rng, r, t, routing_kind))
        ws.append(rng.random((t, cfg.topk), dtype=np.float32))
    return World(xs, ids, ws)


def identity_experts(cfg: EPConfig, expert_x, expert_scales=None) -> np.ndarray:
    """expert_y for identity experts, bf16: what a grouped matmul with identity weights would return."""
    return cfg.token_format.dequantize(np.asarray(expert_x), expert_scales).astype(BF16)


def expert_factor(expert_id: int) -> float:
    """Scale of `distinct_experts`' expert e: 1 for the shared expert (-1), else one of 61 values in [1, 2)."""
    return 1.0 if expert_id < 0 else 1.0 + ((expert_id * 37) % 61) / 64.0


def distinct_experts(cfg: EPConfig, result) -> np.ndarray:
    """expert_y for experts that differ: the rows of expert e are its tokens times expert_factor(e), bf16.
    With identity experts every row of a token is the same, so a combine that applies a token's weights to the wrong
    slots, or sends a row back to the wrong slot, gives the right answer; with these it does not. `result` is a
    DispatchResult (the reference's, or a backend's on the host)."""
    y = identity_experts(cfg, to_numpy(result.expert_x), to_numpy(result.expert_scales)
                         if result.expert_scales is not None else None).astype(np.float32)
    ro, ids = to_numpy(result.row_offsets).astype(np.int64), to_numpy(result.expert_ids).astype(np.int64)
    flat = y.reshape(-1, y.shape[-1])     # any layout: row_offsets are flat rows (epcomm.layouts)
    for g, e in enumerate(ids):
        flat[ro[g]:ro[g + 1]] *= np.float32(expert_factor(int(e)))
    return y.astype(BF16)
