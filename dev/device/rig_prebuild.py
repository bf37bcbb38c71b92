"""Compile every kernel the one-GPU rig (dev/device/one_gpu_rig.sh) needs, in parallel, before any rank starts: the GPU
worker's suites at 2, 8 and 16 ranks, the MoE example and `make demo` at 2, and smoke's EP cases at 8. Without it
each of 8 or 16 ranks would compile the same kernel on first use at the same time (the cache is shared, the work is
not).

    python dev/device/rig_prebuild.py [--worlds 2,8,16] [--smoke-world 8] [--jobs N]
Needs nvcc + NVSHMEM (no GPU); cached kernels cost nothing ($EPCOMM_CACHE).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from epcomm.backends.gpu import specs
from epcomm.smoke import ep as smoke_ep
from epcomm.topology import Topology


def demo_config():
    """What `make demo` runs on one GPU (python -m epcomm.demo's GPU defaults, 2 ranks)."""
    from epcomm.config import EPConfig
    return EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=128, world_size=2, mode="ht")


def rig_configs(worlds: list[int], smoke_world: int | None, smoke_quick: bool = False) -> list:
    out = [demo_config(), *specs.fence_configs(4)]   # the fencing checks (step fence4) run at 4 ranks
    for w in worlds:
        out += specs.test_configs(w) + specs.example_configs(w)
    if smoke_world:
        topo = Topology.load(Path(__file__).resolve().parents[2] / "configs" / f"one-gpu-{smoke_world}.yaml")
        out += [smoke_ep.case_config(c, topo, smoke_world, smoke_quick) for c in smoke_ep.cases(smoke_quick)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,8,16", help="world sizes of the worker suites (comma list)")
    ap.add_argument("--smoke-world", type=int, default=8, help="world size of smoke's EP cases (0: none)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--configs-json", metavar="FILE", help="more EPConfigs to build, a JSON list of their fields "
                    "(dev/device/compat_configs.py writes the DeepEP compat checks' list)")
    a = ap.parse_args()
    t0 = time.time()
    cfgs = rig_configs([int(w) for w in a.worlds.split(",") if w.strip()], a.smoke_world or None)
    if a.configs_json:
        import json

        from epcomm.config import EPConfig
        with open(a.configs_json) as f:
            cfgs += [EPConfig(**d) for d in json.load(f)]
    built = specs.build_all(cfgs, jobs=a.jobs)
    print(f"rig prebuild: {len(built)} kernels ({sum(not b.cached for b in built)} compiled now) in "
          f"{time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
