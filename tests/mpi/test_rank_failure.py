"""A rank that dies with an exception ends the whole job quickly (MPI_Abort from epcomm.init's hook)."""
import time

import pytest

from launched import run_launched

pytestmark = pytest.mark.mpi


def test_uncaught_exception_on_one_rank_ends_the_job():
    t0 = time.monotonic()
    proc = run_launched("cpu-4rank", ["python", "tests/mpi/scripts/die_on_rank1.py"], timeout=60)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124), out[-3000:]
    assert "boom on rank 1" in out and "rank 1 ended with RuntimeError" in out, out[-3000:]
    assert elapsed < 30, f"job took {elapsed:.0f} s: the peers waited instead of being aborted"
