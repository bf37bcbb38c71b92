"""Cluster smoke test for EP traffic: inventory, pair links, EP correctness, EP speed (see docs/SMOKE.md).

Run with `python -m launch smoke -t CONFIG -- [--quick] [--json PATH] [--png PATH] [--stage-timeout S]`.
Modules: analysis (pure decisions), comm (deadline messaging), inventory, links, ep, report, cli.
"""


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)
