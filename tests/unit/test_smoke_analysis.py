"""Pure parts of the smoke test: outlier flags, blame, inventory checks, verdict, report schema, PNG."""
from __future__ import annotations

import json
import zlib

import pytest

from epcomm.smoke import analysis as A
from epcomm.smoke import faults, report as R
from epcomm.smoke.links import matrices, merge, pattern


def places(n, per_node=None, gpu=False):
    per_node = per_node or n
    return [A.Place(r, r // per_node, f"h{r // per_node}", (r % per_node) if gpu else None) for r in range(n)]


def pairs(n, per_node, bw=100.0, lat=2.0, special=None):
    out = []
    for s in range(n):
        for d in range(n):
            if s != d:
                cls = "same_node" if s // per_node == d // per_node else "other_node"
                p = {"src": s, "dst": d, "cls": cls, "bw_gbps": bw if cls == "same_node" else bw / 10,
                     "lat_us": lat, "data_ok": True}
                p.update((special or {}).get((s, d), {}))
                out.append(p)
    return out


def test_median():
    assert A.median([3, 1, 2]) == 2
    assert A.median([4, 1, 2, 3]) == 2.5
    assert A.median([None, float("nan")]) is None


def test_flag_links_per_class():
    ps = pairs(4, 2, special={(1, 3): {"bw_gbps": 3.0}, (2, 0): {"lat_us": 50.0}})
    med = A.flag_links(ps, lat_slack_us=1.0)
    assert med["same_node"]["bw_gbps"] == 100.0 and med["other_node"]["bw_gbps"] == 10.0
    flagged = {(p["src"], p["dst"]): p["flags"] for p in ps if p["flags"]}
    assert flagged == {(1, 3): ["slow_bw"], (2, 0): ["slow_latency"]}  # other-node 10 GB/s pairs are not slow


def test_latency_slack_suppresses_noise():
    ps = pairs(3, 3, special={(0, 1): {"lat_us": 9.0}})
    A.flag_links(ps, lat_slack_us=50.0)
    assert not any(p["flags"] for p in ps)


def test_blame():
    assert A.blame_pairs([(1, 0), (1, 2), (1, 3)], 4) == ("src", 1)
    assert A.blame_pairs([(0, 2), (1, 2), (3, 2)], 4) == ("dst", 2)
    assert A.blame_pairs([(0, 1)], 4) == ("pair", None)
    assert A.blame_pairs([], 4) == ("pair", None)


def test_link_failures_name_pair_and_source():
    pl = places(4, 2, gpu=True)
    ps = pairs(4, 2, special={(1, 3): {"bw_gbps": 1.2}})
    med = A.flag_links(ps)
    (f,) = A.link_failures(ps, pl, med)
    assert (f.what, f.src, f.dst) == ("link_slow_bw", 1, 3)
    assert f.message == "rank 1 node0 (h0) GPU 1 -> rank 3 node1 (h1) GPU 1: 1.2 GB/s vs median 10 GB/s"
    ps = pairs(4, 2, special={(2, d): {"data_ok": False} for d in (0, 1, 3)})
    fs = A.link_failures(ps, pl, A.flag_links(ps))
    assert [(f.what, f.rank) for f in fs] == [("link_data", 2)] and "sends corrupt data" in fs[0].message


def test_inventory_checks():
    pl = places(4, 2, gpu=True)
    ok = {"hostname": "h", "versions": {"python": "3.12", "driver": "580"},
          "gpu": {"present": True, "device_count": 2}}
    info = [dict(ok, hostname=f"h{r // 2}", gpu=dict(ok["gpu"], uuid=f"u{r}")) for r in range(4)]
    assert A.check_inventory(info, pl, gpu=True) == []
    info[3] = dict(info[3], versions={"python": "3.12", "driver": "575"})
    info[1] = dict(info[1], gpu={"present": False, "device_count": 1, "error": "no GPU 1"})
    info[0] = dict(info[0], gpu=dict(info[0]["gpu"], device_count=1))   # host h0 shows 1 GPU, topology uses 2
    fs = A.check_inventory(info, pl, gpu=True)
    whats = sorted((f.what, f.rank) for f in fs)
    assert ("missing_gpu", 1) in whats and ("version_skew", 3) in whats
    assert any(f.what == "gpu_count" and f.host == "h0" for f in fs)
    info = [dict(ok, hostname=f"h{r // 2}", gpu=dict(ok["gpu"], uuid="same")) for r in range(4)]
    assert {f.what for f in A.check_inventory(info, pl, gpu=True)} == {"gpu_shared"}
    info = [dict(ok, hostname=f"x{r}") for r in range(4)]
    assert {f.what for f in A.check_inventory(info, places(4, 2), gpu=False)} == {"host_mismatch"}


def test_inventory_accepts_the_gpu_sharing_the_topology_asked_for():
    """`share_gpus: true` gives several ranks one GPU index: one UUID for them is what was asked, not a failure;
    the same UUID behind two different GPU indices (CUDA_VISIBLE_DEVICES gone wrong) still is one."""
    from epcomm.topology import Topology
    topo = Topology.load("configs/one-gpu-2x4.yaml")
    pl = A.place_table(topo.rank_table(), {r: "h" for r in range(8)})
    ok = {"hostname": "h", "versions": {"python": "3.12"}, "gpu": {"present": True, "device_count": 1, "uuid": "u0"}}
    assert A.check_inventory([dict(ok) for _ in range(8)], pl, gpu=True) == []
    pl = places(4, 2, gpu=True)
    info = [dict(ok, hostname=f"h{r // 2}", gpu=dict(ok["gpu"], device_count=2)) for r in range(4)]
    assert {f.what for f in A.check_inventory(info, pl, gpu=True)} == {"gpu_shared"}


def test_slow_ranks():
    med, fs = A.flag_slow_ranks([100, 110, 95, 400], places(4))
    assert med == 105 and [f.rank for f in fs] == [3]


def test_verdict_and_exit_code():
    assert A.verdict([], ["inventory", "links"], 8, 2).startswith("OK: 8 ranks on 2 node(s)")
    slow = A.Failure("links", "link_slow_bw", "a -> b: 1 GB/s vs median 9 GB/s")
    hang = A.Failure("ep", "timeout", "rank 2 node0 (h) did not arrive")
    warn = A.Failure("ep", "ep_skipped", "x", severity="warn")
    assert A.verdict([warn], ["ep"], 2, 1).startswith("OK")
    assert A.verdict([slow], ["links"], 2, 1) == "FAIL links: a -> b: 1 GB/s vs median 9 GB/s"
    v = A.verdict([slow, hang], ["links", "ep"], 2, 1)
    assert v.startswith("FAIL ep: rank 2") and v.endswith("(+1 more failure, see report)") and "\n" not in v
    assert (A.exit_code([]), A.exit_code([warn]), A.exit_code([slow]), A.exit_code([slow, hang])) == (0, 0, 1, 3)


def test_verdict_blames_the_stuck_rank_not_the_ranks_that_waited_for_it():
    victim = A.Failure("links", "timeout", "rank 1 node0 (h) stuck: rank 0 sent no turn", rank=1, waited_on=0)
    culprit = A.Failure("links", "timeout", "rank 2 node0 (h) stuck: no progress", rank=2)
    assert A.verdict([victim, culprit], ["links"], 4, 1).startswith("FAIL links: rank 2 ")
    assert A.verdict([victim], ["links"], 4, 1).startswith("FAIL links: rank 1 ")   # alone, it is still named


def minimal_report(n=2, ok=True):
    bw = [[None if s == d else 10.0 for d in range(n)] for s in range(n)]
    return {"schema": R.SCHEMA, "ok": ok, "exit_code": 0 if ok else 1, "verdict": "OK: x" if ok else "FAIL links: y",
            "started": "t", "duration_s": 1.0, "topology": {"name": "t", "num_nodes": 1, "backend": "host"},
            "options": {}, "ranks": [{"rank": r, "node": 0, "host": "h", "device": None} for r in range(n)],
            "stages": {"links": {"status": "ok", "duration_s": 0.1, "bandwidth_gbps": bw, "latency_us": bw,
                                 "pairs": []}},
            "failures": [] if ok else [A.Failure("links", "link_data", "y").to_dict()]}


def test_schema():
    assert R.validate(minimal_report()) == []
    assert R.validate(minimal_report(ok=False)) == []
    bad = minimal_report()
    bad["exit_code"] = 1
    assert any("ok must equal" in e for e in R.validate(bad))
    bad = minimal_report()
    bad["stages"]["links"]["bandwidth_gbps"] = [[1.0]]
    assert any("matrix" in e for e in R.validate(bad))
    bad = minimal_report()
    del bad["verdict"]
    assert R.validate(bad) == ["missing key 'verdict'"]
    json.loads(R.dumps(minimal_report()))
    text = R.table(minimal_report())
    assert text.splitlines()[-1] == "OK: x"


def test_plain_png(tmp_path):
    path = tmp_path / "h.png"
    R._heatmap_plain([[None, 5.0], [1.0, None]], str(path), flagged={(1, 0)})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    idat = data.index(b"IDAT")
    n = int.from_bytes(data[idat - 4:idat], "big")
    raw = zlib.decompress(data[idat + 4:idat + 4 + n])
    assert len(raw) == 48 * (1 + 48 * 3)


def test_links_merge_and_matrices():
    res = {0: {"sent": [{"src": 0, "dst": 1, "cls": "same_node", "bw_gbps": 5.0, "lat_us": 1.0, "readback_ok": True}],
               "received": [{"src": 1, "dst": 0, "signal_ok": True, "payload_ok": False}]},
           1: {"sent": [{"src": 1, "dst": 0, "cls": "same_node", "bw_gbps": 4.0, "lat_us": 1.5, "readback_ok": True}],
               "received": [{"src": 0, "dst": 1, "signal_ok": True, "payload_ok": True}]}}
    ps = merge(res, 2)
    assert [p["data_ok"] for p in ps] == [True, False]
    bw, lat = matrices(ps, 2)
    assert bw == [[None, 5.0], [4.0, None]] and lat == [[None, 1.0], [1.5, None]]
    assert pattern(10, 1).tolist() == pattern(10, 1).tolist() and pattern(10, 1).tolist() != pattern(10, 2).tolist()


def test_fault_parse():
    f = faults.parse("hang:rank=2,stage=ep; corrupt:rank=1,stage=links;slow_link:src=1,dst=3,ms=4")
    assert f.hang == {2: "ep"} and f.corrupts(1, "links") and not f.corrupts(1, "ep")
    assert f.delay(1, 3) == pytest.approx(0.004) and f.delay(3, 1) == 0
    assert faults.parse("corrupt:rank=0").corrupt == {0: {"links", "ep"}}
    assert not faults.parse("")
    with pytest.raises(ValueError):
        faults.parse("explode:rank=1")
    with pytest.raises(ValueError):
        faults.parse("slow_link:src=1")


def test_a_stage_stuck_talking_to_a_peer_blames_the_peer(monkeypatch):
    """A stage thread that hangs inside a put to rank 2 (env.talking_to) reports a timeout that waited on rank 2."""
    import threading

    from epcomm.smoke import cli, stages
    release = threading.Event()

    def stuck(env):
        env.talking_to = 2
        release.wait(10)

    def fine(env):
        env.talking_to = 3
        env.talking_to = None
        return "done"

    env = stages.StageEnv(comm=None, msgr=None, rank=0, world=4, topo=None, opts=cli.Options(stage_timeout=0.3),
                       faults=None, gpu=False, device=None)
    monkeypatch.setattr(stages, "stage_function", lambda name: stuck)
    out = stages.run_local("links", env, threaded=True)
    release.set()
    assert out["status"] == "timeout" and out["waited_on"] == 2 and "stuck talking to rank 2" in out["error"]
    monkeypatch.setattr(stages, "stage_function", lambda name: fine)
    out = stages.run_local("links", env, threaded=True)
    assert out["status"] == "ok" and out["value"] == "done" and "waited_on" not in out


def test_shared_gpu_drops_speed_flags_but_keeps_data_checks():
    ps = pairs(4, 2, special={(1, 3): {"bw_gbps": 1.2}, (2, 0): {"data_ok": False}})
    med = A.flag_links(ps)
    A.drop_speed_flags(ps)
    fs = A.link_failures(ps, places(4, 2, gpu=True), med)
    assert {f.what for f in fs} == {"link_data"}
    assert "not link figures" in A.SHARED_GPU_NOTE
