"""Pure decision logic of the smoke test (no MPI, no GPU): outlier flags, inventory checks, failures, verdict.

Everything here takes plain Python / numpy data, so it is unit-tested without launching ranks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from ..stats import median

STAGES = ("inventory", "links", "ep", "speed")

# default thresholds (options of `python -m epcomm.smoke` override them)
BW_FACTOR = 0.5        # a pair below BW_FACTOR x median bandwidth of its class is flagged
LAT_FACTOR = 3.0       # a pair above LAT_FACTOR x median latency of its class is flagged
SLOW_FACTOR = 2.0      # a rank whose EP time is above SLOW_FACTOR x median is flagged


@dataclass
class Failure:
    """One named problem. `stage` + `what` classify it; the rest says where (any may be None)."""
    stage: str
    what: str                      # timeout | missing_gpu | gpu_count | version_skew | host_mismatch | link_data |
    message: str                   # link_slow_bw | link_slow_latency | link_error | ep_mismatch | ep_error | slow_rank
    rank: int | None = None        # the rank blamed (source rank for link / EP data problems)
    node: int | None = None
    host: str | None = None
    device: int | None = None
    src: int | None = None         # link problems: the pair
    dst: int | None = None
    severity: str = "fail"         # fail | warn
    waited_on: int | None = None   # timeouts: the peer this rank waited for in vain (it is the first suspect)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Place:
    """Where a rank runs, as the report names it."""
    rank: int
    node: int
    host: str
    device: int | None = None

    def name(self) -> str:
        gpu = f" GPU {self.device}" if self.device is not None else ""
        return f"rank {self.rank} node{self.node} ({self.host}){gpu}"


def place_table(topology_ranks: list[dict[str, Any]], hostnames: dict[int, str] | None = None) -> list[Place]:
    """Places from Topology.rank_table() rows; `hostnames` (rank -> reported hostname) wins over the YAML's."""
    out = []
    for row in topology_ranks:
        r = int(row["rank"])
        host = (hostnames or {}).get(r) or row.get("host") or "?"
        out.append(Place(r, int(row["node"]), str(host), row.get("device")))
    return out


# ------------------------------------------------------------------------------------------------- links

def flag_links(pairs: list[dict[str, Any]], bw_factor: float = BW_FACTOR, lat_factor: float = LAT_FACTOR,
               lat_slack_us: float = 0.0) -> dict[str, dict[str, float | None]]:
    """Mark outlier pairs in place and return the medians per class.

    pairs: dicts with src, dst, cls ("same_node" | "other_node"), bw_gbps, lat_us (None when not measured).
    A pair gets flags "slow_bw" when bw < bw_factor x median bw of its class, "slow_latency" when
    lat > lat_factor x median latency and lat - median > lat_slack_us (an absolute floor for noisy hosts).
    Medians are per class so NVLink pairs are not compared with network pairs.
    """
    medians: dict[str, dict[str, float | None]] = {}
    for cls in sorted({p["cls"] for p in pairs}):
        members = [p for p in pairs if p["cls"] == cls]
        mb = median(p.get("bw_gbps") for p in members)
        ml = median(p.get("lat_us") for p in members)
        medians[cls] = {"bw_gbps": mb, "lat_us": ml, "pairs": len(members)}
        for p in members:
            flags = p.setdefault("flags", [])
            bw, lat = p.get("bw_gbps"), p.get("lat_us")
            if bw is not None and mb and bw < bw_factor * mb:
                flags.append("slow_bw")
            if lat is not None and ml is not None and lat > lat_factor * ml and lat - ml > lat_slack_us:
                flags.append("slow_latency")
    return medians


SHARED_GPU_NOTE = ("ranks share a GPU (share_gpus): pair copies and EP times there are not link figures, so no "
                   "bandwidth, latency or slow-rank verdict (data checks still apply)")


def drop_speed_flags(pairs: list[dict[str, Any]]) -> None:
    """Ranks on one GPU: clear the bandwidth / latency flags of flag_links (no link to judge); data checks stay."""
    for p in pairs:
        p["flags"] = [f for f in p.get("flags", []) if f not in ("slow_bw", "slow_latency")]


