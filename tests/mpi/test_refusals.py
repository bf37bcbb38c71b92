"""A refused call harms no one (host backend, real mpirun): every bad-input kind on one rank and on every rank, each
followed by a correct round on the same buffer (tests/mpi/scripts/refusals.py does the work on each rank)."""
import re

import pytest

from launched import run_launched

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_every_refused_call_harms_no_one(mode):
    proc = run_launched("cpu-4rank", ["python", "tests/mpi/scripts/refusals.py", mode], timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAIL" not in out, out[-6000:]
    m = re.search(r"(\d+) refused calls then a correct round each, (\d+) rounds on one buffer, 4 ranks; peers' "
                  r"combines: (\d+) EPPeerRejectedError, (\d+) exact beside a refusal: ok", out)
    assert m, out[-3000:]
    refused, rounds, peer_errors, exact = map(int, m.groups())
    assert refused >= 50 and rounds >= 2 * refused
    assert peer_errors > 0 and exact > 0   # both answers of a peer's combine were exercised


def test_the_gpu_refusal_check_is_right_on_the_host_backend():
    """tests/gpu/refusals.py (the GPU check, with the GPU worker's configs) run on the host backend at 2 ranks: its
    expectations hold where refusals are known to work, so a failure on the GPU is the GPU's."""
    proc = run_launched("tests/compat/cpu-2rank.yaml", ["python", "tests/gpu/refusals.py"], timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAIL" not in out, out[-6000:]
    for mode in ("ll", "ht"):
        m = re.search(rf"\[rank 0\] {mode}-bf16 refusals: peers' combines (\d+) EPPeerRejectedError, (\d+) exact", out)
        assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out[-3000:]
