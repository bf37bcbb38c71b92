"""GPU backend checks, run under the launcher on every rank (tests/gpu/worker.py does the work per rank).

Skipped (by tests/conftest.py's gpu marker) when fewer than 2 GPUs are visible.
"""
from __future__ import annotations

import pytest

from launched import run_launched

pytestmark = pytest.mark.gpu(2)


def _run(config: str, args: list[str], timeout: float = 400):
    proc = run_launched(config, ["python", "tests/gpu/worker.py", *args], timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "SUMMARY" in out and "fail=0" in out, out[-8000:]
    return out


@pytest.mark.parametrize("config", ["local-2gpu", "sim-2node"])
def test_gpu_backend_against_reference(config):
    """Every mode x format x (plain, fused shared expert, skip_a2a) vs epcomm.reference, poisoned outputs, skewed
    routing, T=0 / T=max, CUDA graph capture + replay, 1000 back-to-back rounds, timeout naming the missing rank."""
    _run(config, [])


@pytest.mark.parametrize("mode", ["ll", "ht"])
def test_moe_layer_example(mode):
    proc = run_launched("local-2gpu", ["python", "examples/moe_layer.py", "--mode", mode], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "OK" in proc.stdout
