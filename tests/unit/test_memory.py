"""epcomm.memory: per-rank GPU memory of an EPBuffer from its config (CPU only; the GPU worker checks it against
the backend's real allocations)."""
import json
from pathlib import Path

import pytest

from epcomm import memory
from epcomm.backends.gpu.layout import HEAP_MARGIN, Layout
from epcomm.config import EPConfig


def cfg(**kw):
    base = dict(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=4096, world_size=8, mode="ht",
                token_format="fp8")
    base.update(kw)
    return EPConfig(**base)


def test_estimate_adds_up():
    c = cfg()
    est = memory.estimate(c)
    assert est["symmetric_bytes"] == Layout(c, any_remote=False).total
    assert sum(est["symmetric_regions"].values()) == est["symmetric_bytes"]
    assert est["local_bytes"] == sum(b["bytes"] for b in est["local_buffers"])
    assert est["total_bytes"] == est["heap_reserved_bytes"] + est["local_bytes"]
    ex = {b["name"]: b for b in est["local_buffers"]}
    assert ex["set0.expert_x"]["bytes"] == c.max_recv_rows * c.hidden          # fp8: one byte per channel
    assert ex["set1.expert_scales"]["bytes"] == c.max_recv_rows * (c.hidden // 128) * 4
    assert ex["y0"]["bytes"] == c.max_tokens_per_rank * c.hidden * 2            # bf16 combine output
    assert est["nvshmem_symmetric_size"] == max(est["symmetric_bytes"] + HEAP_MARGIN, 1 << 30)   # need + margin
    # the heap on the GPU: that + NVSHMEM's own objects, in granules (heap.py)
    h = memory.estimate(c, env={})["nvshmem_heap"]
    assert h["static"] == -(-(h["symmetric_size"] + h["nvshmem_own"]) // (2 << 20)) * (2 << 20)
    assert memory.estimate(c, env={})["heap_reserved_bytes"] == h["bytes"] == max(h["static"], h["dynamic"])


def test_other_nodes_need_staging_and_bf16_no_scales():
    one, two = memory.estimate(cfg()), memory.estimate(cfg(), nodes=2)
    assert two["symmetric_bytes"] > one["symmetric_bytes"] and two["symmetric_regions"]["stage"] > 0
    bf = memory.estimate(cfg(token_format="bf16"))
    assert not any("scales" in b["name"] for b in bf["local_buffers"])
    with pytest.raises(ValueError, match="nodes must divide"):
        memory.estimate(cfg(), nodes=3)


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert memory.main(["--tokens", "128", "--world", "2", "--mode", "ll", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "symmetric buffer" in text and "total" in text
    assert json.loads(out.read_text())["config"]["mode"] == "ll"
    assert memory.main(["--world", "3"]) == 2
    assert "divisible by world_size=3" in capsys.readouterr().err


def test_planning_needs_no_cuda_package():
    """epcomm.memory and the layout it sums import on a machine without cuda-python, cupy, torch or nvshmem4py."""
    import subprocess
    import sys
    code = ("import sys\nfor m in ('cuda', 'cupy', 'torch', 'nvshmem'): sys.modules[m] = None\n"
            "import epcomm.memory, epcomm.backends.gpu.layout\nprint('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


def test_estimate_sums_the_backends_own_list():
    """Every array of layout.device_arrays is counted, once per copy (the list GpuBackend allocates from)."""
    from epcomm.backends.gpu.layout import OUTPUT_SETS, device_arrays
    c = cfg()
    names = [b["name"] for b in memory.estimate(c)["local_buffers"]]
    want = sum(1 if a.copies == "one" else OUTPUT_SETS for a in device_arrays(c))
    assert len(names) == len(set(names)) == want


def test_docs_table_is_current():
    """docs/MEMORY.md carries `python -m epcomm.memory --docs-table` verbatim."""
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "MEMORY.md").read_text()
    assert memory.markdown_table() in doc


def test_capacity_flags(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert memory.main(["--world", "64", "--nodes", "8", "--format", "fp8", "--recv-capacity-factor", "2",
                        "--json", str(out)]) == 0
    est = json.loads(out.read_text())
    assert est["config"]["recv_capacity"] == 2 * 4096 * 8 and "total_bytes" in est
    shapes = {b["name"]: b["shape"] for b in est["local_buffers"]}
    assert shapes["set0.expert_x"] == [2 * 4096 * 8, 7168]                 # the capacity's rows
    assert memory.main(["--world", "8", "--recv-capacity", "1000", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["max_recv_rows"] == 1000
    capsys.readouterr()
    with pytest.raises(SystemExit):
        memory.main(["--recv-capacity", "10", "--recv-capacity-factor", "2"])
    assert "not allowed with" in capsys.readouterr().err


def test_capacity_bounds_the_receive_side():
    small, big = memory.estimate(cfg(recv_capacity_factor=1)), memory.estimate(cfg())
    assert small["total_bytes"] < big["total_bytes"]
    ex = {b["name"]: b["shape"] for b in small["local_buffers"]}
    assert ex["set0.expert_x"][0] == ex["set1.src_info"][0] == 4096 * 8


def test_issue_targets_per_rank():
    """Issue 12's targets (hidden 7168, top-8 of 256, 4096 tokens, fp8, ht; expert_y not counted)."""
    GiB = 1 << 30
    assert memory.estimate(cfg(world_size=8))["total_bytes"] <= 6 * GiB
    assert memory.estimate(cfg(world_size=64), nodes=8, env={})["total_bytes"] <= 24 * GiB
    assert memory.estimate(cfg(world_size=8), env={})["total_bytes"] <= 6 * GiB
    factor2 = memory.estimate(cfg(world_size=64, recv_capacity_factor=2), nodes=8, env={})
    assert factor2["total_bytes"] <= 4 * GiB
    # with NVSHMEM's own defaults (512 MiB granules, 32 teams) the heap of the same buffer takes 512 MiB more
    stock = memory.estimate(cfg(world_size=64, recv_capacity_factor=2), nodes=8,
                            env={"NVSHMEM_CUMEM_GRANULARITY": "512M", "NVSHMEM_MAX_TEAMS": "32"})
    assert stock["total_bytes"] - factor2["total_bytes"] >= 512 << 20


def test_nvshmem_heap_model():
    """heap.py: NVSHMEM 3.4.5's own symmetric objects and the heap granules (numbers from its source)."""
    from epcomm.backends.gpu import heap
    MiB = 1 << 20
    assert heap.parse_size("2M") == 2 * MiB and heap.parse_size("0.5g") == 512 * MiB
    assert heap.parse_size("4096") == 4096
    assert heap.nvshmem_settings({}) == (2 * MiB, 7)
    stock_env = {"NVSHMEM_CUMEM_GRANULARITY": "536870912", "NVSHMEM_MAX_TEAMS": "32"}
    assert heap.nvshmem_settings(stock_env) == (512 * MiB, 32)
    # psync area per team: 2 x 2 x 27648 + 65536 + 10 x 27648 + 1024 x npes + 2 x 27648 longs
    per_team = 8 * (507904 + 1024 * 64)
    own = heap.nvshmem_own_bytes(64, 32)
    assert 32 * per_team + 10 * MiB < own < 32 * per_team + 10 * MiB + MiB          # ~150 MiB
    assert heap.nvshmem_own_bytes(64, 3) == heap.nvshmem_own_bytes(64, 6)            # its 6 predefined teams at least
    need = 3000 * MiB
    stock = heap.heap_footprint(need, 64, {"NVSHMEM_CUMEM_GRANULARITY": "512M", "NVSHMEM_MAX_TEAMS": "32"})
    assert stock["dynamic"] == 512 * MiB + 3072 * MiB and stock["bytes"] == stock["dynamic"]
    ours = heap.heap_footprint(need, 64, {})
    assert ours["bytes"] - need < 64 * MiB and ours["bytes"] % (2 * MiB) == 0


def test_nvshmem_settings_are_set_before_nvshmem_reads_them(monkeypatch):
    """NVSHMEM reads its environment once, at the first unique id or init of the process: Runtime.new_uid sets
    epcomm's settings (2 MiB granules, 7 teams, the heap size when known, no NVLink multicast) before it asks NVSHMEM
    for the id; values the environment already has are kept."""
    import sys
    import types

    from epcomm.backends.gpu import runtime
    seen = {}

    def get_unique_id(empty=False):
        seen.update({k: runtime.os.environ.get(k) for k in ("NVSHMEM_CUMEM_GRANULARITY", "NVSHMEM_MAX_TEAMS",
                                                             "NVSHMEM_SYMMETRIC_SIZE", "NVSHMEM_DISABLE_NVLS")})
        raise RuntimeError("stop here")
    core = types.SimpleNamespace(get_unique_id=get_unique_id)
    monkeypatch.setitem(sys.modules, "nvshmem", types.SimpleNamespace(core=core))
    monkeypatch.setitem(sys.modules, "nvshmem.core", core)
    for k in ("NVSHMEM_CUMEM_GRANULARITY", "NVSHMEM_SYMMETRIC_SIZE", "NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE",
              "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        monkeypatch.setenv(k, "-")   # recorded, so that what the call sets is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("NVSHMEM_MAX_TEAMS", "9")
    with pytest.raises(RuntimeError, match="stop here"):
        runtime.Runtime.new_uid(3 << 30)
    assert seen == {"NVSHMEM_CUMEM_GRANULARITY": str(2 << 20), "NVSHMEM_MAX_TEAMS": "9",
                    "NVSHMEM_SYMMETRIC_SIZE": str((3 << 30) + HEAP_MARGIN), "NVSHMEM_DISABLE_NVLS": "1"}


def test_one_node_ht_fp8_gets_a_stage_region_where_its_dispatch_quantises_once(monkeypatch):
    """The ht fp8 dispatch quantises every token once into the stage region (kernels: qonce, the default since the
    eighth session) from QONCE_MIN_TOKENS tokens per rank: such a buffer on one node has that region too, as large as
    with a peer on another node, and the memory estimate counts it; smaller buffers (unless the test variant qonceall
    is on), bf16 and ll keep none. The kernel's threshold is the same number."""
    from epcomm.backends.gpu import variants
    from epcomm.backends.gpu.layout import QONCE_MIN_TOKENS
    src = (Path(__file__).resolve().parents[2] / "epcomm/backends/gpu/kernels/layout.cuh").read_text()
    assert f"QONCE_MIN_TOKENS = EP_V_QONCE_ALL ? 0 : {QONCE_MIN_TOKENS};" in src
    ht8, ht16, ll8 = cfg(mode="ht"), cfg(mode="ht", token_format="bf16"), cfg(mode="ll")
    small = cfg(mode="ht", max_tokens_per_rank=QONCE_MIN_TOKENS - 1)
    assert ht8.max_tokens_per_rank >= QONCE_MIN_TOKENS
    monkeypatch.delenv(variants.ENV, raising=False)
    remote = Layout(ht8, any_remote=True).region_bytes["stage"]
    assert Layout(ht8, any_remote=False).region_bytes["stage"] == remote > 0
    assert memory.estimate(ht8)["symmetric_regions"]["stage"] >= remote
    assert Layout(small, any_remote=False).region_bytes["stage"] == 0
    assert Layout(ht16, any_remote=False).region_bytes["stage"] == 0
    assert Layout(ll8, any_remote=False).region_bytes["stage"] == 0
    monkeypatch.setenv(variants.ENV, "qonceall")
    assert Layout(small, any_remote=False).region_bytes["stage"] > 0
