"""epcomm.bench.compare: does a run reproduce a recorded one (no MPI, no torch)."""
import copy
import json

import pytest

from epcomm.bench import compare as C


def rec(median=300.0, status="ok", **kw):
    base = {"case": "ht", "impl": "epcomm", "op": "dispatch", "mode": "ht", "format": "bf16", "tokens": 4096,
            "graph": False, "status": status, "time_us": {"median": median} if status == "ok" else None,
            "ratio_to_floor": median / 200.0 if status == "ok" else None}
    base.update(kw)
    return base


def doc(results, **kw):
    d = {"schema": "epcomm.bench/1", "date": "2026-11-25T20:20:43+00:00", "backend": "gpu", "world_size": 2,
         "topology": "local-2gpu", "devices": [{"name": "NVIDIA H100 80GB HBM3"}] * 2,
         "settings": {"hidden": 7168, "topk": 8, "num_experts": 256, "routing": "uniform", "sms_requested": None,
                      "iters": 50, "quick": False, "cases": ["baseline", "ht", "ll"]},
         "results": results}
    d.update(kw)
    return d


def verdicts(cmp):
    return {(r["op"], r["format"], r["tokens"]): r["verdict"] for r in cmp["rows"]}


def test_same_faster_slower_by_tolerance():
    old = doc([rec(300.0), rec(300.0, op="combine"), rec(300.0, format="fp8")])
    new = doc([rec(340.0), rec(200.0, op="combine"), rec(350.0, format="fp8")])
    cmp = C.compare(old, new, tolerance=0.15)
    assert verdicts(cmp) == {("dispatch", "bf16", 4096): "same", ("combine", "bf16", 4096): "faster",
                             ("dispatch", "fp8", 4096): "slower"}
    assert not cmp["ok"] and cmp["counts"]["slower"] == 1
    row = cmp["rows"][2]
    assert row["ratio"] == pytest.approx(350 / 300) and row["x_floor_ratio"] == pytest.approx(350 / 300)
    assert C.compare(old, new, tolerance=0.2)["ok"]   # 350 / 300 = 1.17 is inside +-20 %


def test_failed_missing_new_and_untimed_rows():
    old = doc([rec(), rec(tokens=128), rec(tokens=1),
               rec(case="baseline", impl="nccl", mode=None, status="n/a")])
    new = doc([rec(status="wrong"), rec(tokens=2),
               rec(case="baseline", impl="nccl", mode=None, status="n/a")])
    cmp = C.compare(old, new)
    assert verdicts(cmp) == {("dispatch", "bf16", 4096): "failed", ("dispatch", "bf16", 128): "missing",
                             ("dispatch", "bf16", 1): "missing", ("dispatch", "bf16", 2): "new"}
    assert not cmp["ok"]   # the n/a baseline of both runs is not a row at all
    assert C.compare(doc([rec()]), doc([rec(), rec(tokens=2)]))["ok"]   # a row only in the new run is fine


def test_cases_not_run_are_not_missing():
    old = doc([rec(), rec(case="ll", tokens=128, graph=True)])
    new = doc([rec()], settings={**doc([])["settings"], "cases": ["ht"]})
    cmp = C.compare(old, new)
    assert cmp["ok"] and [r["case"] for r in cmp["rows"]] == ["ht"]
    assert any("not compared: case ll" in w for w in cmp["warnings"])


def test_other_shapes_are_refused_other_cards_are_warned():
    old = doc([rec()])
    for path, value in (("hidden", 4096), ("sms_requested", 24), ("routing", "skewed")):
        new = copy.deepcopy(old)
        new["settings"][path] = value
        with pytest.raises(C.NotComparable, match=f"settings.{path}"):
            C.compare(old, new)
    with pytest.raises(C.NotComparable, match="world_size"):
        C.compare(old, doc([rec()], world_size=4))
    cmp = C.compare(old, doc([rec()], devices=[{"name": "NVIDIA H200"}] * 2, topology="sim-2node"))
    assert cmp["ok"] and len(cmp["warnings"]) == 2
    with pytest.raises(C.NotComparable, match="tolerance"):
        C.compare(old, old, tolerance=0)


def test_table_and_summary():
    cmp = C.compare(doc([rec(), rec(op="combine")]), doc([rec(), rec(500.0, op="combine")]))
    text = C.table(cmp)
    assert "slower" in text and "same" in text
    assert "same" not in C.table(cmp, only_changes=True).split("\n", 2)[2].rsplit("\n", 1)[0]
    assert C.summary(cmp).startswith("compare: CHANGED: 2 rows against the run of 2026-11-25T20:20:43+00:00")


