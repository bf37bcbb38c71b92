"""Rank 0's outputs: the human table, the JSON document, the PNG plot.

JSON document (schema "epcomm.bench/1"; null = not available, shown as "n/a" in the table):
  schema, date (UTC ISO 8601), command (argv), code {commit (git HEAD or null), dirty (uncommitted changes, or
  null), kernel_source (sha256 of the kernel sources: names the kernels even without git), kernel_variant
  ("baseline" or the EPCOMM_VARIANT names joined by "+")}, backend ("gpu" |
  "host"), topology, world_size, nodes, devices (per rank: name, SMs), torch (version or null), timer ("cuda_events"
  | "perf_counter"),
  settings {iters, warmup, input_sets, quick, seed, routing, hidden, topk, num_experts, tokens_ht, tokens_ll,
            sweep_tokens, ll_layouts (the ll case's output layouts; absent in files written before), sms_requested,
            sms_supported, cases, recv_capacity_factor (--recv-capacity-factor or null; absent in files written
            before), ht_sms (more SM budgets of the ht case), peer_sms (DeepEP's SM budgets)},
  env {EPCOMM_* knobs of the run, e.g. EPCOMM_BLOCKS or a kernel variant} (absent in files written before),
  links {status ("ok" | "partial" | "n/a" | "error" | "skipped"), reason?, one_way_gbps[rank],
         concurrent_gbps[rank], concurrent_total_gbps, local_copy_gbps[rank], p2p[rank], peer_rank[rank], ...},
  floor_bandwidth {link_gbps[rank] | null, local_gbps[rank] | null, source},
  floor_latency {status ("ok" | "n/a" | "error"), reason?, launch_us, launch_graph_us (empty kernel, eager / graph
         replay), flag_rtt_us (slowest pair), pairs [{peer, path, rtt_us}], per_op_us (= launch_us + flag_rtt_us),
         per_op_graph_us, method, source?} (epcomm/bench/latency.py; absent in files written before: no latency term),
  peers {deepep: {status ("ok" | "partial" | "n/a" | "error" | "imported"), reason?, module, version, normal,
         low_latency, imported_from?}} (epcomm/bench/peer_deepep.py),
  results [record], errors [str], notes [str] (e.g. --sms not supported, graph fallback), ok (bool: every record
  verified and no error).
  compare (only with --compare): {against (path), schema "epcomm.bench-compare/1", tolerance, old, new, warnings,
           rows [{case..graph, occurrence, old_us, new_us, ratio, old_x_floor, new_x_floor, x_floor_ratio, new_status,
           verdict}],
           counts, ok} (epcomm/bench/compare.py).
record:
  case ("ht" | "ll" | "sweep" | "baseline"), impl ("epcomm" | "nccl" | "deepep"), op ("dispatch" | "combine" |
  "roundtrip"), mode (EPConfig mode of epcomm records, "ht" | "ll"; null for nccl; DeepEP's call for deepep records:
  "cached" | "normal" | "low_latency", epcomm/bench/peer_deepep.py. The ll case has one set of rows per mode,
  "ll" then "ht", same tokens and inputs; files written before that have only mode "ll" there), layout (EPConfig
  output layout of epcomm records, "grouped" | "batched"; null for nccl. The ll case repeats its rows of both
  modes with "batched" after the "grouped" ones, unless --no-batched; files written before have no layout field:
  read a missing one as "grouped"), capacity (EPConfig.recv_capacity_factor of epcomm records measured with
  --recv-capacity-factor; null: the default capacity, the worst case, and in files written before the field),
  format, tokens,
  hidden, topk, num_experts, world_size, graph (bool), status ("ok" | "wrong" | "error" | "n/a"),
  verified (bool: first iteration of this shape matched epcomm.reference before timing), error (str|null),
  iters, warmup, input_sets, time_us {median, p10, p90, min, max, mean, n} (slowest rank per iteration) | null,
  per_rank_median_us [rank], host_call_us (median host time of the call), wall_us (median host time to completion),
  bytes {link_send[rank], link_recv[rank], local[rank]}, link_bytes_max, local_bytes_max,
  link_gbps, local_gbps (bytes max / median time), floor {link_us, local_us, bandwidth_us (the larger of the two),
  latency_us (per-op latency x ops, null without floor_latency), ops (2 for a round trip), floor_us (= bandwidth_us
  + latency_us), binds} | null (files written before have no bandwidth_us / latency_us: floor_us is the bandwidth
  term), ratio_to_floor (median / floor), ratio_to_nccl (median / NCCL median of the same op and tokens),
  ratio_to_deepep (epcomm records: median / the fastest DeepEP record of the same case, op, format, tokens and SM
  budget), sms (int|null: SMs used), sms_budget (int|null: the SM limit asked for, null = all; absent in files
  written before, read as settings.sms_requested), peer_config (deepep records: the tuned Config), imported_from
  (rows copied from another run's JSON by --peer-json).
"""
from __future__ import annotations