def blame_pairs(bad: list[tuple[int, int]], world: int) -> tuple[str, int | None]:
    """Who is to blame for a set of bad (src, dst) pairs: ("src", r) when every bad pair leaves rank r and r's
    pairs are all bad (at least 2 of them), ("dst", r) likewise for receivers, else ("pair", None)."""
    if not bad:
        return "pair", None
    srcs = {s for s, _ in bad}
    dsts = {d for _, d in bad}
    if len(srcs) == 1 and world > 2:
        s = next(iter(srcs))
        if len({d for x, d in bad if x == s}) >= max(2, world - 1):
            return "src", s
    if len(dsts) == 1 and world > 2:
        d = next(iter(dsts))
        if len({s for s, x in bad if x == d}) >= max(2, world - 1):
            return "dst", d
    return "pair", None


def link_failures(pairs: list[dict[str, Any]], places: list[Place], medians: dict) -> list[Failure]:
    """Failures for pairs with a data error, a transfer error/timeout, or a performance flag."""
    world = len(places)
    out: list[Failure] = []
    data_bad = [(p["src"], p["dst"]) for p in pairs if p.get("data_ok") is False]
    if data_bad:
        who, r = blame_pairs(data_bad, world)
        if who in ("src", "dst"):
            pl = places[r]
            role = "sends" if who == "src" else "receives"
            others = sorted({d if who == "src" else s for s, d in data_bad})
            out.append(Failure("links", "link_data", f"{pl.name()} {role} corrupt data "
                               f"({'to' if who == 'src' else 'from'} ranks {_ranges(others)})",
                               rank=r, node=pl.node, host=pl.host, device=pl.device))
        for s, d in data_bad if who == "pair" else []:
            out.append(_pair_failure("link_data", "data check failed", places, s, d))
    for p in pairs:
        if p.get("error"):
            out.append(_pair_failure("link_error", p["error"], places, p["src"], p["dst"]))
    def badness(p):  # worst first, so the verdict names the slowest pair
        m = medians.get(p["cls"], {})
        if "slow_bw" in p.get("flags", ()) and p.get("bw_gbps") and m.get("bw_gbps"):
            return -m["bw_gbps"] / p["bw_gbps"]
        if p.get("lat_us") and m.get("lat_us"):
            return -p["lat_us"] / m["lat_us"]
        return 0.0
    for p in sorted(pairs, key=badness):
        m = medians.get(p["cls"], {})
        if "slow_bw" in p.get("flags", ()):
            out.append(_pair_failure("link_slow_bw", f"{_gb(p['bw_gbps'])} vs median {_gb(m.get('bw_gbps'))}",
                                     places, p["src"], p["dst"]))
        elif "slow_latency" in p.get("flags", ()):
            out.append(_pair_failure("link_slow_latency",
                                     f"latency {p['lat_us']:.1f} us vs median {m.get('lat_us') or 0:.1f} us",
                                     places, p["src"], p["dst"]))
    return out


def _pair_failure(what: str, detail: str, places: list[Place], s: int, d: int) -> Failure:
    ps, pd = places[s], places[d]
    return Failure("links", what, f"{ps.name()} -> {pd.name()}: {detail}", rank=s, node=ps.node, host=ps.host,
                   device=ps.device, src=s, dst=d)


def _gb(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g} GB/s"


