"""Quick timings of the gpu backend (not the project benchmark): median of CUDA-event times per op, per rank.

    mpirun -n 2 python tests/gpu/bench_quick.py --topology configs/local-2gpu.yaml
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.workload import make_world  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=None)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    import torch
    ctx = epcomm.init(topology=args.topology, backend="gpu")
    torch.cuda.set_device(ctx.device)
    dev = torch.device(f"cuda:{ctx.device}")
    from epcomm.backends.gpu import GpuBackend
    from epcomm.backends.gpu.specs import bench_configs
    from tests.gpu.worker import tb16
    rows = []
    for cfg in bench_configs(ctx.world_size):
        T = cfg.max_tokens_per_rank
        t0 = time.time()
        be = GpuBackend(cfg, ctx)
        setup = time.time() - t0
        if args.check and cfg.mode == "ll":
            world = make_world(cfg, seed=77, routing_kind="uniform")
            x = tb16(world.xs[ctx.rank], dev)
            ids = torch.from_numpy(world.topk_ids[ctx.rank]).to(dev)
            res = be.dispatch(x, ids)
            be.synchronize()
            refs = ref.dispatch(cfg, world.xs, world.topk_ids)
            p = ref.compare_dispatch(cfg, res, refs[ctx.rank])
            print(f"[rank {ctx.rank}] bench-config check {cfg.mode}-{cfg.token_format}: {'PASS' if not p else p}",
                  flush=True)
        g = torch.Generator(device=dev)
        g.manual_seed(ctx.rank + 1)
        x = (torch.randn((T, cfg.hidden), device=dev, generator=g)).to(torch.bfloat16)
        ids = torch.argsort(torch.rand((T, cfg.num_experts), device=dev, generator=g), dim=1)[:, :cfg.topk] \
            .to(torch.int32).contiguous()
        w = torch.rand((T, cfg.topk), device=dev, generator=g)
        ey = torch.randn((cfg.max_recv_rows, cfg.hidden), device=dev, generator=g).to(torch.bfloat16)
        times = {"dispatch": [], "combine": [], "dispatch_async": [], "dispatch_wait": [], "combine_async": [],
                 "combine_wait": []}
        for it in range(args.iters + 5):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(7)]
            ctx.comm.Barrier()
            ev[0].record()
            res = be.dispatch(x, ids)
            ev[1].record()
            y = be.combine(ey, res.handle, w)
            ev[2].record()
            pend = be.dispatch_async(x, ids)
            ev[3].record()
            res = be.dispatch_wait(pend)
            ev[4].record()
            cp = be.combine_async(ey, res.handle, w)
            ev[5].record()
            y = be.combine_wait(cp)
            ev[6].record()
            torch.cuda.synchronize()
            if it >= 5:
                times["dispatch"].append(ev[0].elapsed_time(ev[1]) * 1e3)
                times["combine"].append(ev[1].elapsed_time(ev[2]) * 1e3)
                times["dispatch_async"].append(ev[2].elapsed_time(ev[3]) * 1e3)
                times["dispatch_wait"].append(ev[3].elapsed_time(ev[4]) * 1e3)
                times["combine_async"].append(ev[4].elapsed_time(ev[5]) * 1e3)
                times["combine_wait"].append(ev[5].elapsed_time(ev[6]) * 1e3)
        be.synchronize()
        # CUDA graphs: one captured dispatch and one captured combine, replayed (no host launch gaps)
        gd, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        cs = torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(cs):
            with torch.cuda.graph(gd, stream=cs):
                gres = be.dispatch(x, ids)
            with torch.cuda.graph(gc, stream=cs):
                be.combine(ey, gres.handle, w)
        torch.cuda.synchronize()
        times["graph_dispatch"], times["graph_combine"] = [], []
        for it in range(args.iters + 5):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ctx.comm.Barrier()
            ev[0].record()
            gd.replay()
            ev[1].record()
            gc.replay()
            ev[2].record()
            torch.cuda.synchronize()
            if it >= 5:
                times["graph_dispatch"].append(ev[0].elapsed_time(ev[1]) * 1e3)
                times["graph_combine"].append(ev[1].elapsed_time(ev[2]) * 1e3)
        be.synchronize()
        # steady state: NP dispatch+combine pairs captured in one graph and replayed (no host gap or barrier between
        # rounds, so no host skew between the ranks): time per pair; then the phase split of the last round from the
        # kernels' %globaltimer stamps (state words 32..49, see kernels/ep.cu stamp())
        NP = 16
        gs = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.stream(cs):
            with torch.cuda.graph(gs, stream=cs):
                for _ in range(NP):
                    r2 = be.dispatch(x, ids)
                    be.combine(ey, r2.handle, w)
        torch.cuda.synchronize()
        times["steady_pair"] = []
        for it in range(12):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ctx.comm.Barrier()
            ev[0].record()
            gs.replay()
            ev[1].record()
            torch.cuda.synchronize()
            if it >= 2:
                times["steady_pair"].append(ev[0].elapsed_time(ev[1]) * 1e3 / NP)
        be.synchronize()
        stamps = be.state[32:50].cpu().numpy().view(np.uint64).astype(np.int64)
        ph = np.diff(stamps) / 1e3
        med = {k: float(np.median(v)) for k, v in times.items()}
        tok_bytes = cfg.token_bytes()
        # bytes this rank sends: ll = every (token, slot); ht = once per destination rank (approx. by ids)
        ids_np = ids.cpu().numpy()
        if cfg.mode == "ll":
            nsend = int((ids_np >= 0).sum())
        else:
            nsend = int(sum(len(set((r // cfg.n_local_experts) for r in row if r >= 0)) for row in ids_np))
        gbs = nsend * tok_bytes / (med["dispatch"] * 1e-6) / 1e9
        cbs = nsend * 2 * cfg.hidden / (med["combine"] * 1e-6) / 1e9
        rows.append(f"[rank {ctx.rank}] {cfg.mode} {cfg.token_format} T={T} H={cfg.hidden} K={cfg.topk} E={cfg.num_experts}: "
                    f"dispatch {med['dispatch']:.1f} us ({gbs:.0f} GB/s), combine {med['combine']:.1f} us ({cbs:.0f} GB/s), "
                    f"async {med['dispatch_async']:.1f} + wait {med['dispatch_wait']:.1f} us, combine async "
                    f"{med['combine_async']:.1f} + wait {med['combine_wait']:.1f} us; graph replay dispatch "
                    f"{med['graph_dispatch']:.1f} combine {med['graph_combine']:.1f} us; setup {setup:.1f} s; "
                    f"steady pair {med['steady_pair']:.1f} us = [send {ph[0]:.1f} hand {ph[1]:.1f} wait {ph[2]:.1f} "
                    f"recv {ph[3]:.1f}] gap {ph[4]:.1f} [csend {ph[5]:.1f} wait {ph[6]:.1f} crecv {ph[7]:.1f}] us")
        print(rows[-1], flush=True)
        del y
        be.close()
    for r in rows:
        print(r, flush=True)
    from epcomm.backends.gpu.runtime import Runtime
    rt = Runtime.get()
    if rt:
        rt.close()


if __name__ == "__main__":
    main()
