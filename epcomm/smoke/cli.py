"""`python -m epcomm.smoke`: is this cluster fit for EP traffic, and if not, where is it broken?

Run on every rank (`python -m launch smoke -t CONFIG -- [options]`). Rank 0 coordinates: before each stage it
waits (with a deadline) for every rank to report ready, starts the stage, collects each rank's result (with a
deadline), and decides. A rank that does not arrive or does not answer is named; then rank 0 writes the report
and aborts the job (MPI_Abort), so one stuck rank cannot hang the smoke test. Stages: inventory, links, ep, speed.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..provenance import code_identity
from . import analysis, report as rep
from .analysis import STAGES, Failure
from .comm import READY, RESULT, START, STOP_TAG, Deadline, Messenger, StageTimeout, guarded, tag

EXIT_USAGE = 2


@dataclass
class Options:
    json: str | None = "smoke-report.json"
    png: str | None = "smoke-links.png"
    stage_timeout: float = 60.0       # main() raises the default to 300 on GPU configs (first-use kernel builds)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    quick: bool = False
    link_method: str = "auto"
    bw_factor: float | None = None    # None: 0.5 on GPU configs, 0.2 on host configs (see _analyse_links)
    lat_factor: float = analysis.LAT_FACTOR
    lat_slack_us: float | None = None
    slow_factor: float = analysis.SLOW_FACTOR


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(prog="python -m epcomm.smoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m launch smoke -t cpu-2x4 -- --quick --json out.json")
    ap.add_argument("--json", default="smoke-report.json", metavar="PATH",
                    help="write the JSON report here (schema docs/SMOKE.md; '' = none)")
    ap.add_argument("--png", default="smoke-links.png", metavar="PATH",
                    help="write the pair-bandwidth heatmap here ('' = none)")
    ap.add_argument("--stage-timeout", type=float, default=None, metavar="S",
                    help="deadline of each stage and of each wait for a rank (default 60 on host configs, "
                         "300 on GPU configs: the EP stage builds kernels on first use)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    ap.add_argument("--quick", action="store_true", help="smaller messages, fewer repetitions and EP cases")
    ap.add_argument("--link-method", choices=("auto", "peer", "mpi"), default="auto",
                    help="GPU configs: auto/peer = CUDA peer copies for pairs on one host, MPI for others; "
                         "mpi = MPI host-memory RMA everywhere")
    ap.add_argument("--bw-factor", type=float, default=None,
                    help="flag a pair below this x the median bandwidth of its class (default 0.5 on GPU configs; "
                         "0.2 on host configs, whose CPU-timed copies swing 2x on busy cores)")
    ap.add_argument("--lat-factor", type=float, default=analysis.LAT_FACTOR,
                    help="flag a pair above this x the median latency of its class (default 3)")
    ap.add_argument("--lat-slack-us", type=float, default=None,
                    help="...and at least this many us above it (default 50 on host configs, 5 on GPU)")
    ap.add_argument("--slow-factor", type=float, default=analysis.SLOW_FACTOR,
                    help="flag a rank whose EP time is above this x the median (default 2)")
    a = ap.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
    if a.stage_timeout is not None and a.stage_timeout <= 0:
        ap.error("--stage-timeout must be > 0")
    return Options(json=a.json or None, png=a.png or None, stage_timeout=a.stage_timeout or 0.0,
                   stages=[s for s in STAGES if s in stages], quick=a.quick, link_method=a.link_method,
                   bw_factor=a.bw_factor, lat_factor=a.lat_factor, lat_slack_us=a.lat_slack_us,
                   slow_factor=a.slow_factor)


@dataclass
class StageEnv:
    """What a stage function of one rank gets."""
    comm: Any
    msgr: Messenger
    rank: int
    world: int
    topo: Any
    opts: Options
    faults: Any
    gpu: bool
    device: int | None
    stage_index: int = 0
    payload: dict | None = None
    deadline: Deadline | None = None
    talking_to: int | None = None   # the peer a stage is exchanging data with now: if the stage hangs, it is the suspect


def _stage_fn(name: str):
    if name == "inventory":
        from .inventory import probe

        def inv(env: StageEnv):
            node, local = env.topo.rank_to_node(env.rank)
            return probe(env.rank, node, local, env.device, env.topo.has_gpus)
        return inv
    if name == "links":
        from . import links
        return links.run
    from . import ep
    return ep.run_correctness if name == "ep" else ep.run_speed


def run_local(name: str, env: StageEnv, threaded: bool) -> dict[str, Any]:
    """This rank's part of a stage under the stage deadline: {status, value, error, duration_s}."""
    t0 = time.monotonic()
    env.deadline = Deadline(max(0.5, env.opts.stage_timeout - 1.0))
    env.talking_to = None
    out: dict[str, Any] = {"rank": env.rank, "status": "ok", "value": None, "error": None}

    def body():
        if env.gpu and env.device is not None and name != "inventory":
            try:
                import torch
                torch.cuda.set_device(env.device)   # the current device is per thread
            except Exception:
                pass
            try:
                from cuda.core import Device
                Device(env.device).set_current()    # same primary context, for cuda.core / driver calls
            except Exception:
                pass
        return _stage_fn(name)(env)
    try:
        out["value"] = guarded(body, env.opts.stage_timeout, name, threaded)
    except StageTimeout as e:
        peer = e.waited_on if e.waited_on is not None else env.talking_to
        why = str(e) if peer is None or e.waited_on is not None else f"{e} (stuck talking to rank {peer})"
        out.update(status="timeout", error=why, waited_on=peer)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        out.update(status="error", error=f"{type(e).__name__}: {e}", traceback=tb[-6:])
    out["duration_s"] = round(time.monotonic() - t0, 3)
    return out


