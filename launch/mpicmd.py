"""Find mpirun, tell Open MPI from MPICH, and build the mpirun command line for a topology."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from epcomm.errors import EPInputError
from epcomm.topology import Topology, is_local_host
from launch.rank_env import forwarded_names, global_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config(name: str) -> Path:
    """A config given as a path, or as a name under configs/ (with or without .yaml)."""
    p = Path(name)
    candidates = [p, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    have = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))) or "none"
    raise EPInputError(f"{name}: topology file not found (configs available: {have})")


def find_mpirun(explicit: str | None = None) -> str | None:
    """--mpirun, else $EPCOMM_MPIRUN, else mpirun beside this Python (the venv's), else mpirun / mpiexec on PATH."""
    for cand in (explicit, os.environ.get("EPCOMM_MPIRUN")):
        if cand:
            found = shutil.which(cand)
            if not found:
                raise EPInputError(f"mpirun {cand!r} not found or not executable")
            return found
    here = Path(sys.executable).parent
    for n in ("mpirun", "mpiexec"):
        if (here / n).is_file() and os.access(here / n, os.X_OK):
            return str(here / n)
    return shutil.which("mpirun") or shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def detect_mpi(mpirun: str) -> str:
    """'openmpi' or 'mpich' from `mpirun --version`; 'unknown' when it says neither."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EPInputError(f"{mpirun}: cannot run --version ({e})") from None
    return flavor_from_version(text)


@functools.lru_cache(maxsize=None)
def open_mpi_major(mpirun: str) -> int | None:
    """Open MPI's major version from `mpirun --version` ("mpirun (Open MPI) 4.1.6"); None when it does not say."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"open mpi\)?\s+(\d+)\.", (out.stdout + out.stderr).lower())
    return int(m.group(1)) if m else None


def flavor_from_version(text: str) -> str:
    low = text.lower()
    if "open mpi" in low or "open-mpi" in low or "openrte" in low or "prte" in low:
        return "openmpi"
    # Intel MPI and MVAPICH start ranks with MPICH's Hydra (same -hosts / -ppn / -genv flags)
    if "hydra" in low or "mpich" in low or "intel(r) mpi" in low or "mvapich" in low:
        return "mpich"
    return "unknown"


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


@dataclass
class JobSpec:
    """Everything `plan` shows and `run` executes."""
    topology: Topology
    flavor: str
    mpirun: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # global env exported to every rank
    notes: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)  # written for this job (a -n topology); `run` removes them


def user_command(cmd: list[str]) -> list[str]:
    """`python` / `python3` as the command means this interpreter (so the venv is used on every rank)."""
    if cmd and cmd[0] in ("python", "python3"):
        return [sys.executable, *cmd[1:]]
    return list(cmd)


def build_command(topo: Topology, cmd: list[str], *, mpi: str | None = None, mpirun: str | None = None,
                  extra_env: dict[str, str] | None = None, mpi_args: list[str] | None = None,
                  keep_going: bool = False) -> JobSpec:
    """The full mpirun argv for running `cmd` on every rank of `topo` (nothing is executed)."""
    if not cmd:
        raise EPInputError("no command given (put it after --)")
    notes: list[str] = []
    choice = mpi or topo.mpi
    exe = find_mpirun(mpirun)
    detected = detect_mpi(exe) if exe else None
    if choice == "auto":
        if detected in ("openmpi", "mpich"):
            flavor = detected
        else:
            flavor = "openmpi"
            notes.append("no mpirun found; command shown for Open MPI" if exe is None
                         else f"{exe}: could not tell Open MPI from MPICH; assuming Open MPI")
    else:
        flavor = choice
        if detected and detected != "unknown" and detected != choice:
            notes.append(f"topology asks for {choice} but {exe} is {detected}")
    if exe is None:
        exe = "mpirun" if flavor == "openmpi" else "mpiexec"

    made_file = not topo.source
    topo_path = _topo_arg(topo)  # before the env: single_node topologies get a file here
    env = global_environment(topo)
    env["EPCOMM_MPI_FLAVOR"] = flavor   # which rank variables the wrapper reads first
    env["EPCOMM_TOPOLOGY_SHA"] = topo.fingerprint()   # every host's copy of the file must say the same
    env.update(extra_env or {})
    pypath = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pypath if pypath else "")

    wrapper = [sys.executable, "-m", "launch.rank_env", "-t", topo_path, "--", *user_command(cmd)]
    slots = topo.host_slots()
    hosts = ",".join(f"{h}:{n}" for h, n in slots)
    n = str(topo.world_size)

    if flavor == "openmpi":
        argv = [exe, "-n", n, "--host", hosts, "--map-by", "slot", "--bind-to", "none"]
        cores = local_cores()
        if any(is_local_host(h) and k > cores for h, k in slots):
            argv.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        if topo.resolved_backend() == "host":
            argv += ["--mca", "osc", "^ucx"]
        if keep_going:   # the runtime lets the other ranks live when one dies
            # Open MPI 5 (PRRTE): ULFM's --with-ft; 4.x (ORTE, e.g. the GPU machines' 4.1.6, which refuses
            # --with-ft): --enable-recovery. Unknown version: 5's flag (the PyPI wheel's)
            major = open_mpi_major(exe)
            argv += ["--enable-recovery"] if major is not None and major < 5 else ["--with-ft", "ulfm"]
        for k, v in env.items():
            argv += ["-x", f"{k}={v}"]
        for k in forwarded_names(os.environ, env):   # the shell's value, to remote nodes too
            argv += ["-x", k]
    elif flavor == "mpich":
        if keep_going:
            raise EPInputError("--keep-going needs Open MPI's recovery mode (ULFM, mpirun --with-ft ulfm)")
        argv = [exe, "-n", n, "-hosts", hosts]
        counts = {k for _, k in slots}
        if len(counts) == 1:
            argv += ["-ppn", str(counts.pop())]
        for k, v in env.items():
            argv += ["-genv", k, v]
    else:
        raise EPInputError(f"mpi: unknown MPI flavour {flavor!r} (openmpi or mpich)")
    argv += list(mpi_args or [])
    argv += wrapper
    return JobSpec(topology=topo, flavor=flavor, mpirun=exe, command=argv, env=env, notes=notes,
                   temp_files=[topo_path] if made_file else [])


def _topo_arg(topo: Topology) -> str:
    if topo.source:
        return topo.source
    # single_node topologies have no file: write one the ranks can read
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"epcomm-{topo.name}-", suffix=".yaml")
    import yaml

    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(topo.to_dict(), f, sort_keys=False)
    topo.source = path
    return path
