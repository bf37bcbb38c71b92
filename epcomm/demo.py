"""One dispatch + combine layer on every rank, checked against epcomm.reference, then timed.

    python -m launch run -t configs/cpu-2x4.yaml -- python -m epcomm.demo      (what `make demo` runs without GPUs)
    python -m launch run -t configs/local-2gpu.yaml -- python -m epcomm.demo   (with 2 GPUs)
    python -m launch run -t configs/one-gpu-2.yaml -- python -m epcomm.demo    (with 1 GPU: 2 ranks share it)

Every rank builds the same random world from --seed, dispatches its tokens, applies identity experts, combines, and
compares both outputs with the reference (dispatch bit-exact, combine within bf16 rounding). Then it repeats the
round --repeat times and reports the median time per operation (CUDA events on GPUs, wall clock on the host backend).
Rank 0 prints a table (and --json writes it); the exit status is 1 when any rank's check fails.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .arrays import arrays_for
from .buffer import EPBuffer
from .checks import Round, received_rows
from .config import EPConfig
from .context import init
from .formats import FORMAT_NAMES
from .stats import median


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m epcomm.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=None,
                    help="channels per token (multiple of 128; default 7168 on GPUs, 1024 on the host backend)")
    ap.add_argument("--topk", type=int, default=None, help="experts per token (default 8 on GPUs, 4 on the host)")
    ap.add_argument("--experts", type=int, default=None,
                    help="routed experts in the world (default: the topology's ep.num_experts, else 256 on GPUs, "
                         "4 per rank on the host)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 128 on GPUs, 64 on the host)")
    ap.add_argument("--format", choices=FORMAT_NAMES, default="bf16", help="token format on the wire")
    ap.add_argument("--mode", choices=("ht", "ll"), default="ht", help="high-throughput or low-latency protocol")
    ap.add_argument("--routing", default="uniform", help="routing pattern (epcomm.workload.ROUTINGS)")
    ap.add_argument("--seed", type=int, default=None, help="world seed (default: random, printed)")
    ap.add_argument("--repeat", type=int, default=20, help="timed rounds after the checked one (default 20)")
    ap.add_argument("--backend", choices=("auto", "host", "gpu"), default="auto")
    ap.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    ctx = init(backend=args.backend)
    comm, rank, world = ctx.comm, ctx.rank, ctx.world_size
    on_gpu = ctx.backend == "gpu"
    seed = comm.bcast(args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31), root=0)
    experts = args.experts or ctx.topology.num_experts or (256 if on_gpu else 4 * world)
    cfg = EPConfig(hidden=args.hidden or (7168 if on_gpu else 1024), topk=args.topk or (8 if on_gpu else 4),
                          num_experts=experts, max_tokens_per_rank=args.tokens or (128 if on_gpu else 64),
                          world_size=world, token_format=args.format, mode=args.mode)
    arrays = arrays_for(ctx)
    rnd = Round.random(cfg, rank, seed, args.routing)        # identity experts
    x, ids, weights = (arrays.put(a) for a in rnd.inputs())

    buf = EPBuffer(cfg, ctx)
    out = buf.dispatch(x, ids)
    expert_y = arrays.put(rnd.expert_y(out))
    y = buf.combine(expert_y, out.handle, weights)

    problems = rnd.check_dispatch(out) + rnd.check_combine(y)
    rows = received_rows(out)
    # every rank must take the same branch: the timed rounds are collective (dispatch, barriers)
    ok = comm.allreduce(0 if problems else 1, op=_min()) == 1

    t_dispatch, t_combine = [], []
    for _ in range(args.repeat if ok else 0):
        done = arrays.timer()
        out = buf.dispatch(x, ids)
        t_dispatch.append(done())
        done = arrays.timer()
        buf.combine(expert_y, out.handle, weights)
        t_combine.append(done())
    buf.synchronize()
    med = lambda v: median(v) if v else float("nan")  # noqa: E731

    rows_all = comm.gather(dict(rank=rank, node=ctx.node, rows=rows, dispatch_us=med(t_dispatch),
                                combine_us=med(t_combine), problems=problems), root=0)
    if rank == 0:
        summary = dict(backend=ctx.backend, topology=ctx.topology.name, ranks=world, nodes=ctx.num_nodes,
                       tokens_per_rank=cfg.max_tokens_per_rank, hidden=cfg.hidden, experts=cfg.num_experts,
                       topk=cfg.topk, format=cfg.token_format, mode=cfg.mode, seed=seed, repeat=args.repeat,
                       check="ok" if ok else "FAILED", per_rank=rows_all,
                       shared_gpus=ctx.topology.sharing_lines() if on_gpu else [])
        print(f"epcomm demo: backend {ctx.backend}, {world} ranks on {ctx.num_nodes} node(s) ({ctx.topology.name}), "
              f"{cfg.num_experts} experts top-{cfg.topk}, hidden {cfg.hidden}, {cfg.max_tokens_per_rank} tokens/rank, "
              f"{cfg.token_format}, mode {cfg.mode}, seed {seed}")
        print(f"{'rank':>4} {'node':>4} {'rows in':>8} {'dispatch us':>12} {'combine us':>11}  check")
        for r in rows_all:
            status = "ok" if not r["problems"] else "MISMATCH: " + "; ".join(r["problems"])
            print(f"{r['rank']:>4} {r['node']:>4} {r['rows']:>8} {r['dispatch_us']:>12.1f} {r['combine_us']:>11.1f}  "
                  f"{status}")
        print(f"(median of {args.repeat} rounds; {'CUDA events' if on_gpu else 'wall clock incl. barrier'})")
        for line in ctx.topology.sharing_lines() if on_gpu else []:
            print(f"note: {line}: the ranks share one GPU (share_gpus), so these times are not link figures")
        print("demo: dispatch and combine match the reference" if ok else "demo: FAILED")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    buf.close()
    return 0 if ok else 1


def _min():
    from mpi4py import MPI
    return MPI.MIN


if __name__ == "__main__":
    sys.exit(main())
