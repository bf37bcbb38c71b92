"""python -m epcomm.bench through the launcher on the host backend (4 ranks): the driver, the JSON schema, and
that every timed epcomm result was verified against the reference first."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from epcomm.bench import report

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mpi


def test_bench_quick_host(tmp_path):
    pytest.importorskip("mpi4py")
    if not (REPO / "epcomm" / "buffer.py").exists():
        pytest.skip("EPBuffer not in this checkout yet")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "launch", "bench", "-t", "configs/cpu-4rank.yaml", "--timeout", "240",
           "--", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert set(report.TOP_KEYS) <= set(doc)
    assert doc["schema"] == report.SCHEMA and doc["backend"] == "host" and doc["world_size"] == 4
    assert doc["timer"] == "perf_counter" and doc["ok"] is True and doc["errors"] == []
    assert doc["links"]["status"] == "n/a"
    from epcomm.backends.gpu import jit
    assert doc["code"]["kernel_source"] == jit.source_hash()   # which kernels, with or without git
    assert doc["code"]["kernel_variant"] == "baseline"          # no EPCOMM_VARIANT in the test environment
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert doc["code"]["commit"] == head.stdout.strip() and isinstance(doc["code"]["dirty"], bool)
    recs = doc["results"]
    for r in recs:
        assert set(report.RECORD_KEYS) <= set(r), set(report.RECORD_KEYS) - set(r)
    ep = [r for r in recs if r["impl"] == "epcomm"]
    seen = {(r["case"], r["op"], r["format"], r["tokens"]) for r in ep}
    assert ("ht", "dispatch", "bf16", 32) in seen and ("ht", "dispatch", "fp8", 32) in seen
    assert ("ll", "dispatch", "fp8", 16) in seen and ("ll", "combine", "bf16", 16) in seen
    # the ll shape once per wire design: mode "ll" rows first (as before), then the same ops with mode "ht"; then
    # both again with the batched output layout (every row verified below, like the others)
    ll = [(r["layout"], r["mode"], r["op"], r["format"], r["tokens"]) for r in ep if r["case"] == "ll"]
    assert ll == [(lay, m, op, f, 16) for lay in ("grouped", "batched") for m in ("ll", "ht")
                  for op, f in (("dispatch", "fp8"), ("combine", "bf16"), ("roundtrip", "fp8"))], ll
    assert doc["settings"]["ll_layouts"] == ["grouped", "batched"]
    assert all(r["mode"] == "ht" and r["layout"] == "grouped" for r in ep if r["case"] != "ll")
    assert {r["tokens"] for r in ep if r["case"] == "sweep"} == {1, 2, 4, 8, 16, 32}
    for r in ep:
        assert r["status"] == "ok" and r["verified"] is True, r
        t = r["time_us"]
        assert t["n"] == doc["settings"]["iters"] and 0 < t["p10"] <= t["median"] <= t["p90"]
        assert len(r["per_rank_median_us"]) == 4 and len(r["bytes"]["link_send"]) == 4
        assert r["floor"]["floor_us"] is None and r["ratio_to_floor"] is None   # no bandwidths on the host
    nccl = [r for r in recs if r["impl"] == "nccl"]
    assert nccl and all(r["status"] == "n/a" and r["time_us"] is None for r in nccl)
    assert "n/a" in proc.stdout and "result: OK" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()]
    ll_rows = [c for c in rows if c[:2] == ["ll", "epcomm"]]   # case impl op mode layout fmt tokens ... status
    assert [(c[2], c[3], c[4]) for c in ll_rows] == [(op, m, lay) for lay in ("grouped", "batched")
                                                     for m in ("ll", "ht")
                                                     for op in ("dispatch", "combine", "roundtrip")], ll_rows
    assert all(c[-1] == "ok" for c in ll_rows)


def test_bench_compare_against_a_recorded_run(tmp_path):
    """--compare: the shapes are checked before anything runs (exit 2), and a run is compared row by row (a band
    wide enough that the host's noise cannot fail it; the verdict logic is tested in tests/unit)."""
    pytest.importorskip("mpi4py")
    first = tmp_path / "first.json"
    base = [sys.executable, "-m", "launch", "bench", "-t", "configs/cpu-4rank.yaml", "--timeout", "120", "--",
            "--quick", "--case", "ht"]
    proc = subprocess.run(base + ["--json", str(first)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = tmp_path / "second.json"
    proc = subprocess.run(base + ["--case", "ht,sweep", "--sweep-max", "2", "--json", str(second),
                                  "--compare", str(first), "--tolerance", "100"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmp = json.loads(second.read_text())["compare"]
    assert cmp["ok"] and cmp["against"] == str(first)
    assert {r["verdict"] for r in cmp["rows"]} == {"same", "new"}   # the sweep rows are new
    assert cmp["counts"]["same"] == 6   # ht: dispatch, combine, round trip after a bf16 and after an fp8 dispatch
    assert "compare: OK" in proc.stdout
    proc = subprocess.run(base + ["--hidden", "128", "--compare", str(first)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "settings.hidden: recorded 256, new 128" in proc.stderr, proc.stderr[-3000:]


def test_bench_capacity_rows_are_verified_against_their_own_shapes(tmp_path):
    """--recv-capacity-factor F below the worst case (4 ranks, F = 1.5 < 4): the capacity rows' outputs have fewer
    rows than the worst-case rows of the same shape, and each is checked against the spec of its own buffer (the 2 x
    H200 run of 2026-11-30 found the capacity rows compared with the worst case's shapes)."""
    pytest.importorskip("mpi4py")
    out = tmp_path / "bench-cap.json"
    cmd = [sys.executable, "-m", "launch", "bench", "-t", "configs/cpu-4rank.yaml", "--timeout", "240",
           "--", "--quick", "--case", "ht,ll", "--no-batched", "--recv-capacity-factor", "1.5", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    ep = [r for r in json.loads(out.read_text())["results"] if r["impl"] == "epcomm"]
    caps = [r for r in ep if r["capacity"] == 1.5]
    assert caps and len(caps) == len(ep) - len(caps)
    assert all(r["status"] == "ok" and r["verified"] is True for r in ep), [r["error"] for r in ep if r["error"]]
