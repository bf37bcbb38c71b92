"""Other ways in: a torch.distributed group (gloo) or a caller-supplied unique id, then one checked round.

    mpirun -n 2 python tests/gpu/init_variants.py torch|uid
(ranks from OMPI_COMM_WORLD_RANK/SIZE; no epcomm.init / mpi4py inside the GpuBackend path.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import epcomm
from epcomm import reference as ref
from epcomm.backends.gpu.runtime import Runtime, torch_context, uid_context
from epcomm.backends.gpu.specs import test_configs
from epcomm.workload import distinct_experts, make_world


def main():
    import torch
    how = sys.argv[1]
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", 0)))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    device = rank % max(1, torch.cuda.device_count())   # ranks may share one GPU (the one-GPU rig)
    torch.cuda.set_device(device)
    if how == "torch":
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ctx = torch_context()
    else:  # uid through a file (stands for "any channel the caller has")
        path = Path(os.environ.get("EPCOMM_UID_FILE", "/tmp/epcomm-uid.bin"))
        if rank == 0:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(Runtime.new_uid())
            os.replace(tmp, path)
        else:
            import time
            for _ in range(600):
                if path.exists():
                    break
                time.sleep(0.05)
        ctx = uid_context(path.read_bytes(), rank, world, device)
    cfg = test_configs(world)[3]          # ht-bf16? index 3 = ll-fp8 plain
    preset = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    buf = epcomm.EPBuffer(cfg, ctx)      # NVSHMEM starts here (deferred bootstrap), its heap sized for this buffer
    from epcomm.backends.gpu.layout import heap_bytes
    heap = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    want = preset or str(heap_bytes(buf._backend.layout.total))
    heap_probs = [] if heap == want else [f"NVSHMEM_SYMMETRIC_SIZE={heap}, expected {want} (need + margin)"]
    w = make_world(cfg, seed=31, routing_kind="uniform")
    dev = torch.device(f"cuda:{device}")
    x = torch.from_numpy(w.xs[rank].view(np.int16)).view(torch.bfloat16).to(dev)
    ids = torch.from_numpy(w.topk_ids[rank]).to(dev)
    res = buf.dispatch(x, ids)
    refs = ref.dispatch(cfg, w.xs, w.topk_ids)
    probs = ref.compare_dispatch(cfg, res, refs[rank])
    eys = [distinct_experts(cfg, r) for r in refs]
    ey = torch.from_numpy(eys[rank].view(np.int16)).view(torch.bfloat16).to(dev)
    y = buf.combine(ey, res.handle, torch.from_numpy(w.topk_weights[rank]).to(dev))
    buf.synchronize()
    yx, mag = ref.combine_exact(cfg, eys, refs, w.topk_weights)
    probs += ref.compare_combine(y, yx[rank], mag[rank]) + heap_probs
    print(f"[rank {rank}] init via {how}: {'PASS' if not probs else probs}", flush=True)
    buf.close()
    Runtime.get().close()
    sys.exit(1 if probs else 0)


if __name__ == "__main__":
    main()