# ------------------------------------------------------------------------------------------------ rank 0

class Coordinator:
    def __init__(self, env: StageEnv, threaded: bool):
        self.env = env
        self.threaded = threaded
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        topo = env.topo
        self.places = analysis.place_table(topo.rank_table())
        self.failures: list[Failure] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self.inventory: dict[int, dict] = {}
        self.abort = False

    def _place(self, r: int) -> analysis.Place:
        return self.places[r]

    def _timeout(self, stage: str, r: int, why: str, waited_on: int | None = None) -> None:
        pl = self._place(r)
        self.failures.append(Failure(stage, "timeout", f"{pl.name()} {why}", rank=r, node=pl.node, host=pl.host,
                                     device=pl.device, waited_on=waited_on))
        self.abort = True

    def run(self) -> int:
        env, opts = self.env, self.env.opts
        others = list(range(1, env.world))
        for name in STAGES:
            if name not in opts.stages:
                continue
            i = STAGES.index(name)
            t_stage = time.monotonic()
            env.faults.maybe_hang(0, name)
            _, missing = env.msgr.collect(others, tag(i, READY), Deadline(opts.stage_timeout))
            if missing:
                for r in missing:
                    self._timeout(name, r, f"did not arrive at stage {name} within {opts.stage_timeout:g}s "
                                           f"(hung or dead)")
                self.stages[name] = {"status": "timeout", "duration_s": round(time.monotonic() - t_stage, 3),
                                     "missing_ranks": missing}
                break
            payload = self._payload(name)
            env.msgr.send_all(payload, others, tag(i, START))
            env.stage_index, env.payload = i, payload
            own = run_local(name, env, self.threaded)
            got, missing = env.msgr.collect(others, tag(i, RESULT), Deadline(opts.stage_timeout + 5.0))
            results = {0: own, **got}
            st = self._analyse(name, results, missing)
            st["duration_s"] = round(time.monotonic() - t_stage, 3)
            self.stages[name] = st
            if self.abort:
                break
        return self._finish()

    def _payload(self, name: str) -> dict[str, Any]:
        if name != "links":
            return {}
        hosts = {str(r): inf.get("hostname") for r, inf in self.inventory.items()}
        uuids = {str(r): (inf.get("gpu") or {}).get("uuid") for r, inf in self.inventory.items()}
        return {"nonce": random.randrange(1, 1 << 30), "hostnames": hosts, "uuids": uuids}

    def _analyse(self, name: str, results: dict[int, dict], missing: list[int]) -> dict[str, Any]:
        st: dict[str, Any] = {"status": "ok"}
        n_before = len(self.failures)
        for r in missing:
            self._timeout(name, r, f"did not report its {name} result within {self.env.opts.stage_timeout + 5:g}s")
        st["per_rank_status"] = [results[r]["status"] if r in results else "missing" for r in range(self.env.world)]
        for r, res in sorted(results.items()):
            if res["status"] == "timeout":
                self._timeout(name, r, f"stuck in stage {name}: {res['error']}", res.get("waited_on"))
            elif res["status"] == "error":
                pl = self._place(r)
                self.failures.append(Failure(name, "stage_error", f"{pl.name()}: {res['error']}", rank=r,
                                             node=pl.node, host=pl.host, device=pl.device))
        errors = {r: {k: res.get(k) for k in ("status", "error", "traceback", "duration_s")}
                  for r, res in results.items() if res["status"] != "ok"}
        if errors:
            st["rank_errors"] = {str(r): e for r, e in errors.items()}
        values = {r: res["value"] for r, res in results.items() if res["status"] == "ok"}
        getattr(self, f"_analyse_{name}")(st, values)
        new = self.failures[n_before:]
        if any(f.what == "timeout" for f in new):
            st["status"] = "timeout"
        elif any(f.what == "stage_error" for f in new) and not values:
            st["status"] = "error"
        elif any(f.severity == "fail" for f in new):
            st["status"] = "fail"
        st["failures"] = [f.to_dict() for f in new]
        return st

    def _analyse_inventory(self, st: dict, values: dict[int, Any]) -> None:
        self.inventory = {r: v for r, v in values.items() if v}
        hostnames = {r: v.get("hostname") for r, v in self.inventory.items()}
        self.places = analysis.place_table(self.env.topo.rank_table(), hostnames)
        per_rank = [self.inventory.get(r) for r in range(self.env.world)]
        st["per_rank"] = per_rank
        self.failures += analysis.check_inventory(per_rank, self.places, self.env.topo.has_gpus)
        if self.env.topo.shares_gpus:   # `share_gpus: true`: the report says so next to the rank table
            st["shared_gpus"] = self.env.topo.sharing_lines()

    def _analyse_links(self, st: dict, values: dict[int, Any]) -> None:
        from . import links
        opts = self.env.opts
        pairs = links.merge(values, self.env.world)
        slack = opts.lat_slack_us if opts.lat_slack_us is not None else (5.0 if self.env.gpu else 50.0)
        bw_factor = opts.bw_factor if opts.bw_factor is not None else (analysis.BW_FACTOR if self.env.gpu else 0.2)
        medians = analysis.flag_links(pairs, bw_factor, opts.lat_factor, slack)
        if self.env.topo.shares_gpus:
            analysis.drop_speed_flags(pairs)
            st["note"] = analysis.SHARED_GPU_NOTE
        bw, lat = links.matrices(pairs, self.env.world)
        for v in values.values():
            for s in v.get("stuck_senders", []):
                self._timeout("links", s, "did not finish its link measurements before the stage deadline")
        self.failures += analysis.link_failures(pairs, self.places, medians)
        sz = next((v.get("sizes") for v in values.values() if v), None)
        methods = sorted({p.get("method") for p in pairs if p.get("method")})
        st.update(pairs=pairs, medians=medians, bandwidth_gbps=bw, latency_us=lat, sizes=sz, methods=methods,
                  thresholds={"bw_factor": bw_factor, "lat_factor": opts.lat_factor, "lat_slack_us": slack})
        notes = sorted({p["note"] for p in pairs if p.get("note")})
        if notes:
            st["notes"] = notes

    def _analyse_ep(self, st: dict, values: dict[int, Any]) -> None:
        st["per_rank"] = {str(r): v for r, v in values.items()}
        names = []
        for v in values.values():
            for c in v.get("cases", []):
                if c["name"] not in names:
                    names.append(c["name"])
        summary = []
        for cname in names:
            recs = {r: c for r, v in values.items() for c in v.get("cases", []) if c["name"] == cname}
            statuses = {c.get("status", "error") for c in recs.values()}
            status = "ok" if statuses <= {"ok"} else ("skipped" if statuses <= {"skipped", "ok"} else
                                                      "error" if "error" in statuses else "mismatch")
            summary.append({"name": cname, "status": status, "shape": next(iter(recs.values())).get("shape")})
            bad = {r: c for r, c in recs.items() if c.get("status") == "mismatch"}
            if bad:
                self.failures += self._ep_blame(cname, bad)
            for r, c in sorted(recs.items()):
                if c.get("status") == "error":
                    tr = c.get("timeout_rank")
                    if tr is not None and 0 <= tr < self.env.world:
                        pl = self._place(tr)
                        self.failures.append(Failure("ep", "ep_timeout", f"{cname}: rank {r} waited in vain for "
                                                     f"{pl.name()}: {c['error']}", rank=tr, node=pl.node,
                                                     host=pl.host, device=pl.device))
                    else:
                        pl = self._place(r)
                        self.failures.append(Failure("ep", "ep_error", f"{cname}: {pl.name()}: {c['error']}",
                                                     rank=r, node=pl.node, host=pl.host, device=pl.device))
                elif c.get("status") == "skipped":
                    self.failures.append(Failure("ep", "ep_skipped", f"{cname}: {c.get('error')}", rank=r,
                                                 severity="warn"))
        st["cases"] = summary

    def _ep_blame(self, cname: str, bad: dict[int, dict]) -> list[Failure]:
        """One failure per guilty source when every wrong receiver blames it; else one per wrong receiver."""
        blamed: dict[int, list[int]] = {}
        for r, c in bad.items():
            for s in c.get("bad_sources", []):
                blamed.setdefault(s, []).append(r)
        common = [s for s, rs in blamed.items() if len(rs) == len(bad)]
        if len(common) == 1 and len(bad) > 1:
            s = common[0]
            pl = self._place(s)
            return [Failure("ep", "ep_mismatch", f"{cname}: rows sent by {pl.name()} are wrong on ranks "
                            f"{analysis._ranges(bad)}", rank=s, node=pl.node, host=pl.host, device=pl.device)]
        out = []
        for r, c in sorted(bad.items()):
            pl = self._place(r)
            detail = "; ".join((c.get("dispatch_problems") or []) + (c.get("combine_problems") or []))
            srcs = c.get("bad_sources") or c.get("combine_expert_ranks") or []
            who = f" (rows from source ranks {analysis._ranges(srcs)})" if srcs else ""
            out.append(Failure("ep", "ep_mismatch", f"{cname}: {pl.name()} output differs from the reference"
                               f"{who}: {detail}", rank=r, node=pl.node, host=pl.host, device=pl.device))
        return out

    def _analyse_speed(self, st: dict, values: dict[int, Any]) -> None:
        times = [(values.get(r) or {}).get("median_us") for r in range(self.env.world)]
        med, fails = analysis.flag_slow_ranks(times, self.places, self.env.opts.slow_factor)
        if self.env.topo.shares_gpus:
            st["note"] = analysis.SHARED_GPU_NOTE
        else:
            self.failures += fails
        shape = next((v.get("shape") for v in values.values() if v), None)
        st.update(per_rank_us=times, median_us=med, shape=shape, factor=self.env.opts.slow_factor)

    def _finish(self) -> int:
        env, opts = self.env, self.env.opts
        for name in opts.stages:
            self.stages.setdefault(name, {"status": "skipped", "duration_s": 0.0,
                                          "reason": "not run: an earlier stage timed out"})
        topo = env.topo
        stages_run = [s for s, v in self.stages.items() if v.get("status") != "skipped"]
        verdict = analysis.verdict(self.failures, stages_run, env.world, topo.num_nodes)
        code = analysis.exit_code(self.failures)
        report = {
            "schema": rep.SCHEMA, "ok": code == 0, "exit_code": code, "verdict": verdict,
            "started": self.started, "duration_s": round(time.monotonic() - self.t0, 3), "code": code_identity(),
            "topology": {"name": topo.name, "source": topo.source, "world_size": topo.world_size,
                         "num_nodes": topo.num_nodes, "ranks_per_node": topo.ranks_per_node,
                         "backend": topo.backend, "gpu": env.gpu},
            "options": {"stage_timeout": opts.stage_timeout, "stages": opts.stages, "quick": opts.quick,
                        "link_method": opts.link_method, "faults": os.environ.get("EPCOMM_SMOKE_FAULT"),
                        "backend_faults": os.environ.get("EPCOMM_FAULT")},
            "ranks": [{"rank": p.rank, "node": p.node, "host": p.host, "device": p.device} for p in self.places],
            "stages": {s: self.stages[s] for s in STAGES if s in self.stages},
            "failures": [f.to_dict() for f in self.failures],
        }
        links_st = self.stages.get("links", {})
        if opts.png and links_st.get("bandwidth_gbps"):
            flagged = {(p["src"], p["dst"]) for p in links_st.get("pairs", [])
                       if p.get("flags") or p.get("data_ok") is False or p.get("error")}
            try:
                links_st["heatmap"] = {"path": os.path.abspath(opts.png),
                                       "renderer": rep.heatmap(links_st["bandwidth_gbps"], opts.png,
                                                               f"{topo.name}: pair bandwidth GB/s", flagged)}
            except Exception as e:
                links_st["heatmap"] = {"error": f"{type(e).__name__}: {e}"}
        problems = rep.validate(report)
        if problems:   # a bug of the smoke test itself: say so, do not hide the verdict
            report["schema_problems"] = problems
        if opts.json:
            try:
                with open(opts.json, "w") as f:
                    f.write(rep.dumps(report))
            except OSError as e:
                print(f"smoke: cannot write {opts.json}: {e}", file=sys.stderr)
        print(rep.table(report), flush=True)
        if code:
            print(verdict, file=sys.stderr, flush=True)
        env.msgr.send_all({"code": code, "abort": self.abort, "verdict": verdict}, range(1, env.world), STOP_TAG)
        if self.abort:
            env.msgr.flush(Deadline(1.0))
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(0.5)
            env.comm.Abort(code)
        env.msgr.flush(Deadline(5.0))
        return code


