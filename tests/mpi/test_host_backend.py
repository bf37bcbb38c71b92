"""Host backend under the launcher: every rank's outputs equal epcomm.reference; faults fail fast and name the peer.

Each test launches tests/mpi/worker.py on a topology from configs/. Seeds are fresh each run (printed; rerun a
failure with the worker command shown in the assertion message).
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
import time

import pytest

from launched import REPO_ROOT, run_launched

pytestmark = pytest.mark.mpi
WORKER = "tests/mpi/worker.py"


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(1, 2 ** 30)
    print(f"seed {s}")
    return s


def run_cases(config: str, seed: int, cases: list[str], timeout: float = 240, env=None):
    argv = [WORKER, "cases", "--seed", str(seed)]
    for c in cases:
        argv += ["--case", c]
    proc = run_launched(config, argv, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ok in" in proc.stdout, (
        f"worker failed on {config} (exit {proc.returncode}), rerun: python -m launch run -t {config} -- "
        f"python {' '.join(argv)}\n{out[-6000:]}")
    return out


def grid(fmts=("bf16", "fp8"), modes=("ht", "ll"), extra=("",)):
    return [f"fmt={f},mode={m}" + (f",{e}" if e else "") for f in fmts for m in modes for e in extra]


ROUTING_CASES = ["routing=uniform", "routing=hot,tokens=ragged", "routing=empty_rank", "routing=minus1,tokens=ragged",
                 "routing=all_minus1", "routing=local", "routing=skewed,tokens=ragged", "tokens=0", "tokens=1",
                 "fused=1", "fused=1,routing=hot,tokens=ragged", "fused=1,tokens=0", "dup=1", "K=1", "K=8,E=2",
                 "skip=1", "skip=1,fused=1,aws=2,tokens=ragged", "skip=1,fused=1,aws=4", "rounds=3"]


def test_reference_4rank(seed):
    run_cases("cpu-4rank", seed, grid(extra=ROUTING_CASES))


def test_reference_2x4(seed):
    cases = grid(extra=["routing=uniform", "routing=skewed,tokens=ragged", "fused=1,routing=minus1",
                        "skip=1,fused=1,aws=4,tokens=ragged", "routing=empty_rank,fused=1", "tokens=0"])
    run_cases("cpu-2x4", seed, cases)


SERVER_CASES = [
    "layout=batched", "layout=batched,routing=hot,tokens=ragged", "layout=batched,routing=empty_rank",
    "layout=batched,routing=minus1,tokens=ragged", "layout=batched,dup=1,ecap=64", "layout=batched,skip=1",
    "align=8,routing=skewed,tokens=ragged", "align=128,fused=1,routing=minus1", "align=4,skip=1,fused=1,aws=2",
    "H=2880,routing=hot", "H=48,routing=minus1", "ids64=1,routing=minus1,tokens=ragged",
    "out=1,fused=1", "out=1,layout=batched,async=1", "stats=1,rounds=3,routing=hot,tokens=ragged",
    "mb=1,rounds=4,routing=skewed,tokens=ragged", "mb=1,rounds=3,align=16,async=1",
    "mb=1,stats=1,rounds=3,layout=batched,fused=0,routing=empty_rank"]
FP8_SERVER_CASES = [
    "sfmt=ue8m0", "slayout=col,routing=hot", "sfmt=ue8m0,slayout=col,layout=batched,routing=skewed,tokens=ragged",
    "H=2880,sfmt=ue8m0", "H=208,slayout=col", "prequant=1", "prequant=1,sfmt=ue8m0,slayout=col,layout=batched",
    "prequant=1,align=128,fused=1,tokens=ragged"]


def test_server_options_4rank(seed):
    """Issue 13 on the host backend: batched layout, alignment, odd hidden sizes, int64 ids, out=, stats_out=,
    two micro-batches on one buffer; fp8 scale formats / layouts and caller-quantised input."""
    run_cases("cpu-4rank", seed, grid(extra=SERVER_CASES) + grid(fmts=("fp8",), extra=FP8_SERVER_CASES)
              + grid(fmts=("bf16",), extra=["H=40,routing=hot,tokens=ragged"]))


def test_server_options_2x4(seed):
    run_cases("cpu-2x4", seed, grid(extra=["layout=batched,routing=skewed,tokens=ragged", "mb=1,rounds=3,stats=1",
                                           "align=128,fused=1,out=1,ids64=1"]) +
              grid(fmts=("fp8",), extra=["prequant=1,sfmt=ue8m0,slayout=col,layout=batched,mb=1,rounds=2"]))


def test_batched_capacity_overflow_fails_on_every_rank_naming_the_expert(seed):
    proc = run_launched("cpu-4rank", [WORKER, "cases", "--seed", str(seed), "--case",
                                      "layout=batched,ecap=2,routing=hot"], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "expert_capacity=2" in out, out[-3000:]


def test_larger_case_4rank(seed):
    run_cases("cpu-4rank", seed, grid(extra=["H=1024,M=96,K=8,E=8,tokens=ragged"]))


def test_100_rounds_back_to_back(seed):
    # fresh inputs each round, no barrier between rounds; every third round uses the async API
    run_cases("cpu-4rank", seed, ["rounds=100,mode=ht,M=8", "rounds=100,mode=ll,fmt=fp8,M=8,fused=1"])


def test_slow_rank_still_correct(seed):
    run_cases("cpu-4rank", seed, grid(fmts=("bf16",), extra=["rounds=3"]),
              env={"EPCOMM_FAULT": "slow:rank=1,ms=50"})


def test_corrupt_fault_is_detected(seed):
    proc = run_launched("cpu-4rank", [WORKER, "cases", "--seed", str(seed), "--case", "fmt=bf16,mode=ht,K=8,E=2"],
                        timeout=120, env={"EPCOMM_FAULT": "corrupt:rank=1"})
    assert proc.returncode != 0
    assert "FAIL rank" in proc.stdout and "expert_x differs" in proc.stdout, proc.stdout[-3000:]


def test_8_ranks(seed):
    run_cases("cpu-8rank", seed, grid(extra=["H=128,M=8", "H=128,M=8,fused=1,routing=skewed,tokens=ragged"]))


def test_16_ranks(seed):
    run_cases("cpu-2x8", seed, ["H=128,M=8,mode=ht", "H=128,M=8,mode=ll,fmt=fp8",
                                "H=128,M=8,mode=ht,fmt=fp8,fused=1,routing=hot,tokens=ragged",
                                "H=128,M=4,mode=ll,rounds=10"], timeout=300)


def failing_run(config: str, argv: list[str], env=None) -> tuple[str, float, dict[int, tuple[str, float, str]]]:
    """A launched run that must fail: (output, wall seconds, {rank: (error class, seconds, message)}) of the
    workers' "rank R: <EPError class> after Ts: message" lines."""
    t0 = time.monotonic()
    proc = run_launched(config, argv, timeout=90, env=env)
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    hits = {int(r): (kind, float(t), m) for r, kind, t, m in
            re.findall(r"rank (\d+): (EP\w*Error) after ([\d.]+)s: (.*)", out)}
    return out, wall, hits


