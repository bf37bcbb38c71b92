"""Per-rank GPU checks of the gpu backend against epcomm.reference. Run on every rank:

    python -m launch run -t configs/local-2gpu.yaml -- python tests/gpu/worker.py [--quick] [--only ll-bf16] ...
    mpirun -n 2 python tests/gpu/worker.py --topology configs/sim-2node.yaml

Prints one line per check ("PASS"/"FAIL ..."), a summary, and exits 1 when any rank failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np

import epcomm
from epcomm import reference as ref
from epcomm.arrays import CupyArrays, TorchArrays
from epcomm.checks import Round
from epcomm.errors import EPCapacityError, EPTimeoutError
from epcomm.workload import distinct_experts, make_world

import refusals  # noqa: E402  (tests/gpu/refusals.py, beside this file)
import server_checks  # noqa: E402  (tests/gpu/server_checks.py, beside this file)


def tb16(a: np.ndarray, dev):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(dev)


class Checker:
    def __init__(self, ctx):
        import torch
        self.torch = torch
        self.ctx = ctx
        self.me = ctx.rank
        self.dev = torch.device(f"cuda:{ctx.device}")
        self.fails = []
        self.npass = 0

    def ok(self, name, problems):
        if problems:
            self.fails.append((name, problems))
            print(f"[rank {self.me}] FAIL {name}: {problems[:3]}", flush=True)
        else:
            self.npass += 1
            print(f"[rank {self.me}] PASS {name}", flush=True)

    def poison(self, be):
        s = be.sets[be.next_output_set()]
        s["ex"].view(self.torch.uint8).fill_(0x7F)
        if s.get("escale") is not None:
            s["escale"].fill_(float("nan"))
        s["src_info"].fill_(0x55555555)
        s["row_offsets"].view(self.torch.int32).fill_(7)
        for y in be.ybufs:
            y.fill_(float("nan"))

    def _async_wait(self, be, start, wait, cross_stream: bool):
        """start() then wait(pending); cross_stream: start on a side stream, wait on the current one (the backend
        must order the wait after the send)."""
        if not cross_stream:
            return wait(start())
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())   # the inputs written on the current stream come first
        with torch.cuda.stream(side):
            pending = start()
        return wait(pending)

    def one_round(self, be, cfg, world, use_async: bool, check=True, cross_stream=False):
        rnd = Round(cfg, world, self.me, experts="distinct")
        arr = TorchArrays(self.ctx.device)
        x, ids, w = (arr.put(a) for a in rnd.inputs())
        self.poison(be)
        res = self._async_wait(be, lambda: be.dispatch_async(x, ids), be.dispatch_wait, cross_stream) \
            if use_async else be.dispatch(x, ids)
        be.synchronize()
        problems = rnd.check_dispatch(res) if check else []
        eyg = arr.put(rnd.expert_y(poison_tail=True))  # rows past the end are NaN: they must never be read
        y = self._async_wait(be, lambda: be.combine_async(eyg, res.handle, w), be.combine_wait, cross_stream) \
            if use_async else be.combine(eyg, res.handle, w)
        be.synchronize()
        if check:
            problems += rnd.check_combine(y)
        return problems

    def one_round_cupy(self, be, cfg, world):
        """Same as one_round with cupy arrays in and out (bf16 travels as uint16 bits)."""
        import cupy as cp
        from epcomm.formats import BF16
        rnd = Round(cfg, world, self.me, experts="distinct")
        arr = CupyArrays(self.ctx.device)
        with cp.cuda.Device(self.ctx.device):
            x, ids, w = (arr.put(a) for a in rnd.inputs())
            self.poison(be)
            res = be.dispatch(x, ids)
            be.synchronize()
            problems = []
            if not isinstance(res.expert_x, cp.ndarray) or not isinstance(res.src_info, cp.ndarray):
                problems.append(f"outputs are {type(res.expert_x).__name__}, not cupy")
            problems += rnd.check_dispatch(res)
            y = be.combine(arr.put(rnd.expert_y()), res.handle, w)
            be.synchronize()
            problems += rnd.check_combine(cp.asnumpy(y).view(BF16))   # cupy returns bf16 as uint16 bits
        return problems

    def suite(self, cfg, quick=False):
        from epcomm.backends.gpu import GpuBackend
        tag = f"{cfg.mode}-{cfg.token_format}{'-fused' if cfg.fused_shared_expert else ''}" \
              f"{'-skip' + str(cfg.allreduce_world_size) if cfg.skip_a2a else ''}"
        t0 = time.time()
        be = GpuBackend(cfg, self.ctx)
        self.memory(be, cfg, tag)
        M = cfg.max_tokens_per_rank
        cases = [("uniform", None, 1), ("uniform", "ragged", 2), ("hot", None, 3), ("empty_rank", None, 4),
                 ("minus1", "ragged", 5), ("all_minus1", None, 6), ("skewed", 37, 7), ("uniform", 0, 8),
                 ("local", M, 9)]
        if quick:
            cases = cases[:3]
        if "oneshot" in be.variants:   # the variant's edges: one token (one chunk per destination), a rank with none
            R = cfg.world_size
            cases += [("uniform", 1, 10), ("hot", [0] + [1] * (R - 1), 11), ("minus1", [1] * (R - 1) + [2], 12)]
        for i, (kind, nt, seed) in enumerate(cases):
            world = make_world(cfg, seed=1000 * seed + 17, routing_kind=kind, num_tokens=nt)
            try:
                p = self.one_round(be, cfg, world, use_async=bool(i % 2))
            except Exception as e:  # keep going: report
                p = [f"{type(e).__name__}: {e}"]
                traceback.print_exc()
            self.ok(f"{tag} {kind} T={nt if nt is not None else M} {'async' if i % 2 else 'fused'}", p)
        try:   # async send on a side stream, wait on the current one
            p = self.one_round(be, cfg, make_world(cfg, seed=78, routing_kind="skewed", num_tokens="ragged"),
                               use_async=True, cross_stream=True)
        except Exception as e:
            p = [f"{type(e).__name__}: {e}"]
            traceback.print_exc()
        self.ok(f"{tag} async across streams", p)
        try:
            p = self.one_round_cupy(be, cfg, make_world(cfg, seed=77, routing_kind="minus1", num_tokens="ragged"))
        except Exception as e:
            p = [f"{type(e).__name__}: {e}"]
            traceback.print_exc()
        self.ok(f"{tag} cupy arrays in/out", p)
        if self.me == 0:
            print(f"[rank 0] {tag}: {be.grid_choice.describe()}", flush=True)
        print(f"[rank {self.me}] suite {tag} {time.time() - t0:.1f} s", flush=True)
        return be

    def many_rounds(self, be, cfg, n=1000):
        torch = self.torch
        world = make_world(cfg, seed=4242, routing_kind="uniform")
        me = self.me
        x = tb16(world.xs[me], self.dev)
        ids = torch.from_numpy(world.topk_ids[me]).to(self.dev)
        w = torch.from_numpy(world.topk_weights[me]).to(self.dev)
        refs = ref.dispatch(cfg, world.xs, world.topk_ids)
        eys = [distinct_experts(cfg, r) for r in refs]
        eyg = tb16(eys[me], self.dev)
        be.synchronize()
        t0 = time.time()
        for i in range(n):
            if i % 3 == 2:
                res = be.dispatch_wait(be.dispatch_async(x, ids))
                y = be.combine_wait(be.combine_async(eyg, res.handle, w))
            else:
                res = be.dispatch(x, ids)
                y = be.combine(eyg, res.handle, w)
        be.synchronize()
        dt = time.time() - t0
        p = ref.compare_dispatch(cfg, res, refs[me])
        yx, mag = ref.combine_exact(cfg, eys, refs, world.topk_weights)
        p += ref.compare_combine(y, yx[me], mag[me])
        self.ok(f"{cfg.mode}-{cfg.token_format} {n} back-to-back rounds ({dt / n * 1e6:.0f} us/round)", p)

    def memory(self, be, cfg, tag):
        """epcomm.memory's estimate (capacity planning, no GPU) is what the backend really allocates."""
        from epcomm.memory import estimate
        nodes = self.ctx.topology.num_nodes
        est = estimate(cfg, nodes if cfg.world_size % nodes == 0 else 1)
        from epcomm.backends.gpu.layout import device_arrays
        shared = [getattr(be, a.param) for a in device_arrays(cfg) if a.copies == "one"]   # state, hist_acc, ...
        arrays = [*shared, *be.ybufs] + [a for s in be.sets for a in s.values() if a is not None]
        real = sum(int(a.nbytes) for a in arrays)   # torch and cupy arrays both have nbytes
        problems = [] if real == est["local_bytes"] else [f"device arrays {real} B, estimate {est['local_bytes']} B"]
        if est["symmetric_bytes"] != be.layout.total:
            problems.append(f"symmetric {be.layout.total} B, estimate {est['symmetric_bytes']} B")
        self.ok(f"{tag} memory estimate", problems)

    def graph(self, be, cfg, replays=4):
        torch = self.torch
        me = self.me
        M = cfg.max_tokens_per_rank
        worlds = [make_world(cfg, seed=900 + i, routing_kind=("uniform", "hot", "minus1", "skewed")[i % 4],
                             num_tokens=M) for i in range(replays + 1)]
        w0 = worlds[0]
        sx = tb16(w0.xs[me], self.dev)
        sids = torch.from_numpy(w0.topk_ids[me]).to(self.dev)
        sw = torch.from_numpy(w0.topk_weights[me]).to(self.dev)
        sey = torch.zeros((*cfg.rows_shape, cfg.hidden), dtype=torch.bfloat16, device=self.dev)
        be.synchronize()
        torch.cuda.synchronize()
        g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g1, stream=s):
                res = be.dispatch(sx, sids)
            with torch.cuda.graph(g2, stream=s):
                y = be.combine(sey, res.handle, sw)
        torch.cuda.synchronize()
        problems = []
        for i in range(1, replays + 1):
            wd = worlds[i]
            sx.copy_(tb16(wd.xs[me], self.dev))
            sids.copy_(torch.from_numpy(wd.topk_ids[me]))
            sw.copy_(torch.from_numpy(wd.topk_weights[me]))
            g1.replay()
            torch.cuda.synchronize()
            refs = ref.dispatch(cfg, wd.xs, wd.topk_ids)
            problems += ref.compare_dispatch(cfg, res, refs[me])
            eys = [distinct_experts(cfg, r) for r in refs]
            sey.copy_(tb16(eys[me], self.dev))
            g2.replay()
            torch.cuda.synchronize()
            be.synchronize()
            yx, mag = ref.combine_exact(cfg, eys, refs, wd.topk_weights)
            problems += ref.compare_combine(y, yx[me], mag[me])
        self.ok(f"{cfg.mode}-{cfg.token_format} CUDA graph capture + {replays} replays", problems)

    def capacity(self, cfg):
        """recv_capacity_factor 1 and every token picking expert 0 (hot routing): rank 0 would receive more rows than
        its capacity. The void round's dispatch and combine launch and return on every rank (no hang), synchronize()
        raises the EPCapacityError of the reference (rank, rows, capacity) on every rank, once, and the next round on
        the same buffer (async, then fused) matches the reference."""
        from epcomm.backends.gpu import GpuBackend
        torch = self.torch
        cfg = cfg.replace(recv_capacity_factor=1.0)
        tag = f"{cfg.mode}-{cfg.token_format}"
        be = GpuBackend(cfg, self.ctx)
        self.memory(be, cfg, f"{tag} capacity")
        problems = []
        hot = make_world(cfg, seed=515, routing_kind="hot")
        try:
            ref.check_capacity(cfg, hot.topk_ids)
            problems.append("hot routing fits the capacity: the check could not fail")
            want = None
        except EPCapacityError as e:
            want = e
        for use_async in (False, True):
            me = self.me
            x = tb16(hot.xs[me], self.dev)
            ids = torch.from_numpy(hot.topk_ids[me]).to(self.dev)
            w = torch.from_numpy(hot.topk_weights[me]).to(self.dev)
            res = be.dispatch_wait(be.dispatch_async(x, ids)) if use_async else be.dispatch(x, ids)
            ey = torch.zeros((*cfg.rows_shape, cfg.hidden), dtype=torch.bfloat16, device=self.dev)
            be.combine(ey, res.handle, w)        # the void round's combine: nothing sent, nothing awaited
            try:
                be.synchronize()
                problems.append(f"{'async' if use_async else 'fused'}: no EPCapacityError")
            except EPCapacityError as e:
                if want is not None and (e.rank, e.needed, e.capacity) != (want.rank, want.needed, want.capacity):
                    problems.append(f"EPCapacityError rank {e.rank} rows {e.needed} capacity {e.capacity}, expected "
                                    f"{want.rank} {want.needed} {want.capacity}")
            be.synchronize()                     # raised once: the buffer is usable
            # a round that fits for sure: T = M / R tokens per rank (at most M x min(K, local) rows on any rank)
            fits = make_world(cfg, seed=516 + use_async, routing_kind="uniform",
                              num_tokens=max(1, cfg.max_tokens_per_rank // cfg.world_size))
            problems += self.one_round(be, cfg, fits, use_async=use_async)
        be.close()
        self.ok(f"{tag} over capacity: every rank raises EPCapacityError, the next round is correct", problems)

    def timeout(self, cfg):
        """Every rank but rank 1 dispatches: each must raise EPTimeoutError naming rank 1 (its node, its experts);
        rank 0 also checks that the buffer refuses the next call."""
        from epcomm.backends.gpu import GpuBackend
        torch = self.torch
        cfg = cfg.replace(timeout_s=1.5)
        be = GpuBackend(cfg, self.ctx)
        world = make_world(cfg, seed=5, routing_kind="uniform")
        problems = []
        if self.me != 1:
            x = tb16(world.xs[self.me], self.dev)
            ids = torch.from_numpy(world.topk_ids[self.me]).to(self.dev)
            be.dispatch(x, ids)
            t0 = time.time()
            try:
                be.synchronize()
                problems.append("no EPTimeoutError")
            except EPTimeoutError as e:
                dt = time.time() - t0
                print(f"[rank {self.me}] got EPTimeoutError after {dt:.1f} s: {e}", flush=True)
                if e.rank != 1:
                    problems.append(f"names rank {e.rank}, expected 1")
                if e.node != self.ctx.topology.node_of(1):
                    problems.append(f"names node {e.node}")
                if e.experts != cfg.experts_of(1) or cfg.holds(1) not in str(e):
                    problems.append(f"names experts {e.experts}, expected {cfg.holds(1)}")
            if self.me == 0:
                try:
                    be.dispatch(x, ids)
                    problems.append("next call did not raise")
                except EPTimeoutError:
                    pass
        be.broken = "timeout test"
        self.ctx.comm.Barrier()
        be.close()
        self.ok(f"{cfg.mode}-{cfg.token_format} timeout names the missing rank", problems)


def abort_test(ck, cfg):
    """Rank 1 aborts (as EPBuffer does on a failure) instead of dispatching; every other rank dispatches and must
    raise EPError naming it well before its 10 s deadline, on rank 1's node (peer pointer) and on other nodes
    (NVSHMEM signal) alike. Every rank but 1 dispatches, so at > 2 ranks no wait is on a rank that merely stayed
    idle."""
    from epcomm.backends.gpu import GpuBackend
    from epcomm.errors import EPError
    torch = ck.torch
    same = ck.ctx.topology.same_node(ck.me, 1)
    cfg = cfg.replace(timeout_s=10.0)
    be = GpuBackend(cfg, ck.ctx)
    world = make_world(cfg, seed=6, routing_kind="uniform")
    problems = []
    ck.ctx.comm.Barrier()
    if ck.me == 1:
        be.abort("abort test")
    ck.ctx.comm.Barrier()
    if ck.me != 1:
        x = tb16(world.xs[ck.me], ck.dev)
        ids = torch.from_numpy(world.topk_ids[ck.me]).to(ck.dev)
        t0 = time.time()
        be.dispatch(x, ids)
        try:
            be.synchronize()
            problems.append("no error")
        except EPTimeoutError as e:
            problems.append(f"timed out instead of seeing the abort: {e}")
        except EPError as e:
            dt = time.time() - t0
            print(f"[rank {ck.me}] abort seen after {dt:.2f} s: {e}", flush=True)
            if "rank 1" not in str(e) or "aborted" not in str(e):
                problems.append(f"message does not name rank 1: {e}")
            if dt > 5:
                problems.append(f"took {dt:.1f} s")
    be.broken = "abort test"
    ck.ctx.comm.Barrier()
    be.close()
    ck.ok(f"{cfg.mode}-{cfg.token_format} abort of a {'same' if same else 'other'}-node peer stops the wait at once",
          problems)


def give_up_test(ck, cfg):
    """3+ ranks: rank 1 never dispatches; rank 0 (deadline 2 s) times out and, through EPBuffer, gives up on rank 1
    everywhere: the other ranks (deadline 30 s), which wait for rank 1 too, must stop within a few seconds of rank
    0's deadline with an EPError saying that rank 0 gave up on rank 1, not at their own deadline."""
    from epcomm.errors import EPError
    torch = ck.torch
    short, long_ = 2.0, 30.0
    cfg = cfg.replace(timeout_s=short if ck.me == 0 else long_)
    buf = epcomm.EPBuffer(cfg, ck.ctx)
    world = make_world(cfg, seed=7, routing_kind="uniform")
    problems = []
    ck.ctx.comm.Barrier()
    if ck.me != 1:
        x = tb16(world.xs[ck.me], ck.dev)
        ids = torch.from_numpy(world.topk_ids[ck.me]).to(ck.dev)
        t0 = time.time()
        try:
            buf.dispatch(x, ids)
            buf.synchronize()
            problems.append("no error")
        except EPTimeoutError as e:
            dt = time.time() - t0
            print(f"[rank {ck.me}] EPTimeoutError after {dt:.2f} s: {e}", flush=True)
            if ck.me != 0 or e.rank != 1:
                problems.append(f"rank {ck.me} timed out itself: {e}")
        except EPError as e:
            dt = time.time() - t0
            print(f"[rank {ck.me}] EPError after {dt:.2f} s: {e}", flush=True)
            m = str(e)
            gave_up = "rank 1 " in m and "rank 0 " in m and "gave up on it" in m
            aborted = "rank 0 " in m and "aborted" in m     # a wait that was still on rank 0 itself
            if ck.me == 0 or not (gave_up or aborted):
                problems.append(f"rank {ck.me}: {e}")
            if dt > short + 5:
                problems.append(f"rank {ck.me} took {dt:.1f} s (its own deadline is {long_:g} s)")
    ck.ctx.comm.Barrier()
    if ck.me == 1:
        buf._backend.broken = "give-up test"   # the peers are done with this buffer: no collective free
    buf.close()
    ck.ok(f"{cfg.mode}-{cfg.token_format} a timeout stops every peer waiting for the silent rank", problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="substring of the suite tag (e.g. ll-bf16)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="back-to-back rounds of the soak check (default 1000; 200 above 2 ranks: on one GPU their "
                         "kernels time-slice it or split its SMs, and every round waits for all of them)")
    ap.add_argument("--no-extras", action="store_true")
    ap.add_argument("--refusals-only", action="store_true",
                    help="only the refused-call check (tests/gpu/refusals.py), once per mode (issue 15 item 1)")
    args = ap.parse_args()
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    import torch
    t_start = time.time()
    ctx = epcomm.init(topology=args.topology, backend="gpu")
    torch.cuda.set_device(ctx.device)
    from epcomm.backends.gpu.specs import test_configs
    ck = Checker(ctx)
    sharing = ctx.topology.ranks_per_gpu(ctx.rank)
    if args.rounds is None:
        args.rounds = 1000 if ctx.world_size <= 2 else 200
    mps = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    print(f"[rank {ctx.rank}] device {ctx.device} node {ctx.node} topology {ctx.topology.name} "
          f"{torch.cuda.get_device_name(ctx.device)}"
          f"{f' shared by {sharing} ranks' if sharing > 1 else ''}{f' MPS {mps} %' if mps else ''}", flush=True)
    refused_modes = set()
    for cfg in test_configs(ctx.world_size):
        tag = f"{cfg.mode}-{cfg.token_format}"
        if args.only and args.only not in tag:
            continue
        try:
            if args.refusals_only:
                if refusals.first_of_its_mode(cfg, refused_modes):
                    refusals.run(ck, cfg)
                continue
            be = ck.suite(cfg, quick=args.quick)
            if not args.no_extras and not cfg.fused_shared_expert and not cfg.skip_a2a:
                ck.graph(be, cfg)
                if cfg.token_format == "bf16" or cfg.mode == "ll":
                    ck.many_rounds(be, cfg, args.rounds)
            be.close()
            if not cfg.fused_shared_expert and not cfg.skip_a2a and cfg.max_tokens_per_rank == 64:
                ck.capacity(cfg)                 # each mode / format
            if not cfg.fused_shared_expert and not cfg.skip_a2a and cfg.max_tokens_per_rank != 61:
                server_checks.run(ck, cfg)     # issue 13: int64 ids, out=, stats_out=, micro-batches, refusals
            if refusals.first_of_its_mode(cfg, refused_modes):
                refusals.run(ck, cfg)          # issue 15: a refused call harms no one (each mode once)
        except Exception as e:
            traceback.print_exc()
            ck.fails.append((f"{tag} suite", [repr(e)]))
            print(f"[rank {ctx.rank}] FAIL suite {tag}: {e!r}", flush=True)
    if args.refusals_only:
        args.no_extras = True
    if not args.no_extras:
        try:
            ck.timeout(test_configs(ctx.world_size)[0])
        except Exception as e:
            traceback.print_exc()
            ck.fails.append(("timeout", [repr(e)]))
    if not args.no_extras:
        try:
            abort_test(ck, test_configs(ctx.world_size)[0])
        except Exception as e:
            traceback.print_exc()
            ck.fails.append(("abort", [repr(e)]))
    if not args.no_extras and ctx.world_size >= 3:
        try:
            give_up_test(ck, test_configs(ctx.world_size)[0])
        except Exception as e:
            traceback.print_exc()
            ck.fails.append(("give up", [repr(e)]))
    nf = ctx.comm.allreduce(len(ck.fails))
    print(f"[rank {ctx.rank}] SUMMARY pass={ck.npass} fail={len(ck.fails)} (all ranks fail={nf}) "
          f"world={ctx.world_size} {time.time() - t_start:.1f} s", flush=True)
    from epcomm.backends.gpu.runtime import Runtime
    rt = Runtime.get()
    if rt:
        rt.close()
    sys.exit(1 if nf else 0)


if __name__ == "__main__":
    main()
