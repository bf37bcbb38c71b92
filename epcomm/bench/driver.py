"""python -m epcomm.bench: the command line, and the run on every rank (the cases: cases.py).

Run it under the launcher (one rank per GPU):
    python -m launch bench -t configs/local-2gpu.yaml --timeout 600 -- --json bench.json --png bench.png
Cases: links (copy-engine peer and device copy bandwidth; GPU only), baseline (NCCL all_to_all_single; GPU only),
ht (4096 tokens, bf16 and fp8 dispatch, bf16 combine, mode "ht"), ll (128 tokens, fp8 dispatch + bf16 combine,
CUDA graph replay on GPU; once with mode "ll", then the same shape with mode "ht": records differ in "mode"; then
both again with layout "batched", a slab per local expert: records differ in "layout"; --no-batched skips those),
sweep (tokens 1..4096, powers of 2, mode "ht", bf16), deepep (DeepEP beside epcomm when `deep_ep` imports: its
high-throughput kernels at every --peer-sms budget, its low-latency ones in a process without epcomm's NVSHMEM:
epcomm/bench/peer_deepep.py), latency (the floor's latency term: an empty launch and a flag round trip to each peer,
epcomm/bench/latency.py; last, so that the epcomm cases' first buffer sizes NVSHMEM's heap).
--recv-capacity-factor F repeats the ht and ll shapes with that receive capacity (EPConfig.recv_capacity_factor):
worst-case and capacity rows of one run, "capacity" F in the latter's records.
Every epcomm and baseline shape is checked against epcomm.reference on its first iteration; a wrong result is
reported as "wrong" and its timings are withheld (exit status 1).
--compare RECORDED.json checks that this run reproduces a recorded one (epcomm.bench.compare): exit status 3 when
every result is right but some row is slower than the recorded one by more than --tolerance, or failed, or missing;
2 when the recorded run has other shapes (found before anything runs).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from ..context import init

from . import compare, peer_deepep, report
from .cases import LL_LAYOUTS, Bench

CASES = ("links", "baseline", "deepep", "ht", "ll", "sweep", "latency")


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
    ap.add_argument("--no-batched", action="store_true",
                    help="ll case: measure the default output layout only (not also layout 'batched')")
    ap.add_argument("--recv-capacity-factor", type=float, default=None, metavar="F",
                    help="ht and ll cases: after each shape at the default receive capacity (the worst case), the "
                         "same shape again with EPConfig.recv_capacity_factor=F (rows marked capacity F); default off")
    ap.add_argument("--backend", choices=("auto", "host", "gpu"), default="auto")
    ap.add_argument("--compare", metavar="PATH",
                    help="a recorded run's JSON (e.g. docs/perf/bench-local-2gpu.json): after the run, print the rows "
                         "that differ by more than --tolerance and exit 3 if any is slower, failed or missing "
                         "(checked for the same shapes before anything runs)")
    ap.add_argument("--tolerance", type=float, default=compare.DEFAULT_TOLERANCE,
                    help=f"--compare: relative band of 'same' (default {compare.DEFAULT_TOLERANCE:g})")
    add_peer_and_latency_options(ap)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--case: unknown {bad}; choose from {','.join(CASES)}")
    args.cases = cases
    args.ll_layouts = list(LL_LAYOUTS[:1] if args.no_batched else LL_LAYOUTS)
    if args.sets < 4:
        ap.error("--sets must be >= 4 (inputs rotate so caches do not serve repeated data)")
    if not args.tolerance > 0:
        ap.error("--tolerance must be > 0")
    if args.recv_capacity_factor is not None and not args.recv_capacity_factor > 0:
        ap.error("--recv-capacity-factor must be > 0")
    check_peer_and_latency_options(ap, args)
    return args


def _sm_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_peer_and_latency_options(ap) -> None:
    """Options of the deepep and latency cases and of the ht case's extra SM budgets (issue 16)."""
    ap.add_argument("--ht-sms", type=_sm_list, default=[], metavar="N,N",
                    help="ht case: also measure epcomm at these SM budgets (e.g. 24,66: DeepEP's rows' budgets)")
    ap.add_argument("--peer-sms", type=_sm_list, default=[24, 66, 132], metavar="N,N",
                    help="deepep case: SM budgets of DeepEP's high-throughput kernels (even; default 24,66,132)")
    ap.add_argument("--peer-json", metavar="PATH",
                    help="import the DeepEP rows of an earlier `--case deepep` run (same inputs and shapes) instead "
                         "of running DeepEP in this process")
    ap.add_argument("--latency-us", type=float, default=None,
                    help="the floor's per-op latency term when the latency case is not run (us)")


