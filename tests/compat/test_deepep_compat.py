"""epcomm.compat.deep_ep under the launcher: DeepEP's Buffer API on the host backend, every rank checked against a
torch reference of DeepEP's layouts (tests/compat/deepep_checks.py). Fresh seed each run (printed)."""
from __future__ import annotations

import random

import pytest

from launched import run_launched

pytestmark = pytest.mark.mpi
WORKER = "tests/compat/worker.py"


def run(config: str, seed: int):
    argv = [WORKER, "--seed", str(seed)]
    proc = run_launched(config, argv, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ok in" in proc.stdout, (
        f"compat worker failed on {config} (exit {proc.returncode}), rerun: python -m launch run -t {config} -- "
        f"python {' '.join(argv)}\n{out[-6000:]}")


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(1, 2 ** 30)
    print(f"seed {s}")
    return s


def test_two_ranks(seed):
    run("tests/compat/cpu-2rank.yaml", seed)


def test_four_ranks(seed):
    run("cpu-4rank", seed)


def test_example_switch_runs():
    proc = run_launched("tests/compat/cpu-2rank.yaml", ["examples/deepep_switch.py"], timeout=200)
    assert proc.returncode == 0 and proc.stdout.count("max rel error") == 4, (proc.stdout + proc.stderr)[-4000:]