def _ranges(ranks: Iterable[int]) -> str:
    rs = sorted(set(ranks))
    parts, i = [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(parts)


# ------------------------------------------------------------------------------------------------- inventory

VERSION_KEYS = ("python", "numpy", "mpi4py", "mpi_library", "torch", "cuda", "driver", "nvshmem", "nvshmem4py",
                "gpu_name")


def check_inventory(per_rank: list[dict[str, Any] | None], places: list[Place], gpu: bool) -> list[Failure]:
    """Named failures of the inventory stage. per_rank[r]: what rank r reported (None = nothing arrived).

    Checks: hostname consistent within a topology node; on GPU topologies: the rank's GPU present, the GPUs
    visible on a host at least those the topology uses there, no GPU (UUID) shared by two ranks of a host unless
    the topology gives them the same GPU (`share_gpus: true`);
    versions (VERSION_KEYS) identical on every rank that reports them.
    """
    out: list[Failure] = []
    by_node: dict[int, set[str]] = {}
    for pl, info in zip(places, per_rank):
        if info is None:
            continue
        by_node.setdefault(pl.node, set()).add(info.get("hostname", "?"))
    for node, hosts in sorted(by_node.items()):
        if len(hosts) > 1:
            out.append(Failure("inventory", "host_mismatch",
                               f"node{node}: its ranks run on different hosts {sorted(hosts)}", node=node))
    if gpu:
        host_used: dict[str, set[int]] = {}
        host_visible: dict[str, int] = {}
        uuids: dict[tuple[str, str], list[int]] = {}
        for pl, info in zip(places, per_rank):
            if info is None:
                continue
            host = info.get("hostname", pl.host)
            g = info.get("gpu") or {}
            count = g.get("device_count")
            if pl.device is not None:
                host_used.setdefault(host, set()).add(pl.device)
            if count is not None:
                host_visible[host] = max(host_visible.get(host, 0), int(count))
            if not g.get("present"):
                why = g.get("error") or (f"{count} GPU(s) visible" if count is not None else "no GPU found")
                out.append(Failure("inventory", "missing_gpu", f"{pl.name()}: GPU missing ({why})",
                                   rank=pl.rank, node=pl.node, host=pl.host, device=pl.device))
            if g.get("uuid"):
                uuids.setdefault((host, g["uuid"]), []).append(pl.rank)
        for host, used in sorted(host_used.items()):
            vis = host_visible.get(host)
            if vis is not None and vis < len(used):
                out.append(Failure("inventory", "gpu_count", f"host {host}: topology uses {len(used)} GPU(s) "
                                   f"{sorted(used)} but {vis} are visible", host=host))
        for (host, uuid), ranks in sorted(uuids.items()):
            if len({places[r].device for r in ranks}) == 1:
                continue   # one GPU index for all of them: the topology put them there (only `share_gpus` allows it)
            if len(ranks) > 1:
                pl = places[ranks[1]]
                out.append(Failure("inventory", "gpu_shared", f"host {host}: ranks {_ranges(ranks)} all use GPU "
                                   f"{uuid}", rank=pl.rank, node=pl.node, host=host, device=pl.device))
    for key in VERSION_KEYS:
        values: dict[str, list[int]] = {}
        for pl, info in zip(places, per_rank):
            if info is None:
                continue
            v = (info.get("versions") or {}).get(key)
            if v is not None:
                values.setdefault(str(v), []).append(pl.rank)
        if len(values) > 1:
            ordered = sorted(values.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            # the most common version comes first (desc names it); every rank on another one is odd
            odd_ranks = sorted(r for _, rs in ordered[1:] for r in rs)
            pl = places[odd_ranks[0]]
            desc = "; ".join(f"{v} on ranks {_ranges(rs)}" for v, rs in ordered)
            out.append(Failure("inventory", "version_skew",
                               f"{key} version skew: {desc} (odd one: {pl.name()})",
                               rank=pl.rank, node=pl.node, host=pl.host, device=pl.device))
    return out


# ------------------------------------------------------------------------------------------------- speed

def flag_slow_ranks(times_us: list[float | None], places: list[Place], factor: float = SLOW_FACTOR,
                    slack_us: float = 0.0) -> tuple[float | None, list[Failure]]:
    """(median, failures) for ranks whose EP time is above factor x median (and median + slack_us)."""
    med = median(times_us)
    out = []
    if med is None:
        return None, out
    for pl, t in zip(places, times_us):
        if t is not None and t > factor * med and t - med > slack_us:
            out.append(Failure("speed", "slow_rank", f"{pl.name()}: dispatch+combine {t:.0f} us vs median "
                               f"{med:.0f} us", rank=pl.rank, node=pl.node, host=pl.host, device=pl.device))
    return med, out


# ------------------------------------------------------------------------------------------------- verdict

def verdict(failures: list[Failure], stages_run: list[str], world: int, nodes: int) -> str:
    """The one-line verdict: 'OK ...' or 'FAIL <stage>: <first failure>' (+ how many more)."""
    fails = [f for f in failures if f.severity == "fail"]
    if not fails:
        return f"OK: {world} ranks on {nodes} node(s); stages {','.join(stages_run) or 'none'} passed"
    order = {s: i for i, s in enumerate(STAGES)}
    # A timeout names the stuck rank: most useful first. A rank that only waited for another one is a victim,
    # so it comes after the ranks that were stuck themselves; then stage order.
    first = sorted(fails, key=lambda f: (f.what != "timeout", f.waited_on is not None, order.get(f.stage, 99)))[0]
    more = len(fails) - 1
    tail = f" (+{more} more failure{'s' if more > 1 else ''}, see report)" if more else ""
    return f"FAIL {first.stage}: {first.message}{tail}"


def exit_code(failures: list[Failure]) -> int:
    """0 healthy, 3 when a rank timed out (hung), 1 for any other failure."""
    fails = [f for f in failures if f.severity == "fail"]
    if not fails:
        return 0
    return 3 if any(f.what == "timeout" for f in fails) else 1


# ------------------------------------------------------------------------------------------------- stages
# Each *_stage function takes the ranks' results of one stage and returns (what goes into the report's stage entry,
# failures); the coordinator only collects and sends.

def timeout_failure(stage: str, place: Place, why: str, waited_on: int | None = None) -> Failure:
    """A rank that did not arrive or did not answer (or waited in vain for `waited_on`)."""
    return Failure(stage, "timeout", f"{place.name()} {why}", rank=place.rank, node=place.node, host=place.host,
                   device=place.device, waited_on=waited_on)


def collected_stage(name: str, results: dict[int, dict], missing: list[int], places: list[Place],
                    result_deadline_s: float) -> tuple[dict[str, Any], list[Failure]]:
    """What every stage reports: each rank's status, ranks that did not answer, hung or raised."""
    world = len(places)
    st: dict[str, Any] = {"status": "ok"}
    fails = [timeout_failure(name, places[r], f"did not report its {name} result within {result_deadline_s:g}s")
             for r in missing]
    st["per_rank_status"] = [results[r]["status"] if r in results else "missing" for r in range(world)]
    for r, res in sorted(results.items()):
        if res["status"] == "timeout":
            fails.append(timeout_failure(name, places[r], f"stuck in stage {name}: {res['error']}",
                                         res.get("waited_on")))
        elif res["status"] == "error":
            pl = places[r]
            fails.append(Failure(name, "stage_error", f"{pl.name()}: {res['error']}", rank=r, node=pl.node,
                                 host=pl.host, device=pl.device))
    errors = {str(r): {k: res.get(k) for k in ("status", "error", "traceback", "duration_s")}
              for r, res in results.items() if res["status"] != "ok"}
    if errors:
        st["rank_errors"] = errors
    return st, fails


def stage_status(failures: list[Failure], any_values: bool) -> str:
    """timeout > error (no rank produced a value) > fail > ok, from the stage's own failures."""
    if any(f.what == "timeout" for f in failures):
        return "timeout"
    if any(f.what == "stage_error" for f in failures) and not any_values:
        return "error"
    if any(f.severity == "fail" for f in failures):
        return "fail"
    return "ok"


def inventory_stage(inventory: dict[int, dict], places: list[Place], has_gpus: bool):
    per_rank = [inventory.get(r) for r in range(len(places))]
    return {"per_rank": per_rank}, check_inventory(per_rank, places, has_gpus)


def links_stage(values: dict[int, Any], pairs: list[dict[str, Any]], places: list[Place], bw_factor: float,
                lat_factor: float, lat_slack_us: float, shared_gpu: bool = False):
    """Flags outlier pairs (in `pairs`) and names stuck senders, bad data and slow pairs (not slow ones when the
    ranks share a GPU: there is no link to judge)."""
    medians = flag_links(pairs, bw_factor, lat_factor, lat_slack_us)
    if shared_gpu:
        drop_speed_flags(pairs)
    fails = [timeout_failure("links", places[s], "did not finish its link measurements before the stage deadline")
             for v in values.values() for s in v.get("stuck_senders", [])]
    fails += link_failures(pairs, places, medians)
    st = {"pairs": pairs, "medians": medians,
          "sizes": next((v.get("sizes") for v in values.values() if v), None),
          "methods": sorted({p.get("method") for p in pairs if p.get("method")}),
          "thresholds": {"bw_factor": bw_factor, "lat_factor": lat_factor, "lat_slack_us": lat_slack_us}}
    notes = sorted({p["note"] for p in pairs if p.get("note")})
    if notes:
        st["notes"] = notes
    if shared_gpu:
        st["note"] = SHARED_GPU_NOTE
    return st, fails


def ep_stage(values: dict[int, Any], places: list[Place]):
    """Per case: one status over the ranks; mismatches blamed on their source, errors on the rank waited for."""
    world = len(places)
    names = list(dict.fromkeys(c["name"] for v in values.values() for c in v.get("cases", [])))
    summary, fails = [], []
    for cname in names:
        recs = {r: c for r, v in values.items() for c in v.get("cases", []) if c["name"] == cname}
        statuses = {c.get("status", "error") for c in recs.values()}
        status = "ok" if statuses <= {"ok"} else ("skipped" if statuses <= {"skipped", "ok"} else
                                                  "error" if "error" in statuses else "mismatch")
        summary.append({"name": cname, "status": status, "shape": next(iter(recs.values())).get("shape")})
        bad = {r: c for r, c in recs.items() if c.get("status") == "mismatch"}
        if bad:
            fails += ep_blame(cname, bad, places)
        for r, c in sorted(recs.items()):
            if c.get("status") == "error":
                tr = c.get("timeout_rank")
                if tr is not None and 0 <= tr < world:
                    pl = places[tr]
                    fails.append(Failure("ep", "ep_timeout", f"{cname}: rank {r} waited in vain for {pl.name()}: "
                                         f"{c['error']}", rank=tr, node=pl.node, host=pl.host, device=pl.device))
                else:
                    pl = places[r]
                    fails.append(Failure("ep", "ep_error", f"{cname}: {pl.name()}: {c['error']}", rank=r,
                                         node=pl.node, host=pl.host, device=pl.device))
            elif c.get("status") == "skipped":
                fails.append(Failure("ep", "ep_skipped", f"{cname}: {c.get('error')}", rank=r, severity="warn"))
    return {"per_rank": {str(r): v for r, v in values.items()}, "cases": summary}, fails


def ep_blame(cname: str, bad: dict[int, dict], places: list[Place]) -> list[Failure]:
    """One failure per guilty source when every wrong receiver blames it; else one per wrong receiver."""
    blamed: dict[int, list[int]] = {}
    for r, c in bad.items():
        for s in c.get("bad_sources", []):
            blamed.setdefault(s, []).append(r)
    common = [s for s, rs in blamed.items() if len(rs) == len(bad)]
    if len(common) == 1 and len(bad) > 1:
        pl = places[common[0]]
        return [Failure("ep", "ep_mismatch", f"{cname}: rows sent by {pl.name()} are wrong on ranks "
                        f"{_ranges(bad)}", rank=pl.rank, node=pl.node, host=pl.host, device=pl.device)]
    out = []
    for r, c in sorted(bad.items()):
        pl = places[r]
        detail = "; ".join((c.get("dispatch_problems") or []) + (c.get("combine_problems") or []))
        srcs = c.get("bad_sources") or c.get("combine_expert_ranks") or []
        who = f" (rows from source ranks {_ranges(srcs)})" if srcs else ""
        out.append(Failure("ep", "ep_mismatch", f"{cname}: {pl.name()} output differs from the reference{who}: "
                           f"{detail}", rank=r, node=pl.node, host=pl.host, device=pl.device))
    return out


def speed_stage(values: dict[int, Any], places: list[Place], factor: float, shared_gpu: bool = False):
    """Per-rank round times; a slow rank fails the stage, except when the ranks share a GPU (times there say
    nothing about one GPU or link: the report carries a note instead)."""
    times = [(values.get(r) or {}).get("median_us") for r in range(len(places))]
    med, fails = flag_slow_ranks(times, places, factor)
    shape = next((v.get("shape") for v in values.values() if v), None)
    st = {"per_rank_us": times, "median_us": med, "shape": shape, "factor": factor}
    if shared_gpu:
        st["note"], fails = SHARED_GPU_NOTE, []
    return st, fails
