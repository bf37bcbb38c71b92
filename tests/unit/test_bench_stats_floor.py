"""Pure parts of epcomm.bench (and epcomm.stats): order statistics, byte counting from a routing, the floor."""
import numpy as np
import pytest

from epcomm.bench import floor as fl
from epcomm.stats import median, percentile, slowest_rank, summarize
from epcomm.config import EPConfig


def test_percentiles_match_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 51):
        xs = list(rng.random(n) * 100)
        for q in (0, 10, 50, 90, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_summarize_and_errors():
    s = summarize([5.0, 1.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 5.0, 3)
    assert s["mean"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_slowest_rank_per_iteration():
    assert slowest_rank([[1, 5, 2], [3, 1, 2]]) == [3, 5, 2]
    with pytest.raises(ValueError):
        slowest_rank([[1, 2], [1]])


def cfg(world=2, fmt="bf16", hidden=256, topk=3, experts=4):
    return EPConfig(hidden=hidden, topk=topk, num_experts=experts, max_tokens_per_rank=8, world_size=world,
                    token_format=fmt)


def test_traffic_counts_pairs_once_per_destination_rank():
    c = cfg()  # experts 0,1 on rank 0; 2,3 on rank 1
    ids0 = np.array([[0, 1, 2],      # rank 0 and rank 1
                     [0, 1, -1],     # rank 0 only (two experts there: one pair)
                     [-1, -1, -1],   # nowhere
                     [3, 2, -1]], np.int32)  # rank 1 only
    ids1 = np.array([[2, 0, 1]], np.int32)   # rank 1 and rank 0
    tr = fl.traffic(c, [ids0, ids1])
    assert tr.pairs.tolist() == [[2, 2], [1, 1]]
    assert tr.rows.tolist() == [2 + 2 + 2, 1 + 2 + 1]  # expert rows landing on rank 0 / rank 1
    assert tr.tokens.tolist() == [4, 1]


def test_op_bytes_dispatch_and_combine():
    c = cfg()
    ids0 = np.array([[0, 1, 2], [0, 1, -1], [-1, -1, -1], [3, 2, -1]], np.int32)
    ids1 = np.array([[2, 0, 1]], np.int32)
    tr = fl.traffic(c, [ids0, ids1])
    tb = 2 * 256
    d = fl.op_bytes(c, tr, "dispatch")
    assert d["link_send"] == [2 * tb, 1 * tb]   # rank 0 sends 2 tokens to rank 1; rank 1 sends 1 to rank 0
    assert d["link_recv"] == [1 * tb, 2 * tb]
    # local: pairs received (own included) read once + expert rows written once
    assert d["local"] == [(2 + 1) * tb + 6 * tb, (2 + 1) * tb + 4 * tb]
    cb = fl.op_bytes(c, tr, "combine")
    assert cb["link_send"] == [1 * tb, 2 * tb]  # rows go back to the token's rank
    assert cb["link_recv"] == [2 * tb, 1 * tb]
    # local: expert rows read + own tokens' pairs read + y written
    assert cb["local"] == [6 * tb + 4 * tb + 4 * tb, 4 * tb + 2 * tb + 1 * tb]


def test_fp8_token_bytes_include_scales():
    c = cfg(fmt="fp8", hidden=512)
    tr = fl.traffic(c, [np.array([[3, -1, -1]], np.int32), np.zeros((0, 3), np.int32)])
    d = fl.op_bytes(c, tr, "dispatch")
    assert d["link_send"] == [512 + 4 * 4, 0]
    assert fl.op_bytes(c, tr, "combine")["link_recv"] == [2 * 512, 0]


def test_floor_terms_and_binding():
    nb = {"link_send": [400_000, 100_000], "link_recv": [100_000, 400_000], "local": [3_000_000, 1_000_000]}
    f = fl.floor_of(nb, link_gbps=400.0, local_gbps=3000.0)
    assert f["link_us"] == pytest.approx(1.0)       # 400 kB at 400 GB/s
    assert f["local_us"] == pytest.approx(1.0)      # 3 MB at 3000 GB/s
    f = fl.floor_of(nb, link_gbps=[400.0, 200.0], local_gbps=6000.0)
    assert f["link_us"] == pytest.approx(2.0) and f["binds"] == "link" and f["floor_us"] == pytest.approx(2.0)
    f = fl.floor_of(nb, link_gbps=None, local_gbps=3000.0)
    assert f["floor_us"] is None and f["binds"] is None and f["local_us"] == pytest.approx(1.0)
    assert f["link_bytes_max"] == 400_000 and f["local_bytes_max"] == 3_000_000
    assert fl.floor_of(nb, link_gbps=[400.0, None], local_gbps=1.0)["link_us"] is None


def test_roundtrip_floor_adds():
    d = {"link_us": 1.0, "local_us": 2.0, "floor_us": 2.0, "binds": "local", "link_bytes_max": 1,
         "local_bytes_max": 2}
    c = {"link_us": 3.0, "local_us": 1.0, "floor_us": 3.0, "binds": "link", "link_bytes_max": 3,
         "local_bytes_max": 4}
    r = fl.roundtrip_floor(d, c)
    assert r["floor_us"] == 5.0 and r["link_us"] == 4.0 and r["local_us"] == 3.0
    assert r["binds"] == "dispatch:local combine:link" and r["link_bytes_max"] == 4


def test_realistic_shape_local_term_binds_on_h100_figures():
    """4096 tokens, hidden 7168, top-8 of 256, 2 ranks, GPU-NOTES figures (371 GB/s per direction under load,
    2995 GB/s device copy): about 58 MB cross the link each way, the local term is larger."""
    from epcomm.workload import routing
    c = EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=4096, world_size=2)
    rng = np.random.default_rng(1)
    ids = [routing(c, rng, r, 4096, "uniform") for r in range(2)]
    tr = fl.traffic(c, ids)
    d = fl.op_bytes(c, tr, "dispatch")
    assert 55e6 < d["link_send"][0] < 59e6           # ~4081 tokens x 14336 B
    assert tr.rows.sum() == 2 * 4096 * 8
    f = fl.floor_of(d, 371.0, 2995.0)
    assert f["binds"] == "local" and 140 < f["link_us"] < 170 and 185 < f["local_us"] < 210


def test_latency_term_adds_per_op_and_twice_for_a_round_trip():
    nb = {"link_send": [400_000], "link_recv": [400_000], "local": [1_000_000]}
    f = fl.floor_of(nb, link_gbps=400.0, local_gbps=3000.0)
    assert f["bandwidth_us"] == pytest.approx(1.0) and f["latency_us"] is None and f["floor_us"] == f["bandwidth_us"]
    fl.with_latency(f, 4.0)
    assert f["latency_us"] == 4.0 and f["floor_us"] == pytest.approx(5.0)
    fl.with_latency(f, 2.0)                               # recomputed from the bandwidth term, never stacked
    assert f["floor_us"] == pytest.approx(3.0)
    fl.with_latency(f, None)
    assert f["latency_us"] is None and f["floor_us"] == pytest.approx(1.0)
    r = fl.roundtrip_floor(fl.floor_of(nb, 400.0, 3000.0), fl.floor_of(nb, 400.0, 3000.0))
    assert r["ops"] == 2 and fl.with_latency(r, 4.0)["floor_us"] == pytest.approx(2.0 + 8.0)
    old = {"floor_us": 7.0, "link_us": 7.0, "local_us": 1.0, "binds": "link"}   # a file recorded before
    assert fl.with_latency(old, 1.5)["floor_us"] == pytest.approx(8.5) and old["bandwidth_us"] == 7.0
    assert fl.with_latency(None, 1.0) is None
    no_bw = fl.floor_of(nb, link_gbps=None, local_gbps=3000.0)
    assert fl.with_latency(no_bw, 4.0)["floor_us"] is None    # no floor without both bandwidths


def test_records_apply_the_latency_term_by_graph_and_command_line():
    from types import SimpleNamespace

    from epcomm.bench import driver
    from epcomm.bench.records import per_op_latency
    from epcomm.topology import Topology
    lat = {"status": "ok", "per_op_us": 5.0, "per_op_graph_us": 3.0}
    assert per_op_latency(lat, False) == 5.0 and per_op_latency(lat, True) == 3.0
    assert per_op_latency({"status": "error"}, False) is None and per_op_latency(None, True) is None
    for extra, want in (([], (5.0, 3.0)), (["--latency-us", "2"], (2.0, 2.0))):
        a = driver.parse(["--quick", "--link-gbps", "100", "--local-gbps", "1000"] + extra)
        driver.resolve_shapes(a, "host", None)
        ctx = SimpleNamespace(rank=0, world_size=2, device=0, backend="host",
                              topology=Topology.load("configs/local-2gpu.yaml"))
        b = driver.Bench(a, ctx, driver.SelfComm())
        cfg = b.cfg("bf16", "ht", 8)
        plain = b.records.record("ht", "epcomm", "dispatch", cfg, 8, status="n/a")
        graph = b.records.record("ll", "epcomm", "dispatch", cfg, 8, graph=True, status="n/a")
        rt = b.records.record("ll", "epcomm", "roundtrip", cfg, 8, graph=True, status="n/a")
        b.records.set_latency(lat)                        # what the latency case measured
        b.records.refresh()
        bw = plain["floor"]["bandwidth_us"]
        assert plain["floor"]["floor_us"] == pytest.approx(bw + want[0])
        assert graph["floor"]["floor_us"] == pytest.approx(bw + want[1])
        assert rt["floor"]["latency_us"] == pytest.approx(2 * want[1])


def test_latency_line_in_the_table():
    from epcomm.bench import report
    assert "none" in report.latency_line(None)
    line = report.latency_line({"status": "ok", "launch_us": 2.0, "launch_graph_us": 1.0, "flag_rtt_us": 2.5,
                                "per_op_us": 4.5, "per_op_graph_us": 3.5,
                                "pairs": [{"peer": 1, "path": "peer pointer", "rtt_us": 2.5}]})
    assert "4.50 us eager" in line and "3.50 us graph" in line and "0<->1 2.50 us (peer pointer)" in line
    assert "bandwidth term alone" in report.latency_line({"status": "error", "reason": "timeout"})
