"""Build, before any rank starts, every kernel a bench run will load: the EP kernels of the configs its epcomm cases
make (the bench's own list, Bench.kernel_configs) and the latency probe. Without it both ranks compile the same
kernels on first use, inside the timed call's budget.

    python dev/device/x2_prebuild.py [--world 2] [--jobs N] [bench options, e.g. --case ht,ll --no-batched]
Needs nvcc + NVSHMEM (no GPU); cached kernels cost nothing ($EPCOMM_CACHE). Kernel knobs in the environment
(EPCOMM_VARIANT, ...) apply as they do in the bench.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from epcomm.backends.gpu import specs
from epcomm.bench import driver, latency
from epcomm.bench.records import kernel_env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks of the bench run (default 2)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    a, bench_argv = ap.parse_known_args(argv)
    t0 = time.time()
    args = driver.parse(bench_argv)
    driver.resolve_shapes(args, "gpu", None)
    bench = driver.Bench.__new__(driver.Bench)     # only its configs: no context, no ranks
    bench.args, bench.world = args, a.world
    cfgs = bench.kernel_configs()
    built = specs.build_all(cfgs, jobs=a.jobs) if cfgs else []
    probe = latency.build() if "latency" in args.cases else None
    knobs = ", ".join(f"{k}={v}" for k, v in kernel_env().items()) or "none"
    print(f"x2 prebuild: {len(built)} EP kernels ({sum(not b.cached for b in built)} compiled now)"
          f"{', latency probe ' + probe.name if probe else ''} in {time.time() - t0:.1f} s (EPCOMM_* knobs: {knobs})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