import json
import os

from ..jsonable import jsonable

SCHEMA = "epcomm.bench/1"
PEER_IMPLS = ("deepep",)   # other libraries measured beside epcomm: their rows never make a run "not ok"
RECORD_KEYS = ("case", "impl", "op", "mode", "layout", "capacity", "format", "tokens", "hidden", "topk", "num_experts",
               "world_size", "graph", "status", "verified", "error", "iters", "warmup", "input_sets", "time_us",
               "per_rank_median_us", "host_call_us", "wall_us", "bytes", "link_bytes_max", "local_bytes_max",
               "link_gbps", "local_gbps", "floor", "ratio_to_floor", "ratio_to_nccl", "ratio_to_deepep", "sms",
               "sms_budget")
TOP_KEYS = ("schema", "date", "command", "code", "backend", "topology", "world_size", "nodes", "devices", "torch",
            "timer", "settings", "env", "links", "floor_bandwidth", "floor_latency", "peers", "results", "errors",
            "notes", "ok")


def fmt_num(v, spec: str = ".1f", na: str = "n/a") -> str:
    if v is None:
        return na
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def layout_of(rec: dict) -> str | None:
    """A record's output layout; records written before the field existed are of the default layout."""
    if "layout" in rec:
        return rec["layout"]
    return "grouped" if rec.get("impl") == "epcomm" else None


def capacity_of_cfg(cfg, impl: str):
    """A record's "capacity": the EPConfig's recv_capacity_factor (epcomm records; None: the worst case)."""
    return cfg.recv_capacity_factor if impl == "epcomm" else None


def capacity_of(rec: dict):
    """A record's receive capacity factor; None for the default (and for records written before the field)."""
    return rec.get("capacity")


def capacity_cell(rec: dict) -> str:
    c = capacity_of(rec)
    return "-" if c is None else f"x{c:g}"


def capacity_label(cfg) -> str:
    """' capacity xF' for a config with a receive capacity factor, else ''."""
    c = cfg.recv_capacity_factor
    return "" if c is None else f" capacity x{c:g}"


def effective_budget(rec: dict):
    """The SM budget a record ran under: its sms_budget, else (no limit asked for) the SMs it used."""
    return rec.get("sms_budget") if rec.get("sms_budget") is not None else rec.get("sms")


def peer_ratios(results: list[dict]) -> None:
    """ratio_to_deepep of every epcomm record: its median / the fastest DeepEP median of the same case, op, format
    and tokens, at the same SM budget (DeepEP rows without a budget, its low-latency kernels, match any)."""
    peers = [r for r in results if r.get("impl") in PEER_IMPLS and r.get("status") == "ok" and r.get("time_us")]
    for r in results:
        if r.get("impl") != "epcomm":
            r["ratio_to_deepep"] = None
            continue
        t = (r.get("time_us") or {}).get("median")
        same = [p["time_us"]["median"] for p in peers
                if (p["case"], p["op"], p["format"], p["tokens"]) == (r["case"], r["op"], r["format"], r["tokens"])
                and (p.get("sms_budget") is None or p.get("sms_budget") == effective_budget(r))]
        r["ratio_to_deepep"] = t / min(same) if (t and same) else None


