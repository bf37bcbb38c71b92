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
import statistics
import sys
import time

import numpy as np


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
    ap.add_argument("--format", choices=("bf16", "fp8"), default="bf16", help="token format on the wire")
    ap.add_argument("--mode", choices=("ht", "ll"), default="ht", help="high-throughput or low-latency protocol")
    ap.add_argument("--routing", default="uniform", help="routing pattern (epcomm.workload.ROUTINGS)")
    ap.add_argument("--seed", type=int, default=None, help="world seed (default: random, printed)")
    ap.add_argument("--repeat", type=int, default=20, help="timed rounds after the checked one (default 20)")
    ap.add_argument("--backend", choices=("auto", "host", "gpu"), default="auto")
    ap.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    return ap.parse_args(argv)


class _HostArrays:
    """numpy in and out; wall-clock timing with a barrier so every rank's time covers the whole exchange."""

    def __init__(self, ctx):
        self.comm = ctx.comm

    def put(self, a):
        return a

    def timer(self):
        self.comm.Barrier()
        start = time.perf_counter()
        return lambda: (time.perf_counter() - start) * 1e6


class _TorchArrays:
    """torch tensors on this rank's GPU; CUDA-event timing on the current stream (no host sync inside the op)."""

    def __init__(self, ctx):
        import torch
        self.torch = torch
        self.dev = torch.device(f"cuda:{ctx.device}")
        torch.cuda.set_device(self.dev)

    def put(self, a):
        from .arrays import to_torch
        return to_torch(a, self.dev)

    def timer(self):
        torch = self.torch
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def done():
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) * 1e3
        return done


def main(argv=None) -> int:
    args = parse(argv)
    import epcomm
    from epcomm import reference
    from epcomm.workload import identity_experts, make_world

    ctx = epcomm.init(backend=args.backend)
    comm, rank, world = ctx.comm, ctx.rank, ctx.world_size
    on_gpu = ctx.backend == "gpu"
    seed = comm.bcast(args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31), root=0)
    experts = args.experts or ctx.topology.num_experts or (256 if on_gpu else 4 * world)
    cfg = epcomm.EPConfig(hidden=args.hidden or (7168 if on_gpu else 1024), topk=args.topk or (8 if on_gpu else 4),
                          num_experts=experts, max_tokens_per_rank=args.tokens or (128 if on_gpu else 64),
                          world_size=world, token_format=args.format, mode=args.mode)
    arrays = _TorchArrays(ctx) if on_gpu else _HostArrays(ctx)
    w = make_world(cfg, seed, args.routing)
    x, ids, weights = (arrays.put(a) for a in (w.xs[rank], w.topk_ids[rank], w.topk_weights[rank]))

    buf = epcomm.EPBuffer(cfg, ctx)
    out = buf.dispatch(x, ids)
    ey_host = identity_experts(cfg, reference.to_numpy(out.expert_x), reference.to_numpy(out.expert_scales))
    expert_y = arrays.put(ey_host)
    y = buf.combine(expert_y, out.handle, weights)

    ref = reference.dispatch(cfg, w.xs, w.topk_ids)
    problems = reference.compare_dispatch(cfg, out, ref[rank])
    ref_ys = [identity_experts(cfg, r.expert_x, r.expert_scales) for r in ref]
    exact, mags = reference.combine_exact(cfg, ref_ys, ref, w.topk_weights)
    problems += reference.compare_combine(y, exact[rank], mags[rank])
    rows = int(np.asarray(reference.to_numpy(out.row_offsets))[-1])
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
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731

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
