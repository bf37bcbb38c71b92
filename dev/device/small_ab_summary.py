"""Summary of dev/device/small_ab.sh: for every 128-token row (op, mode, layout, format) and arm, the median over the
repetitions of the bench's median (slowest rank), the reps' spread (min..max) and p10, and the change against the
first arm, in µs. A change smaller than the arms' spread is printed as such: it is not a result.

    python3 dev/device/small_ab_summary.py OUTDIR ARM [ARM ...] [--out PREFIX]   (ARM "-" = no variant)
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path


def tag(arm: str) -> str:
    return "baseline" if arm == "-" else arm.replace(",", "_")


def rows_of(path: str) -> dict:
    d = json.loads(Path(path).read_text())
    out = {}
    for r in d.get("results", []):
        if r.get("impl") != "epcomm" or r.get("status") != "ok":
            continue
        out[(r["op"], r["mode"], r.get("layout") or "grouped", r["format"])] = (r["time_us"]["median"],
                                                                              r["time_us"]["p10"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--out", default=None, help="write PREFIX.json")
    a = ap.parse_args()
    table: dict = {}
    for arm in a.arms:
        for f in sorted(glob.glob(f"{a.outdir}/ll-{tag(arm)}-rep*.json")):
            for key, (med, p10) in rows_of(f).items():
                table.setdefault(key, {}).setdefault(arm, []).append((med, p10))
    result = []
    print(f"{'op':9} {'mode':4} {'layout':7} {'fmt':4} " + " ".join(f"{tag(x)[:22]:>34}" for x in a.arms))
    for key in sorted(table):
        cells, ref = [], None
        for arm in a.arms:
            v = table[key].get(arm, [])
            if not v:
                cells.append(f"{'-':>34}")
                continue
            meds = [m for m, _ in v]
            med, p10 = statistics.median(meds), statistics.median(p for _, p in v)
            if ref is None:
                ref = (med, min(meds), max(meds))
                cells.append(f"{med:7.1f} [{min(meds):.1f}..{max(meds):.1f}] p10 {p10:5.1f}".rjust(34))
                d = 0.0
            else:
                d = med - ref[0]
                overlap = min(meds) <= ref[2] and max(meds) >= ref[1]
                cells.append(f"{med:7.1f} ({d:+.1f}{'~' if overlap else '!'}) p10 {p10:5.1f}".rjust(34))
            result.append({"op": key[0], "mode": key[1], "layout": key[2], "format": key[3], "arm": arm,
                           "median_us": med, "reps_us": meds, "p10_us": p10, "change_us": d})
        print(f"{key[0]:9} {key[1]:4} {key[2]:7} {key[3]:4} " + " ".join(cells))
    print("µs; [min..max] of the reps' medians; (+x~): within the reference arm's spread (not a result); "
          "(+x!): outside it")
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
