"""Per-rank worker for tests/mpi: run cases on the host backend, check every rank against epcomm.reference.

    python -m launch run -t cpu-4rank -- python tests/mpi/worker.py cases --seed 123 --case fmt=fp8,mode=ll ...

Case spec: comma-separated key=value: fmt (bf16|fp8), mode (ht|ll), routing (epcomm.workload.ROUTINGS),
tokens (max|ragged|N), fused (0|1), skip (0|1), aws (allreduce_world_size), H, M, K, E (experts per rank),
rounds (back-to-back rounds on one buffer, fresh inputs each, no barrier), async (0|1).
Exit 0 when every rank matched; prints "FAIL rank R ..." lines otherwise. Other commands: timeout, abort.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.workload import identity_experts, make_world  # noqa: E402

DEFAULTS = dict(fmt="bf16", mode="ht", routing="uniform", tokens="max", fused=0, skip=0, aws=1,
                H=256, M=16, K=4, E=4, rounds=1, timeout=30.0)


def parse_case(spec: str) -> dict:
    c = dict(DEFAULTS)
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        if k not in c:
            raise SystemExit(f"unknown case key {k!r}")
        c[k] = type(DEFAULTS[k])(v) if k != "tokens" else v
    return c


def make_cfg(c: dict, world: int) -> epcomm.EPConfig:
    return epcomm.EPConfig(hidden=c["H"], topk=c["K"], num_experts=c["E"] * world, max_tokens_per_rank=c["M"],
                           world_size=world, token_format=c["fmt"], mode=c["mode"], fused_shared_expert=bool(c["fused"]),
                           skip_a2a=bool(c["skip"]), allreduce_world_size=c["aws"], timeout_s=c["timeout"])


def tokens_arg(c):
    t = c["tokens"]
    return None if t == "max" else ("ragged" if t == "ragged" else int(t))


def check_round(cfg, ctx, buf, world, use_async: bool) -> list[str]:
    me = ctx.rank
    if use_async:
        out = buf.dispatch_wait(buf.dispatch_async(world.xs[me], world.topk_ids[me]))
    else:
        out = buf.dispatch(world.xs[me], world.topk_ids[me])
    exp = ref.dispatch(cfg, world.xs, world.topk_ids)
    problems = ["dispatch: " + p for p in ref.compare_dispatch(cfg, out, exp[me])]
    eys = [identity_experts(cfg, e.expert_x, e.expert_scales) for e in exp]
    my_ey = identity_experts(cfg, out.expert_x, out.expert_scales)
    if use_async:
        y = buf.combine_wait(buf.combine_async(my_ey, out.handle, world.topk_weights[me]))
    else:
        y = buf.combine(my_ey, out.handle, world.topk_weights[me])
    ys, mags = ref.combine_exact(cfg, eys, exp, world.topk_weights)
    problems += ["combine: " + p for p in ref.compare_combine(y, ys[me], mags[me])]
    if y.dtype != np.dtype(epcomm.formats.BF16) or y.shape != (len(world.xs[me]), cfg.hidden):
        problems.append(f"combine output {y.dtype}{list(y.shape)}")
    return problems


def cmd_cases(args, ctx) -> int:
    fails = 0
    t0 = time.perf_counter()
    for i, spec in enumerate(args.case):
        c = parse_case(spec)
        cfg = make_cfg(c, ctx.world_size)
        with epcomm.EPBuffer(cfg, ctx) as buf:
            for rnd in range(c["rounds"]):
                seed = args.seed + 1000 * i + rnd
                world = make_world(cfg, seed, c["routing"], tokens_arg(c))
                problems = check_round(cfg, ctx, buf, world, bool(c.get("async", 0)) or (rnd % 3 == 2))
                for p in problems:
                    print(f"FAIL rank {ctx.rank} case [{spec}] seed {seed} round {rnd}: {p}", flush=True)
                fails += bool(problems)
    total = ctx.comm.allreduce(fails)
    if ctx.rank == 0:
        print(f"worker: {len(args.case)} case(s) on {ctx.world_size} ranks, seed {args.seed}: "
              f"{'ok' if total == 0 else f'{total} FAILED'} in {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if total else 0


def cmd_fault(args, ctx) -> int:
    """timeout: run with EPCOMM_FAULT=skip_dispatch:...; abort: rank args.bad_rank passes bad input in round 1."""
    c = parse_case(args.case[0] if args.case else "")
    cfg = make_cfg(c, ctx.world_size)
    t0 = time.monotonic()
    try:
        with epcomm.EPBuffer(cfg, ctx) as buf:
            for rnd in range(3):
                world = make_world(cfg, args.seed + rnd, c["routing"], tokens_arg(c))
                x = world.xs[ctx.rank]
                if args.cmd == "abort" and rnd == 1 and ctx.rank == args.bad_rank:
                    x = np.zeros((len(x), cfg.hidden + 128), x.dtype)
                out = buf.dispatch(x, world.topk_ids[ctx.rank])
                ey = identity_experts(cfg, out.expert_x, out.expert_scales)
                buf.combine(ey, out.handle, world.topk_weights[ctx.rank])
    except epcomm.EPError as e:
        dt = time.monotonic() - t0
        print(f"rank {ctx.rank}: {type(e).__name__} after {dt:.2f}s: {e}", file=sys.stderr, flush=True)
        if isinstance(e, epcomm.EPTimeoutError):
            print(f"rank {ctx.rank}: peer={e.rank} node={e.node} what={e.what!r}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(3)
    print(f"rank {ctx.rank}: no error", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("cases", "timeout", "abort"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--bad-rank", type=int, default=1)
    args = ap.parse_args()
    ctx = epcomm.init()
    if args.cmd == "cases":
        return cmd_cases(args, ctx)
    return cmd_fault(args, ctx)


if __name__ == "__main__":
    sys.exit(main())
