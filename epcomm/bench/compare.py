"""Does a benchmark run reproduce a recorded one? Compare two epcomm.bench JSON documents row by row.

    python -m epcomm.bench.compare docs/perf/bench-local-2gpu.json new.json
    python -m launch bench -t configs/local-2gpu.yaml -- --compare docs/perf/bench-local-2gpu.json   (after the run)

Rows are matched on (case, impl, op, mode, layout, capacity, format, tokens, graph, sms_budget) and their order
among rows with the same fields (the ht case has two bf16 combines: after the bf16 and after the fp8 dispatch); a
record without a layout (written before the field existed) is of the default layout, "grouped", one without a
capacity of the default capacity (null), and one without an sms_budget ran under the run's --sms
(settings.sms_requested), so older files still match row for row. Rows of a receive capacity factor the new run did
not measure (--recv-capacity-factor) are left out, with a warning.
Each common row shows the recorded and the new median, new / recorded, and the same for the ratio to the floor: the
floor is measured in each run, so that ratio still means something when today's link or card is slower than the
recorded one. Verdict per row, on the
median: "same" (within +-tolerance), "faster", "slower", "failed" (the new row has no timing: wrong, error),
"missing" (recorded, not in the new run), "new" (only in the new run). The runs must have the same shapes (backend,
world size, hidden, top-k, experts, routing, SM limit); another topology or card is compared, with a warning, and so
are other EPCOMM_* knobs (the `env` of the runs: an A/B of two kernel variants) and a floor with a latency term
against one without. A peer's rows (DeepEP) are compared and shown like any other, but never make the comparison
"CHANGED": they say whether the machine moved, not epcomm.

Exit status: 0 no row of epcomm or NCCL slower, failed or missing; 1 some were; 2 the documents cannot be compared.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .report import PEER_IMPLS, capacity_cell, capacity_of, layout_of

SCHEMA = "epcomm.bench-compare/1"
DEFAULT_TOLERANCE = 0.15   # the lent machines vary by ~5-10 % between calls (docs/PERF.md); more is a change
KEY = ("case", "impl", "op", "mode", "layout", "capacity", "format", "tokens", "graph", "sms_budget")
BAD = ("slower", "failed", "missing")
# what must match for a row-by-row comparison to mean anything (top level, then settings)
SAME_TOP = ("backend", "world_size")
SAME_SETTINGS = ("hidden", "topk", "num_experts", "routing", "sms_requested")


class NotComparable(ValueError):
    """The two documents cannot be compared row by row (unreadable, not a bench document, other shapes)."""


def load(path: str) -> dict[str, Any]:
    """A bench JSON document, with a clear error when it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise NotComparable(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise NotComparable(f"{path}: not JSON ({e})") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not str(schema).startswith("epcomm.bench/"):
        raise NotComparable(f"{path}: not an epcomm.bench document (schema {schema!r})")
    return doc


def _cards(doc: dict) -> list[str]:
    return sorted({d.get("name") for d in (doc.get("devices") or []) if d.get("name")})


def _side(doc: dict) -> dict[str, Any]:
    return {"date": doc.get("date"), "topology": doc.get("topology"), "backend": doc.get("backend"),
            "cards": _cards(doc), "code": doc.get("code")}


def _field(rec: dict, k: str, doc: dict):
    """A record's KEY field, with the defaults of files written before the field existed."""
    if k == "layout":
        return layout_of(rec)
    if k == "capacity":
        return capacity_of(rec)
    if k == "sms_budget" and "sms_budget" not in rec:
        return (doc.get("settings") or {}).get("sms_requested")
    return rec.get(k)


def _keyed(doc: dict) -> dict[tuple, dict]:
    """Records by (KEY fields, occurrence): the ht case has two combine rows with the same fields (after the bf16
    and after the fp8 dispatch), told apart by their order."""
    out: dict[tuple, dict] = {}
    for rec in doc.get("results", []):
        base = tuple(_field(rec, k, doc) for k in KEY)
        n = sum(1 for k in out if k[:-1] == base)
        out[base + (n,)] = rec
    return out


def _median(rec: dict | None) -> float | None:
    t = (rec or {}).get("time_us") or {}
    v = t.get("median")
    return float(v) if (rec or {}).get("status") == "ok" and v else None


def _ratio(new, old):
    return new / old if (new is not None and old) else None


def _by_ratio(r: float, tolerance: float) -> str:
    return "same" if abs(r - 1.0) <= tolerance else ("slower" if r > 1.0 else "faster")


def check_comparable(old: dict, new: dict) -> list[str]:
    """Warnings for differences that leave the comparison meaningful; NotComparable for those that do not."""
    problems = []
    for k in SAME_TOP:
        if old.get(k) != new.get(k):
            problems.append(f"{k}: recorded {old.get(k)!r}, new {new.get(k)!r}")
    so, sn = old.get("settings") or {}, new.get("settings") or {}
    for k in SAME_SETTINGS:
        if so.get(k) != sn.get(k):
            problems.append(f"settings.{k}: recorded {so.get(k)!r}, new {sn.get(k)!r}")
    if problems:
        raise NotComparable("different shapes, row-by-row times would mislead: " + "; ".join(problems))
    warnings = []
    if old.get("topology") != new.get("topology"):
        warnings.append(f"topology: recorded {old.get('topology')!r}, new {new.get('topology')!r}")
    if _cards(old) != _cards(new):
        warnings.append(f"cards: recorded {_cards(old) or 'n/a'}, new {_cards(new) or 'n/a'}")
    if (so.get("iters"), so.get("quick")) != (sn.get("iters"), sn.get("quick")):
        warnings.append(f"iterations: recorded {so.get('iters')} (quick {so.get('quick')}), "
                        f"new {sn.get('iters')} (quick {sn.get('quick')}): fewer iterations, more noise")
    if (old.get("env") or {}) != (new.get("env") or {}):
        warnings.append(f"EPCOMM_* knobs: recorded {old.get('env') or {}}, new {new.get('env') or {}}")
    lo, ln = _latency(old), _latency(new)
    if (lo is None) != (ln is None):
        which = "new" if lo is None else "recorded"
        warnings.append(f"only the {which} run's floor has a latency term "
                        f"({ln if lo is None else lo:.2f} us per op): its x-floor ratios are lower by that much")
    return warnings


def _latency(doc: dict):
    lat = doc.get("floor_latency") or {}
    return lat.get("per_op_us") if lat.get("status") == "ok" else None


def compare(old: dict, new: dict, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The comparison document (schema epcomm.bench-compare/1). Raises NotComparable."""
    if not tolerance > 0:
        raise NotComparable(f"tolerance must be > 0, got {tolerance}")
    warnings = check_comparable(old, new)
    olds, news = _keyed(old), _keyed(new)
    ran = set((new.get("settings") or {}).get("cases") or [r.get("case") for r in new.get("results", [])])
    skipped = sorted({k[0] for k in olds if k[0] not in ran and k not in news})
    if skipped:
        warnings.append(f"not run this time, not compared: case {', '.join(map(str, skipped))}")
    ll_layouts = (new.get("settings") or {}).get("ll_layouts")   # absent in files written before --no-batched
    lay = KEY.index("layout")
    skipped_ll = sorted({k[lay] for k in olds if k[0] == "ll" and k[0] in ran and ll_layouts is not None
                         and k[lay] not in ll_layouts and k not in news})
    if skipped_ll:
        warnings.append(f"not run this time, not compared: ll case, layout {', '.join(map(str, skipped_ll))}")
    skipped_caps = _capacities_not_run(olds, news, new)
    if skipped_caps:
        warnings.append(f"not run this time, not compared: receive capacity factor "
                        f"{', '.join(f'{c:g}' for c in skipped_caps)}")
    cap = KEY.index("capacity")
    rows = []
    for k in list(olds) + [k for k in news if k not in olds]:
        o, n = olds.get(k), news.get(k)
        if n is None and (k[0] in skipped or (k[0] == "ll" and k[lay] in skipped_ll) or k[cap] in skipped_caps):
            continue
        mo, mn = _median(o), _median(n)
        if mn is not None:
            verdict = "new" if mo is None else _by_ratio(mn / mo, tolerance)
        elif n is not None and n.get("status") in ("wrong", "error"):
            verdict = "failed"
        elif mo is not None:
            verdict = "failed" if n is not None else "missing"   # timed before, not now
        else:
            continue   # timed in neither run (n/a: no NCCL on the host backend, say)
        rows.append({**dict(zip(KEY, k)), "occurrence": k[-1], "old_us": mo, "new_us": mn, "ratio": _ratio(mn, mo),
                     "old_x_floor": (o or {}).get("ratio_to_floor"), "new_x_floor": (n or {}).get("ratio_to_floor"),
                     "x_floor_ratio": _ratio((n or {}).get("ratio_to_floor"), (o or {}).get("ratio_to_floor")),
                     "new_status": (n or {}).get("status"), "verdict": verdict})
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("same", "faster", "slower", "failed", "missing", "new")}
    own_bad = [r for r in rows if r["verdict"] in BAD and r["impl"] not in PEER_IMPLS]
    return {"schema": SCHEMA, "tolerance": tolerance, "old": _side(old), "new": _side(new), "warnings": warnings,
            "rows": rows, "counts": counts, "ok": not own_bad}


def _capacities_not_run(olds: dict, news: dict, new: dict) -> list:
    """Receive capacity factors of recorded rows that the new run did not measure (its --recv-capacity-factor)."""
    factor = (new.get("settings") or {}).get("recv_capacity_factor")
    cap = KEY.index("capacity")
    return sorted({k[cap] for k in olds if k[cap] is not None and k[cap] != factor and k not in news})


def _f(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def table(cmp: dict, only_changes: bool = False) -> str:
    head = (f"{'case':>8} {'impl':>6} {'op':>9} {'mode':>11} {'layout':>7} {'cap':>4} {'fmt':>4} {'tokens':>6} "
            f"{'graph':>5} {'sms':>4} "
            f"{'recorded':>9} {'new':>9} {'new/rec':>7} {'xfl rec':>7} {'xfl new':>7}  verdict")
    lines = [head, "-" * len(head)]
    for r in cmp["rows"]:
        if only_changes and r["verdict"] == "same":
            continue
        op = r["op"] + (f"#{r['occurrence'] + 1}" if r["occurrence"] else "")   # the 2nd row with these fields
        lines.append(f"{r['case']:>8} {r['impl']:>6} {op:>9} {r['mode'] or '-':>11} {r['layout'] or '-':>7} "
                     f"{capacity_cell(r):>4} "
                     f"{r['format']:>4} {r['tokens']:>6} {'yes' if r['graph'] else 'no':>5} "
                     f"{'all' if r['sms_budget'] is None else r['sms_budget']:>4} "
                     f"{_f(r['old_us']):>9} {_f(r['new_us']):>9} "
                     f"{_f(r['ratio'], '.2f'):>7} {_f(r['old_x_floor'], '.2f'):>7} {_f(r['new_x_floor'], '.2f'):>7}  "
                     f"{r['verdict']}")
    for w in cmp["warnings"]:
        lines.append(f"warning: {w}")
    lines.append(summary(cmp))
    return "\n".join(lines)


def summary(cmp: dict) -> str:
    c = cmp["counts"]
    parts = ", ".join(f"{n} {v}" for v, n in c.items() if n)
    when = cmp["old"].get("date") or "?"
    commit = ((cmp["old"].get("code") or {}).get("commit") or "")[:10]
    when += f", commit {commit}" if commit else ""
    return (f"compare: {'OK' if cmp['ok'] else 'CHANGED'}: {sum(c.values())} rows against the run of {when} "
            f"({parts or 'nothing in common'}; tolerance +-{cmp['tolerance'] * 100:g} %)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epcomm.bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recorded", help="the recorded run (e.g. docs/perf/bench-local-2gpu.json)")
    ap.add_argument("new", help="the run to check")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"relative band of 'same' (default {DEFAULT_TOLERANCE:g} = +-{DEFAULT_TOLERANCE * 100:g} %%)")
    ap.add_argument("--changes", action="store_true", help="print only the rows that are not 'same'")
    ap.add_argument("--json", metavar="PATH", help="write the comparison document here")
    a = ap.parse_args(argv)
    try:
        cmp = compare(load(a.recorded), load(a.new), a.tolerance)
    except NotComparable as e:
        print(f"epcomm.bench.compare: {e}", file=sys.stderr)
        return 2
    print(table(cmp, a.changes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(cmp, f, indent=1)
    return 0 if cmp["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
