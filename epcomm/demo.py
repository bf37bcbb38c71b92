"""One dispatch + combine round on every rank, checked against epcomm.reference.

    python -m launch run -t configs/cpu-2x4.yaml -- python -m epcomm.demo      (what `make demo` runs)

Every rank builds the same random world from --seed, dispatches its tokens, applies identity experts,
combines, and compares both outputs with the reference. Rank 0 prints a summary; exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m epcomm.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024, help="channels per token (multiple of 128; default 1024)")
    ap.add_argument("--topk", type=int, default=4, help="experts per token (default 4)")
    ap.add_argument("--experts", type=int, default=None,
                    help="routed experts in the world (default: the topology's ep.num_experts, else 4 per rank)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank (default 64)")
    ap.add_argument("--format", choices=("bf16", "fp8"), default="bf16", help="token format on the wire")
    ap.add_argument("--mode", choices=("ht", "ll"), default="ht", help="high-throughput or low-latency kernels")
    ap.add_argument("--routing", default="uniform", help="routing pattern (epcomm.workload.ROUTINGS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=("auto", "host", "gpu"), default="auto")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import epcomm
    from epcomm import reference
    from epcomm.workload import identity_experts, make_world

    try:
        EPBuffer = epcomm.EPBuffer
    except (ImportError, AttributeError) as e:
        if os.environ.get("EPCOMM_RANK", "0") == "0":
            print(f"epcomm.demo: EPBuffer is not available yet ({e})", file=sys.stderr)
        return 2
    ctx = epcomm.init(backend=args.backend)
    comm, rank, world = ctx.comm, ctx.rank, ctx.world_size
    experts = args.experts or ctx.topology.num_experts or 4 * world
    cfg = epcomm.EPConfig(hidden=args.hidden, topk=args.topk, num_experts=experts,
                          max_tokens_per_rank=args.tokens, world_size=world, token_format=args.format,
                          mode=args.mode)
    w = make_world(cfg, args.seed, args.routing)
    x, ids, weights = w.xs[rank], w.topk_ids[rank], w.topk_weights[rank]

    buf = EPBuffer(cfg, ctx)
    comm.Barrier()
    t0 = time.perf_counter()
    out = buf.dispatch(x, ids)
    t1 = time.perf_counter()
    expert_y = identity_experts(cfg, reference.to_numpy(out.expert_x), reference.to_numpy(out.expert_scales))
    t2 = time.perf_counter()
    y = buf.combine(expert_y, out.handle, weights)
    t3 = time.perf_counter()

    ref = reference.dispatch(cfg, w.xs, w.topk_ids)
    problems = reference.compare_dispatch(cfg, out, ref[rank])
    ref_ys = [identity_experts(cfg, r.expert_x, r.expert_scales) for r in ref]
    exact, mags = reference.combine_exact(cfg, ref_ys, ref, w.topk_weights)
    problems += reference.compare_combine(y, exact[rank], mags[rank])
    rows = int(np.asarray(reference.to_numpy(out.row_offsets))[-1])

    report = comm.gather((rank, ctx.node, rows, t1 - t0, t3 - t2, problems), root=0)
    ok = comm.allreduce(0 if problems else 1, op=_min()) == 1
    if rank == 0:
        print(f"epcomm demo: {world} ranks on {ctx.num_nodes} node(s) ({ctx.topology.name}), backend {ctx.backend}, "
              f"{cfg.num_experts} experts, top-{cfg.topk}, hidden {cfg.hidden}, {args.tokens} tokens/rank, "
              f"{cfg.token_format}, mode {cfg.mode}")
        for r, node, n, td, tc, probs in report:
            status = "ok" if not probs else "MISMATCH: " + "; ".join(probs)
            print(f"  rank {r:>3} node {node}: received {n:>5} rows, dispatch {td * 1e3:7.2f} ms, "
                  f"combine {tc * 1e3:7.2f} ms  {status}")
        print("demo: dispatch and combine match the reference" if ok else "demo: FAILED")
    if hasattr(buf, "close"):
        buf.close()
    return 0 if ok else 1


def _min():
    from mpi4py import MPI
    return MPI.MIN


if __name__ == "__main__":
    sys.exit(main())
