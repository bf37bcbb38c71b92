"""EP stages: dispatch + combine through EPBuffer checked against epcomm.reference, then a short benchmark.

Every rank rebuilds the whole world's inputs from one seed (epcomm.workload.make_world), so it can compute the
reference outputs of its own rank without any gather. A wrong output is described by the source ranks whose rows
differ (from the reference src_info), so the report can name who sent bad data.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..arrays import arrays_for, to_numpy
from ..buffer import EPBuffer
from ..checks import Round
from ..config import EPConfig
from ..context import init
from ..errors import EPInputError, EPTimeoutError
from ..stats import median
from ..workload import make_world


def cases(quick: bool) -> list[dict[str, Any]]:
    c = [
        {"name": "uniform/bf16", "routing": "uniform", "token_format": "bf16", "num_tokens": None},
        {"name": "skewed/fp8/ragged", "routing": "skewed", "token_format": "fp8", "num_tokens": "ragged"},
        {"name": "empty_rank/bf16", "routing": "empty_rank", "token_format": "bf16", "num_tokens": None},
    ]
    if not quick:
        c += [
            {"name": "minus1/fp8", "routing": "minus1", "token_format": "fp8", "num_tokens": None},
            {"name": "hot/bf16/shared", "routing": "hot", "token_format": "bf16", "num_tokens": "ragged",
             "fused_shared_expert": True},
            {"name": "uniform/fp8/ll", "routing": "uniform", "token_format": "fp8", "num_tokens": None,
             "mode": "ll"},
        ]
    return c


def case_config(case: dict[str, Any], topo, world: int, quick: bool, timeout_s: float = 30.0) -> EPConfig:
    """The EPConfig of one correctness case (also what dev/device/rig_prebuild.py compiles ahead of a GPU run)."""
    e = num_experts(topo, world, 4)
    return EPConfig(hidden=256, topk=min(4, e), num_experts=e, max_tokens_per_rank=16 if quick else 48,
                    world_size=world, token_format=case["token_format"], mode=case.get("mode", "ht"),
                    fused_shared_expert=case.get("fused_shared_expert", False), timeout_s=timeout_s)


def num_experts(topo, world: int, per_rank: int) -> int:
    e = getattr(topo, "num_experts", None)
    if isinstance(e, int) and e > 0 and e % world == 0:
        return e
    return per_rank * world


def _ctx():
    ctx = init()
    if ctx.backend == "gpu" and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
        # the NVSHMEM heap is sized once, at the first EPBuffer (a small one here): make room for the speed stage
        R = ctx.world_size
        est = 8 * R * 1024 * (2 * 7168 + 160) + (1 << 30)
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(int(est))
    return ctx


def bad_sources(cfg, actual, expected) -> list[int]:
    """Source ranks whose rows (tokens or scales) differ from the reference (rows after row_offsets match)."""
    ro_a = np.asarray(to_numpy(actual.row_offsets)).astype(np.int64)
    if not np.array_equal(ro_a, expected.row_offsets.astype(np.int64)):
        return []
    n = int(expected.row_offsets[-1])
    xa = np.ascontiguousarray(to_numpy(actual.expert_x)[:n]).view(np.uint8).reshape(n, -1)
    xe = np.ascontiguousarray(expected.expert_x[:n]).view(np.uint8).reshape(n, -1)
    bad = (xa != xe).any(axis=1)
    if cfg.token_format.quantized and actual.expert_scales is not None:
        sa = np.ascontiguousarray(to_numpy(actual.expert_scales)[:n]).view(np.uint32)
        bad |= (sa != expected.expert_scales[:n].view(np.uint32)).any(axis=1)
    info_a = np.asarray(to_numpy(actual.src_info))[:n]
    bad |= (info_a != expected.src_info[:n]).any(axis=1)
    return sorted({int(s) for s in expected.src_info[:n][bad, 0]})


def _corrupt(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    if x.size:
        v = x.view(np.uint16)
        v[::3, ::17] ^= np.uint16(0x8000)  # sign flip: differs in bf16 and in fp8
    return x


def run_correctness(env) -> dict[str, Any]:
    """Each case: dispatch + combine on this rank, compared with the reference. Stops at the first exception
    (the peers' next collective would not match)."""
    ctx = _ctx()
    arr = arrays_for(ctx)
    R, me = env.world, env.rank
    quick = env.opts.quick
    out: list[dict[str, Any]] = []
    timeout = max(2.0, min(15.0, env.opts.stage_timeout / 4))
    for k, case in enumerate(cases(quick)):
        rec: dict[str, Any] = {"name": case["name"]}
        out.append(rec)
        try:
            cfg = case_config(case, env.topo, R, quick, timeout)
        except EPInputError as e:
            rec.update(status="skipped", error=str(e))
            continue
        rec["shape"] = {"hidden": cfg.hidden, "topk": cfg.topk, "num_experts": cfg.num_experts,
                        "max_tokens_per_rank": cfg.max_tokens_per_rank, "mode": cfg.mode,
                        "token_format": str(cfg.token_format), "fused_shared_expert": cfg.fused_shared_expert}
        rnd = Round.random(cfg, me, seed=1000 + k, routing=case["routing"], num_tokens=case["num_tokens"])
        exp = rnd.dispatch
        x, ids, weights = rnd.inputs()
        rec["tokens"] = len(x)
        rec["rows_expected"] = int(exp.row_offsets[-1])
        if env.faults.corrupts(me, "ep"):
            x = _corrupt(x)
        try:
            try:
                buf = EPBuffer(cfg, ctx)
            except (NotImplementedError, EPInputError) as e:
                rec.update(status="skipped", error=f"{type(e).__name__}: {e}")
                continue
            try:
                res = buf.dispatch(arr.put(x), arr.put(ids))
                arr.sync()
                problems = rnd.check_dispatch(res)
                rec["dispatch_problems"] = problems
                rec["bad_sources"] = bad_sources(cfg, res, exp) if problems else []
                y = buf.combine(arr.put(rnd.expert_y()), res.handle, arr.put(weights))
                arr.sync()
                cprob = rnd.check_combine(y)
                rec["combine_problems"] = cprob
                if cprob:
                    # the ranks holding the experts of the wrong tokens
                    exact, mag = rnd.y_exact, rnd.magnitude
                    ya = np.asarray(to_numpy(y)).astype(np.float64)
                    tol = 2.0 ** -8 * np.abs(exact) + 2.0 ** -7 * mag + 1e-6
                    bad_t = np.nonzero((np.abs(ya - exact) > tol).any(axis=1))[0] if ya.shape == exact.shape \
                        else np.arange(len(exact))
                    bad_ids = ids[bad_t]
                    holders = sorted({int(cfg.expert_rank(int(e))) for e in bad_ids.ravel() if e >= 0})
                    rec["combine_bad_tokens"] = int(len(bad_t))
                    rec["combine_expert_ranks"] = holders
                rec["status"] = "ok" if not problems and not cprob else "mismatch"
            finally:
                try:
                    buf.close()
                except Exception:
                    pass
        except EPTimeoutError as e:
            rec.update(status="error", error=f"EPTimeoutError: {e}", timeout_rank=e.rank, timeout_node=e.node)
            break
        except Exception as e:
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
            break
    return {"backend": ctx.backend, "cases": out}


def run_speed(env) -> dict[str, Any]:
    """Median time of dispatch + combine on this rank (bf16, uniform routing, identity experts)."""
    ctx = _ctx()
    arr = arrays_for(ctx)
    R, me = env.world, env.rank
    quick = env.opts.quick
    if ctx.backend == "gpu":
        hidden, topk, tokens, per_rank_e = 7168, 8, (512 if quick else 1024), 32
    else:
        hidden, topk, tokens, per_rank_e = 512, 4, (32 if quick else 128), 4
    e = num_experts(env.topo, R, per_rank_e)
    cfg = EPConfig(hidden=hidden, topk=min(topk, e), num_experts=e, max_tokens_per_rank=tokens, world_size=R,
                   timeout_s=max(2.0, min(30.0, env.opts.stage_timeout / 3)))
    world = make_world(cfg, seed=77, routing_kind="uniform")
    x, ids, w = arr.put(world.xs[me]), arr.put(world.topk_ids[me]), arr.put(world.topk_weights[me])
    iters, warm = (5, 2) if quick else (20, 3)
    times = []
    buf = EPBuffer(cfg, ctx)
    try:
        for it in range(warm + iters):
            arr.sync()
            t0 = time.perf_counter()
            res = buf.dispatch(x, ids)
            buf.combine(res.expert_x, res.handle, w)
            arr.sync()
            if it >= warm:
                times.append(time.perf_counter() - t0)
            # No early exit on the stage deadline here: ranks would see it expire on different iterations and
            # leave their peers waiting in a collective dispatch. Every call has its own deadline (cfg.timeout_s),
            # and the stage's guard reports a stage that overruns.
    finally:
        try:
            buf.close()
        except Exception:
            pass
    return {"backend": ctx.backend, "shape": {"hidden": hidden, "topk": cfg.topk, "num_experts": e,
                                               "tokens": tokens},
            "iters": len(times), "median_us": median(times) * 1e6 if times else None,
            "min_us": float(np.min(times)) * 1e6 if times else None}