# ------------------------------------------------------------------------------------------------ other ranks

def follower(env: StageEnv, threaded: bool) -> int:
    opts = env.opts
    lost_after = 3 * opts.stage_timeout + 10.0
    for name in opts.stages:
        i = STAGES.index(name)
        env.faults.maybe_hang(env.rank, name)
        env.msgr.send({"rank": env.rank}, 0, tag(i, READY))
        got = env.msgr.wait_one(0, [tag(i, START), STOP_TAG], Deadline(lost_after))
        if got is None:
            return _lost_root(env, name, lost_after)
        t, obj = got
        if t == STOP_TAG:
            return _stopped(env, obj)
        env.stage_index, env.payload = i, obj
        res = run_local(name, env, threaded)
        env.msgr.send(res, 0, tag(i, RESULT))
    got = env.msgr.wait_one(0, [STOP_TAG], Deadline(lost_after))
    if got is None:
        return _lost_root(env, "report", lost_after)
    return _stopped(env, got[1])


def _stopped(env: StageEnv, obj: dict) -> int:
    env.msgr.flush(Deadline(5.0))
    if obj.get("abort"):
        time.sleep(60)   # rank 0 is aborting the job; this process is about to be killed
        os._exit(obj.get("code", 3) or 3)
    return int(obj.get("code", 1))


