"""Bytes an operation must move, counted from the actual routing, and the floor they imply.

Definitions (docs/PERF.md, "The floor"):
* A (token, destination rank) pair exists when at least one of the token's top-k experts lives on that rank.
* dispatch, rank r:  link bytes = pairs of r's tokens to other ranks x token bytes (sent), and pairs of other ranks'
  tokens to r x token bytes (received); local bytes = every pair received by r, its own included, read once
  + every expert row of r written once (token bytes each; fp8 = hidden + 4 * hidden/128 scale bytes).
* combine, rank r:  link bytes = one bf16 row back per (token, remote rank) pair, sent and received;
  local bytes = every expert row of r read once + every pair of r's own tokens read once + y written once
  (2 * hidden bytes each).
* Time of one term on one rank = max(bytes sent, bytes received) / link bandwidth, or local bytes / device copy
  bandwidth. An operation ends when its slowest rank ends, so each term is the max over ranks, and the bandwidth
  term is the larger of the two ("binds" names it).
* Latency term (measured in the same run, epcomm/bench/latency.py): one empty kernel launch timed like the op
  (CUDA events; through a graph replay for graph rows) + one flag round trip to the peer (a flag written into the
  peer's memory and its echo: peer pointers on one node, NVSHMEM signals across nodes). floor = latency term +
  bandwidth term; without a measured latency the floor is the bandwidth term alone (as in files recorded before).
  A round trip's floor is the sum of both floors (two launches, two handshakes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import EPConfig


@dataclass
class Traffic:
    """Routing summary of one world. pairs[s, d]: tokens of rank s with >= 1 expert on rank d;
    rows[d]: expert rows rank d receives (valid (token, slot) entries routed to it); tokens[s]: T_s."""
    pairs: np.ndarray   # int64 [R, R]
    rows: np.ndarray    # int64 [R]
    tokens: np.ndarray  # int64 [R]


def traffic(cfg: EPConfig, topk_ids: Sequence) -> Traffic:
    """Count pairs and rows from every rank's topk_ids (numpy arrays, -1 = no expert)."""
    r_count = cfg.world_size
    if len(topk_ids) != r_count:
        raise ValueError(f"need topk_ids of all {r_count} ranks, got {len(topk_ids)}")
    pairs = np.zeros((r_count, r_count), np.int64)
    rows = np.zeros(r_count, np.int64)
    tokens = np.zeros(r_count, np.int64)
    for s, ids in enumerate(topk_ids):
        ids = np.asarray(ids).reshape(len(ids), -1) if len(ids) else np.zeros((0, cfg.topk), np.int32)
        tokens[s] = ids.shape[0]
        valid = ids >= 0
        dest = np.where(valid, ids // cfg.n_local_experts, r_count)  # r_count = "nowhere"
        if cfg.skip_a2a:
            dest = np.where(dest == s, dest, r_count)
        hit = np.zeros((ids.shape[0], r_count + 1), bool)
        if ids.shape[0]:
            np.put_along_axis(hit, dest.astype(np.int64), True, axis=1)
        pairs[s] += hit[:, :r_count].sum(axis=0)
        rows += np.bincount(dest.ravel(), minlength=r_count + 1)[:r_count]
    return Traffic(pairs, rows, tokens)


def op_bytes(cfg: EPConfig, tr: Traffic, op: str) -> dict:
    """Per-rank byte counts of one operation: {'link_send': [...], 'link_recv': [...], 'local': [...],
    'row_bytes': int}. op: 'dispatch' (in cfg.token_format) or 'combine' (bf16 rows)."""
    remote = tr.pairs.copy()
    np.fill_diagonal(remote, 0)
    if op == "dispatch":
        rb = cfg.token_bytes()
        send = remote.sum(axis=1) * rb
        recv = remote.sum(axis=0) * rb
        local = tr.pairs.sum(axis=0) * rb + tr.rows * rb
    elif op == "combine":
        rb = 2 * cfg.hidden
        send = remote.sum(axis=0) * rb   # rows go back to the token's rank
        recv = remote.sum(axis=1) * rb
        local = tr.rows * rb + tr.pairs.sum(axis=1) * rb + tr.tokens * rb
    else:
        raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")
    return {"link_send": [int(v) for v in send], "link_recv": [int(v) for v in recv],
            "local": [int(v) for v in local], "row_bytes": int(rb)}


def _per_rank(value, n: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * n
    out = [None if v is None else float(v) for v in value]
    if len(out) != n or any(v is None or v <= 0 for v in out):
        return None
    return out


def floor_of(nbytes: dict, link_gbps=None, local_gbps=None) -> dict:
    """Floor of one operation from op_bytes() and bandwidths in GB/s (1e9 B/s; a number or one per rank).

    Returns {'link_us', 'local_us', 'floor_us', 'binds', 'link_bytes_max', 'local_bytes_max'}; a term whose
    bandwidth is unknown is None, and then floor_us and binds are None too."""
    n = len(nbytes["local"])
    link_bw, local_bw = _per_rank(link_gbps, n), _per_rank(local_gbps, n)
    link_max = max(max(s, r) for s, r in zip(nbytes["link_send"], nbytes["link_recv"])) if n else 0
    local_max = max(nbytes["local"]) if n else 0
    link_us = local_us = None
    if link_bw is not None:
        link_us = max(max(s, r) / (bw * 1e3) for s, r, bw in
                      zip(nbytes["link_send"], nbytes["link_recv"], link_bw))
    if local_bw is not None:
        local_us = max(b / (bw * 1e3) for b, bw in zip(nbytes["local"], local_bw))
    floor_us = binds = None
    if link_us is not None and local_us is not None:
        floor_us = max(link_us, local_us)
        binds = "link" if link_us >= local_us else "local"
    return {"link_us": link_us, "local_us": local_us, "bandwidth_us": floor_us, "latency_us": None, "ops": 1,
            "floor_us": floor_us, "binds": binds, "link_bytes_max": int(link_max), "local_bytes_max": int(local_max)}


def roundtrip_floor(d: dict, c: dict) -> dict:
    """Dispatch then combine: terms and floors add (the two operations run one after the other)."""
    def add(a, b):
        return None if a is None or b is None else a + b
    bw_us = add(_bandwidth_us(d), _bandwidth_us(c))
    binds = None if bw_us is None else f"dispatch:{d['binds']} combine:{c['binds']}"
    return {"link_us": add(d["link_us"], c["link_us"]), "local_us": add(d["local_us"], c["local_us"]),
            "bandwidth_us": bw_us, "latency_us": None, "ops": d.get("ops", 1) + c.get("ops", 1),
            "floor_us": bw_us, "binds": binds,
            "link_bytes_max": d["link_bytes_max"] + c["link_bytes_max"],
            "local_bytes_max": d["local_bytes_max"] + c["local_bytes_max"]}


def _bandwidth_us(fl: dict):
    """The bandwidth term of a floor (files recorded before the latency term have only floor_us)."""
    return fl.get("bandwidth_us", fl.get("floor_us"))


def with_latency(fl: dict | None, per_op_us: float | None) -> dict | None:
    """The floor `fl` (from floor_of / roundtrip_floor) with the latency term of its operations set: latency_us =
    per_op_us x ops (a round trip is two ops), floor_us = bandwidth term + latency_us. per_op_us None: the floor is
    the bandwidth term alone. Idempotent (always recomputed from the bandwidth term); returns the same dict."""
    if fl is None:
        return None
    bw = _bandwidth_us(fl)
    fl["bandwidth_us"] = bw
    fl.setdefault("ops", 1)
    if per_op_us is None or bw is None:
        fl["latency_us"], fl["floor_us"] = None, bw
    else:
        fl["latency_us"] = per_op_us * fl["ops"]
        fl["floor_us"] = bw + fl["latency_us"]
    return fl
