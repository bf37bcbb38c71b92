"""A dead rank is fenced off instead of taking the job down (host backend, real mpirun; issue 15 item 4).

tests/mpi/scripts/fence_one_rank.py does the work on each of 4 ranks: rank 3 is lost in dispatch round 2, the three
survivors finish that round with EPRankLostError naming rank 3, its node and experts, then run 100 more rounds on
the same EPBuffer, each checked against epcomm.reference with masked_ranks=(3,).
"""
import re

import pytest

from launched import run_launched

pytestmark = pytest.mark.mpi

SURVIVORS = (0, 1, 2)


def survivors_went_on(out: str, how: str, mode: str, after: int, late: bool = False) -> None:
    """late: a survivor may have had its round 2 whole (rows back before the death) and learn in round 3."""
    assert "FAIL" not in out and "Traceback" not in out, out[-6000:]
    told = 0
    for r in SURVIVORS:
        lost = rf"rank {r}: round {'[23]' if late else '2'}: rank {r} \(node 0\): rank 3 \(node 0\) was lost .*" \
               rf"experts 6\.\.7"
        told += bool(re.search(lost, out))
        assert late or re.search(lost, out), out[-4000:]
        assert f"rank {r}: rank 3 lost in round 2 ({how}, {mode}), then {after} rounds without it: ok" in out, \
            out[-4000:]
    assert told >= 1, out[-4000:]


@pytest.mark.parametrize("mode, fault", [("ht", "die"), ("ll", "die"), ("ht", "die_in_combine"),
                                         ("ll", "die_in_combine")])
def test_sigkill_mid_dispatch_is_fenced_off_and_the_survivors_go_on(mode, fault):
    """kill -9 of rank 3 halfway through its dispatch sends (fault "die"; or its combine's, "die_in_combine"), under
    `launch run --keep-going` (Open MPI ULFM keeps the survivors alive); the launcher reports the rank and exits
    with its code when all have ended."""
    proc = run_launched("cpu-4rank", ["python", "tests/mpi/scripts/fence_one_rank.py", mode, "kill", "100"],
                        timeout=180, launch_args=["--keep-going"], env={"EPCOMM_FAULT": f"{fault}:rank=3,round=2"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 137, out[-6000:]
    assert "launch: rank 3 (node 0, host " in out and "killed by SIGKILL (exit 137); the others go on" in out, \
        out[-4000:]
    survivors_went_on(out, "kill", mode, 100, late=fault == "die_in_combine")


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_a_rank_that_stops_calling_is_fenced_off(mode):
    """Rank 3 stays alive but never calls dispatch again (a hung GPU looks like this): the survivors' deadline
    declares it dead and they go on; its own next call raises EPFencedError."""
    proc = run_launched("cpu-4rank", ["python", "tests/mpi/scripts/fence_one_rank.py", mode, "stall", "100"],
                        timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    survivors_went_on(out, "stall", mode, 100)
    assert "rank 3: fenced off, as it should: rank 3 (node 0) was fenced off by rank " in out, out[-4000:]


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_an_explicit_fence_masks_a_live_rank_everywhere(mode):
    """Rank 0 calls buf.fence([3]) before round 2 while rank 3 goes on calling (fp8 tokens, a fused shared expert):
    rank 3's round 2 raises EPFencedError naming rank 0; each survivor's round 2 is exact without rank 3 or, where
    its tokens were already sent to rank 3 before it read the notice, raises EPRankLostError; 100 rounds follow."""
    proc = run_launched("cpu-4rank", ["python", "tests/mpi/scripts/fence_one_rank.py", mode, "fence", "100", "fp8"],
                        timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAIL" not in out and "Traceback" not in out, out[-6000:]
    for r in SURVIVORS:
        assert f"rank {r}: rank 3 lost in round 2 (fence, {mode}), then 100 rounds without it: ok" in out, out[-4000:]
    assert "rank 3: fenced off, as it should: rank 3 (node 0) was fenced off by rank 0 (node 0)" in out, out[-4000:]


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_the_gpu_kill_test_is_right_on_the_host_backend(mode):
    """tests/gpu/fence_one_rank.py (the GPU test: rank 3 SIGKILLs itself with its round-2 dispatch launched, the
    survivors get EPRankLostError from that round's combine + synchronize, then 100 rounds against the spec with
    masked_ranks) run on the host backend: the script itself is proved here, on a CPU machine."""
    proc = run_launched("cpu-4rank", ["python", "tests/gpu/fence_one_rank.py", mode, "100"], timeout=180,
                        launch_args=["--keep-going"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 137, out[-6000:]
    assert "FAIL" not in out and "Traceback" not in out, out[-6000:]
    for r in SURVIVORS:
        assert re.search(rf"rank {r}: round 2: rank {r} \(node 0\): rank 3 \(node 0\) was lost .*experts 6\.\.7", out)
        assert f"rank {r}: rank 3 killed in round 2 ({mode}, host), then 100 rounds without it: ok" in out, out[-4000:]


def test_the_gpu_live_fence_check_is_right_on_the_host_backend():
    """tests/gpu/fence_live.py (the GPU check of an explicit fence: rank 0 fences the live rank 3, the others run 20
    rounds against the spec with masked_ranks, for ll / ht x bf16 / fp8) run on the host backend: the script itself
    is proved here."""
    proc = run_launched("cpu-4rank", ["python", "tests/gpu/fence_live.py", "20"], timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "FAIL" not in out and "Traceback" not in out, out[-6000:]
    for r in SURVIVORS:
        for tag in ("ll-bf16", "ll-fp8", "ht-bf16", "ht-fp8"):
            assert f"rank {r}: {tag}: rank 3 fenced while alive, then 20 rounds without it: ok" in out, out[-4000:]
    assert all(f"rank {r}: fence_live ok (host" in out for r in range(4)), out[-4000:]
