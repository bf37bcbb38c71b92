"""The benchmark's cases on every rank: links (GPU copy bandwidth, the floor's), baseline (NCCL all_to_all),
ht, ll and sweep (epcomm). Each shape is checked against the spec first (verify.py), then timed (timing.py, or
CUDA graphs: graphs.py) and recorded (records.py)."""
from __future__ import annotations

import time

import numpy as np

from ..arrays import HostArrays, TorchArrays, to_numpy
from ..buffer import EPBuffer
from ..config import EPConfig
from ..formats import FORMAT_NAMES
from . import latency, peer_deepep, report
from .gpu import A2ABaseline, init_torch_dist, measure_links
from .graphs import time_graph
from .records import Records
from .timing import CudaTimer, HostTimer
from .verify import Verifier

LL_MODES = ("ll", "ht")  # EPConfig modes the ll case measures, in this order
LL_LAYOUTS = ("grouped", "batched")  # then output layouts: the default's rows first, as in files recorded before


class Logger:
    def __init__(self, rank: int):
        self.rank, self.t0 = rank, time.perf_counter()

    def __call__(self, msg: str, everyone: bool = False) -> None:
        if self.rank == 0 or everyone:
            who = "" if self.rank == 0 and not everyone else f" rank {self.rank}"
            print(f"[bench +{time.perf_counter() - self.t0:6.1f}s{who}] {msg}", flush=True)


