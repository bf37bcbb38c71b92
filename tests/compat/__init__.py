"""DeepEP compatibility checks (deepep_checks) and their CPU worker; the GPU worker (tests/gpu/compat_worker.py)
imports the same checks."""
