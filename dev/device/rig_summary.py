"""Summary of a dev/device/one_gpu_rig.sh run: one table on screen and rig-summary.json.

    python dev/device/rig_summary.py OUT/rig-steps.tsv OUT
Reads the steps the rig recorded (step, config, ranks, MPS %, exit status, seconds, log, kind) and each step's log:
the worker's "[rank r] SUMMARY pass=P fail=F" lines (checks passed / run, per rank), the MoE example's "OK" lines,
smoke's JSON report, the fencing test's survivor lines. A step passes when it exited 0 and every rank reported with
no failure.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

SUMMARY = re.compile(r"\[rank (\d+)\] SUMMARY pass=(\d+) fail=(\d+)")
MOE = re.compile(r"\[rank (\d+)\] moe_layer \S+: (OK|FAILED)")


def per_rank(kind: str, log: Path, out: Path) -> dict[int, tuple[int, int]]:
    """{rank: (passed, run)} from a step's log (or smoke's JSON)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    got: dict[int, tuple[int, int]] = {}
    if kind == "worker":
        for r, p, f in SUMMARY.findall(text):
            got[int(r)] = (int(p), int(p) + int(f))
    elif kind == "moe":
        for r, ok in MOE.findall(text):
            got[int(r)] = (int(ok == "OK"), 1)
    elif kind == "demo":   # rank 0 prints one row per rank: "<rank> <node> <rows> <us> <us>  ok"
        if "demo: dispatch and combine match the reference" in text:
            for r, status in re.findall(r"^\s*(\d+)\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+(ok|MISMATCH)", text, re.M):
                got[int(r)] = (int(status == "ok"), 1)
    elif kind == "compat":   # rank 0 prints "rank R: P checks passed, F failed" for every rank
        for r, p, f in re.findall(r"^rank (\d+): (\d+) checks passed, (\d+) failed", text, re.M):
            got[int(r)] = (int(p), int(p) + int(f))
    elif kind == "fence":   # tests/gpu/fence_one_rank.py: one line per survivor (the killed rank prints nothing);
        # tests/gpu/fence_live.py: one line per rank
        for r in re.findall(r"^rank (\d+): (?:rank \d+ killed in round \d+ .*: ok|fence_live ok)", text, re.M):
            got[int(r)] = (1, 1)
        for r in re.findall(r"^FAIL rank (\d+):", text, re.M):
            got[int(r)] = (0, 1)
    elif kind == "smoke":
        try:
            rep = json.loads((out / "smoke8.json").read_text())
        except (OSError, ValueError):
            return got
        for st in (rep.get("stages") or {}).values():
            for r, s in enumerate(st.get("per_rank_status") or []):
                p, n = got.get(r, (0, 0))
                got[r] = (p + (s == "ok"), n + 1)
    return got


def counts_text(ranks: int, got: dict[int, tuple[int, int]]) -> str:
    if not got:
        return "-"
    vals = set(got.values())
    missing = ranks - len(got) if ranks else 0
    if len(vals) == 1:
        p, n = vals.pop()
        text = f"{p}/{n} x{len(got)}"
    else:
        text = ", ".join(f"r{r} {p}/{n}" for r, (p, n) in sorted(got.items()))
    return text + (f" ({missing} ranks silent)" if missing > 0 else "")


def main(argv: list[str]) -> int:
    tsv, out = Path(argv[0]), Path(argv[1])
    rows = []
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        step, config, ranks, mps, rc, secs, log, kind = (line.split("\t") + [""] * 8)[:8]
        n = int(ranks) if ranks.isdigit() else 0
        got = per_rank(kind, Path(log), out) if kind not in ("build", "bench") else {}
        if rc in ("skip", "no-mps"):
            status = "NOT RUN" if rc == "skip" else "NO MPS"
        elif rc == "0" and (kind in ("build", "bench") or (len(got) == n and all(p == t for p, t in got.values()))):
            status = "PASS"
        else:
            status = "TIMEOUT" if rc in ("124", "137") else "FAIL"
        rows.append({"step": step, "config": config, "ranks": n or None,
                     "mps_percent": int(mps) if mps.isdigit() else None,
                     "status": status, "exit": rc, "seconds": int(secs or 0),
                     "checks": {str(r): {"passed": p, "run": t} for r, (p, t) in sorted(got.items())},
                     "checks_text": counts_text(n, got), "log": log})
    try:
        commit = os.environ.get("EPCOMM_COMMIT") or subprocess.run(
            ["git", "log", "-1", "--format=%H"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = ""
    ok = bool(rows) and all(r["status"] == "PASS" for r in rows)
    print(f"\none-GPU rig: {'ALL PASS' if ok else 'NOT ALL PASS'}  "
          f"({gpu or 'no GPU info'}; commit {commit[:12] or '?'})")
    print(f"{'step':<12} {'config':<16} {'ranks':>5} {'MPS %':>5}  {'status':<8} {'checks passed/run per rank':<30} "
          f"{'s':>4}")
    for r in rows:
        print(f"{r['step']:<12} {r['config']:<16} {r['ranks'] or '-':>5} {r['mps_percent'] or '-':>5}  "
              f"{r['status']:<8} {r['checks_text']:<30} {r['seconds']:>4}")
    print(f"total {sum(r['seconds'] for r in rows)} s; shared-GPU timings are not link figures")
    left = list(dict.fromkeys(r["step"].split("-")[0] for r in rows if r["status"] == "NOT RUN"))
    if left:
        print(f"not run for lack of time: bash dev/device/one_gpu_rig.sh prebuild,{','.join(left)}")
    summary = {"ok": ok, "commit": commit, "gpu": gpu, "steps": rows}
    (out / "rig-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
