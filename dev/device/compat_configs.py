"""List the EPConfigs that epcomm.compat.deep_ep makes in its checks (tests/compat/deepep_checks.py), so that the
one-GPU rig compiles their kernels before its compat step (compiled on first use, in both ranks at once, they took
longer than the step's minutes). The checks run on the host backend (CPU, 2 ranks, ~10 s); every EPBuffer's config
is recorded (normal-mode pools, the low-latency pools in layout "batched", the grouped buffers of the old-path
reference in tests/compat/stopgap_reference.py); rank 0 writes them as a JSON list.

    python -m launch run -t tests/compat/cpu-2rank.yaml -x MASTER_PORT=29561 -- \\
        python dev/device/compat_configs.py OUT.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch.distributed as dist

import epcomm.buffer
import epcomm.compat.deep_ep.buffer as deep_ep_buffer
from tests.compat.deepep_checks import run_all


def main() -> int:
    out = sys.argv[1]
    seen: list[dict] = []
    original = epcomm.buffer.EPBuffer.__init__

    def recording_init(self, cfg, *args, **kwargs):
        d = {k: (str(v) if k == "token_format" else v) for k, v in dataclasses.asdict(cfg).items()}
        if d not in seen:
            seen.append(d)
        original(self, cfg, *args, **kwargs)

    epcomm.buffer.EPBuffer.__init__ = recording_init
    # the host backend also where CUDA is present (the GPU machine): the checks run on CPU tensors here, and only
    # the configs matter (on 2026-11-30 "auto" chose the GPU backend there and the listing failed)
    deep_ep_buffer.choose_backend = lambda backend: "host"
    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ.get('MASTER_PORT', '29561')}",
                            rank=rank, world_size=world)
    run_all(rank, world, "cpu", 1)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seen, f, indent=1)
        print(f"compat configs: {len(seen)} EPConfigs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
