"""The smoke test's protocol between ranks. Rank 0 (Coordinator) waits, before each stage and with a deadline, for
every rank to report ready, starts the stage, collects each rank's result (with a deadline) and hands them to the
pure analysis (analysis.py); at the end it builds the report (report.py), and aborts the job when a rank hung.
The other ranks (follower) wait for each start and send their results; a rank that loses rank 0 writes what it
knows and aborts the job, so one stuck rank cannot hang the smoke test.
"""
from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from ..provenance import code_identity
from . import analysis, report as rep
from .analysis import STAGES, Failure
from .comm import READY, RESULT, START, STOP_TAG, Deadline, tag
from .stages import StageEnv, run_local


class Coordinator:
    def __init__(self, env: StageEnv, threaded: bool):
        self.env = env
        self.threaded = threaded
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.places = analysis.place_table(env.topo.rank_table())
        self.failures: list[Failure] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self.inventory: dict[int, dict] = {}

    @property
    def abort(self) -> bool:
        """A rank hung: after the report, the job is aborted (the hung rank would never leave)."""
        return any(f.what == "timeout" for f in self.failures)

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
                self.failures += [analysis.timeout_failure(name, self.places[r], f"did not arrive at stage {name} "
                                                           f"within {opts.stage_timeout:g}s (hung or dead)")
                                  for r in missing]
                self.stages[name] = {"status": "timeout", "duration_s": round(time.monotonic() - t_stage, 3),
                                     "missing_ranks": missing}
                break
            payload = self._payload(name)
            env.msgr.send_all(payload, others, tag(i, START))
            env.stage_index, env.payload = i, payload
            own = run_local(name, env, self.threaded)
            got, missing = env.msgr.collect(others, tag(i, RESULT), Deadline(opts.stage_timeout + 5.0))
            st = self._analyse(name, {0: own, **got}, missing)
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
        env, opts = self.env, self.env.opts
        st, fails = analysis.collected_stage(name, results, missing, self.places, opts.stage_timeout + 5)
        values = {r: res["value"] for r, res in results.items() if res["status"] == "ok"}
        if name == "inventory":
            self.inventory = {r: v for r, v in values.items() if v}
            hostnames = {r: v.get("hostname") for r, v in self.inventory.items()}
            self.places = analysis.place_table(env.topo.rank_table(), hostnames)
            more, new = analysis.inventory_stage(self.inventory, self.places, env.topo.has_gpus)
            if env.topo.shares_gpus:   # `share_gpus: true`: the report says so next to the rank table
                more["shared_gpus"] = env.topo.sharing_lines()
        elif name == "links":
            from . import links   # numpy: loaded here, like the stage itself (stages.stage_function says why)
            pairs = links.merge(values, env.world)
            # host configs: CPU-timed copies swing 2x and by tens of us on busy cores
            slack = opts.lat_slack_us if opts.lat_slack_us is not None else (5.0 if env.gpu else 50.0)
            bw_factor = opts.bw_factor if opts.bw_factor is not None else (analysis.BW_FACTOR if env.gpu else 0.2)
            more, new = analysis.links_stage(values, pairs, self.places, bw_factor, opts.lat_factor, slack,
                                             shared_gpu=env.topo.shares_gpus)
            more["bandwidth_gbps"], more["latency_us"] = links.matrices(pairs, env.world)
        elif name == "ep":
            more, new = analysis.ep_stage(values, self.places)
        else:
            more, new = analysis.speed_stage(values, self.places, opts.slow_factor, shared_gpu=env.topo.shares_gpus)
        st.update(more)
        fails += new
        st["status"] = analysis.stage_status(fails, bool(values))
        st["failures"] = [f.to_dict() for f in fails]
        self.failures += fails
        return st

    def _finish(self) -> int:
        env, opts = self.env, self.env.opts
        for name in opts.stages:
            self.stages.setdefault(name, {"status": "skipped", "duration_s": 0.0,
                                          "reason": "not run: an earlier stage timed out"})
        topo = env.topo
        stages_run = [s for s, v in self.stages.items() if v.get("status") != "skipped"]
        verdict = analysis.verdict(self.failures, stages_run, env.world, topo.num_nodes)
        code = analysis.exit_code(self.failures)
        report = rep.build_report(
            verdict=verdict, exit_code=code, started=self.started, duration_s=round(time.monotonic() - self.t0, 3),
            code=code_identity(),
            topology={"name": topo.name, "source": topo.source, "world_size": topo.world_size,
                      "num_nodes": topo.num_nodes, "ranks_per_node": topo.ranks_per_node, "backend": topo.backend,
                      "gpu": env.gpu},
            options={"stage_timeout": opts.stage_timeout, "stages": opts.stages, "quick": opts.quick,
                     "link_method": opts.link_method, "faults": os.environ.get("EPCOMM_SMOKE_FAULT"),
                     "backend_faults": os.environ.get("EPCOMM_FAULT")},
            ranks=[{"rank": p.rank, "node": p.node, "host": p.host, "device": p.device} for p in self.places],
            stages={s: self.stages[s] for s in STAGES if s in self.stages}, failures=self.failures)
        self._heatmap(report["stages"].get("links", {}))
        problems = rep.validate(report)
        if problems:   # a bug of the smoke test itself: say so, do not hide the verdict
            report["schema_problems"] = problems
        if opts.json:
            why = rep.write(report, opts.json)
            if why:
                print(f"smoke: cannot write {opts.json}: {why}", file=sys.stderr)
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

    def _heatmap(self, links_st: dict) -> None:
        png = self.env.opts.png
        if not png or not links_st.get("bandwidth_gbps"):
            return
        flagged = {(p["src"], p["dst"]) for p in links_st.get("pairs", [])
                   if p.get("flags") or p.get("data_ok") is False or p.get("error")}
        try:
            links_st["heatmap"] = {"path": os.path.abspath(png),
                                   "renderer": rep.heatmap(links_st["bandwidth_gbps"], png,
                                                           f"{self.env.topo.name}: pair bandwidth GB/s", flagged)}
        except Exception as e:
            links_st["heatmap"] = {"error": f"{type(e).__name__}: {e}"}


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
        report = rep.build_report(
            verdict=verdict, exit_code=3, written_by=env.rank,
            topology={"name": env.topo.name, "world_size": env.world, "num_nodes": env.topo.num_nodes},
            options={"stage_timeout": env.opts.stage_timeout},
            stages={stage: {"status": "timeout"}} if stage in STAGES else {}, failures=[failure])
        rep.write(report, env.opts.json)
    time.sleep(1.0 if env.rank == 1 else 3.0)
    env.comm.Abort(3)
    return 3
