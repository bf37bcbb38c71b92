"""epcomm.bench command line: cases, defaults per backend, --quick; env defaults at import."""
import os

import pytest

from epcomm.bench import driver


def test_env_defaults_set_at_import():
    for k in ("NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        assert k in os.environ


def test_cases_and_defaults_gpu():
    a = driver.parse(["--case", "ht,ll"])
    assert a.cases == ["ht", "ll"]
    driver.resolve_shapes(a, "gpu", None)
    assert (a.iters, a.warmup, a.hidden, a.tokens, a.ll_tokens, a.experts, a.topk) == (50, 10, 7168, 4096, 128,
                                                                                       256, 8)
    assert a.sweep_tokens == [1 << i for i in range(13)]


def test_quick_host_shapes():
    a = driver.parse(["--quick"])
    driver.resolve_shapes(a, "host", 32)
    assert a.cases == list(driver.CASES)
    assert a.iters == 5 and a.hidden == 256 and a.tokens == 32 and a.experts == 32
    assert a.sweep_tokens == [1, 2, 4, 8, 16, 32]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        driver.parse(["--case", "ht,nope"])
    with pytest.raises(SystemExit):
        driver.parse(["--sets", "2"])


@pytest.mark.parametrize("no_graph", [False, True])
@pytest.mark.parametrize("no_batched", [False, True])
def test_ll_case_runs_both_modes_and_layouts_alike(no_graph, no_batched):
    # the ll case measures one shape per wire design, then again per output layout (the default's rows first, as in
    # the files recorded before): identical calls except the config's mode and layout
    a = driver.parse(["--case", "ll"] + (["--no-graph"] if no_graph else []) + (["--no-batched"] if no_batched else []))
    driver.resolve_shapes(a, "gpu", None)
    b = driver.Bench.__new__(driver.Bench)
    b.args, b.world, b.sms_supported = a, 8, False
    calls = []
    b.with_buffer = lambda cfg, fn: fn(("buf", cfg.mode, cfg.layout))
    b.run_epcomm_shape = lambda case, buf, cfg, t, ops, graph=False: calls.append(
        (case, buf, cfg.mode, cfg.layout, cfg.token_format, cfg.max_tokens_per_rank, t, ops, graph))
    b.case_ll()
    ops = ("dispatch", "combine", "roundtrip")
    layouts = ("grouped",) if no_batched else ("grouped", "batched")
    assert a.ll_layouts == list(layouts)
    assert calls == [("ll", ("buf", m, lay), m, lay, "fp8", 128, 128, ops, not no_graph)
                     for lay in layouts for m in ("ll", "ht")]


def test_capacity_factor_repeats_the_ht_and_ll_shapes():
    """--recv-capacity-factor F: the ht and ll cases measure each shape at the default capacity (first, as in the
    files recorded before) and again with EPConfig.recv_capacity_factor=F; without it, only the default."""
    with_factor = ["--case", "ht,ll", "--recv-capacity-factor", "2"]
    for argv, caps in ((["--case", "ht,ll"], [None]), (with_factor, [None, 2.0])):
        a = driver.parse(argv + ["--no-batched"])
        driver.resolve_shapes(a, "gpu", None)
        b = driver.Bench.__new__(driver.Bench)
        b.args, b.world = a, 8
        calls = []
        b.with_buffer = lambda cfg, fn: fn(None)
        b.note_capacity = lambda cfg: None
        b.run_epcomm_shape = lambda case, buf, cfg, t, ops, graph=False: calls.append(
            (case, cfg.mode, cfg.token_format, t, cfg.recv_capacity_factor))
        b.case_ht()
        b.case_ll()
        assert calls == ([("ht", "ht", f, 4096, c) for c in caps for f in ("bf16", "fp8")]
                         + [("ll", m, "fp8", 128, c) for c in caps for m in ("ll", "ht")])
    with pytest.raises(SystemExit):
        driver.parse(["--recv-capacity-factor", "0"])


def test_capacity_that_is_the_worst_case_is_noted():
    """At 2 ranks factor 2 is the worst case already (2 x 4096 x 8 rows): the run says its rows measure the same
    buffer; at 8 ranks it does not."""
    from types import SimpleNamespace
    from epcomm.config import EPConfig
    for world, noted in ((2, True), (8, False)):
        b = driver.Bench.__new__(driver.Bench)
        b.records, b.log = SimpleNamespace(notes=[]), lambda msg: None
        cfg = EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=4096, world_size=world, mode="ht",
                       recv_capacity_factor=2)
        b.note_capacity(cfg)
        b.note_capacity(cfg)   # once per run
        assert len(b.records.notes) == (1 if noted else 0)
        b.note_capacity(cfg.replace(recv_capacity_factor=None))
        assert len(b.records.notes) == (1 if noted else 0)


def test_shared_gpu_gives_no_link_figures():
    """Ranks on one GPU (share_gpus): no links case, no NCCL baseline, no floor (even one given on the command line),
    and a note that says why."""
    from types import SimpleNamespace

    from epcomm.topology import Topology
    a = driver.parse(["--case", "links,baseline", "--link-gbps", "100", "--local-gbps", "1000", "--quick"])
    driver.resolve_shapes(a, "host", None)
    ctx = SimpleNamespace(rank=0, world_size=2, device=0, backend="gpu",
                          topology=Topology.load("configs/one-gpu-2.yaml"))
    b = driver.Bench(a, ctx, driver.SelfComm())
    assert b.link_gbps is None and b.local_gbps is None and b.floor_source.startswith("none: ranks share a GPU")
    assert any("GPU 0 on localhost shared by ranks 0-1" in n and "not link figures" in n for n in b.notes)
    b.case_links()
    assert b.links["status"] == "n/a" and "share a GPU" in b.links["reason"]
    b.case_baseline()
    assert [(r["impl"], r["status"]) for r in b.results] == [("nccl", "n/a")] * 3
    assert all("NCCL refuses two ranks on one GPU" in r["error"] for r in b.results)
    assert all(r["floor"]["floor_us"] is None for r in b.results)
    # an unshared GPU topology keeps its floor from the command line
    ctx.topology = Topology.load("configs/local-2gpu.yaml")
    b = driver.Bench(a, ctx, driver.SelfComm())
    assert b.link_gbps == 100 and not b.shared