def link_ratios(results: list[dict]) -> None:
    """Fill ratio_to_floor, ratio_to_nccl and ratio_to_deepep of every record in place."""
    nccl = {(r["op"], r["tokens"]): r for r in results
            if r.get("impl") == "nccl" and r.get("status") == "ok" and r.get("time_us")}
    for r in results:
        t = (r.get("time_us") or {}).get("median")
        fl = (r.get("floor") or {}).get("floor_us")
        r["ratio_to_floor"] = t / fl if (t and fl) else None
        base = nccl.get((r["op"], r["tokens"]))
        if r.get("impl") == "epcomm" and t and base:
            r["ratio_to_nccl"] = t / base["time_us"]["median"]
        else:
            r.setdefault("ratio_to_nccl", None)
    peer_ratios(results)


COLUMNS = (("case", 8), ("impl", 6), ("op", 9), ("mode", 11), ("layout", 7), ("cap", 4), ("fmt", 4), ("tokens", 6),
           ("graph", 5), ("median", 9), ("p10", 9), ("p90", 9), ("floor", 9), ("lat", 5), ("link", 9), ("local", 9),
           ("binds", 6), ("x floor", 7), ("x deepep", 8), ("x nccl", 7), ("link GB/s", 9), ("sms", 4),
           ("status", 6))

_BINDS = [name for name, _ in COLUMNS].index("binds")


def table(doc: dict) -> str:
    """The human table: one line per record, times in microseconds."""
    lines = []
    head = "  ".join(f"{name:>{w}}" for name, w in COLUMNS)
    lines.append(f"epcomm bench: {doc.get('world_size')} ranks, topology {doc.get('topology')}, backend "
                 f"{doc.get('backend')}, timer {doc.get('timer')}; times in us (median, p10, p90 over iterations, "
                 f"slowest rank each); 'x floor' = median/floor, 'x deepep' = median/DeepEP's fastest median (same "
                 f"op, format, tokens, SMs), 'x nccl' = median/NCCL median; 'lat' = the floor's latency term")
    links = doc.get("links") or {}
    if links.get("status") in ("ok", "partial"):
        lines.append("links: one-way " + ", ".join(fmt_num(v, ".0f") for v in links.get("one_way_gbps", []))
                     + " GB/s; all at once " + ", ".join(fmt_num(v, ".0f") for v in links.get("concurrent_gbps", []))
                     + f" GB/s (total {fmt_num(links.get('concurrent_total_gbps'), '.0f')}); device copy "
                     + ", ".join(fmt_num(v, ".0f") for v in links.get("local_copy_gbps", [])) + " GB/s (per rank)")
    else:
        lines.append(f"links: n/a ({links.get('reason', links.get('status', 'not measured'))})")
    fb = doc.get("floor_bandwidth") or {}
    lines.append(f"floor bandwidths: link {fb.get('link_gbps') or 'n/a'} GB/s, local {fb.get('local_gbps') or 'n/a'}"
                 f" GB/s ({fb.get('source', 'n/a')})")
    lines.append(latency_line(doc.get("floor_latency")))
    for name, st in (doc.get("peers") or {}).items():
        lines.append(f"peer {name}: {st.get('status')}" + (f" ({st['reason']})" if st.get("reason") else "")
                     + (f", rows from {st['imported_from']}" if st.get("imported_from") else ""))
    lines.append(head)
    lines.append("-" * len(head))
    for r in doc.get("results", []):
        t = r.get("time_us") or {}
        fl = r.get("floor") or {}
        cells = (r.get("case"), r.get("impl"), r.get("op"), r.get("mode") or "-", layout_of(r) or "-",
                 capacity_cell(r), r.get("format") or "-",
                 r.get("tokens", "-"), "yes" if r.get("graph") else "no", fmt_num(t.get("median")),
                 fmt_num(t.get("p10")), fmt_num(t.get("p90")), fmt_num(fl.get("floor_us")),
                 fmt_num(fl.get("latency_us"), na="-"),
                 fmt_num(fl.get("link_us")), fmt_num(fl.get("local_us")), fl.get("binds") or "n/a",
                 fmt_num(r.get("ratio_to_floor"), ".2f"), fmt_num(r.get("ratio_to_deepep"), ".2f", na="-"),
                 fmt_num(r.get("ratio_to_nccl"), ".2f"),
                 fmt_num(r.get("link_gbps"), ".3g"), fmt_num(sms_cell(r), "d"), r.get("status"))
        if str(cells[_BINDS]).startswith("dispatch:"):
            cells = cells[:_BINDS] + ("sum",) + cells[_BINDS + 1:]
        lines.append("  ".join(f"{str(c):>{w}}" for c, (_, w) in zip(cells, COLUMNS)))
        if r.get("error"):
            lines.append(f"{'':>10}^ {r['error']}")
    for e in doc.get("notes", []):
        lines.append(f"note: {e}")
    for e in doc.get("errors", []):
        lines.append(f"error: {e}")
    lines.append(f"result: {'OK' if doc.get('ok') else 'NOT OK (see status / errors above)'}")
    return "\n".join(lines)


