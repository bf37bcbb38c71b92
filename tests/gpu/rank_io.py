"""What the GPU check scripts (fence_live.py, fence_one_rank.py) share: their arrays on this rank's device, and their
FAIL lines. The same scripts run on the host backend (numpy arrays), which is how tests/mpi proves them on a CPU."""
from __future__ import annotations


def device_put(ctx):
    """(put, dev): `put(a)` is numpy array `a` as a torch tensor on this rank's GPU (GPU backend: the device is
    selected here) or `a` itself (host backend, dev None)."""
    if ctx.backend != "gpu":
        return (lambda a: a), None
    import torch

    from epcomm.arrays import to_torch
    torch.cuda.set_device(ctx.device)
    dev = torch.device(f"cuda:{ctx.device}")
    return (lambda a: to_torch(a, dev)), dev


class Problems(list):
    """The failures of one rank: each printed as a `FAIL rank R: ...` line (what the rig greps) and kept."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def fail(self, msg: str) -> None:
        self.append(msg)
        print(f"FAIL rank {self.rank}: {msg}", flush=True)
