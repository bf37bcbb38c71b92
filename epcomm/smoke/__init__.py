"""Cluster smoke test for EP traffic: inventory, pair links, EP correctness, EP speed (see docs/SMOKE.md).

Run with `python -m launch smoke -t CONFIG -- [--quick] [--json PATH] [--png PATH] [--stage-timeout S]`.
Modules: cli (options, entry), coordinator (rank 0 and the others), stages (one rank's stage under its deadline),
analysis (pure decisions), comm (deadline messaging), inventory, links, ep, report, faults.
"""


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)