def test_timeout_names_the_silent_rank(seed):
    deadline = 3.0
    out, wall, hits = failing_run("cpu-2x4", [WORKER, "timeout", "--seed", str(seed), "--case", f"timeout={deadline}"],
                                  env={"EPCOMM_FAULT": "skip_dispatch:rank=5"})
    # each waiting rank times out itself or is stopped by the abort of the first one that did: all name rank 5
    others = {r: h for r, h in hits.items() if r != 5}
    assert any(kind == "EPTimeoutError" for kind, _, _ in others.values()), out[-3000:]
    for r, (kind, t, m) in others.items():
        assert "from rank 5 (node 1), which never signalled (it holds experts 20..23)" in m and "dispatch" in m, m
        assert t < deadline + 5 and (kind != "EPTimeoutError" or deadline <= t), (r, kind, t)
    assert "peer=5 node=1" in out
    assert wall < 60


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_timeout_aborts_the_peers(seed, mode):
    # Rank 1 skips its dispatch. Rank 0 (deadline 2 s) times out naming rank 1 and must abort: rank 1 (its dispatch
    # completes, then its combine waits on rank 0) and ranks 2, 3 (waiting on rank 1) have a 30 s deadline and must
    # stop at once with an EPError naming rank 0. Every line is printed after EPBuffer.close(): none hung there.
    short, long_ = 2.0, 30.0
    argv = [WORKER, "timeout", "--seed", str(seed), "--case", f"mode={mode},timeout={long_}",
            "--deadline", f"0={short}", "--linger", "3"]
    out, wall, hits = failing_run("cpu-4rank", argv, env={"EPCOMM_FAULT": "skip_dispatch:rank=1,round=0"})
    assert sorted(hits) == [0, 1, 2, 3], out[-3000:]
    kind, t, m = hits[0]
    assert kind == "EPTimeoutError" and "from rank 1 (node 0), which never signalled" in m, (kind, m)
    assert short <= t < short + 5, t
    for r in (1, 2, 3):
        kind, t, m = hits[r]
        assert kind == "EPError", (r, kind, m)
        assert m.startswith("rank 0 (node 0) aborted: EPTimeoutError: rank 0 (node 0) timed out"), (r, m)
        assert t < short + 5, (r, t)   # well under their own 30 s deadline
    assert wall < 60, wall


