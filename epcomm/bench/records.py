"""The benchmark document: one record per (case, impl, op, shape) with its timing summary over ranks, bytes and
floor, plus the run's settings, links, errors and notes. Built once; records are appended as cases run, and
refresh() brings the derived fields (ratios, ok) up to date before each save."""
from __future__ import annotations

import datetime
import os
import sys

from ..provenance import code_identity
from ..stats import median, slowest_rank, summarize
from . import floor as floormod
from . import report


# EPCOMM_* variables the launcher or the tools set for plumbing; every other one is a knob of the run (EPCOMM_BLOCKS,
# a kernel variant, ...) and goes into the document, so that an A/B of two variants says which run was which
PLUMBING_ENV = ("EPCOMM_TOPOLOGY", "EPCOMM_TOPOLOGY_SHA", "EPCOMM_NODE", "EPCOMM_DEVICE", "EPCOMM_RANK",
                "EPCOMM_LOCAL_RANK", "EPCOMM_LOCAL_SIZE", "EPCOMM_WORLD_SIZE", "EPCOMM_NUM_NODES", "EPCOMM_CACHE",
                "EPCOMM_COMMIT", "EPCOMM_NVCC", "EPCOMM_MPIRUN", "EPCOMM_MPI_FLAVOR", "EPCOMM_JOB_DIR", "EPCOMM_NIC")


def kernel_env() -> dict:
    """The EPCOMM_* knobs of this process (not the launcher's plumbing), sorted."""
    return {k: os.environ[k] for k in sorted(os.environ) if k.startswith("EPCOMM_") and k not in PLUMBING_ENV}


def given_latency(args) -> dict:
    """floor_latency before the latency case runs: --latency-us (per op, eager and graph alike) or not measured."""
    us = getattr(args, "latency_us", None)
    if us is None:
        return {"status": "n/a", "reason": "latency case not run"}
    return {"status": "ok", "per_op_us": us, "per_op_graph_us": us, "source": "command line (--latency-us)"}


def per_op_latency(latency: dict | None, graph: bool) -> float | None:
    """The latency term of one operation: per_op_graph_us for rows timed as graph replays, else per_op_us."""
    if not latency or latency.get("status") != "ok":
        return None
    return latency.get("per_op_graph_us" if graph else "per_op_us")


def shared_gpu_note(topo) -> str | None:
    """The bench's note when the topology puts several ranks on one GPU (`share_gpus`), else None."""
    lines = topo.sharing_lines() if topo is not None and hasattr(topo, "sharing_lines") else []
    if not lines:
        return None
    return (f"{'; '.join(lines)}: the ranks time-slice one GPU (or split its SMs under MPS), so these timings are "
            f"not link figures: no floor ratio, no bandwidth, no NCCL baseline (NCCL refuses two ranks on one GPU)")


