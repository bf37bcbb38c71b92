"""python -m epcomm.bench: the cases, the command line, and the run on every rank.

Run it under the launcher (one rank per GPU):
    python -m launch bench -t configs/local-2gpu.yaml --timeout 600 -- --json bench.json --png bench.png
Cases: links (copy-engine peer and device copy bandwidth; GPU only), baseline (NCCL all_to_all_single; GPU only),
ht (4096 tokens, bf16 and fp8 dispatch, bf16 combine, mode "ht"), ll (128 tokens, fp8 dispatch + bf16 combine,
CUDA graph replay on GPU; once with mode "ll", then the same shape with mode "ht": records differ in "mode"),
sweep (tokens 1..4096, powers of 2, mode "ht", bf16).
Every epcomm and baseline shape is checked against epcomm.reference on its first iteration; a wrong result is
reported as "wrong" and its timings are withheld (exit status 1).
--compare RECORDED.json checks that this run reproduces a recorded one (epcomm.bench.compare): exit status 3 when
every result is right but some row is slower than the recorded one by more than --tolerance, or failed, or missing;
2 when the recorded run has other shapes (found before anything runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
import traceback

import numpy as np

from ..arrays import HostArrays, TorchArrays, to_numpy
from ..checks import Round, identity, received_rows
from ..provenance import code_identity
from . import compare
from . import floor as floormod
from . import report
from .stats import median, slowest_rank, summarize

CASES = ("links", "baseline", "ht", "ll", "sweep")
LL_MODES = ("ll", "ht")  # EPConfig modes the ll case measures, in this order


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m epcomm.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default=",".join(CASES),
                    help=f"comma-separated cases to run, from {','.join(CASES)} (default: all)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 50; 5 --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10; 2 --quick)")
    ap.add_argument("--sets", type=int, default=4, help="input sets rotated through (default 4, at least 4)")
    ap.add_argument("--json", metavar="PATH", help="write the JSON document here (rank 0)")
    ap.add_argument("--png", metavar="PATH", help="write the latency-vs-tokens plot here (rank 0; matplotlib)")
    ap.add_argument("--sms", type=int, default=None, metavar="N",
                    help="limit the SMs epcomm kernels use, where the backend supports it")
    ap.add_argument("--quick", action="store_true",
                    help="CI: few iterations; on the host backend also small shapes")
    ap.add_argument("--hidden", type=int, default=None, help="channels per token (default 7168; host: 512, quick 256)")
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=None,
                    help="routed experts (default: the topology's ep.num_experts, else 256)")
    ap.add_argument("--tokens", type=int, default=None, help="ht tokens per rank (default 4096; host 128, quick 32)")
    ap.add_argument("--ll-tokens", type=int, default=None, help="ll tokens per rank (default 128; host quick 16)")
    ap.add_argument("--sweep-max", type=int, default=None, help="largest sweep point (default = ht tokens)")
    ap.add_argument("--routing", default="uniform", help="epcomm.workload routing (default uniform)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="link bandwidth for the floor when the links case is not run (GB/s)")
    ap.add_argument("--local-gbps", type=float, default=None,
                    help="device copy bandwidth for the floor when the links case is not run (GB/s)")
    ap.add_argument("--no-graph", action="store_true", help="ll case: time eager calls instead of graph replays")
    ap.add_argument("--backend", choices=("auto", "host", "gpu"), default="auto")
    ap.add_argument("--compare", metavar="PATH",
                    help="a recorded run's JSON (e.g. docs/perf/bench-local-2gpu.json): after the run, print the rows "
                         "that differ by more than --tolerance and exit 3 if any is slower, failed or missing "
                         "(checked for the same shapes before anything runs)")
    ap.add_argument("--tolerance", type=float, default=compare.DEFAULT_TOLERANCE,
                    help=f"--compare: relative band of 'same' (default {compare.DEFAULT_TOLERANCE:g})")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--case: unknown {bad}; choose from {','.join(CASES)}")
    args.cases = cases
    if args.sets < 4:
        ap.error("--sets must be >= 4 (inputs rotate so caches do not serve repeated data)")
    if not args.tolerance > 0:
        ap.error("--tolerance must be > 0")
    return args


def resolve_shapes(args, backend: str, topo_experts) -> None:
    host = backend != "gpu"
    q = args.quick
    if args.iters is None:
        args.iters = 5 if q else 50
    if args.warmup is None:
        args.warmup = 2 if q else 10
    if args.hidden is None:
        args.hidden = (256 if q else 512) if host else 7168
    if args.tokens is None:
        args.tokens = (32 if q else 128) if host else 4096
    if args.ll_tokens is None:
        args.ll_tokens = (16 if q else 32) if host else 128
    if args.experts is None:
        args.experts = topo_experts or 256
    if args.sweep_max is None:
        args.sweep_max = args.tokens
    args.sweep_tokens = [1 << i for i in range(0, 31) if (1 << i) <= args.sweep_max]


class SelfComm:
    """Stand-in communicator for a world of one without MPI."""
    def Barrier(self): pass
    def allgather(self, v): return [v]
    def bcast(self, v, root=0): return v
    def allreduce(self, v, op=None): return v
    def gather(self, v, root=0): return [v]


class Logger:
    def __init__(self, rank: int):
        self.rank, self.t0 = rank, time.perf_counter()

    def __call__(self, msg: str, everyone: bool = False) -> None:
        if self.rank == 0 or everyone:
            who = "" if self.rank == 0 and not everyone else f" rank {self.rank}"
            print(f"[bench +{time.perf_counter() - self.t0:6.1f}s{who}] {msg}", flush=True)


class Bench:
    def __init__(self, args, ctx, comm, torch=None):
        self.args, self.ctx, self.comm, self.torch = args, ctx, comm, torch
        self.rank, self.world = ctx.rank, ctx.world_size
        self.gpu = torch is not None
        self.log = Logger(self.rank)
        self.code = code_identity() if self.rank == 0 else None   # rank 0 writes the document
        self.arrays = TorchArrays(ctx.device) if self.gpu else HostArrays(comm)   # where inputs go
        if self.gpu:
            from .timing import CudaTimer
            self.timer = CudaTimer(comm, torch)
            self.device = torch.device("cuda", ctx.device)
        else:
            from .timing import HostTimer
            self.timer = HostTimer(comm)
            self.device = None
        self._worlds: dict = {}
        self._expected: dict = {}
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.links = {"status": "skipped", "reason": "links case not selected"}
        self.link_gbps = args.link_gbps
        self.local_gbps = args.local_gbps
        self.floor_source = "command line" if (args.link_gbps or args.local_gbps) else "n/a"
        self.sms_supported = self._sms_supported()

    # ---------------------------------------------------------------- configuration
    def _sms_supported(self) -> bool:
        from ..config import EPConfig
        return "num_sms" in {f.name for f in dataclasses.fields(EPConfig)}

    def cfg(self, fmt: str, mode: str, max_tokens: int):
        from ..config import EPConfig
        a = self.args
        kw = dict(hidden=a.hidden, topk=a.topk, num_experts=a.experts, max_tokens_per_rank=max_tokens,
                  world_size=self.world, token_format=fmt, mode=mode)
        if a.sms is not None and self.sms_supported:
            kw["num_sms"] = a.sms
        return EPConfig(**kw)

    # ---------------------------------------------------------------- inputs and the reference
    def world_sets(self, cfg, t: int) -> list:
        """The n_sets worlds of t tokens per rank (same on every rank; shared by every case and format)."""
        key = t
        if key not in self._worlds:
            from ..workload import make_world
            self._worlds[key] = [make_world(cfg, self.args.seed * 100003 + 7919 * t + k, self.args.routing,
                                            num_tokens=t) for k in range(self.args.sets)]
        return self._worlds[key]

    def round(self, cfg, t: int, k: int) -> Round:
        """Input set k of t tokens against the spec, for this rank only (computed once per format and shape)."""
        key = (cfg.token_format, t, k)       # the spec does not depend on the mode
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
        from .gpu import dequant_fp8_into
        dequant_fp8_into(self.torch, out, res.expert_x, res.expert_scales, received_rows(res))
        return out

    def new_expert_y(self, cfg):
        """A preallocated bf16 expert_y (random values) for fp8 shapes: combine's input after dequantisation."""
        if not cfg.token_format.quantized:
            return None
        if self.gpu:
            ey = self.torch.empty((cfg.max_recv_rows, cfg.hidden), dtype=self.torch.bfloat16, device=self.device)
            ey.normal_()
            return ey
        from ..formats import random_tokens
        return random_tokens(np.random.default_rng(self.rank), cfg.max_recv_rows, cfg.hidden)

    def sms_of(self, buf):
        for obj in (buf, getattr(buf, "_backend", None)):
            for name in ("num_sms", "sms_used", "sms"):
                v = getattr(obj, name, None)
                if callable(v):
                    try:
                        v = v()
                    except Exception:  # noqa: BLE001
                        v = None
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    # ---------------------------------------------------------------- records
    def bytes_of(self, cfg, t: int, op: str) -> dict:
        """op_bytes averaged over the input sets (each set's actual routing)."""
        per = []
        for w in self.world_sets(cfg, t):
            tr = floormod.traffic(cfg, w.topk_ids)
            if op == "roundtrip":
                d, c = floormod.op_bytes(cfg, tr, "dispatch"), floormod.op_bytes(cfg, tr, "combine")
                per.append({k: [a + b for a, b in zip(d[k], c[k])] for k in ("link_send", "link_recv", "local")})
            else:
                per.append(floormod.op_bytes(cfg, tr, op))
        return {k: [int(round(sum(p[k][r] for p in per) / len(per))) for r in range(self.world)]
                for k in ("link_send", "link_recv", "local")}

    def floor_of(self, cfg, t: int, op: str):
        if op == "roundtrip":
            return floormod.roundtrip_floor(self.floor_of(cfg, t, "dispatch"), self.floor_of(cfg, t, "combine"))
        return floormod.floor_of(self.bytes_of(cfg, t, op), self.link_gbps, self.local_gbps)

    def record(self, case, impl, op, cfg, t, *, graph=False, status="ok", verified=False, error=None,
               timing=None, sms=None, fmt=None) -> dict:
        a = self.args
        rec = {"case": case, "impl": impl, "op": op, "mode": cfg.mode if impl == "epcomm" else None,
               "format": fmt or ("bf16" if op == "combine" else cfg.token_format), "tokens": t,
               "hidden": cfg.hidden, "topk": cfg.topk, "num_experts": cfg.num_experts, "world_size": self.world,
               "graph": bool(graph), "status": status, "verified": bool(verified), "error": error,
               "iters": a.iters, "warmup": a.warmup, "input_sets": a.sets, "time_us": None,
               "per_rank_median_us": None, "host_call_us": None, "wall_us": None, "sms": sms}
        fcfg = cfg if op != "combine" else cfg.replace(token_format="bf16")
        if impl == "nccl" and op != "combine":
            fcfg = cfg.replace(token_format="bf16")
        rec["bytes"] = self.bytes_of(fcfg, t, op)
        fl = self.floor_of(fcfg, t, op)
        rec["floor"] = fl
        rec["link_bytes_max"], rec["local_bytes_max"] = fl["link_bytes_max"], fl["local_bytes_max"]
        rec["link_gbps"] = rec["local_gbps"] = None
        if timing is not None and status == "ok":
            per_rank = self.comm.allgather(timing)
            times = slowest_rank([p["times_us"] for p in per_rank])
            rec["time_us"] = summarize(times)
            rec["per_rank_median_us"] = [median(p["times_us"]) for p in per_rank]
            rec["host_call_us"] = max(median(p["host_us"]) for p in per_rank)
            if all(p.get("wall_us") for p in per_rank):
                rec["wall_us"] = max(median(p["wall_us"]) for p in per_rank)
            m = rec["time_us"]["median"]
            if m > 0:
                rec["link_gbps"] = fl["link_bytes_max"] / (m * 1e3)
                rec["local_gbps"] = fl["local_bytes_max"] / (m * 1e3)
        self.results.append(rec)
        if status == "ok" and rec["time_us"]:
            tm = rec["time_us"]
            self.log(f"  {case:<8} {impl:<6} {op:<9} {rec['mode'] or '-':<4} {rec['format']:<4} T={t:<5} "
                     f"{'graph ' if graph else ''}"
                     f"median {tm['median']:9.1f} us (p10 {tm['p10']:.1f}, p90 {tm['p90']:.1f}); floor "
                     f"{report.fmt_num(fl['floor_us'])} us")
        else:
            self.log(f"  {case:<8} {impl:<6} {op:<9} {rec['mode'] or '-':<4} T={t}: {status} {error or ''}")
        return rec

    # ---------------------------------------------------------------- cases
    def case_links(self):
        if not self.gpu:
            self.links = {"status": "n/a", "reason": "host backend: no GPU copy engine"}
            return
        from .gpu import measure_links
        self.log("links: copy-engine peer bandwidth and device copy bandwidth")
        self.links = measure_links(self.torch, self.ctx, self.comm, self.log)
        conc, local = self.links["concurrent_gbps"], self.links["local_copy_gbps"]
        if self.args.link_gbps is None and all(c is not None for c in conc):
            self.link_gbps = conc
        if self.args.local_gbps is None and all(v is not None for v in local):
            self.local_gbps = local
        self.floor_source = ("measured in this run: link = each rank's outgoing peer copy while all ranks copy at "
                             "once; local = 1 GiB device copy (read + write)")
        self.log(f"links: one-way {self.links['one_way_gbps']} GB/s, all at once {conc} GB/s, device copy {local}")

    def case_baseline(self):
        a = self.args
        if not self.gpu:
            cfg = self.cfg("bf16", "ht", a.tokens)
            for op in ("dispatch", "combine", "roundtrip"):
                self.record("baseline", "nccl", op, cfg, a.tokens, status="n/a",
                            error="host backend: no NCCL baseline")
            return
        from .gpu import A2ABaseline, init_torch_dist
        torch = self.torch
        self.log("baseline: torch.distributed NCCL init")
        dist = init_torch_dist(torch, self.comm, self.rank, self.world, "nccl")
        try:
            tokens = [a.tokens, a.ll_tokens]
            if "sweep" in a.cases:
                tokens += a.sweep_tokens
            tokens = sorted(set(tokens), reverse=True)
            cfg = self.cfg("bf16", "ht", max(tokens))
            bl = A2ABaseline(torch, dist, cfg.n_local_experts, self.rank, self.world)
            for t in tokens:
                self.run_baseline_shape(bl, cfg, t)
        finally:
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001
                self.log(f"baseline: destroy_process_group: {e}")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def run_baseline_shape(self, bl, cfg, t: int):
        self.log(f"baseline T={t}: inputs, reference, verify")
        sets = self.device_sets(cfg, t)
        s0 = sets[0]
        self.precompute(cfg, t, combine=True)
        st = bl.dispatch(s0["x"], s0["ids"], s0["w"])
        y = bl.combine(st["expert_x"], st)
        self.torch.cuda.synchronize()
        exp = self.round(cfg, t, 0).dispatch
        n = int(exp.row_offsets[-1])
        problems = []
        got = to_numpy(st["expert_x"])
        if got.shape[0] != n or not np.array_equal(got.view(np.uint8), exp.expert_x[:n].view(np.uint8)):
            problems.append(f"baseline expert_x ({got.shape[0]} rows) differs from the reference ({n} rows)")
        if not np.array_equal(to_numpy(st["tokens_per_expert"]).astype(np.int64),
                              exp.tokens_per_expert.astype(np.int64)):
            problems.append("baseline tokens_per_expert differs from the reference")
        problems += self.check_combine(cfg, y, t, 0)
        problems = self.agree(problems)
        if problems:
            for op in ("dispatch", "combine", "roundtrip"):
                self.record("baseline", "nccl", op, cfg, t, status="wrong", error="; ".join(problems[:3]))
            return
        n_sets = len(sets)
        w = self.args.warmup
        tm = self.timer.run(w, self.args.iters, lambda i: sets[i % n_sets],
                            lambda s: bl.dispatch(s["x"], s["ids"], s["w"]))
        self.record("baseline", "nccl", "dispatch", cfg, t, verified=True, timing=tm, fmt="bf16")

        def prep_c(i):
            s = sets[i % n_sets]
            return bl.dispatch(s["x"], s["ids"], s["w"])
        tm = self.timer.run(w, self.args.iters, prep_c, lambda st_: bl.combine(st_["expert_x"], st_))
        self.record("baseline", "nccl", "combine", cfg, t, verified=True, timing=tm, fmt="bf16")

        def rt(s):
            st_ = bl.dispatch(s["x"], s["ids"], s["w"])
            return bl.combine(st_["expert_x"], st_)
        tm = self.timer.run(w, self.args.iters, lambda i: sets[i % n_sets], rt)
        self.record("baseline", "nccl", "roundtrip", cfg, t, verified=True, timing=tm, fmt="bf16")

    def make_buffer(self, cfg):
        from ..buffer import EPBuffer
        self.log(f"EPBuffer: mode {cfg.mode}, {cfg.token_format}, max {cfg.max_tokens_per_rank} tokens/rank "
                 f"(creating; builds kernels on first use)")
        return EPBuffer(cfg, self.ctx)

    def run_epcomm_shape(self, case: str, buf, cfg, t: int, ops, graph: bool = False):
        """Verify the first iteration of this shape against the reference, then time each op."""
        a = self.args
        self.log(f"{case} {cfg.token_format} mode {cfg.mode} T={t}: inputs, reference, verify")
        sets = self.device_sets(cfg, t)
        n_sets = len(sets)
        ey_buf = self.new_expert_y(cfg)
        s0 = sets[0]
        self.precompute(cfg, t, combine=("combine" in ops or "roundtrip" in ops), extra_set=graph and self.gpu)
        res = buf.dispatch(s0["x"], s0["ids"])
        self.timer.sync()
        problems = self.check_dispatch(cfg, res, t, 0)
        if not problems and ("combine" in ops or "roundtrip" in ops):
            y = buf.combine(self.identity_y(cfg, res, ey_buf), res.handle, s0["w"])
            self.timer.sync()
            problems += self.check_combine(cfg, y, t, 0)
        problems = self.agree(problems)
        sms = self.sms_of(buf)
        if problems:
            for op in ops:
                self.record(case, "epcomm", op, cfg, t, status="wrong", error="; ".join(problems[:3]), sms=sms)
            return
        if graph and self.gpu:
            note = self.time_graph(case, buf, cfg, t, ops, sets, ey_buf, sms)
            if note is None:
                return
            self.log(f"{case} mode {cfg.mode}: CUDA graph not usable ({note}); timing eager calls")
            self.notes.append(f"{case} mode {cfg.mode} T={t}: CUDA graph not usable, eager timings reported: {note}")
        w, it = a.warmup, a.iters
        rt_y = ey_buf  # fp8 round trip: combine reads a preallocated bf16 expert_y (no dequant in the timed region)

        if "dispatch" in ops:
            tm = self.timer.run(w, it, lambda i: sets[i % n_sets], lambda s: buf.dispatch(s["x"], s["ids"]))
            self.record(case, "epcomm", "dispatch", cfg, t, verified=True, timing=tm, sms=sms)
        if "combine" in ops:
            def prep_c(i):
                s = sets[i % n_sets]
                r = buf.dispatch(s["x"], s["ids"])
                return r, self.identity_y(cfg, r, ey_buf), s["w"]
            tm = self.timer.run(w, it, prep_c, lambda st: buf.combine(st[1], st[0].handle, st[2]))
            self.record(case, "epcomm", "combine", cfg, t, verified=True, timing=tm, sms=sms)
        if "roundtrip" in ops:
            def rt(s):
                r = buf.dispatch(s["x"], s["ids"])
                return buf.combine(r.expert_x if rt_y is None else rt_y, r.handle, s["w"])
            tm = self.timer.run(w, it, lambda i: sets[i % n_sets], rt)
            self.record(case, "epcomm", "roundtrip", cfg, t, verified=True, timing=tm, sms=sms)

    def time_graph(self, case, buf, cfg, t, ops, sets, ey_buf, sms):
        """Capture dispatch and combine in two CUDA graphs, verify the first replay, time replays (inputs copied
        into the static tensors before each, untimed). Returns None when done, else why graphs were not usable."""
        torch = self.torch
        a = self.args
        if ey_buf is None:
            ey_buf = torch.empty((cfg.max_recv_rows, cfg.hidden), dtype=torch.bfloat16, device=self.device)
            ey_buf.normal_()
        sx = torch.empty_like(sets[0]["x"])
        sids = torch.empty_like(sets[0]["ids"])
        sw = torch.empty_like(sets[0]["w"])

        def load(s):
            sx.copy_(s["x"])
            sids.copy_(s["ids"])
            sw.copy_(s["w"])
        self.log(f"{case} mode {cfg.mode}: capturing CUDA graphs (dispatch, combine)")
        try:
            load(sets[0])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    r = buf.dispatch(sx, sids)
                    buf.combine(ey_buf, r.handle, sw)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.comm.Barrier()
            g_d, g_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_d):
                gres = buf.dispatch(sx, sids)
            with torch.cuda.graph(g_c):
                gy = buf.combine(ey_buf, gres.handle, sw)
            torch.cuda.synchronize()
            self.comm.Barrier()
            # first replay, checked
            load(sets[0])
            g_d.replay()
            self.identity_y(cfg, gres, ey_buf) if cfg.token_format.quantized else ey_buf.copy_(gres.expert_x)
            g_c.replay()
            torch.cuda.synchronize()
            problems = self.check_dispatch(cfg, gres, t, 0) + self.check_combine(cfg, gy, t, 0)
        except Exception as e:  # noqa: BLE001
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            problems = [f"capture/replay failed: {type(e).__name__}: {e}"]
        problems = self.agree(problems)
        if problems:
            return "; ".join(problems[:3])
        n_sets = len(sets)
        w, it = a.warmup, a.iters

        def prep_d(i):
            load(sets[i % n_sets])

        def prep_c(i):
            load(sets[i % n_sets])
            g_d.replay()

        timings = {}
        if "dispatch" in ops:
            timings["dispatch"] = self.timer.run(w, it, prep_d, lambda _: g_d.replay())
        if "combine" in ops:
            timings["combine"] = self.timer.run(w, it, prep_c, lambda _: g_c.replay())
        if "roundtrip" in ops:
            timings["roundtrip"] = self.timer.run(w, it, prep_d, lambda _: (g_d.replay(), g_c.replay()))
        # replays must stay right on other inputs: check the dispatch of input set 1 after all the timing
        load(sets[1 % n_sets])
        g_d.replay()
        torch.cuda.synchronize()
        post = self.agree(self.check_dispatch(cfg, gres, t, 1 % n_sets))
        for op, tm in timings.items():
            if post:
                self.record(case, "epcomm", op, cfg, t, graph=True, status="wrong",
                            error="graph replay on input set 1: " + "; ".join(post[:3]), sms=sms)
            else:
                self.record(case, "epcomm", op, cfg, t, graph=True, verified=True, timing=tm, sms=sms)
        del g_d, g_c
        if post:
            return "replays went wrong on another input set: " + "; ".join(post[:2])
        return None

    def with_buffer(self, cfg, fn):
        buf = self.make_buffer(cfg)
        try:
            fn(buf)
        finally:
            try:
                buf.close()
            except Exception as e:  # noqa: BLE001
                self.log(f"EPBuffer.close: {type(e).__name__}: {e}", everyone=True)
            if self.gpu:
                self.torch.cuda.synchronize()
                self.torch.cuda.empty_cache()

    def case_ht(self):
        a = self.args
        for fmt in ("bf16", "fp8"):
            cfg = self.cfg(fmt, "ht", a.tokens)
            self.with_buffer(cfg, lambda buf: self.run_epcomm_shape(
                "ht", buf, cfg, a.tokens, ("dispatch", "combine", "roundtrip")))

    def case_ll(self):
        # The low-latency shape over both wire designs, so they can be compared: "ll" (fixed per-expert slots; the
        # rows earlier runs had, first) and "ht" (one message per (token, destination rank)). Same inputs,
        # reference check, ops and graph replay; the records differ only in "mode".
        a = self.args
        for mode in LL_MODES:
            cfg = self.cfg("fp8", mode, a.ll_tokens)
            self.with_buffer(cfg, lambda buf: self.run_epcomm_shape(
                "ll", buf, cfg, a.ll_tokens, ("dispatch", "combine", "roundtrip"), graph=not a.no_graph))

    def case_sweep(self):
        a = self.args
        cfg = self.cfg("bf16", "ht", max(a.sweep_tokens))

        def body(buf):
            for t in a.sweep_tokens:
                self.run_epcomm_shape("sweep", buf, cfg, t, ("dispatch", "combine"))
        self.with_buffer(cfg, body)

    # ---------------------------------------------------------------- document
    def document(self, devices) -> dict:
        a = self.args
        report.link_ratios(self.results)
        ok = (not self.errors and all(r["status"] in ("ok", "n/a") for r in self.results)
              and all(r["verified"] for r in self.results if r["status"] == "ok"))
        return {
            "schema": report.SCHEMA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": list(sys.argv), "code": self.code,
            "backend": self.ctx.backend, "topology": self.ctx.topology.name, "world_size": self.world,
            "nodes": self.ctx.topology.num_nodes, "devices": devices,
            "torch": getattr(self.torch, "__version__", None), "timer": self.timer.name,
            "settings": {"iters": a.iters, "warmup": a.warmup, "input_sets": a.sets, "quick": a.quick,
                         "seed": a.seed, "routing": a.routing, "hidden": a.hidden, "topk": a.topk,
                         "num_experts": a.experts, "tokens_ht": a.tokens, "tokens_ll": a.ll_tokens,
                         "sweep_tokens": a.sweep_tokens if "sweep" in a.cases else [],
                         "sms_requested": a.sms, "sms_supported": self.sms_supported, "cases": a.cases},
            "links": self.links,
            "floor_bandwidth": {"link_gbps": self.link_gbps, "local_gbps": self.local_gbps,
                                "source": self.floor_source},
            "results": self.results, "errors": self.errors, "notes": self.notes, "ok": ok,
        }