def check_peer_and_latency_options(ap, args) -> None:
    if any(v <= 0 or v % 2 for v in args.peer_sms):
        ap.error("--peer-sms: DeepEP needs even SM counts > 0")
    if any(v <= 0 for v in args.ht_sms):
        ap.error("--ht-sms: SM budgets must be > 0")
    if args.latency_us is not None and args.latency_us < 0:
        ap.error("--latency-us must be >= 0")


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


def main(argv=None) -> int:
    args = parse(argv)
    ctx = init(backend=args.backend)
    comm = ctx.comm if ctx.comm is not None else SelfComm()
    resolve_shapes(args, ctx.backend, getattr(ctx.topology, "num_experts", None))
    torch = None
    devices = None
    if ctx.backend == "gpu":
        import torch  # the GPU runs only
        torch.cuda.set_device(ctx.device)
        p = torch.cuda.get_device_properties(ctx.device)
        devices = comm.allgather({"rank": ctx.rank, "device": ctx.device, "name": p.name,
                                  "sms": p.multi_processor_count,
                                  "memory_gib": round(p.total_memory / 2**30, 1)})
    bench = Bench(args, ctx, comm, torch, devices)
    log = bench.log
    records = bench.records
    doc = records.doc        # the one document: cases append to it, every save and the end write it
    if records.shared:
        log(f"note: {records.shared}")
    log(f"{ctx.world_size} ranks, topology {ctx.topology.name}, backend {ctx.backend}, cases {','.join(args.cases)}, "
        f"hidden {args.hidden}, top-{args.topk} of {args.experts}, ht {args.tokens} / ll {args.ll_tokens} tokens, "
        f"iters {args.iters}, warmup {args.warmup}, sets {args.sets}")
    if ctx.backend != "gpu":
        records.set_links({"status": "n/a", "reason": "host backend: no GPU copy engine"})
    recorded, why = None, None
    if args.compare and ctx.rank == 0:   # before anything runs: a wrong file must not cost a whole run
        try:
            recorded = compare.load(args.compare)
            for w in compare.check_comparable(recorded, doc):
                log(f"--compare: {w}")
        except compare.NotComparable as e:
            why = str(e)
    why = comm.bcast(why, root=0)
    if why:
        if ctx.rank == 0:
            print(f"epcomm.bench: --compare {args.compare}: {why}", file=sys.stderr, flush=True)
        return 2

    for case in CASES:  # fixed order: links first (floor), baseline before epcomm buffers exist, latency last
        if case not in args.cases:
            continue
        t0 = time.perf_counter()
        try:
            getattr(bench, f"case_{case}")()
        except Exception as e:  # noqa: BLE001
            msg = f"{case}: {type(e).__name__}: {e}"
            print(f"[bench rank {ctx.rank}] {msg}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            records.errors.append(msg)
        records.merge_errors()
        log(f"{case}: done in {time.perf_counter() - t0:.1f}s")
        records.refresh()
        if ctx.rank == 0 and args.json:    # after every case: a crash later leaves the cases done so far
            report.write_json(doc, args.json)

    if args.peer_json and ctx.rank == 0:
        peer_deepep.import_rows(doc, args.peer_json, log)
    records.refresh()
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
