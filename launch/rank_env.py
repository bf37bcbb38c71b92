"""Per-rank wrapper: ``python -m launch.rank_env [-t TOPOLOGY] -- CMD ...``.

Runs under mpirun, once per rank. Reads the rank the MPI launcher gave this process, computes its node,
local rank, GPU and NIC from the topology, exports them, and runs CMD as its child. All GPUs stay visible
(peer access needs them); the rank's GPU is named by EPCOMM_DEVICE.

It stays CMD's parent (instead of exec'ing it) to see every end of the rank, a kill -9 included: it forwards the
signals mpirun sends (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2) to CMD, exits with CMD's status (128+N for death by
signal N) and writes an exit record for the launcher (epcomm/exitrecord.py); when that status is not 0 it also prints
one line naming the rank and host, and the launcher ends the whole job at once (docs/FAILURES.md).
"""

from __future__ import annotations

import os
import sys

from epcomm.topology import Topology

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# read first for the MPI the launcher built the command for (EPCOMM_MPI_FLAVOR): under MPICH, whose Hydra forwards
# the whole environment, a PMIX_RANK left in the shell by an outer job must not win over PMI_RANK
RANK_VARS_OF = {"openmpi": ("OMPI_COMM_WORLD_RANK", "PMIX_RANK"), "mpich": ("PMI_RANK",)}
LOCAL_RANK_VARS_OF = {"openmpi": ("OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK"), "mpich": ("MPI_LOCALRANKID",)}


def topology_ref(topo: Topology) -> str:
    """What EPCOMM_TOPOLOGY holds: the absolute YAML path, or inline JSON for a topology with no file."""
    return topo.source if topo.source else topo.to_json()


def global_environment(topo: Topology) -> dict[str, str]:
    """Variables identical on every rank (exported with -x / -genv and again by the wrapper)."""
    env: dict[str, str] = {"EPCOMM_TOPOLOGY": topology_ref(topo)}
    nv = topo.nvshmem
    if nv.get("disable_nvls", True):
        env.update({"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
    else:
        env.update({"NVSHMEM_DISABLE_NVLS": "0"})
    if nv.get("symmetric_size"):
        env["NVSHMEM_SYMMETRIC_SIZE"] = str(nv["symmetric_size"])
    if nv.get("remote_transport"):
        env["NVSHMEM_REMOTE_TRANSPORT"] = str(nv["remote_transport"])
    env.update(topo.env)  # the YAML's own env wins over the defaults above
    return env


# The shell's variables that every rank must see on every node, also where the MPI forwards nothing by itself
# (Open MPI sends only what -x names to other nodes; MPICH's Hydra forwards the whole environment).
FORWARD_PREFIXES = ("NVSHMEM_", "NCCL_", "UCX_", "CUDA_", "TORCH_", "EPCOMM_", "OMP_", "PYTORCH_")
PER_RANK = ("EPCOMM_RANK", "EPCOMM_WORLD_SIZE", "EPCOMM_NODE", "EPCOMM_NUM_NODES", "EPCOMM_LOCAL_RANK",
            "EPCOMM_LOCAL_SIZE", "EPCOMM_DEVICE", "EPCOMM_NIC", "EPCOMM_TOPOLOGY")


def forwarded_names(environ, exported) -> list[str]:
    """Names of the launching shell's variables to pass on to every rank (Open MPI: `-x NAME`), sorted; the ones the
    launcher exports itself (`exported`) and the per-rank ones are not among them."""
    return sorted(k for k in environ if k.startswith(FORWARD_PREFIXES) and k not in exported and k not in PER_RANK)


def rank_environment(topo: Topology, rank: int) -> dict[str, str]:
    """Every epcomm variable of one rank (global ones included)."""
    env = global_environment(topo)
    node, local = topo.rank_to_node(rank)
    env.update({
        "EPCOMM_RANK": str(rank),
        "EPCOMM_WORLD_SIZE": str(topo.world_size),
        "EPCOMM_NODE": str(node),
        "EPCOMM_NUM_NODES": str(topo.num_nodes),
        "EPCOMM_LOCAL_RANK": str(local),
        "EPCOMM_LOCAL_SIZE": str(topo.ranks_per_node),
    })
    dev = topo.device(rank)
    if dev is not None:
        env["EPCOMM_DEVICE"] = str(dev)
    nic = topo.nic(rank)
    if nic is not None:
        env["EPCOMM_NIC"] = nic
        env["NVSHMEM_HCA_LIST"] = nic
    return env


def _first_int(environ, names) -> int | None:
    return next((int(environ[v]) for v in names if environ.get(v, "").isdigit()), None)


def mpi_local_rank(environ) -> int | None:
    """This process's index among the ranks on its host, as the MPI that started it says (None: not told)."""
    flavor = environ.get("EPCOMM_MPI_FLAVOR", "")
    names = LOCAL_RANK_VARS_OF.get(flavor) or sum(LOCAL_RANK_VARS_OF.values(), ())
    return _first_int(environ, names)


def expected_local_rank(topo: Topology, rank: int) -> int:
    """This rank's index among the ranks mpirun starts on its host (`--host a:n,b:m` in rank order; the topology
    lists the nodes of one host consecutively, so each host is one group)."""
    start = 0
    for _, n in topo.host_slots():
        if rank < start + n:
            return rank - start
        start += n
    raise ValueError(f"rank {rank} is not in topology {topo.name} ({topo.world_size} ranks)")


def mpi_rank_and_size(environ: dict[str, str] | os._Environ) -> tuple[int | None, int | None]:
    flavor = environ.get("EPCOMM_MPI_FLAVOR", "")
    rank = _first_int(environ, RANK_VARS_OF.get(flavor, ()) + RANK_VARS)
    size = next((int(environ[v]) for v in SIZE_VARS if environ.get(v, "").isdigit()), None)
    return rank, size


def _check_host(topo: Topology, rank: int) -> None:
    """Warn when mpirun placed this rank on another host than the topology says (mapping mismatch)."""
    import socket

    from epcomm.topology import is_local_host

    want = topo.host_of(rank)
    if is_local_host(want):
        return
    here = socket.gethostname()
    if want.split(".")[0] != here.split(".")[0]:
        print(f"launch.rank_env: warning: rank {rank} runs on {here!r} but topology {topo.name} puts it on "
              f"{want!r} (node {topo.node_of(rank)})", file=sys.stderr)


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned ranks): the wrapper dies with the MPI
    daemon that started it, the rank with its wrapper."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT")


