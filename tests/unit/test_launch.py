"""Launcher: mpirun command for Open MPI / MPICH, per-rank env, and real tiny jobs (exit code, timeout, SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from epcomm.topology import Topology
from launch.mpicmd import build_command, flavor_from_version
from launch.rank_env import rank_environment
from launched import REPO_ROOT, mpi_available, run_launched

needs_mpi = pytest.mark.skipif(not mpi_available(), reason="no mpirun")


def _launch(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 60), **kw)


def _topo(name: str) -> Topology:
    return Topology.load(REPO_ROOT / "configs" / f"{name}.yaml")


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_openmpi_command_host_config():
    spec = build_command(_topo("cpu-2x4"), ["python", "x.py"], mpi="openmpi", mpirun=sys.executable)
    a = spec.command
    assert spec.flavor == "openmpi"
    assert _after(a, "-n") == "8" and _after(a, "--host") == "localhost:8" and _after(a, "--map-by") == "slot"
    assert ("--allow-run-as-root" in a) == (os.geteuid() == 0)
    assert ("--oversubscribe" in a) == (8 > len(os.sched_getaffinity(0)))
    i = a.index("--mca")
    assert a[i + 1:i + 3] == ["osc", "^ucx"]
    assert f"EPCOMM_TOPOLOGY={REPO_ROOT / 'configs' / 'cpu-2x4.yaml'}" in a
    assert "NVSHMEM_DISABLE_NVLS=1" in a
    j = a.index("launch.rank_env")
    assert a[j - 2] == sys.executable and a[-2:] == [sys.executable, "x.py"]  # `python` -> this interpreter


def test_openmpi_command_cluster_template():
    a = build_command(_topo("h100-2x8"), ["prog"], mpi="openmpi", mpirun=sys.executable).command
    assert _after(a, "-n") == "16" and _after(a, "--host") == "gpu-node-a:8,gpu-node-b:8"
    assert "--mca" not in a  # GPU config: no host-only MCA settings
    assert "--oversubscribe" not in a  # remote hosts: core count unknown
    assert "NVSHMEM_REMOTE_TRANSPORT=ibrc" in a and "NCCL_DEBUG=WARN" in a


def test_mpich_command():
    spec = build_command(_topo("h100-2x8"), ["prog", "--flag"], mpi="mpich", mpirun=sys.executable)
    a = spec.command
    assert spec.flavor == "mpich"
    assert _after(a, "-n") == "16" and _after(a, "-hosts") == "gpu-node-a:8,gpu-node-b:8" and _after(a, "-ppn") == "8"
    i = a.index("-genv")
    assert a[i + 1] == "EPCOMM_TOPOLOGY" and a[i + 2] == str(REPO_ROOT / "configs" / "h100-2x8.yaml")
    assert "-x" not in a and "--host" not in a and "--allow-run-as-root" not in a
    assert a[-2:] == ["prog", "--flag"]


def test_mpich_sim_nodes_merge_on_one_host():
    a = build_command(_topo("sim-2node"), ["prog"], mpi="mpich", mpirun=sys.executable).command
    assert _after(a, "-hosts") == "localhost:2" and _after(a, "-ppn") == "2"


def test_flavor_detection():
    assert flavor_from_version("mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/") == "openmpi"
    assert flavor_from_version("HYDRA build details:\n    Version: 4.3.0\n") == "mpich"
    assert flavor_from_version("Intel(R) MPI Library for Linux* OS, Version 2021.13 Build 20240701") == "mpich"
    assert flavor_from_version("something else") == "unknown"


def test_yaml_mpi_choice_and_cli_override(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("mpi: mpich\nranks_per_node: 2\nnodes: [localhost]\n")
    spec = build_command(Topology.load(p), ["prog"], mpirun=sys.executable)
    assert spec.flavor == "mpich" and "-genv" in spec.command
    spec = build_command(Topology.load(p), ["prog"], mpi="openmpi", mpirun=sys.executable)
    assert spec.flavor == "openmpi" and "-x" in spec.command


def test_env_per_rank():
    t = _topo("sim-2node")
    e1 = rank_environment(t, 1)
    assert (e1["EPCOMM_RANK"], e1["EPCOMM_NODE"], e1["EPCOMM_LOCAL_RANK"], e1["EPCOMM_DEVICE"]) == ("1", "1", "0", "1")
    assert e1["EPCOMM_WORLD_SIZE"] == "2" and e1["EPCOMM_NUM_NODES"] == "2" and e1["EPCOMM_LOCAL_SIZE"] == "1"
    assert e1["NVSHMEM_DISABLE_NVLS"] == "1" and e1["NCCL_NVLS_ENABLE"] == "0"
    assert e1["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and e1["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    assert "CUDA_VISIBLE_DEVICES" not in e1 and "EPCOMM_NIC" not in e1
    h = rank_environment(_topo("h100-2x8"), 13)
    assert (h["EPCOMM_NODE"], h["EPCOMM_LOCAL_RANK"], h["EPCOMM_DEVICE"]) == ("1", "5", "5")
    assert h["EPCOMM_NIC"] == "mlx5_5" and h["NVSHMEM_HCA_LIST"] == "mlx5_5"
    c = rank_environment(_topo("cpu-2x4"), 6)
    assert "EPCOMM_DEVICE" not in c and c["EPCOMM_NODE"] == "1" and c["EPCOMM_LOCAL_RANK"] == "2"


def test_rank_env_wrapper_without_mpirun():
    code = "import os; print(os.environ['EPCOMM_NODE'], os.environ['EPCOMM_LOCAL_RANK'], os.environ['EPCOMM_DEVICE'])"
    env = dict(os.environ, OMPI_COMM_WORLD_RANK="6", OMPI_COMM_WORLD_SIZE="8")
    cfg = str(REPO_ROOT / "configs" / "sim-2x4gpu.yaml")
    r = subprocess.run([sys.executable, "-m", "launch.rank_env", "-t", cfg, "--", sys.executable, "-c", code],
                       env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "2", "6"]
    env["OMPI_COMM_WORLD_SIZE"] = "4"
    r = subprocess.run([sys.executable, "-m", "launch.rank_env", "-t", cfg, "--", "true"],
                       env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "started 4 ranks but topology sim-2x4gpu has 8" in r.stderr


def test_shell_variables_reach_every_node(monkeypatch):
    """Open MPI passes only what -x names to other nodes: the shell's NCCL_ / NVSHMEM_ / CUDA_ / EPCOMM_ settings are
    forwarded by name; per-rank and launcher-set ones are not doubled."""
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("EPCOMM_BLOCKS", "24")
    monkeypatch.setenv("EPCOMM_RANK", "3")                # stale, from an outer job: must not travel
    monkeypatch.setenv("NVSHMEM_REMOTE_TRANSPORT", "ibgda")   # the topology sets it: its -x NAME=VALUE wins
    a = build_command(_topo("h100-2x8"), ["prog"], mpi="openmpi", mpirun=sys.executable).command
    named = {a[i + 1] for i, x in enumerate(a) if x == "-x" and "=" not in a[i + 1]}
    assert {"NCCL_IB_HCA", "CUDA_VISIBLE_DEVICES", "EPCOMM_BLOCKS"} <= named
    assert not named & {"EPCOMM_RANK", "NVSHMEM_REMOTE_TRANSPORT", "HOME", "PATH"}
    assert "NVSHMEM_REMOTE_TRANSPORT=ibrc" in a


def test_launch_x_override_survives_the_rank_wrapper():
    """`launch run -x NAME=VALUE` reaches the rank as given even where the topology sets NAME (the wrapper used to
    write the topology's value over it); without it the topology's value is set."""
    code = "import os; print(os.environ['NVSHMEM_REMOTE_TRANSPORT'], os.environ['EPCOMM_RANK'])"
    cfg = str(REPO_ROOT / "configs" / "h100-2x8.yaml")
    base = {k: v for k, v in os.environ.items() if k != "NVSHMEM_REMOTE_TRANSPORT"}
    for extra, want in (({"NVSHMEM_REMOTE_TRANSPORT": "ibgda"}, "ibgda"), ({}, "ibrc")):
        env = dict(base, OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="16", **extra)
        r = subprocess.run([sys.executable, "-m", "launch.rank_env", "-t", cfg, "--", sys.executable, "-c", code],
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [want, "3"]


def _wrapper(cfg: str, code: str, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MPI_", "EPCOMM_"))}
    return subprocess.run([sys.executable, "-m", "launch.rank_env", "-t", str(REPO_ROOT / "configs" / f"{cfg}.yaml"),
                           "--", sys.executable, "-c", code], env=dict(full, **env), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)


def test_expected_local_rank_follows_the_host_list():
    from launch.rank_env import expected_local_rank
    assert [expected_local_rank(_topo("h100-2x8"), r) for r in (0, 7, 8, 9, 15)] == [0, 7, 0, 1, 7]
    assert [expected_local_rank(_topo("sim-2node"), r) for r in (0, 1)] == [0, 1]   # two nodes, one host
    assert [expected_local_rank(_topo("cpu-2x4"), r) for r in (3, 4)] == [3, 4]


def test_wrapper_refuses_a_placement_other_than_the_yaml():
    code = "import os; print(os.environ['EPCOMM_RANK'], os.environ['EPCOMM_DEVICE'])"
    ok = _wrapper("h100-2x8", code, OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_LOCAL_RANK="1",
                  EPCOMM_MPI_FLAVOR="openmpi")
    assert ok.returncode == 0 and ok.stdout.split() == ["9", "1"], ok.stderr
    bad = _wrapper("h100-2x8", code, OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_LOCAL_RANK="0",
                   EPCOMM_MPI_FLAVOR="openmpi")
    assert bad.returncode == 2 and "rank 9 is local rank 0 on its host" in bad.stderr, bad.stderr
    assert "expects local rank 1 there (node 1, GPU 1)" in bad.stderr


def test_wrapper_reads_the_rank_of_the_mpi_it_was_built_for():
    code = "import os; print(os.environ['EPCOMM_RANK'])"
    r = _wrapper("cpu-4rank", code, PMIX_RANK="0", PMI_RANK="3", EPCOMM_MPI_FLAVOR="mpich")   # PMIX_RANK: stale
    assert r.returncode == 0 and r.stdout.split() == ["3"], r.stderr


def test_wrapper_refuses_another_hosts_different_topology(tmp_path):
    code = "import os; print(os.environ['EPCOMM_RANK'])"
    sha = _topo("cpu-4rank").fingerprint()
    assert _wrapper("cpu-4rank", code, OMPI_COMM_WORLD_RANK="1", EPCOMM_TOPOLOGY_SHA=sha).stdout.split() == ["1"]
    r = _wrapper("cpu-4rank", code, OMPI_COMM_WORLD_RANK="1", EPCOMM_TOPOLOGY_SHA="0" * 16)
    assert r.returncode == 2 and "differs from the launching host's copy" in r.stderr, r.stderr
    a = build_command(_topo("cpu-4rank"), ["prog"], mpi="openmpi", mpirun=sys.executable).command
    assert f"EPCOMM_TOPOLOGY_SHA={sha}" in a


def test_cli_plan_h100_and_json():
    r = _launch("plan", "-t", "configs/h100-2x8.yaml")
    assert r.returncode == 0, r.stderr
    assert "16 ranks on 2 host(s)" in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 16 and {row[1] for row in rows} == {"gpu-node-a", "gpu-node-b"}
    r = _launch("plan", "-t", "sim-2node", "--json")
    d = json.loads(r.stdout)
    assert d["world_size"] == 2 and d["ranks"][1]["env"]["EPCOMM_NODE"] == "1"


def test_cli_dry_run_and_errors(tmp_path):
    r = _launch("run", "-t", "cpu-4rank", "--mpi", "mpich", "--dry-run", "--", "python", "-c", "pass")
    assert r.returncode == 0 and "-genv" in r.stdout and "-hosts localhost:4" in r.stdout
    r = _launch("run", "-t", "no-such-config", "--", "true")
    assert r.returncode == 2 and "not found" in r.stderr and "cpu-4rank" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranks_per_node: 2\nnodes: [localhost]\nep: {num_experts: 3}\n")
    r = _launch("run", "-t", str(bad), "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip() == f"launch: {bad}: key 'ep.num_experts': 3 experts not divisible by 2 ranks"
    r = _launch("run", "-t", "cpu-4rank")
    assert r.returncode == 2 and "no command" in r.stderr


@pytest.mark.parametrize("sub", ["run", "plan", "smoke", "bench"])
def test_help(sub):
    r = _launch(sub, "--help")
    assert r.returncode == 0 and "--topology" in r.stdout


def test_smoke_bench_missing_module_is_clear():
    import importlib.util

    for mod in ("smoke", "bench"):
        if importlib.util.find_spec(f"epcomm.{mod}") is not None:
            continue
        r = _launch(mod, "-t", "cpu-4rank")
        assert r.returncode == 2 and f"epcomm.{mod} is not available" in r.stderr


# ---- real tiny jobs ---------------------------------------------------------------------------------
PIDFILE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    r = os.environ["EPCOMM_RANK"]
    open(os.path.join(sys.argv[1], r), "w").write(str(os.getpid()))
    time.sleep(float(sys.argv[2]))
""")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"  # a zombie has exited (waiting for init to reap it)