def _lost_root(env: StageEnv, stage: str, waited: float) -> int:
    host = env.topo.host_of(0)
    verdict = f"FAIL {stage}: rank 0 node0 ({host}) stopped responding (rank {env.rank} waited {waited:g}s)"
    print(verdict, file=sys.stderr, flush=True)
    if env.rank == 1 and env.opts.json:
        failure = Failure(stage, "timeout", verdict[len(f"FAIL {stage}: "):], rank=0, node=0, host=host)
        report = {"schema": rep.SCHEMA, "ok": False, "exit_code": 3, "verdict": verdict,
                  "started": "", "duration_s": 0.0, "written_by": env.rank,
                  "topology": {"name": env.topo.name, "world_size": env.world, "num_nodes": env.topo.num_nodes},
                  "options": {"stage_timeout": env.opts.stage_timeout}, "ranks": [],
                  "stages": {stage: {"status": "timeout"}} if stage in STAGES else {},
                  "failures": [failure.to_dict()]}
        try:
            with open(env.opts.json, "w") as f:
                f.write(rep.dumps(report))
        except OSError:
            pass
    time.sleep(1.0 if env.rank == 1 else 3.0)
    env.comm.Abort(3)
    return 3


# ------------------------------------------------------------------------------------------------ entry

def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    from mpi4py import MPI

    from ..topology import Topology
    from . import faults as faults_mod

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        topo = Topology.from_env() or Topology.single_node(size)
        faults = faults_mod.from_env()
    except Exception as e:
        print(f"smoke: rank {rank}: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if topo.world_size != size:
        if rank == 0:
            print(f"smoke: topology {topo.name} has {topo.world_size} ranks but MPI started {size}", file=sys.stderr)
        return EXIT_USAGE
    dev_env = os.environ.get("EPCOMM_DEVICE", "")
    device = int(dev_env) if dev_env.isdigit() else topo.device(rank)
    gpu = topo.has_gpus and topo.resolved_backend() == "gpu"
    threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
    if not opts.stage_timeout:
        opts.stage_timeout = 300.0 if topo.has_gpus else 60.0
    env = StageEnv(comm=comm, msgr=Messenger(comm), rank=rank, world=size, topo=topo, opts=opts, faults=faults,
                   gpu=gpu, device=device)
    if rank == 0:
        return Coordinator(env, threaded).run()
    return follower(env, threaded)
