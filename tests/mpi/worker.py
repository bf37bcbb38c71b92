"""Per-rank worker for tests/mpi: run cases on the host backend, check every rank against epcomm.reference.

    python -m launch run -t cpu-4rank -- python tests/mpi/worker.py cases --seed 123 --case fmt=fp8,mode=ll ...

Case spec: comma-separated key=value: fmt (bf16|fp8), mode (ht|ll), routing (epcomm.workload.ROUTINGS),
tokens (max|ragged|N), fused (0|1), skip (0|1), aws (allreduce_world_size), H, M, K, E (experts per rank),
rounds (back-to-back rounds on one buffer, fresh inputs each, no barrier), async (0|1), cap (recv_capacity_factor;
0 = the worst case; with cap, odd rounds use uniform routing, so over-capacity and fitting rounds alternate: a round
the reference says is over must raise the same EPCapacityError on every rank, the next must be correct).
Server-facing (issue 13): layout (grouped|batched), align (expert_alignment), ecap (expert_capacity, 0 = default),
sfmt (fp32|ue8m0), slayout (row|col), ids64 (int64 topk_ids), prequant (caller-quantised (x_fp8, x_scales)),
out (combine into a poisoned caller tensor), stats (stats_out accumulated over the rounds), mb (two micro-batches:
dispatch A, dispatch B, combine A, combine B, every round).
Exit 0 when every rank matched; prints "FAIL rank R ..." lines otherwise. Other commands: timeout, abort.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import epcomm
from epcomm import reference as ref
from epcomm.checks import Round
from epcomm.workload import identity_experts, make_world

DEFAULTS = dict(fmt="bf16", mode="ht", routing="uniform", tokens="max", fused=0, skip=0, aws=1,
                H=256, M=16, K=4, E=4, rounds=1, timeout=30.0, dup=0, cap=0.0, layout="grouped", align=1, ecap=0,
                sfmt="fp32", slayout="row", ids64=0, prequant=0, out=0, stats=0, mb=0, **{"async": 0})


def add_duplicates(world):
    """Every other token picks its first expert twice (slots 0 and 1): the spec delivers both slots."""
    for ids in world.topk_ids:
        if ids.shape[1] > 1 and len(ids):
            ids[::2, 1] = ids[::2, 0]
    return world


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
                           world_size=world, token_format=c["fmt"], mode=c["mode"],
                           fused_shared_expert=bool(c["fused"]),
                           skip_a2a=bool(c["skip"]), allreduce_world_size=c["aws"], timeout_s=c["timeout"],
                           recv_capacity_factor=c["cap"] or None,
                           layout=c["layout"], expert_alignment=c["align"], expert_capacity=c["ecap"] or None,
                           scale_format=c["sfmt"], scale_layout=c["slayout"])


def caller_quantised(cfg, world, seed: int):
    """Replace every rank's x by a caller-quantised pair whose scales epcomm would not compute itself (each row's
    scales times a power of two), so a backend that re-derives or drops them fails."""
    rng = np.random.default_rng(seed)
    for r, x in enumerate(world.xs):
        q, s = cfg.token_format.quantize(x, cfg.scale_format)
        s = (s * np.exp2(rng.integers(-3, 4, size=(len(x), 1)))).astype(np.float32)
        world.xs[r] = (q, s)
    return world


def tokens_arg(c):
    t = c["tokens"]
    return None if t == "max" else ("ragged" if t == "ragged" else int(t))


def check_overflow(cfg, ctx, buf, world, use_async: bool, want: epcomm.EPCapacityError) -> list[str]:
    """A round the reference says is over capacity: this rank raises the same EPCapacityError and nothing else."""
    me = ctx.rank
    try:
        if use_async:
            buf.dispatch_wait(buf.dispatch_async(world.xs[me], world.topk_ids[me]))
        else:
            buf.dispatch(world.xs[me], world.topk_ids[me])
    except epcomm.EPCapacityError as e:
        got = (e.rank, e.needed, e.capacity, e.overflowing)
        exp = (want.rank, want.needed, want.capacity, want.overflowing)
        return [] if got == exp and f"rank {want.rank} " in str(e) else [f"EPCapacityError {got}, expected {exp}"]
    return [f"no EPCapacityError although rank {want.rank} needs {want.needed} rows > {want.capacity}"]


def capacity_verdict(cfg, world) -> epcomm.EPCapacityError | None:
    """The reference's EPCapacityError for this world's round (None: it fits, or no capacity was set)."""
    if cfg.recv_capacity_factor is None:
        return None
    try:
        ref.check_capacity(cfg, world.topk_ids)
    except epcomm.EPCapacityError as want:
        check_round.overflows += 1
        return want
    check_round.fits += 1
    return None


class RoundCalls:
    """One round's calls with the case's server-facing options (int64 ids, stats_out, out=); a round the reference
    says is over the receive capacity must raise the same EPCapacityError instead (and has no combine)."""

    def __init__(self, cfg, ctx, buf, world, c: dict, use_async: bool, stats):
        self.cfg, self.ctx, self.buf, self.c, self.use_async, self.stats = cfg, ctx, buf, c, use_async, stats
        self.world = world
        self.over = capacity_verdict(cfg, world)
        self.rnd = Round(cfg, world, ctx.rank, experts="distinct")
        self.x, ids, self.weights = self.rnd.inputs()
        self.ids = ids.astype(np.int64) if c["ids64"] else ids

    def dispatch(self) -> list[str]:
        if self.over is not None:
            return check_overflow(self.cfg, self.ctx, self.buf, self.world, self.use_async, self.over)
        buf, kw = self.buf, {"stats_out": self.stats} if self.stats is not None else {}
        if self.use_async:
            self.out = buf.dispatch_wait(buf.dispatch_async(self.x, self.ids, **kw))
        else:
            self.out = buf.dispatch(self.x, self.ids, **kw)
        return ["dispatch: " + p for p in self.rnd.check_dispatch(self.out)]

    def combine(self) -> list[str]:
        if self.over is not None:
            return []
        buf, out = self.buf, self.out
        my_ey = self.rnd.expert_y(out, poison_tail=True)   # rows without a token must never be read
        t = len(self.rnd.inputs()[1])
        kw = {}
        if self.c["out"]:
            kw["out"] = np.full((t, self.cfg.hidden), np.nan, np.float32).astype(epcomm.formats.BF16)
        if self.use_async:
            y = buf.combine_wait(buf.combine_async(my_ey, out.handle, self.weights, **kw))
        else:
            y = buf.combine(my_ey, out.handle, self.weights, **kw)
        problems = ["combine: " + p for p in self.rnd.check_combine(y)]
        if "out" in kw and y is not kw["out"]:
            problems.append("combine(out=y) did not return the caller's array")
        if y.dtype != np.dtype(epcomm.formats.BF16) or y.shape != (t, self.cfg.hidden):
            problems.append(f"combine output {y.dtype}{list(y.shape)}")
        return problems

    def expected_counts(self) -> np.ndarray:
        if self.over is not None:   # a void round delivers nothing: stats_out is not touched
            return np.zeros(self.cfg.n_local_experts, np.int64)
        return self.rnd.dispatch.tokens_per_expert.astype(np.int64)


def check_round(cfg, ctx, buf, worlds, c: dict, use_async: bool, stats) -> tuple[list[str], np.ndarray]:
    """One world: dispatch, combine. Two (mb=1): dispatch A, dispatch B, combine A, combine B on the same buffer.
    Returns the problems and the rows each local expert should have received (for stats_out)."""
    calls = [RoundCalls(cfg, ctx, buf, w, c, use_async, stats) for w in worlds]
    problems = []
    for i, rc in enumerate(calls):
        problems += [f"batch {i} {p}" if len(calls) > 1 else p for p in rc.dispatch()]
    for i, rc in enumerate(calls):
        problems += [f"batch {i} {p}" if len(calls) > 1 else p for p in rc.combine()]
    return problems, sum(rc.expected_counts() for rc in calls)


check_round.overflows = check_round.fits = 0


def cmd_cases(args, ctx) -> int:
    fails = 0
    t0 = time.perf_counter()
    for i, spec in enumerate(args.case):
        c = parse_case(spec)
        cfg = make_cfg(c, ctx.world_size)
        stats = np.zeros(cfg.n_local_experts, np.int64) if c["stats"] else None
        counted = np.zeros(cfg.n_local_experts, np.int64)
        with epcomm.EPBuffer(cfg, ctx) as buf:
            for rnd in range(c["rounds"]):
                seed = args.seed + 1000 * i + rnd
                worlds = []
                for b in range(2 if c["mb"] else 1):
                    # with cap, odd rounds route uniformly: over-capacity and fitting rounds alternate
                    routing = "uniform" if c["cap"] and (rnd + b) % 2 else c["routing"]
                    world = make_world(cfg, seed + 500 * b, routing, tokens_arg(c))
                    if c["dup"]:
                        add_duplicates(world)
                    if c["prequant"]:
                        caller_quantised(cfg, world, seed + 500 * b)
                    worlds.append(world)
                problems, counts = check_round(cfg, ctx, buf, worlds, c, bool(c.get("async", 0)) or (rnd % 3 == 2),
                                               stats)
                counted += counts
                if stats is not None and not np.array_equal(stats, counted):
                    problems.append(f"stats_out {stats.tolist()} != received rows {counted.tolist()}")
                for p in problems:
                    print(f"FAIL rank {ctx.rank} case [{spec}] seed {seed} round {rnd}: {p}", flush=True)
                fails += bool(problems)
    total = ctx.comm.allreduce(fails)
    if ctx.rank == 0:
        print(f"capacity: {check_round.overflows} round(s) over, {check_round.fits} within", flush=True)
        print(f"worker: {len(args.case)} case(s) on {ctx.world_size} ranks, seed {args.seed}: "
              f"{'ok' if total == 0 else f'{total} FAILED'} in {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if total else 0


def cmd_fault(args, ctx) -> int:
    """timeout: run with EPCOMM_FAULT=skip_dispatch:...; abort: rank args.bad_rank passes bad input in round 1."""
    c = parse_case(args.case[0] if args.case else "")
    for item in args.deadline:      # RANK=S: this rank gets its own timeout_s (so one rank gives up first)
        r, _, s = item.partition("=")
        if int(r) == ctx.rank:
            c["timeout"] = float(s)
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
        time.sleep(args.linger)     # the first rank to exit ends the job: give the peers time to print theirs
        os._exit(3)
    print(f"rank {ctx.rank}: no error", flush=True)
    return 0


def expect_input_error(what: str, fn, needle: str) -> list[str]:
    try:
        fn()
    except epcomm.EPInputError as e:
        msg = str(e)
        if needle not in msg or "\n" in msg:
            return [f"{what}: message {msg!r} lacks {needle!r} or is not one line"]
        return []
    except Exception as e:  # noqa: BLE001
        return [f"{what}: raised {type(e).__name__}: {e} instead of EPInputError"]
    return [f"{what}: no error"]


def _batched_combine_shape(cfg, ctx, x, ids, w):
    """A grouped-layout expert_y given to a batched-layout buffer."""
    from epcomm.formats import BF16
    b = epcomm.EPBuffer(cfg.replace(layout="batched"), ctx)
    out = b.dispatch(x, ids)
    b.combine(np.zeros((cfg.max_recv_rows, cfg.hidden), BF16), out.handle, w)


def cmd_checks(args, ctx) -> int:
    """Input checks on a world of one rank (an abort there bothers nobody)."""
    from epcomm.formats import BF16
    cfg = make_cfg(parse_case("M=8,K=2,E=4,H=256"), ctx.world_size)
    world = make_world(cfg, args.seed)
    x, ids, w = world.xs[0], world.topk_ids[0], world.topk_weights[0]
    probs = []

    def fresh():
        return epcomm.EPBuffer(cfg, ctx)

    def disp(xx, ii):
        return lambda: fresh().dispatch(xx, ii)

    probs += expect_input_error("3-D x", disp(x[None], ids), "2-D")
    probs += expect_input_error("wrong hidden", disp(np.zeros((8, 384), BF16), ids), "hidden=256")
    probs += expect_input_error("float32 x", disp(x.astype(np.float32), ids), "bfloat16")
    probs += expect_input_error("uint16 x", disp(x.view(np.uint16), ids), "bfloat16")
    probs += expect_input_error("too many tokens", disp(np.zeros((9, 256), BF16), np.zeros((9, 2), np.int32)),
                                "max_tokens_per_rank=8")
    probs += expect_input_error("int16 ids", disp(x, ids.astype(np.int16)), "int32 or int64")
    probs += expect_input_error("ids shape", disp(x, ids[:, :1]), "topk=2")
    probs += expect_input_error("id too big", disp(x, np.full_like(ids, cfg.num_experts)), "got 4")
    probs += expect_input_error("id -2", disp(x, np.full_like(ids, -2)), "got -2")
    probs += expect_input_error("list x", disp(x.tolist(), ids), "numpy / torch / cupy")
    probs += expect_input_error("world size", lambda: epcomm.EPBuffer(cfg.replace(world_size=2, num_experts=8), ctx),
                                "world_size=2")
    b = fresh()
    out = b.dispatch(x, ids)
    ey = np.zeros((cfg.max_recv_rows, cfg.hidden), BF16)
    probs += expect_input_error("weights T", lambda: b.combine(ey, out.handle, w[:3]), "T=8")
    b = fresh()
    out = b.dispatch(x, ids)
    probs += expect_input_error("weights dtype", lambda: b.combine(ey, out.handle, w.astype(np.float64)), "float32")
    b = fresh()
    out = b.dispatch(x, ids)
    probs += expect_input_error("expert_y rows", lambda: b.combine(ey[:5], out.handle, w), "max_recv_rows")
    b = fresh()
    out = b.dispatch(x, ids)
    probs += expect_input_error("foreign handle", lambda: fresh().combine(ey, out.handle, w), "this EPBuffer")
    b = fresh()
    live = [b.dispatch(x, ids), b.dispatch(x, ids)]     # held, not combined: both still live
    probs += expect_input_error("third outstanding dispatch", lambda: b.dispatch(x, ids), "at most 2 dispatches")
    del live
    b = fresh()
    live = [b.dispatch(x, ids), b.dispatch(x, ids)]
    b.release(live[0].handle)       # it will not be combined: its set may be reused
    b.combine(ey, b.dispatch(x, ids).handle, w)
    b.combine(ey, live[1].handle, w)
    del live
    b = fresh()
    old = b.dispatch(x, ids)          # never combined: dispatch round 2 would overwrite it
    b.combine(ey, b.dispatch(x, ids).handle, w)
    probs += expect_input_error("reuse of a live round's set", lambda: b.dispatch(x, ids), "at most 2 dispatches")
    del old
    b = fresh()
    for _ in range(4):        # results dropped: nothing can combine them, so they are not outstanding
        b.dispatch(x, ids)
    b = fresh()
    probs += expect_input_error("stats_out shape", lambda: b.dispatch(x, ids, stats_out=np.zeros(3, np.int64)),
                                "n_local_experts=4")
    b = fresh()
    out = b.dispatch(x, ids)
    probs += expect_input_error("out shape", lambda: b.combine(ey, out.handle, w, out=np.zeros((3, 256), BF16)),
                                "T=8")
    b = fresh()
    out = b.dispatch(x, ids)
    probs += expect_input_error("out dtype", lambda: b.combine(ey, out.handle, w, out=np.zeros((8, 256), np.float32)),
                                "bfloat16")
    b = fresh()
    probs += expect_input_error("pair on bf16", disp((x, np.zeros((8, 2), np.float32)), ids), "quantised")
    fp8 = cfg.replace(token_format="fp8")
    q, sc = fp8.token_format.quantize(x)
    probs += expect_input_error("scales shape", lambda: epcomm.EPBuffer(fp8, ctx).dispatch((q, sc[:, :1]), ids),
                                "scale_cols=2")
    probs += expect_input_error("batched expert_y", lambda: _batched_combine_shape(cfg, ctx, x, ids, w),
                                "n_local_experts=4, capacity=")
    b = fresh()
    out = b.dispatch(x, ids)
    b.combine(ey, out.handle, w)
    probs += expect_input_error("combined twice", lambda: b.combine(ey, out.handle, w), "already combined")
    # a refused call leaves the buffer usable (host backend); a good one still works after 0-token rounds
    try:
        out = b.dispatch(x, ids)
        b.combine(ey, out.handle, w)
    except epcomm.EPError as e:
        probs.append(f"buffer not usable after a refused call: {e}")
    with fresh() as b:
        out = b.dispatch(x[:0], ids[:0])
        y = b.combine(ey, out.handle, w[:0])
        if y.shape != (0, 256):
            probs.append(f"T=0 combine shape {y.shape}")
    from epcomm.backends.host import faults
    probs += expect_input_error("fault syntax", lambda: faults.parse("explode:rank=1"), "unknown fault")
    f = faults.parse("slow:rank=1,ms=50; skip_dispatch:rank=*,round=3")
    if not (f[0].ms == 50 and f[1].rank is None and f[1].round == 3):
        probs.append(f"fault parse {f}")
    from epcomm.topology import Topology
    probs += expect_input_error("topology mismatch", lambda: epcomm.init(topology=Topology.single_node(3)),
                                "world_size 3")
    if epcomm.init() is not ctx:
        probs.append("init() is not idempotent")
    if not (ctx.same_node(0, 0) and ctx.node_of(0) == 0):
        probs.append("same_node / node_of")
    from epcomm.context import finalize
    b = fresh()
    finalize()
    if not b._closed:
        probs.append("finalize() left a buffer open")
    if epcomm.init() is ctx:
        probs.append("init() after finalize() returned the old context")
    for p in probs:
        print("FAIL checks:", p, flush=True)
    print(f"checks: {'ok' if not probs else f'{len(probs)} FAILED'}", flush=True)
    return 1 if probs else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("cases", "timeout", "abort", "checks"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--bad-rank", type=int, default=1)
    ap.add_argument("--deadline", action="append", default=[], metavar="RANK=S",
                    help="timeout/abort: timeout_s of one rank (overrides the case's timeout there)")
    ap.add_argument("--linger", type=float, default=0.0, metavar="S",
                    help="timeout/abort: seconds to wait after reporting an error before exiting")
    args = ap.parse_args()
    ctx = epcomm.init()
    if args.cmd == "cases":
        return cmd_cases(args, ctx)
    if args.cmd == "checks":
        return cmd_checks(args, ctx)
    return cmd_fault(args, ctx)


if __name__ == "__main__":
    sys.exit(main())