def test_cli_exit_status(tmp_path, capsys):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(doc([rec()])))
    b.write_text(json.dumps(doc([rec(400.0)])))
    c.write_text("{}")
    out = tmp_path / "cmp.json"
    assert C.main([str(a), str(a)]) == 0
    assert C.main([str(a), str(b), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["counts"]["slower"] == 1
    assert C.main([str(a), str(c)]) == 2
    assert C.main([str(a), str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "not an epcomm.bench document" in err and "cannot read" in err


def test_rows_with_the_same_fields_are_told_apart_by_order():
    """The ht case records two bf16 combines (after the bf16 and after the fp8 dispatch): both are compared."""
    old = doc([rec(295.6, op="combine"), rec(383.0, op="combine")])
    new = doc([rec(296.0, op="combine"), rec(300.0, op="combine")])
    cmp = C.compare(old, new)
    assert [r["verdict"] for r in cmp["rows"]] == ["same", "faster"]
    assert [r["occurrence"] for r in cmp["rows"]] == [0, 1]


def test_the_recorded_files_compare_with_themselves_row_for_row():
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[2] / "docs" / "perf").glob("bench-*.json")):
        d = C.load(str(path))
        cmp = C.compare(d, d)
        timed = [r for r in d["results"] if r.get("status") == "ok" and (r.get("time_us") or {}).get("median")]
        assert cmp["ok"] and cmp["counts"]["same"] == len(timed), path.name


def test_records_without_a_layout_match_the_default_layout_and_batched_rows_are_their_own():
    """Files recorded before the layout field: their rows are "grouped" ones; the batched rows of a new run are new,
    never compared with the grouped ones."""
    ll = dict(case="ll", mode="ll", format="fp8", tokens=128, graph=True)
    old = doc([rec(40.0, **ll)])
    new = doc([rec(41.0, layout="grouped", **ll), rec(90.0, layout="batched", **ll)],
              settings={**doc([])["settings"], "ll_layouts": ["grouped", "batched"]})
    cmp = C.compare(old, new)
    assert [(r["layout"], r["verdict"]) for r in cmp["rows"]] == [("grouped", "same"), ("batched", "new")]
    assert cmp["ok"]
    back = C.compare(new, old)     # the other way: the batched row is recorded, the old-style run lacks it
    assert [(r["layout"], r["verdict"]) for r in back["rows"]] == [("grouped", "same"), ("batched", "missing")]
    assert "batched" in C.table(cmp)


def test_layouts_not_run_are_not_missing():
    ll = dict(case="ll", mode="ll", format="fp8", tokens=128, graph=True)
    both = {**doc([])["settings"], "ll_layouts": ["grouped", "batched"]}
    old = doc([rec(40.0, layout="grouped", **ll), rec(90.0, layout="batched", **ll)], settings=both)
    new = doc([rec(40.0, layout="grouped", **ll)], settings={**both, "ll_layouts": ["grouped"]})   # --no-batched
    cmp = C.compare(old, new)
    assert [(r["layout"], r["verdict"]) for r in cmp["rows"]] == [("grouped", "same")] and cmp["ok"]
    assert any("layout batched" in w for w in cmp["warnings"])
    lost = doc([rec(40.0, layout="grouped", **ll)], settings=both)      # batched was to run: its row is missing
    assert [r["verdict"] for r in C.compare(old, lost)["rows"]] == ["same", "missing"]


def test_capacity_rows_are_their_own_and_old_files_match_the_default():
    """Rows measured with --recv-capacity-factor F (capacity F) never match the default-capacity rows; a recorded file
    without the field matches the new run's default rows; recorded capacity rows of a factor not run this time are
    left out with a warning, not "missing"."""
    old = doc([rec(300.0), rec(300.0, op="combine")])                       # written before the field
    settings2 = {**doc([])["settings"], "recv_capacity_factor": 2.0}
    new = doc([rec(300.0, capacity=None), rec(300.0, op="combine", capacity=None), rec(250.0, capacity=2.0),
               rec(290.0, op="combine", capacity=2.0)], settings=settings2)
    cmp = C.compare(old, new)
    assert cmp["ok"] and [(r["op"], r["capacity"], r["verdict"]) for r in cmp["rows"]] == [
        ("dispatch", None, "same"), ("combine", None, "same"), ("dispatch", 2.0, "new"), ("combine", 2.0, "new")]
    back = C.compare(new, doc([rec(300.0), rec(300.0, op="combine")]))      # the factor-2 rows not run now
    assert back["ok"] and all(r["capacity"] is None for r in back["rows"])
    assert any("receive capacity factor 2" in w for w in back["warnings"])
    slower = C.compare(new, doc([rec(300.0), rec(300.0, op="combine"), rec(400.0, capacity=2.0),
                                 rec(290.0, op="combine", capacity=2.0)], settings=settings2))
    assert not slower["ok"] and [r["verdict"] for r in slower["rows"] if r["capacity"] == 2.0] == ["slower", "same"]
    assert " x2 " in C.table(slower)


def test_sm_budgets_are_their_own_rows_and_older_files_read_the_run_sms():
    """Rows are told apart by the SM budget asked for: the ht rows at --ht-sms 24 are new beside the full-GPU ones;
    a file written before the field has the budget of its run (settings.sms_requested: the 24-SM file's rows)."""
    old = doc([rec(300.0)])
    new = doc([rec(305.0, sms_budget=None), rec(560.0, sms_budget=24)])
    cmp = C.compare(old, new)
    assert [(r["sms_budget"], r["verdict"]) for r in cmp["rows"]] == [(None, "same"), (24, "new")] and cmp["ok"]
    old24 = doc([rec(560.0)], settings={**doc([])["settings"], "sms_requested": 24})
    new24 = doc([rec(570.0, sms_budget=24)], settings={**doc([])["settings"], "sms_requested": 24})
    assert [r["verdict"] for r in C.compare(old24, new24)["rows"]] == ["same"]
    assert " 24 " in C.table(cmp)


def test_peer_rows_are_compared_but_never_make_the_run_changed():
    peer = dict(impl="deepep", mode="cached", sms_budget=24)
    old = doc([rec(300.0), rec(320.0, **peer)])
    new = doc([rec(300.0), rec(500.0, **peer)])
    cmp = C.compare(old, new)
    assert [r["verdict"] for r in cmp["rows"]] == ["same", "slower"] and cmp["ok"]
    assert C.compare(old, doc([rec(300.0)]))["ok"]             # DeepEP not built this time: missing, still ok
    assert not C.compare(old, doc([rec(400.0), rec(320.0, **peer)]))["ok"]   # epcomm slower: changed


def test_other_knobs_and_a_new_latency_term_are_warned():
    old = doc([rec()])
    new = doc([rec()], env={"EPCOMM_VARIANT": "tma"},
              floor_latency={"status": "ok", "per_op_us": 4.25, "per_op_graph_us": 3.0})
    w = C.compare(old, new)["warnings"]
    assert any("EPCOMM_VARIANT" in x and "tma" in x for x in w)
    assert any("latency term" in x and "4.25" in x for x in w)
    assert C.compare(new, new)["warnings"] == []


def test_a_run_of_this_version_matches_the_files_recorded_before_row_for_row():
    """What --compare docs/perf/<file>.json meets on the device: the new run's records carry sms_budget, a latency
    term in their floors, DeepEP rows and ht rows at more budgets; the recorded rows still pair one for one. A file
    recorded with sms_budget (91fe4cc on) keeps each row's own; the extra rows use a budget no recorded file has."""
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[2] / "docs" / "perf").glob("bench-*.json")):
        old = C.load(str(path))
        new = copy.deepcopy(old)
        budget = old["settings"].get("sms_requested")
        for r in new["results"]:
            r.setdefault("sms_budget", budget)
            if r.get("floor"):
                r["floor"].update(bandwidth_us=r["floor"]["floor_us"], latency_us=4.0)
        extra = [rec(550.0, sms_budget=40), rec(320.0, impl="deepep", mode="cached", sms_budget=40)]
        new["results"] += extra
        new["floor_latency"] = {"status": "ok", "per_op_us": 4.0, "per_op_graph_us": 3.0}
        cmp = C.compare(old, new)
        timed = [r for r in old["results"] if r.get("status") == "ok" and (r.get("time_us") or {}).get("median")]
        assert cmp["ok"] and cmp["counts"]["same"] == len(timed) and cmp["counts"]["new"] == len(extra), path.name
