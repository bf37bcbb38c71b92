"""Any bad end of one rank ends the whole job within seconds, with that rank's exit code, and the launcher names it.

Rank 1 ends (an exception, sys.exit(3), SIGKILL, SIGTERM) while the other ranks sit in a collective that needs it (an
MPI barrier, or the collective creation of an EPBuffer). Without the exit guard (epcomm/context.py), the rank wrapper
(launch/rank_env.py) and the launcher's watch of the exit records (launch/runner.py), rank 1 waited in MPI_Finalize
for peers that waited for it, and the job ended only at --timeout (rc 124), the code lost.

Timing bounds are loose on purpose (a loaded 2-core machine): the launcher's --timeout is 120 s, the bound 20 s.
Set EPCOMM_TEST_MPICH_PYTHON to a Python whose bin/ holds MPICH's mpiexec (pip install mpich mpi4py numpy ml_dtypes
pyyaml in a venv) to run the same checks under MPICH as well.
"""
import os
import sys
import time
from pathlib import Path

import pytest

from launched import REPO_ROOT, run_launched

pytestmark = pytest.mark.mpi

SCRIPT = "tests/mpi/scripts/end_one_rank.py"
BOUND_S = 20.0
LAUNCH_TIMEOUT = 120
MPICH_PYTHON = os.environ.get("EPCOMM_TEST_MPICH_PYTHON")

MPIS = ["openmpi"] + (["mpich"] if MPICH_PYTHON else [])


def end_rank_1(how: str, where: str, mpi: str = "openmpi", launch_args=()):
    """Run the script on 4 ranks; returns (returncode, output, seconds)."""
    if mpi == "openmpi":
        t0 = time.monotonic()
        proc = run_launched("cpu-4rank", ["python", SCRIPT, how, where], timeout=LAUNCH_TIMEOUT,
                            launch_args=list(launch_args))
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0
    import subprocess
    py = str(Path(MPICH_PYTHON))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("EPCOMM_MPIRUN", None)   # the mpiexec beside that Python
    cmd = [py, "-m", "launch", "run", "-t", "cpu-4rank", "--timeout", str(LAUNCH_TIMEOUT), "--grace", "3",
           *launch_args, "--", "python", SCRIPT, how, where]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, errors="replace",
                          timeout=LAUNCH_TIMEOUT + 60)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def assert_ended_by_rank_1(rc, out, dt, code, reason):
    assert rc == code, f"exit {rc}, wanted {code}\n{out[-4000:]}"
    assert f"launch: rank 1 (node 0, host " in out and f"ended first: {reason}" in out, out[-4000:]
    assert "done" not in out.replace("rank 1: ending", ""), out[-4000:]   # no peer got past the collective
    assert dt < BOUND_S, f"job took {dt:.0f} s: the peers waited instead of being stopped\n{out[-3000:]}"


@pytest.mark.parametrize("mpi", MPIS)
def test_sys_exit_3_during_a_barrier_ends_the_job_with_3(mpi):
    rc, out, dt = end_rank_1("exit3", "barrier", mpi)
    assert_ended_by_rank_1(rc, out, dt, 3, "SystemExit(3)")
    assert "epcomm: rank 1 ended with SystemExit(3); aborting the job (exit 3)" in out


@pytest.mark.parametrize("mpi", MPIS)
def test_exception_inside_epbuffer_creation_ends_the_job(mpi):
    rc, out, dt = end_rank_1("raise", "buffer", mpi)
    assert_ended_by_rank_1(rc, out, dt, 1, "RuntimeError: boom inside EPBuffer creation on rank 1")


@pytest.mark.parametrize("mpi", MPIS)
def test_sys_exit_while_the_others_create_a_buffer(mpi):
    rc, out, dt = end_rank_1("exit3", "buffer", mpi)
    assert_ended_by_rank_1(rc, out, dt, 3, "SystemExit(3)")


@pytest.mark.parametrize("mpi", MPIS)
def test_sigkill_of_one_rank_ends_the_job_with_137(mpi):
    rc, out, dt = end_rank_1("sigkill", "barrier", mpi)
    assert_ended_by_rank_1(rc, out, dt, 137, "killed by SIGKILL")
    assert "launch.rank_env: rank 1 (node 0, host " in out   # the wrapper's own line (also on remote hosts)


def test_sigterm_of_one_rank_ends_the_job_with_143():
    rc, out, dt = end_rank_1("sigterm", "barrier")
    assert_ended_by_rank_1(rc, out, dt, 143, "killed by SIGTERM")


def test_uncaught_exception_before_a_collective():
    rc, out, dt = end_rank_1("raise", "barrier")
    assert_ended_by_rank_1(rc, out, dt, 1, "RuntimeError: boom on rank 1")
    assert "Traceback" in out and "rank 1 ended with RuntimeError" in out   # the traceback is printed first


def test_exit_0_while_others_wait_is_stopped_by_exit_wait():
    """sys.exit(0) is a normal end (a rank may finish before the others); --exit-wait S bounds how long the others
    may go on after it. The launcher names the rank that finished first and exits 1."""
    rc, out, dt = end_rank_1("exit0", "barrier", launch_args=["--exit-wait", "2"])
    assert rc == 1, out[-4000:]
    assert "launch: rank 1 (node 0, host " in out and "finished 2 s ago (--exit-wait)" in out, out[-4000:]
    assert dt < BOUND_S, dt


def test_a_verdict_every_rank_exits_with_is_a_normal_end():
    """Every rank exits 3 together (a check that failed everywhere, `make bench` slower than recorded): exit 3,
    through MPI_Finalize, no abort and no rank named."""
    rc, out, dt = end_rank_1("all3", "barrier")
    assert rc == 3, out[-4000:]
    assert out.count("done") == 4 and "aborting the job" not in out and "ended first" not in out, out[-4000:]
    assert "MPI_ABORT" not in out, out[-4000:]


def test_a_normal_job_is_left_alone():
    proc = run_launched("cpu-4rank", ["python", "-c", "import epcomm; c = epcomm.init(); c.comm.Barrier()"],
                        timeout=LAUNCH_TIMEOUT, launch_args=["--exit-wait", "30"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "launch:" not in proc.stderr, proc.stderr[-2000:]