def main(argv=None) -> int:
    args = parse(argv)
    import epcomm
    try:
        ctx = epcomm.init(backend=args.backend)
    except (ImportError, AttributeError) as e:
        print(f"epcomm.bench: epcomm.init is not available ({e})", file=sys.stderr)
        return 2
    comm = ctx.comm if ctx.comm is not None else SelfComm()
    resolve_shapes(args, ctx.backend, getattr(ctx.topology, "num_experts", None))
    torch = None
    devices = None
    if ctx.backend == "gpu":
        import torch  # noqa: F811
        torch.cuda.set_device(ctx.device)
        p = torch.cuda.get_device_properties(ctx.device)
        devices = comm.allgather({"rank": ctx.rank, "device": ctx.device, "name": p.name,
                                  "sms": p.multi_processor_count,
                                  "memory_gib": round(p.total_memory / 2**30, 1)})
    bench = Bench(args, ctx, comm, torch)
    log = bench.log
    log(f"{ctx.world_size} ranks, topology {ctx.topology.name}, backend {ctx.backend}, cases {','.join(args.cases)}, "
        f"hidden {args.hidden}, top-{args.topk} of {args.experts}, ht {args.tokens} / ll {args.ll_tokens} tokens, "
        f"iters {args.iters}, warmup {args.warmup}, sets {args.sets}")
    if args.sms is not None and not bench.sms_supported:
        log(f"--sms {args.sms}: not supported (EPConfig has no num_sms); running with the backend's default")
        bench.notes.append(f"--sms {args.sms}: not supported (EPConfig has no num_sms)")
    if ctx.backend != "gpu":
        bench.links = {"status": "n/a", "reason": "host backend: no GPU copy engine"}
    recorded, why = None, None
    if args.compare and ctx.rank == 0:   # before anything runs: a wrong file must not cost a whole run
        try:
            recorded = compare.load(args.compare)
            for w in compare.check_comparable(recorded, bench.document(devices)):
                log(f"--compare: {w}")
        except compare.NotComparable as e:
            why = str(e)
    why = comm.bcast(why, root=0)
    if why:
        if ctx.rank == 0:
            print(f"epcomm.bench: --compare {args.compare}: {why}", file=sys.stderr, flush=True)
        return 2

    def save():
        if ctx.rank == 0 and args.json:
            report.write_json(bench.document(devices), args.json)

    for case in CASES:  # fixed order: links first (floor), baseline before epcomm buffers exist
        if case not in args.cases:
            continue
        t0 = time.perf_counter()
        try:
            getattr(bench, f"case_{case}")()
        except Exception as e:  # noqa: BLE001
            msg = f"{case}: {type(e).__name__}: {e}"
            print(f"[bench rank {ctx.rank}] {msg}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            bench.errors.append(msg)
        # every rank must know whether any rank failed (their error lists are merged into rank 0's)
        errs = comm.allgather(bench.errors)
        merged = []
        for r, es in enumerate(errs):
            for e in es:
                tagged = e if e.startswith("rank ") else f"rank {r}: {e}"
                if tagged not in merged:
                    merged.append(tagged)
        bench.errors = merged
        log(f"{case}: done in {time.perf_counter() - t0:.1f}s")
        save()

    doc = bench.document(devices)
    slower = False
    if ctx.rank == 0:
        print(report.table(doc), flush=True)
        if recorded is not None:
            cmp = compare.compare(recorded, doc, args.tolerance)
            print(compare.table(cmp, only_changes=True), flush=True)
            doc["compare"] = {"against": args.compare, **cmp}
            slower = not cmp["ok"]
        if args.json:
            report.write_json(doc, args.json)
            print(f"json: {args.json}")
        if args.png:
            why = report.write_png(doc, args.png)
            print(f"png: {args.png}" if why is None else f"png: not written ({why})")
    slower = comm.bcast(slower, root=0)   # every rank exits with the same status
    if not doc["ok"]:
        return 1
    return 3 if slower else 0