class Records:
    def __init__(self, args, ctx, comm, log, world_sets, timer_name: str, torch=None, devices=None):
        self.args, self.comm, self.log, self.world_sets = args, comm, log, world_sets
        self.world = ctx.world_size
        a = args
        self.doc = {
            "schema": report.SCHEMA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": list(sys.argv), "code": code_identity() if ctx.rank == 0 else None,  # rank 0 writes it
            "backend": ctx.backend, "topology": ctx.topology.name, "world_size": self.world,
            "nodes": ctx.topology.num_nodes, "devices": devices,
            "torch": getattr(torch, "__version__", None), "timer": timer_name,
            "settings": {"iters": a.iters, "warmup": a.warmup, "input_sets": a.sets, "quick": a.quick,
                         "seed": a.seed, "routing": a.routing, "hidden": a.hidden, "topk": a.topk,
                         "num_experts": a.experts, "tokens_ht": a.tokens, "tokens_ll": a.ll_tokens,
                         "sweep_tokens": a.sweep_tokens if "sweep" in a.cases else [],
                         "ll_layouts": a.ll_layouts if "ll" in a.cases else [],
                         "sms_requested": a.sms, "sms_supported": True, "cases": a.cases,
                         "recv_capacity_factor": getattr(a, "recv_capacity_factor", None),
                         "ht_sms": list(getattr(a, "ht_sms", [])), "peer_sms": list(getattr(a, "peer_sms", []))},
            "env": kernel_env(),
            "links": {"status": "skipped", "reason": "links case not selected"},
            "floor_bandwidth": {"link_gbps": a.link_gbps, "local_gbps": a.local_gbps,
                                "source": "command line" if (a.link_gbps or a.local_gbps) else "n/a"},
            "floor_latency": given_latency(a),
            "peers": {},
            "results": [], "errors": [], "notes": [], "ok": True,
        }
        self.shared = shared_gpu_note(ctx.topology)
        if self.shared:   # no link exists between ranks of one GPU: no floor, no GB/s, no NCCL baseline
            self.doc["floor_bandwidth"] = {"link_gbps": None, "local_gbps": None, "source": "none: ranks share a GPU"}
            self.doc["floor_latency"] = {"status": "n/a", "reason": "ranks share a GPU"}
            self.notes.append(self.shared)

    @property
    def results(self) -> list[dict]:
        return self.doc["results"]

    @property
    def errors(self) -> list[str]:
        return self.doc["errors"]

    @property
    def notes(self) -> list[str]:
        return self.doc["notes"]

    def set_links(self, links: dict, link_gbps=None, local_gbps=None, source: str | None = None) -> None:
        """The links case's measurement; measured bandwidths become the floor's unless given on the command line."""
        self.doc["links"] = links
        fb = self.doc["floor_bandwidth"]
        if self.shared:
            link_gbps = local_gbps = source = None
        if link_gbps is not None and self.args.link_gbps is None:
            fb["link_gbps"] = link_gbps
        if local_gbps is not None and self.args.local_gbps is None:
            fb["local_gbps"] = local_gbps
        if source is not None:
            fb["source"] = source

    def merge_errors(self) -> None:
        """Every rank's errors, tagged with the rank, on every rank (so every rank knows whether any failed)."""
        merged = []
        for r, es in enumerate(self.comm.allgather(list(self.errors))):
            for e in es:
                tagged = e if e.startswith("rank ") else f"rank {r}: {e}"
                if tagged not in merged:
                    merged.append(tagged)
        self.errors[:] = merged

    def set_latency(self, latency: dict) -> None:
        """The latency case's measurement (latency.measure); a --latency-us given on the command line wins."""
        if self.shared or self.args.latency_us is not None:
            return
        self.doc["floor_latency"] = latency

    def refresh(self) -> dict:
        """Derived fields up to date (floors with the latency term, ratios to the floor, NCCL and peers, ok); returns
        the document. A peer's rows (DeepEP) never make the run not ok: they are not epcomm's."""
        fb = self.doc["floor_bandwidth"]
        for r in self.results:
            if r.get("imported_from") and r.get("bytes") and r["op"] != "roundtrip":   # another run's floor
                r["floor"] = floormod.floor_of(r["bytes"], fb["link_gbps"], fb["local_gbps"])
            floormod.with_latency(r.get("floor"), per_op_latency(self.doc["floor_latency"], r.get("graph")))
        report.link_ratios(self.results)
        own = [r for r in self.results if r.get("impl") not in report.PEER_IMPLS]
        self.doc["ok"] = (not self.errors and all(r["status"] in ("ok", "n/a") for r in own)
                          and all(r["verified"] for r in own if r["status"] == "ok"))
        return self.doc

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
        fb = self.doc["floor_bandwidth"]
        return floormod.floor_of(self.bytes_of(cfg, t, op), fb["link_gbps"], fb["local_gbps"])

    def record(self, case, impl, op, cfg, t, *, graph=False, status="ok", verified=False, error=None,
               timing=None, sms=None, fmt=None, mode=None) -> dict:
        """mode: what the row calls (a peer's call, e.g. DeepEP's "cached"); epcomm rows: their config's mode.
        sms_budget: the SM limit the row was asked to run under (cfg.num_sms; None = all the GPU's)."""
        a = self.args
        rec = {"case": case, "impl": impl, "op": op, "mode": mode or (cfg.mode if impl == "epcomm" else None),
               "layout": cfg.layout if impl == "epcomm" else None, "capacity": report.capacity_of_cfg(cfg, impl),
               "format": str(fmt or ("bf16" if op == "combine" else cfg.token_format)), "tokens": t,
               "hidden": cfg.hidden, "topk": cfg.topk, "num_experts": cfg.num_experts, "world_size": self.world,
               "graph": bool(graph), "status": status, "verified": bool(verified), "error": error,
               "iters": a.iters, "warmup": a.warmup, "input_sets": a.sets, "time_us": None,
               "per_rank_median_us": None, "host_call_us": None, "wall_us": None, "sms": sms,
               "sms_budget": cfg.num_sms}
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
            if m > 0 and not self.shared:
                rec["link_gbps"] = fl["link_bytes_max"] / (m * 1e3)
                rec["local_gbps"] = fl["local_bytes_max"] / (m * 1e3)
        self.results.append(rec)
        if status == "ok" and rec["time_us"]:
            tm = rec["time_us"]
            self.log(f"  {case:<8} {impl:<6} {op:<9} {rec['mode'] or '-':<4} {rec['layout'] or '-':<7} "
                     f"{rec['format']:<4} T={t:<5} {report.capacity_cell(rec) + ' ' if rec['capacity'] else ''}"
                     f"{'graph ' if graph else ''}"
                     f"median {tm['median']:9.1f} us (p10 {tm['p10']:.1f}, p90 {tm['p90']:.1f}); floor "
                     f"{report.fmt_num(fl['floor_us'])} us")
        else:
            self.log(f"  {case:<8} {impl:<6} {op:<9} {rec['mode'] or '-':<4} {rec['layout'] or '-':<7} T={t}: "
                     f"{status} {error or ''}")
        return rec
