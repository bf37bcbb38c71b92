"""Run a command on every rank of a topology from pytest: ``run_launched("cpu-4rank", ["python", "x.py"])``."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _resolve(config: str) -> str:
    p = Path(config)
    for c in (p, REPO_ROOT / config, REPO_ROOT / "configs" / config, REPO_ROOT / "configs" / f"{config}.yaml"):
        if c.is_file():
            return str(c.resolve())
    raise FileNotFoundError(f"topology config {config!r} not found (looked in {REPO_ROOT / 'configs'})")


def run_launched(config: str, argv: list[str], timeout: float = 120, env: dict[str, str] | None = None,
                 check: bool = False, launch_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `argv` on every rank of `config` through ``python -m launch run`` and wait for it.

    config: a path, a path relative to the repo root, or a name under configs/ ("cpu-2x4" or "cpu-2x4.yaml").
    argv:   the per-rank command. "python"/"python3" as argv[0] means this interpreter; an argv starting with
            a *.py file gets this interpreter put in front (relative paths are taken from the repo root).
    timeout: the launcher kills every rank after this many seconds (returncode 124).
    env:    extra environment variables for every rank (on top of os.environ).
    launch_args: extra options of `python -m launch run` (e.g. ["--exit-wait", "5"]).
    Returns the CompletedProcess with text stdout / stderr captured; check=True raises on a non-zero exit
    with both streams in the message.
    """
    argv = list(argv)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif argv and argv[0].endswith(".py"):
        argv.insert(0, sys.executable)
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "launch", "run", "-t", _resolve(config), "--timeout", f"{timeout:g}",
           "--grace", "3", *(launch_args or []), "--", *argv]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, errors="replace",
                          timeout=timeout + 60)
    if check and proc.returncode != 0:
        raise AssertionError(f"launched job failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """GPUs listed by `nvidia-smi -L` (0 when it is missing or fails)."""
    from epcomm.topology import count_local_gpus
    return count_local_gpus()


def mpi_available() -> bool:
    here = Path(sys.executable).parent
    return (here / "mpirun").exists() or (here / "mpiexec").exists() or bool(shutil.which("mpirun"))