def sms_cell(rec: dict):
    """The sms column: the SM budget asked for where there is one, else the SMs used."""
    return effective_budget(rec)


def latency_line(lat: dict | None) -> str:
    if not lat:
        return "floor latency: none (file written before the latency term)"
    if lat.get("status") != "ok":
        return f"floor latency: {lat.get('status')} ({lat.get('reason', '')}): floors are the bandwidth term alone"
    if lat.get("launch_us") is None:
        return f"floor latency: {fmt_num(lat.get('per_op_us'), '.2f')} us per op ({lat.get('source', '')})"
    pairs = ", ".join(f"0<->{p['peer']} {fmt_num(p['rtt_us'], '.2f')} us ({p['path']})" for p in lat.get("pairs", []))
    return (f"floor latency per op: {fmt_num(lat.get('per_op_us'), '.2f')} us eager, "
            f"{fmt_num(lat.get('per_op_graph_us'), '.2f')} us graph = empty launch "
            f"{fmt_num(lat.get('launch_us'), '.2f')} / {fmt_num(lat.get('launch_graph_us'), '.2f')} us + flag round "
            f"trip {fmt_num(lat.get('flag_rtt_us'), '.2f')} us ({pairs or 'one rank'})")


def write_json(doc: dict, path: str) -> None:
    """Atomic write (tmp + rename), so a crash mid-run leaves the last complete document."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(jsonable(doc), f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def plot_series(doc: dict) -> dict:
    """{label: [(tokens, median_us)]} for the latency-vs-tokens plot: epcomm sweep, NCCL baseline, dispatch floor."""
    series: dict[str, list] = {}
    sweep_tokens = set((doc.get("settings") or {}).get("sweep_tokens") or [])
    for r in doc.get("results", []):
        t = (r.get("time_us") or {}).get("median")
        if r.get("status") != "ok" or t is None or r.get("op") not in ("dispatch", "combine"):
            continue
        if r.get("case") == "sweep" and r.get("impl") == "epcomm":
            series.setdefault(f"epcomm {r['op']} ({r.get('format')})", []).append((r["tokens"], t))
            fl = (r.get("floor") or {}).get("floor_us")
            if fl:
                series.setdefault(f"floor {r['op']}", []).append((r["tokens"], fl))
        elif r.get("impl") == "nccl" and r.get("tokens") in sweep_tokens:
            series.setdefault(f"NCCL all_to_all {r['op']} (bf16)", []).append((r["tokens"], t))
    return {k: sorted(set(v)) for k, v in series.items()}


def write_png(doc: dict, path: str) -> str | None:
    """Latency vs tokens (log-log). Returns None on success, else why nothing was written."""
    series = plot_series(doc)
    if not series:
        return "no sweep results to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not available ({e})"
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "--" if label.startswith("floor") else "-o", label=label, markersize=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("latency (us, median)")
    s = doc.get("settings") or {}
    ax.set_title(f"epcomm {doc.get('topology')} ({doc.get('world_size')} ranks), hidden {s.get('hidden')}, "
                 f"top-{s.get('topk')} of {s.get('num_experts')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    """python -m epcomm.bench.report BENCH.json [PLOT.png]: print the table again, and draw the plot (for runs made
    where matplotlib was missing)."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main.__doc__)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    print(table(doc))
    if len(argv) > 1:
        why = write_png(doc, argv[1])
        print(f"png: {argv[1]}" if why is None else f"png: not written ({why})")
        return 0 if why is None else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
