"""GPU backend checks, run under the launcher on every rank (tests/gpu/worker.py does the work per rank).

With >= 2 GPUs: local-2gpu and sim-2node (one GPU per rank). With exactly one GPU: the same checks with both ranks on
it (one-gpu-2 and one-gpu-sim-2x1, `share_gpus: true`). Skipped (by tests/conftest.py's gpu marker) without a GPU.
"""
from __future__ import annotations

import pytest

from launched import gpu_count, run_launched

pytestmark = pytest.mark.gpu(1)


def configs() -> dict[str, str]:
    """role -> config: one node and two (simulated) nodes, on separate GPUs when there are two."""
    if gpu_count() >= 2:
        return {"one-node": "local-2gpu", "two-nodes": "sim-2node"}
    return {"one-node": "one-gpu-2", "two-nodes": "one-gpu-sim-2x1"}


def _run(config: str, args: list[str], timeout: float = 400):
    proc = run_launched(config, ["python", "tests/gpu/worker.py", *args], timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "SUMMARY" in out and "fail=0" in out, out[-8000:]
    return out


@pytest.mark.parametrize("role", ["one-node", "two-nodes"])
def test_gpu_backend_against_reference(role):
    """Every mode x format x (plain, fused shared expert, skip_a2a) vs epcomm.reference, poisoned outputs, skewed
    routing, T=0 / T=max, CUDA graph capture + replay, 1000 back-to-back rounds, timeout naming the missing rank."""
    _run(configs()[role], [])


@pytest.mark.parametrize("mode", ["ll", "ht"])
def test_moe_layer_example(mode):
    proc = run_launched(configs()["one-node"], ["python", "examples/moe_layer.py", "--mode", mode], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "OK" in proc.stdout