def test_abort_fails_fast_naming_the_bad_rank(seed):
    out, _, hits = failing_run("cpu-4rank", [WORKER, "abort", "--seed", str(seed), "--bad-rank", "2"])
    others = {r: h for r, h in hits.items() if r != 2}
    assert others, out[-3000:]
    for r, (kind, t, m) in others.items():
        # rank 2 refuses its dispatch (it takes part empty: the peers' combine names it), then its EPInputError
        # leaves the `with EPBuffer` block, which aborts the peers: whichever reaches a peer first, it names rank 2
        refused = kind == "EPPeerRejectedError" and "rank 2 (node 0) refused its dispatch input" in m
        aborted = kind == "EPError" and m.startswith("rank 2 (node 0) aborted: EPInputError: dispatch: x must be 2-D")
        assert refused or aborted, (r, kind, m)
        assert t < 10, (r, t)   # the deadline is 30 s: they did not wait for it
    assert "rank 2: EPInputError" in out


def test_input_checks_single_rank(seed):
    cmd = [sys.executable, "-m", "launch", "run", "-n", "1", "--timeout", "60", "--",
           sys.executable, WORKER, "checks", "--seed", str(seed)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "checks: ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_receive_capacity_overflow_is_named_on_every_rank(seed):
    """recv_capacity_factor 1.5 with every token picking expert 0 in even rounds: rank 0 would receive more rows than
    its capacity; every rank raises the same EPCapacityError (rank, rows, capacity) and the odd (uniform) round
    after it on the same buffer matches the reference; the async API too (every third round)."""
    cases = grid(extra=["cap=1.5,routing=hot,rounds=6", "cap=1.5,routing=hot,rounds=4,fused=1,tokens=ragged"])
    cases += ["cap=1,routing=skewed,rounds=4,skip=1", "cap=1,routing=hot,rounds=3,mode=ht,dup=1,K=8,E=2"]
    # with issue 13's layouts: padding on top of the capacity, batched slabs, two micro-batches (one of them over)
    cases += ["cap=1.5,routing=hot,rounds=4,align=16,tokens=ragged", "cap=1.5,routing=hot,rounds=4,layout=batched",
              "cap=1.5,routing=hot,rounds=3,mb=1,stats=1,async=1", "cap=1.5,routing=hot,rounds=3,mb=1,fmt=fp8"]
    out = run_cases("cpu-4rank", seed, cases)
    over, within = map(int, re.search(r"capacity: (\d+) round\(s\) over, (\d+) within", out).groups())
    assert over >= 8 and within >= 8, out[-2000:]   # both kinds of round happened: the test can fail
