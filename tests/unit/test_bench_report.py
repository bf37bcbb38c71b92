"""epcomm.bench.report: table, JSON document, plot series, ratios (no MPI, no torch)."""
import json

from epcomm.bench import report


def rec(**kw):
    base = {"case": "ht", "impl": "epcomm", "op": "dispatch", "mode": "ht", "format": "bf16", "tokens": 4096,
            "graph": False, "status": "ok", "verified": True, "error": None,
            "time_us": {"median": 300.0, "p10": 290.0, "p90": 320.0, "min": 280.0, "max": 400.0, "mean": 305.0,
                        "n": 50},
            "floor": {"link_us": 150.0, "local_us": 200.0, "floor_us": 200.0, "binds": "local",
                      "link_bytes_max": 58_000_000, "local_bytes_max": 600_000_000},
            "link_gbps": 193.3, "sms": None}
    base.update(kw)
    return base


def doc(results):
    return {"schema": report.SCHEMA, "world_size": 2, "topology": "local-2gpu", "backend": "gpu",
            "timer": "cuda_events", "links": {"status": "n/a", "reason": "test"}, "floor_bandwidth": {},
            "settings": {"sweep_tokens": [1, 2, 4096], "hidden": 7168, "topk": 8, "num_experts": 256},
            "results": results, "errors": [], "notes": ["--sms 8: not supported"], "ok": True}


def test_ratios():
    rs = [rec(), rec(impl="nccl", case="baseline", time_us={"median": 900.0}, floor=None),
          rec(op="combine", floor={"floor_us": None}), rec(tokens=128)]
    report.link_ratios(rs)
    assert rs[0]["ratio_to_floor"] == 1.5
    assert abs(rs[0]["ratio_to_nccl"] - 300 / 900) < 1e-12
    assert rs[1]["ratio_to_nccl"] is None          # NCCL is not compared with itself
    assert rs[2]["ratio_to_floor"] is None and rs[2]["ratio_to_nccl"] is None
    assert rs[3]["ratio_to_nccl"] is None          # no NCCL record at 128 tokens


def test_table_marks_missing_as_na():
    rs = [rec(), rec(case="baseline", impl="nccl", status="n/a", time_us=None, floor=None,
                     error="host backend: no NCCL baseline")]
    report.link_ratios(rs)
    out = report.table(doc(rs))
    lines = out.splitlines()
    assert any(" 300.0 " in line and "local" in line and line.rstrip().endswith("ok") for line in lines)
    assert any("n/a" in line and "nccl" in line for line in lines)
    assert "host backend: no NCCL baseline" in out
    assert "links: n/a (test)" in out
    assert "note: --sms 8: not supported" in out
    assert "result: OK" in out


def test_json_roundtrip_and_nan(tmp_path):
    d = doc([rec(link_gbps=float("nan"))])
    p = tmp_path / "b.json"
    report.write_json(d, str(p))
    back = json.loads(p.read_text())
    assert back["schema"] == report.SCHEMA
    assert back["results"][0]["link_gbps"] is None
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_series_from_sweep_and_nccl():
    rs = [rec(case="sweep", tokens=1, time_us={"median": 20.0}), rec(case="sweep", tokens=2, time_us={"median": 21.0}),
          rec(case="sweep", op="combine", tokens=1, time_us={"median": 25.0}, floor=None),
          rec(case="baseline", impl="nccl", tokens=2, time_us={"median": 500.0}),
          rec(case="baseline", impl="nccl", tokens=128, time_us={"median": 700.0}),   # not a sweep point
          rec(case="ht", tokens=4096)]                                                 # not in the sweep case
    s = report.plot_series(doc(rs))
    assert s["epcomm dispatch (bf16)"] == [(1, 20.0), (2, 21.0)]
    assert s["epcomm combine (bf16)"] == [(1, 25.0)]
    assert s["NCCL all_to_all dispatch (bf16)"] == [(2, 500.0)]
    assert s["floor dispatch"] == [(1, 200.0), (2, 200.0)]


def test_png_written_when_matplotlib_present(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    rs = [rec(case="sweep", tokens=t, time_us={"median": 10.0 * t}) for t in (1, 2, 4)]
    p = tmp_path / "b.png"
    assert report.write_png(doc(rs), str(p)) is None
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_png_without_results():
    assert report.write_png(doc([]), "/nonexistent/x.png") == "no sweep results to plot"


def test_table_mode_and_layout_columns_tell_ll_rows_apart():
    rs = [rec(case="ll", mode=m, layout=lay, format="fp8", tokens=128, graph=True)
          for lay in ("grouped", "batched") for m in ("ll", "ht")]
    rs.append(rec(case="baseline", impl="nccl", mode=None, layout=None, tokens=128))
    old = rec(case="ll", mode="ll", format="fp8", tokens=64)    # written before records had a layout
    old.pop("layout", None)
    rs.append(old)
    report.link_ratios(rs)
    rows = [line.split() for line in report.table(doc(rs)).splitlines()]
    head = next(c for c in rows if c[:3] == ["case", "impl", "op"])
    assert head[3:6] == ["mode", "layout", "cap"]
    assert [c[:8] for c in rows if c[:2] == ["ll", "epcomm"]] == [
        ["ll", "epcomm", "dispatch", m, lay, "-", "fp8", t] for lay, m, t in
        (("grouped", "ll", "128"), ("grouped", "ht", "128"), ("batched", "ll", "128"), ("batched", "ht", "128"),
         ("grouped", "ll", "64"))]
    assert any(c[:5] == ["baseline", "nccl", "dispatch", "-", "-"] for c in rows)


def test_layout_of_reads_a_missing_layout_as_the_default():
    assert report.layout_of({"impl": "epcomm", "layout": "batched"}) == "batched"
    assert report.layout_of({"impl": "epcomm"}) == "grouped"
    assert report.layout_of({"impl": "nccl"}) is None and report.layout_of({"impl": "nccl", "layout": None}) is None


def test_table_roundtrip_binds_shown_as_sum():
    r = rec(op="roundtrip", floor={"floor_us": 400.0, "link_us": 300.0, "local_us": 400.0,
                                   "binds": "dispatch:local combine:local"})
    line = next(row for row in report.table(doc([r])).splitlines() if "roundtrip" in row)
    assert " sum " in line and "dispatch:" not in line


def test_saved_perf_files_still_render(capsys):
    # JSON files committed before the mode column / ll-case "ht" rows existed must still print
    from pathlib import Path
    import pytest
    files = sorted((Path(__file__).resolve().parents[2] / "docs" / "perf").glob("bench-*.json"))
    if not files:
        pytest.skip("no saved bench JSON in docs/perf")
    for f in files:
        assert report.main([str(f)]) == 0
        out = capsys.readouterr().out
        assert " mode " in out and " layout " in out and "result:" in out


def test_capacity_rows_are_marked():
    """--recv-capacity-factor rows carry their factor (column "cap"); default-capacity rows and records written before
    the field show "-"."""
    rs = [rec(case="ht", capacity=None), rec(case="ht", capacity=2.0)]
    old = rec(case="ht")
    old.pop("capacity", None)
    rs.append(old)
    report.link_ratios(rs)
    rows = [line.split() for line in report.table(doc(rs)).splitlines()]
    assert [c[5] for c in rows if c[:2] == ["ht", "epcomm"]] == ["-", "x2", "-"]
    assert report.capacity_of(old) is None and report.capacity_cell({"capacity": 1.5}) == "x1.5"
