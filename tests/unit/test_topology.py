"""Topology YAML loading, validation messages and rank mapping (no MPI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from epcomm.errors import EPInputError
from epcomm.topology import Topology

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
EXPECTED_WORLD = {
    "cpu-4rank": 4, "cpu-8rank": 8, "cpu-2x4": 8, "cpu-2x8": 16, "local-2gpu": 2, "local-4gpu": 4,
    "local-8gpu": 8, "sim-2node": 2, "sim-2x2gpu": 4, "sim-2x4gpu": 8, "h100-2x8": 16,
    "one-gpu-2": 2, "one-gpu-4": 4, "one-gpu-sim-2x1": 2, "one-gpu-8": 8, "one-gpu-2x4": 8, "one-gpu-2x8": 16,
}


def test_all_expected_configs_exist():
    assert set(EXPECTED_WORLD) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    t = Topology.load(path)
    assert t.name == path.stem
    assert t.source == str(path.resolve())
    if path.stem in EXPECTED_WORLD:
        assert t.world_size == EXPECTED_WORLD[path.stem]
    assert len(t.rank_table()) == t.world_size
    if t.num_experts is not None:
        assert t.num_experts % t.world_size == 0
    # round trip through the dict / JSON form
    again = Topology.from_json(t.to_json())
    assert again.to_dict() == t.to_dict()


def test_rank_mapping_node_by_node():
    t = Topology.load(Path("configs/cpu-2x4.yaml"))
    assert [t.rank_to_node(r) for r in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert t.node_ranks(1) == [4, 5, 6, 7]
    assert t.same_node(0, 3) and not t.same_node(3, 4)
    assert t.host_slots() == [("localhost", 8)]
    assert t.device(5) is None and t.resolved_backend() == "host"
    with pytest.raises(EPInputError):
        t.rank_to_node(8)


def test_sim_2node_ranks_are_on_different_nodes():
    t = Topology.load("configs/sim-2node.yaml")
    assert t.world_size == 2
    assert not t.same_node(0, 1)
    assert (t.device(0), t.device(1)) == (0, 1)
    assert t.hostnames == ["localhost", "localhost"]


def test_sim_2x4gpu_devices():
    t = Topology.load("configs/sim-2x4gpu.yaml")
    assert [t.device(r) for r in range(8)] == list(range(8))
    assert t.same_node(0, 3) and not t.same_node(3, 4)


def test_h100_template():
    t = Topology.load("configs/h100-2x8.yaml")
    assert t.world_size == 16 and t.hostnames == ["gpu-node-a", "gpu-node-b"]
    assert t.device(9) == 1 and t.nic(9) == "mlx5_1" and t.local_rank(9) == 1
    assert t.host_slots() == [("gpu-node-a", 8), ("gpu-node-b", 8)]


def test_single_node():
    t = Topology.single_node(3)
    assert t.world_size == 3 and t.num_nodes == 1 and t.backend == "host" and not t.has_gpus
    g = Topology.single_node(2, backend="gpu", gpus=[0, 1])
    assert g.device(1) == 1
    with pytest.raises(EPInputError):
        Topology.single_node(0)


def test_from_env(tmp_path):
    assert Topology.from_env({}) is None
    t = Topology.from_env({"EPCOMM_TOPOLOGY": str(Path("configs/cpu-2x4.yaml").resolve())})
    assert t.world_size == 8
    j = Topology.from_env({"EPCOMM_TOPOLOGY": Topology.single_node(2).to_json()})
    assert j.world_size == 2


def test_node_as_plain_hostname_and_gpus_per_node():
    t = Topology.from_dict({"gpus_per_node": 2, "nodes": ["a", "b"]}, source="x.yaml")
    assert t.world_size == 4 and t.nodes[1].gpus == [0, 1] and t.name == "x"


BASE_GPU = {"name": "t", "nodes": [{"hostname": "a", "gpus": [0, 1]}, {"hostname": "b", "gpus": [0, 1]}]}
BASE_CPU = {"name": "t", "ranks_per_node": 2, "nodes": [{"hostname": "localhost"}]}


def _with(base, **changes):
    d = json.loads(json.dumps(base))
    d.update(changes)
    return d


BAD = [
    # (case id, yaml dict, key named in the message, words in the reason)
    ("unknown-top-key", _with(BASE_CPU, colour="red"), "colour", "unknown key"),
    ("unknown-node-key", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": [0], "gpu": 1}]), "nodes[0].gpu",
     "unknown key"),
    ("duplicate-gpu", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": [0, 3]}, {"hostname": "b", "gpus": [3, 3]}]),
     "nodes[1].gpus", "duplicate GPU 3"),
    ("unequal-gpus", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": [0, 1]}, {"hostname": "b", "gpus": [0]}]),
     "nodes[1].gpus", "same count"),
    ("gpu-wrong-type", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": ["0"]}]), "nodes[0].gpus[0]",
     "expected an integer"),
    ("negative-gpu", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": [-1]}]), "nodes[0].gpus[0]", ">= 0"),
    ("experts-not-divisible", _with(BASE_GPU, ep={"num_experts": 6}), "ep.num_experts", "not divisible by 4"),
    ("unknown-ep-key", _with(BASE_GPU, ep={"experts": 8}), "ep.experts", "unknown key"),
    ("empty-nodes", _with(BASE_CPU, nodes=[]), "nodes", "empty"),
    ("missing-nodes", {"ranks_per_node": 2}, "nodes", "missing"),
    ("nodes-not-list", _with(BASE_CPU, nodes={"hostname": "a"}), "nodes", "expected a list"),
    ("bad-mpi", _with(BASE_CPU, mpi="intel"), "mpi", "openmpi"),
    ("bad-backend", _with(BASE_CPU, backend="tpu"), "backend", "host"),
    ("gpu-backend-without-gpus", _with(BASE_CPU, backend="gpu"), "backend", "needs GPUs"),
    ("rpn-wrong-type", _with(BASE_CPU, ranks_per_node="4"), "ranks_per_node", "expected an integer"),
    ("rpn-zero", _with(BASE_CPU, ranks_per_node=0), "ranks_per_node", ">= 1"),
    ("both-counts", _with(BASE_CPU, gpus_per_node=2), "ranks_per_node", "not both"),
    ("gpus-in-host-config", _with(BASE_CPU, nodes=[{"hostname": "a", "gpus": [0, 1]}]), "nodes[0].gpus",
     "host-only"),
    ("no-rank-count", {"nodes": [{"hostname": "a"}]}, "nodes[0]", "no GPUs"),
    ("missing-hostname", _with(BASE_CPU, nodes=[{}]), "nodes[0].hostname", "missing"),
    ("hostname-type", _with(BASE_CPU, nodes=[{"hostname": 5}]), "nodes[0].hostname", "expected a non-empty string"),
    ("host-not-consecutive", _with(BASE_CPU, nodes=["a", "b", "a"]), "nodes[2].hostname", "consecutively"),
    ("nics-count", _with(BASE_GPU, nodes=[{"hostname": "a", "gpus": [0, 1], "nics": ["mlx5_0"]}]),
     "nodes[0].nics", "one per GPU"),
    ("nics-without-gpus", _with(BASE_CPU, nodes=[{"hostname": "a", "nics": ["mlx5_0"]}]), "nodes[0].nics",
     "no GPUs"),
    ("gpus-per-node-mismatch", {"gpus_per_node": 2, "nodes": [{"hostname": "a", "gpus": [0]}]}, "nodes[0].gpus",
     "gpus_per_node is 2"),
    ("mixed-gpu-and-not", {"nodes": [{"hostname": "a", "gpus": [0]}, {"hostname": "b", "ranks": 1}]},
     "nodes[1].gpus", "missing"),
    ("env-type", _with(BASE_CPU, env={"A": [1]}), "env.A", "expected a string"),
    ("env-name", _with(BASE_CPU, env={"1A": "x"}), "env.1A", "not a valid"),
    ("nvshmem-unknown", _with(BASE_GPU, nvshmem={"nvls": True}), "nvshmem.nvls", "unknown key"),
    ("nvshmem-bool", _with(BASE_GPU, nvshmem={"disable_nvls": "yes"}), "nvshmem.disable_nvls", "true/false"),
    ("nvshmem-size", _with(BASE_GPU, nvshmem={"symmetric_size": "lots"}), "nvshmem.symmetric_size", "byte count"),
    ("nvshmem-transport", _with(BASE_GPU, nvshmem={"remote_transport": "tcp"}), "nvshmem.remote_transport",
     "one of"),
    ("name-type", _with(BASE_CPU, name=3), "name", "string"),
]


@pytest.mark.parametrize("case,data,key,reason", BAD, ids=[b[0] for b in BAD])
def test_validation_error_is_one_line_naming_file_and_key(tmp_path, case, data, key, reason):
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EPInputError) as ei:
        Topology.load(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: key '{key}': "), msg
    assert reason in msg, msg
    assert isinstance(ei.value, ValueError)


def test_relative_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("configs").mkdir()
    Path("configs/x.yaml").write_text(yaml.safe_dump(BAD[2][1]))
    with pytest.raises(EPInputError, match=r"^configs/x\.yaml: key 'nodes\[1\]\.gpus': duplicate GPU 3 \("):
        Topology.load("configs/x.yaml")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(EPInputError, match="cannot read"):
        Topology.load(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("nodes: [a, b\n")
    with pytest.raises(EPInputError, match="invalid YAML") as ei:
        Topology.load(p)
    assert "\n" not in str(ei.value)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(EPInputError, match="expected a mapping"):
        Topology.load(p)


# ---- several ranks on one GPU (share_gpus) -------------------------------------------------------------------
@pytest.mark.parametrize("name,nodes,per_node", [("one-gpu-2", 1, 2), ("one-gpu-4", 1, 4), ("one-gpu-sim-2x1", 2, 1),
                                                 ("one-gpu-8", 1, 8),
                                                 ("one-gpu-2x4", 2, 4), ("one-gpu-2x8", 2, 8)])
def test_one_gpu_configs_put_every_rank_on_gpu_0(name, nodes, per_node):
    t = Topology.load(f"configs/{name}.yaml")
    assert (t.num_nodes, t.ranks_per_node) == (nodes, per_node)
    assert {t.device(r) for r in range(t.world_size)} == {0}
    assert all(t.ranks_per_gpu(r) == t.world_size for r in range(t.world_size))
    assert t.shares_gpus and t.sharing_lines() == [
        f"GPU 0 on localhost shared by ranks 0-{t.world_size - 1} ({t.world_size} ranks)"]
    assert not t.same_node(0, t.world_size - 1) if nodes == 2 else t.same_node(0, t.world_size - 1)
    assert t.resolved_backend() == "gpu"
    assert {row["gpu_shared_by"] for row in t.rank_table()} == {t.world_size}


def test_configs_without_sharing_say_so():
    for name in ("sim-2node", "local-8gpu", "cpu-2x4", "h100-2x8"):
        t = Topology.load(f"configs/{name}.yaml")
        assert not t.shares_gpus and t.sharing_lines() == []
        assert all(t.ranks_per_gpu(r) == 1 for r in range(t.world_size)), name


def test_repeated_gpu_without_share_gpus_is_refused():
    with pytest.raises(EPInputError, match=r"nodes\[0\].gpus'.*duplicate GPU 0.*share_gpus: true"):
        Topology.from_dict({"nodes": [{"hostname": "localhost", "gpus": [0, 0]}]})
    with pytest.raises(EPInputError, match=r"nodes\[0\].ranks'.*4 ranks but 1 GPUs.*share_gpus"):
        Topology.from_dict({"nodes": [{"hostname": "localhost", "gpus": [0], "ranks": 4}]})
    # the same GPU in two simulated nodes of one host: both nodes must allow it
    two = [{"hostname": "localhost", "gpus": [0]}, {"hostname": "localhost", "gpus": [0]}]
    with pytest.raises(EPInputError, match=r"nodes\[1\].gpus'.*GPU 0 of host 'localhost' is also used by nodes\[0\]"):
        Topology.from_dict({"nodes": two})
    with pytest.raises(EPInputError, match=r"nodes\[1\].gpus'.*also used by nodes\[0\]"):
        Topology.from_dict({"nodes": [dict(two[0], share_gpus=True), two[1]]})
    # GPU 0 of two different hosts is two GPUs
    t = Topology.from_dict({"nodes": [{"hostname": "a", "gpus": [0]}, {"hostname": "b", "gpus": [0]}]})
    assert not t.shares_gpus


def test_share_gpus_schema():
    t = Topology.from_dict({"nodes": [{"hostname": "localhost", "gpus": [0, 1], "ranks": 8, "share_gpus": True}]})
    assert [t.device(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.gpu_peers(5) == [4, 5, 6, 7] and t.ranks_per_gpu(0) == 4
    assert t.sharing_lines() == ["GPU 0 on localhost shared by ranks 0-3 (4 ranks)",
                                 "GPU 1 on localhost shared by ranks 4-7 (4 ranks)"]
    # an explicit per-rank list with repeats; only some GPUs shared
    t = Topology.from_dict({"nodes": [{"hostname": "localhost", "gpus": [0, 0, 1], "share_gpus": True}]})
    assert t.world_size == 3 and t.ranks_per_gpu(2) == 1 and t.gpu_peers(1) == [0, 1]
    # round trip keeps the flag and the per-rank GPUs (the fingerprint the ranks check depends on it)
    again = Topology.from_json(t.to_json())
    assert again.to_dict() == t.to_dict() and again.fingerprint() == t.fingerprint()
    assert t.to_dict()["nodes"][0]["share_gpus"] is True
    for bad, msg in [({"share_gpus": "yes"}, r"share_gpus'.*expected true/false"),
                     ({"ranks": 3, "gpus": [0, 1]}, r"ranks'.*3 ranks cannot be spread evenly over 2 GPUs")]:
        node = {"hostname": "localhost", "gpus": [0], "share_gpus": True, **bad}
        with pytest.raises(EPInputError, match=msg):
            Topology.from_dict({"nodes": [node]})
    with pytest.raises(EPInputError, match=r"share_gpus'.*no GPUs to share"):
        Topology.from_dict({"ranks_per_node": 2, "nodes": [{"hostname": "localhost", "share_gpus": True}]})
    # gpus_per_node + ranks: 4 ranks over GPUs 0-1
    t = Topology.from_dict({"gpus_per_node": 2, "nodes": [{"hostname": "h", "ranks": 4, "share_gpus": True}]})
    assert [t.device(r) for r in range(4)] == [0, 0, 1, 1]


def test_rank_ranges():
    from epcomm.topology import rank_ranges
    assert rank_ranges([0, 1, 2, 3, 6]) == "0-3, 6"
    assert rank_ranges([7]) == "7" and rank_ranges([3, 1, 2]) == "1-3"


def test_plan_shows_the_sharing(capsys):
    from launch.__main__ import main
    assert main(["plan", "-t", "one-gpu-2x4"]) == 0
    out = capsys.readouterr().out
    assert "shared: GPU 0 on localhost shared by ranks 0-7 (8 ranks)" in out
    assert main(["plan", "-t", "sim-2node"]) == 0
    assert "shared" not in capsys.readouterr().out