class Bench:
    def __init__(self, args, ctx, comm, torch=None, devices=None):
        self.args, self.ctx, self.comm, self.torch = args, ctx, comm, torch
        self.rank, self.world = ctx.rank, ctx.world_size
        self.log = Logger(self.rank)
        self.gpu = torch is not None
        self.timer = CudaTimer(comm, torch) if self.gpu else HostTimer(comm)
        self.device = torch.device("cuda", ctx.device) if self.gpu else None
        arrays = TorchArrays(ctx.device) if self.gpu else HostArrays(comm)   # where inputs go
        self.verify = Verifier(args, self.rank, comm, arrays, torch, self.device)
        self.records = Records(args, ctx, comm, self.log, self.verify.world_sets, self.timer.name, torch, devices)

    # what the run has so far (all kept in self.records.doc)
    results = property(lambda self: self.records.results)
    errors = property(lambda self: self.records.errors)
    notes = property(lambda self: self.records.notes)
    links = property(lambda self: self.records.doc["links"])
    link_gbps = property(lambda self: self.records.doc["floor_bandwidth"]["link_gbps"])
    local_gbps = property(lambda self: self.records.doc["floor_bandwidth"]["local_gbps"])
    floor_source = property(lambda self: self.records.doc["floor_bandwidth"]["source"])
    shared = property(lambda self: self.records.shared)   # the note when ranks share a GPU, else None

    def cfg(self, fmt: str, mode: str, max_tokens: int, layout: str = "grouped", capacity: float | None = None):
        a = self.args
        return EPConfig(hidden=a.hidden, topk=a.topk, num_experts=a.experts, max_tokens_per_rank=max_tokens,
                        world_size=self.world, token_format=fmt, mode=mode, num_sms=a.sms, layout=layout,
                        recv_capacity_factor=capacity)

    def capacities(self) -> list:
        """Receive capacities the ht and ll cases measure: the default (worst case, None) first, as in files recorded
        before, then --recv-capacity-factor's if given (so one run compares the two)."""
        f = getattr(self.args, "recv_capacity_factor", None)
        return [None] if f is None else [None, f]

    def note_capacity(self, cfg) -> None:
        """A note when a capacity factor gives the worst case anyway (few ranks: F x tokens x topk >= ranks x tokens x
        min(topk, local experts)): its rows then measure the same buffer as the default's."""
        if cfg.recv_capacity_factor is not None and cfg.recv_rows >= cfg.worst_case_recv_rows:
            note = (f"recv_capacity_factor {cfg.recv_capacity_factor:g} at {cfg.world_size} ranks, "
                    f"{cfg.max_tokens_per_rank} tokens is the worst case ({cfg.worst_case_recv_rows} rows): its rows "
                    f"measure the same buffer sizes as the default capacity's")
            if note not in self.records.notes:
                self.records.notes.append(note)
                self.log(f"note: {note}")

    # ---------------------------------------------------------------- cases
    def case_links(self):
        if self.records.shared:
            self.records.set_links({"status": "n/a", "reason": "ranks share a GPU: no link between them to measure"})
            return
        if not self.gpu:
            self.records.set_links({"status": "n/a", "reason": "host backend: no GPU copy engine"})
            return
        self.log("links: copy-engine peer bandwidth and device copy bandwidth")
        links = measure_links(self.torch, self.ctx, self.comm, self.log)
        conc, local = links["concurrent_gbps"], links["local_copy_gbps"]
        self.records.set_links(
            links, link_gbps=conc if all(c is not None for c in conc) else None,
            local_gbps=local if all(v is not None for v in local) else None,
            source=("measured in this run: link = each rank's outgoing peer copy while all ranks copy at once; "
                    "local = 1 GiB device copy (read + write)"))
        self.log(f"links: one-way {links['one_way_gbps']} GB/s, all at once {conc} GB/s, device copy {local}")

    def case_baseline(self):
        a = self.args
        if not self.gpu or self.records.shared:
            why = ("ranks share a GPU: NCCL refuses two ranks on one GPU" if self.records.shared else
                   "host backend: no NCCL baseline")
            cfg = self.cfg("bf16", "ht", a.tokens)
            for op in ("dispatch", "combine", "roundtrip"):
                self.records.record("baseline", "nccl", op, cfg, a.tokens, status="n/a", error=why)
            return
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
        sets = self.verify.device_sets(cfg, t)
        s0 = sets[0]
        self.verify.precompute(cfg, t, combine=True)
        st = bl.dispatch(s0["x"], s0["ids"], s0["w"])
        y = bl.combine(st["expert_x"], st)
        self.torch.cuda.synchronize()
        exp = self.verify.round(cfg, t, 0).dispatch
        n = int(exp.row_offsets[-1])
        problems = []
        got = to_numpy(st["expert_x"])
        if got.shape[0] != n or not np.array_equal(got.view(np.uint8), exp.expert_x[:n].view(np.uint8)):
            problems.append(f"baseline expert_x ({got.shape[0]} rows) differs from the reference ({n} rows)")
        if not np.array_equal(to_numpy(st["tokens_per_expert"]).astype(np.int64),
                              exp.tokens_per_expert.astype(np.int64)):
            problems.append("baseline tokens_per_expert differs from the reference")
        problems += self.verify.check_combine(cfg, y, t, 0)
        problems = self.verify.agree(problems)
        if problems:
            for op in ("dispatch", "combine", "roundtrip"):
                self.records.record("baseline", "nccl", op, cfg, t, status="wrong", error="; ".join(problems[:3]))
            return
        n_sets = len(sets)
        w = self.args.warmup
        tm = self.timer.run(w, self.args.iters, lambda i: sets[i % n_sets],
                            lambda s: bl.dispatch(s["x"], s["ids"], s["w"]))
        self.records.record("baseline", "nccl", "dispatch", cfg, t, verified=True, timing=tm, fmt="bf16")

        def prep_c(i):
            s = sets[i % n_sets]
            return bl.dispatch(s["x"], s["ids"], s["w"])
        tm = self.timer.run(w, self.args.iters, prep_c, lambda st_: bl.combine(st_["expert_x"], st_))
        self.records.record("baseline", "nccl", "combine", cfg, t, verified=True, timing=tm, fmt="bf16")

        def rt(s):
            st_ = bl.dispatch(s["x"], s["ids"], s["w"])
            return bl.combine(st_["expert_x"], st_)
        tm = self.timer.run(w, self.args.iters, lambda i: sets[i % n_sets], rt)
        self.records.record("baseline", "nccl", "roundtrip", cfg, t, verified=True, timing=tm, fmt="bf16")

    def make_buffer(self, cfg):
        self.log(f"EPBuffer: mode {cfg.mode}, layout {cfg.layout}, {cfg.token_format}, "
                 f"max {cfg.max_tokens_per_rank} tokens/rank (creating; builds kernels on first use)")
        return EPBuffer(cfg, self.ctx)

    def run_epcomm_shape(self, case: str, buf, cfg, t: int, ops, graph: bool = False):
        """Verify the first iteration of this shape against the reference, then time each op."""
        a = self.args
        self.log(f"{case} {cfg.token_format} mode {cfg.mode} layout {cfg.layout}{report.capacity_label(cfg)} T={t}: "
                 "inputs, reference, verify")
        sets = self.verify.device_sets(cfg, t)
        n_sets = len(sets)
        ey_buf = self.verify.new_expert_y(cfg)
        s0 = sets[0]
        self.verify.precompute(cfg, t, combine=("combine" in ops or "roundtrip" in ops), extra_set=graph and self.gpu)
        res = buf.dispatch(s0["x"], s0["ids"])
        self.timer.sync()
        problems = self.verify.check_dispatch(cfg, res, t, 0)
        if not problems and ("combine" in ops or "roundtrip" in ops):
            y = buf.combine(self.verify.identity_y(cfg, res, ey_buf), res.handle, s0["w"])
            self.timer.sync()
            problems += self.verify.check_combine(cfg, y, t, 0)
        problems = self.verify.agree(problems)
        sms = buf.sms_used
        if problems:
            for op in ops:
                self.records.record(case, "epcomm", op, cfg, t, status="wrong", error="; ".join(problems[:3]),
                                    sms=sms)
            return
        if graph and self.gpu:
            note = time_graph(self, case, buf, cfg, t, ops, sets, ey_buf, sms)
            if note is None:
                return
            self.log(f"{case} mode {cfg.mode}: CUDA graph not usable ({note}); timing eager calls")
            self.records.notes.append(f"{case} mode {cfg.mode} T={t}: CUDA graph not usable, eager timings "
                                      f"reported: {note}")
        w, it = a.warmup, a.iters
        rt_y = ey_buf  # fp8 round trip: combine reads a preallocated bf16 expert_y (no dequant in the timed region)

        if "dispatch" in ops:
            tm = self.timer.run(w, it, lambda i: sets[i % n_sets], lambda s: buf.dispatch(s["x"], s["ids"]))
            self.records.record(case, "epcomm", "dispatch", cfg, t, verified=True, timing=tm, sms=sms)
        if "combine" in ops:
            def prep_c(i):
                s = sets[i % n_sets]
                r = buf.dispatch(s["x"], s["ids"])
                return r, self.verify.identity_y(cfg, r, ey_buf), s["w"]
            tm = self.timer.run(w, it, prep_c, lambda st: buf.combine(st[1], st[0].handle, st[2]))
            self.records.record(case, "epcomm", "combine", cfg, t, verified=True, timing=tm, sms=sms)
        if "roundtrip" in ops:
            def rt(s):
                r = buf.dispatch(s["x"], s["ids"])
                return buf.combine(r.expert_x if rt_y is None else rt_y, r.handle, s["w"])
            tm = self.timer.run(w, it, lambda i: sets[i % n_sets], rt)
            self.records.record(case, "epcomm", "roundtrip", cfg, t, verified=True, timing=tm, sms=sms)

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
        for cap in self.capacities():
            for fmt in FORMAT_NAMES:
                cfg = self.cfg(fmt, "ht", a.tokens, capacity=cap)
                self.note_capacity(cfg)
                self.with_buffer(cfg, lambda buf: self.run_epcomm_shape(
                    "ht", buf, cfg, a.tokens, ("dispatch", "combine", "roundtrip")))
        self.ht_more_budgets()

    def ht_more_budgets(self):
        """--ht-sms: the ht rows again under each of these SM limits (records carry sms_budget), beside DeepEP's rows
        at the same budgets."""
        a = self.args
        for sms in getattr(a, "ht_sms", []):
            if sms == a.sms:
                continue
            for fmt in FORMAT_NAMES:
                cfg = self.cfg(fmt, "ht", a.tokens).replace(num_sms=sms)
                self.with_buffer(cfg, lambda buf: self.run_epcomm_shape(
                    "ht", buf, cfg, a.tokens, ("dispatch", "combine", "roundtrip")))

    def kernel_configs(self) -> list:
        """The EPConfigs the selected epcomm cases make buffers of, so that a device call can build their kernels
        before the ranks start (dev/device/x2_prebuild.py; the SM budget is not a kernel define)."""
        a, out = self.args, []
        for cap in self.capacities():   # --recv-capacity-factor: its buffers are other specialisations
            if "ht" in a.cases:
                out += [self.cfg(fmt, "ht", a.tokens, capacity=cap) for fmt in FORMAT_NAMES]
            if "ll" in a.cases:
                out += [self.cfg("fp8", mode, a.ll_tokens, layout, capacity=cap)
                        for layout in a.ll_layouts for mode in LL_MODES]
        if "sweep" in a.cases:
            out.append(self.cfg("bf16", "ht", max(a.sweep_tokens)))
        return out

    def case_deepep(self):
        peer_deepep.run_case(self)

    def case_latency(self):
        """The floor's latency term (latency.py); none where ranks share a GPU or on the host backend."""
        if self.records.shared or not self.gpu:
            why = "ranks share a GPU: no link between them" if self.records.shared else "host backend: no GPU"
            self.records.set_latency({"status": "n/a", "reason": why})
            return
        if self.args.latency_us is not None:
            self.log(f"latency: --latency-us {self.args.latency_us} given, not measured")
            return
        try:
            lat = latency.measure(self.torch, self.ctx, self.comm, self.timer, self.args.warmup, self.args.iters,
                                  self.log)
        except Exception as e:  # noqa: BLE001 (the floor loses its latency term; epcomm's rows stand)
            lat = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            self.records.notes.append(f"latency: {lat['reason']}; floors are the bandwidth term alone")
            self.log(f"latency: {lat['reason']}", everyone=True)
        self.records.set_latency(lat)

    def case_ll(self):
        # The low-latency shape over both wire designs, so they can be compared: "ll" (fixed per-expert slots; the
        # rows earlier runs had, first) and "ht" (one message per (token, destination rank)); then both again with
        # the batched output layout (a slab per local expert: what masked / batched expert GEMMs take at decode),
        # unless --no-batched. Same inputs, reference check, ops and graph replay; records differ in "mode" and
        # "layout".
        a = self.args
        for cap in self.capacities():
            for layout in a.ll_layouts:
                for mode in LL_MODES:
                    cfg = self.cfg("fp8", mode, a.ll_tokens, layout, capacity=cap)
                    self.note_capacity(cfg)
                    self.with_buffer(cfg, lambda buf: self.run_epcomm_shape(
                        "ll", buf, cfg, a.ll_tokens, ("dispatch", "combine", "roundtrip"), graph=not a.no_graph))

    def case_sweep(self):
        a = self.args
        cfg = self.cfg("bf16", "ht", max(a.sweep_tokens))

        def body(buf):
            for t in a.sweep_tokens:
                self.run_epcomm_shape("sweep", buf, cfg, t, ("dispatch", "combine"))
        self.with_buffer(cfg, body)