def _wait_for_pids(d: Path, n: int, timeout: float = 30) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = list(d.iterdir())
        if len(files) == n and all(f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError(f"only {len(list(d.iterdir()))} of {n} ranks started")


@needs_mpi
def test_job_env_per_rank_under_mpirun():
    code = ("import os; print('R', *[os.environ.get(k, '-') for k in "
            "('EPCOMM_RANK','EPCOMM_NODE','EPCOMM_LOCAL_RANK','EPCOMM_WORLD_SIZE','EPCOMM_TOPOLOGY')])")
    r = run_launched("cpu-2x4", ["python", "-c", code], timeout=60, env={"EPCOMM_TEST_X": "1"})
    assert r.returncode == 0, r.stderr
    rows = sorted((ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("R ")), key=lambda x: int(x[0]))
    topo = str(REPO_ROOT / "configs" / "cpu-2x4.yaml")
    assert rows == [[str(i), str(i // 4), str(i % 4), "8", topo] for i in range(8)]


@needs_mpi
def test_job_exit_code_propagates():
    code = "import os, sys, time; r = int(os.environ['EPCOMM_RANK']); sys.exit(3) if r == 2 else time.sleep(0.3)"
    r = run_launched("cpu-4rank", ["python", "-c", code], timeout=60)
    assert r.returncode != 0
    ok = run_launched("cpu-4rank", ["python", "-c", "pass"], timeout=60)
    assert ok.returncode == 0, ok.stderr


@needs_mpi
def test_job_timeout_kills_every_rank(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text(PIDFILE_SCRIPT)
    (tmp_path / "pids").mkdir()
    t0 = time.monotonic()
    r = run_launched("cpu-4rank", [str(script), str(tmp_path / "pids"), "300"], timeout=8)
    assert r.returncode == 124 and "timeout" in r.stderr
    assert time.monotonic() - t0 < 30
    pids = [int(f.read_text()) for f in (tmp_path / "pids").iterdir()]
    assert len(pids) == 4 and not [p for p in pids if _alive(p)]


@needs_mpi
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_every_rank(tmp_path, sig):
    script = tmp_path / "sleep.py"
    script.write_text(PIDFILE_SCRIPT)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "launch", "run", "-t", "cpu-4rank", "--grace", "3", "--",
                          "python", str(script), str(pids_dir), "300"], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = _wait_for_pids(pids_dir, 4)
        p.send_signal(sig)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + sig
    assert not [q for q in pids if _alive(q)]


@needs_mpi
@pytest.mark.skipif(__import__("importlib").util.find_spec("epcomm.buffer") is None, reason="EPBuffer not there yet")
def test_demo_two_nodes_host_backend():
    r = run_launched("cpu-2x4", ["python", "-m", "epcomm.demo", "--hidden", "256", "--tokens", "16"], timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "match the reference" in r.stdout