def exit_status(returncode: int) -> int:
    """A child's Popen returncode as a shell would report it: -N (signal N) -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    if returncode < 0:
        import signal
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit {returncode}"


def _rank_said_it(rank: int, status: int) -> bool:
    """Did the rank itself leave a record with this code (epcomm's exit guard, which prints its own line)?"""
    from epcomm import exitrecord
    job_dir = os.environ.get(exitrecord.ENV)
    return bool(job_dir) and any(r.rank == rank and r.by == "rank" and r.code == status
                                 for r in exitrecord.read_all(job_dir))


def run_child(argv: list[str], rank: int) -> int:
    """Run the rank's command as a child, forward signals to it, report a non-zero end; returns the exit status."""
    import signal
    import socket
    import subprocess

    from epcomm import exitrecord

    try:
        # close_fds=False: the child inherits what an exec would keep (MPICH's PMI_FD socket among them)
        child = subprocess.Popen(argv, close_fds=False, preexec_fn=_set_parent_death_signal)
    except OSError as e:
        print(f"launch.rank_env: rank {rank}: cannot run {argv[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for name in FORWARDED_SIGNALS:
        try:
            signal.signal(getattr(signal, name), forward)
        except (AttributeError, ValueError, OSError):
            pass
    rc = child.wait()   # a forwarded signal interrupts the wait only for the handler (PEP 475 retries it)
    status = exit_status(rc)
    if status != 0 and not _rank_said_it(rank, status):
        node = os.environ.get("EPCOMM_NODE", "?")
        print(f"launch.rank_env: rank {rank} (node {node}, host {socket.gethostname()}) ended: "
              f"{describe_status(rc)}", file=sys.stderr, flush=True)
    exitrecord.write(rank, status, describe_status(rc), by="wrapper")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    topo_arg = None
    if argv[:1] in (["-t"], ["--topology"]) and len(argv) >= 2:
        topo_arg, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m launch.rank_env [-t TOPOLOGY] -- CMD ...", file=sys.stderr)
        return 2
    try:
        topo = Topology.load(topo_arg) if topo_arg else Topology.from_env()
    except Exception as e:  # EPInputError: one line is enough
        print(f"launch.rank_env: {e}", file=sys.stderr)
        return 2
    if topo is None:
        print("launch.rank_env: no topology (-t or EPCOMM_TOPOLOGY)", file=sys.stderr)
        return 2
    want_sha = os.environ.get("EPCOMM_TOPOLOGY_SHA")
    if want_sha and topo.fingerprint() != want_sha:
        import socket
        print(f"launch.rank_env: on {socket.gethostname()}, topology {topo_arg or os.environ.get('EPCOMM_TOPOLOGY')} "
              f"differs from the launching host's copy (fingerprint {topo.fingerprint()} vs {want_sha}): copy the "
              f"same file to every host", file=sys.stderr)
        return 2
    rank, size = mpi_rank_and_size(os.environ)
    if rank is None:
        print(f"launch.rank_env: not started by mpirun (none of {', '.join(RANK_VARS)} set)", file=sys.stderr)
        return 2
    if size is not None and size != topo.world_size:
        print(f"launch.rank_env: mpirun started {size} ranks but topology {topo.name} has {topo.world_size}",
              file=sys.stderr)
        return 2
    _check_host(topo, rank)
    got, want = mpi_local_rank(os.environ), expected_local_rank(topo, rank)
    if got is not None and got != want:
        print(f"launch.rank_env: rank {rank} is local rank {got} on its host, but topology {topo.name} expects local "
              f"rank {want} there (node {topo.node_of(rank)}, GPU {topo.device(rank)}): mpirun placed the ranks otherwise than the "
              f"YAML says (an extra --hostfile or --map-by?); not starting, since ranks would share a GPU or NIC",
              file=sys.stderr)
        return 2
    # global values already here came from mpirun (-x / -genv), with the operator's `launch -x NAME=VALUE` overrides
    # in them: keep those; set the per-rank ones and any global one that did not arrive
    glob = global_environment(topo)
    for k, v in rank_environment(topo, rank).items():
        if not (k in glob and k in os.environ):
            os.environ[k] = v
    _set_parent_death_signal()
    sys.stdout.flush()
    return run_child(argv, rank)


if __name__ == "__main__":
    sys.exit(main())
