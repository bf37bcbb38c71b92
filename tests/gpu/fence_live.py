"""GPU: an explicit fence of a LIVE rank (issue 15 item 4; EPBuffer.fence, e.g. after a health check): the survivors
go on with the same buffer, every round the spec with masked_ranks. For ranks sharing one GPU:

    python3 -m launch run -t configs/one-gpu-4.yaml --timeout 200 -- python3 tests/gpu/fence_live.py [ROUNDS]
    (dev/device/one_gpu_rig.sh fencelive runs it)

For each of ll / ht x bf16 / fp8, on a fresh EPBuffer(fence_dead_ranks=True): PRE rounds with every rank (nothing
dropped, nothing masked), then rank 0 fences the last rank (alive, idle: it makes no more calls on that buffer), a
barrier (fence() returns once its notices are written, so every survivor's next dispatch reads them), then ROUNDS
(default 20) rounds on the survivors, each checked against epcomm.reference with masked_ranks=(last,):
DispatchResult (ragged and skewed routing, hot experts, -1 slots), DispatchResult.dropped (= reference
masked_slots), DispatchResult.masked_ranks, active_ranks, and combine (the live experts only). Every rank closes
locally (a fenced buffer frees nothing collectively). Half of the checked rounds use dispatch_async / combine_async.

The same script runs on the host backend (numpy arrays; `-t cpu-4rank`), which proves the script itself on a CPU
machine (tests/mpi/test_fencing.py). Prints "FAIL ..." lines; exit 1 on a failure.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import epcomm
from epcomm import reference
from epcomm.arrays import to_numpy
from epcomm.backends.gpu.specs import fence_live_configs
from epcomm.workload import distinct_experts, make_world

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
PRE = 2
ctx = epcomm.init()
me, R = ctx.rank, ctx.world_size
victim = R - 1
problems: list[str] = []

if ctx.backend == "gpu":
    import torch

    from epcomm.arrays import to_torch
    torch.cuda.set_device(ctx.device)
    dev = torch.device(f"cuda:{ctx.device}")

    def put(a):
        return to_torch(a, dev)
else:
    def put(a):
        return a


def fail(msg: str) -> None:
    problems.append(msg)
    print(f"FAIL rank {me}: {msg}", flush=True)


def world(cfg, r: int):
    w = make_world(cfg, 3000 + r, routing_kind=("uniform", "minus1", "skewed", "hot")[r % 4],
                   num_tokens="ragged" if r % 3 == 2 else None)
    for ids in w.topk_ids:   # every rank's first token goes to the fenced rank's first expert: something is dropped
        if len(ids):
            ids[0, 0] = victim * cfg.n_local_experts
    return w


def check_round(buf, cfg, tag: str, r: int, masked: tuple) -> None:
    w = world(cfg, r)
    want = reference.dispatch(cfg, w.xs, w.topk_ids, masked_ranks=masked)
    use_async = r % 2 == 1
    x, ids = put(w.xs[me]), put(w.topk_ids[me])
    res = buf.dispatch_wait(buf.dispatch_async(x, ids)) if use_async else buf.dispatch(x, ids)
    buf.synchronize()
    err = reference.compare_dispatch(cfg, res, want[me])
    if err:
        fail(f"{tag} round {r} dispatch: {err[0]}")
    drop = None if res.dropped is None else to_numpy(res.dropped)
    if drop is None or not np.array_equal(drop, reference.masked_slots(cfg, w.topk_ids[me], masked)):
        fail(f"{tag} round {r}: dropped {drop}")
    if tuple(res.masked_ranks) != masked:
        fail(f"{tag} round {r}: masked_ranks {tuple(res.masked_ranks)} != {masked}")
    eys = [None if d is None else distinct_experts(cfg, d) for d in want]
    ey = put(eys[me])
    y = buf.combine_wait(buf.combine_async(ey, res.handle, put(w.topk_weights[me]))) if use_async \
        else buf.combine(ey, res.handle, put(w.topk_weights[me]))
    buf.synchronize()
    ys, mags = reference.combine_exact(cfg, eys, want, w.topk_weights)
    err = reference.compare_combine(y, ys[me], mags[me])
    if err:
        fail(f"{tag} round {r} combine: {err[0]}")


t0 = time.monotonic()
for cfg in fence_live_configs(R):
    tag = f"{cfg.mode}-{cfg.token_format}"
    buf = epcomm.EPBuffer(cfg, ctx, fence_dead_ranks=True)
    for r in range(PRE):
        check_round(buf, cfg, tag, r, ())
    if tuple(buf.active_ranks) != tuple(range(R)):
        fail(f"{tag}: active_ranks {buf.active_ranks} before the fence")
    ctx.comm.Barrier()
    if me == 0:
        buf.fence([victim])
        if victim in buf.active_ranks:
            fail(f"{tag}: active_ranks {buf.active_ranks} right after fence([{victim}])")
    ctx.comm.Barrier()   # the notices are in every region: every survivor's next dispatch masks the rank
    if me != victim:
        live = tuple(q for q in range(R) if q != victim)
        for r in range(PRE, PRE + ROUNDS):
            check_round(buf, cfg, tag, r, (victim,))
            if tuple(buf.active_ranks) != live:   # (the host backend reads a peer's notice at its next dispatch)
                fail(f"{tag}: active_ranks {buf.active_ranks} after round {r}, wanted {live}")
    buf.close()           # local on every rank: a fenced buffer never frees collectively
    ctx.comm.Barrier()
    if me != victim and not problems:
        print(f"rank {me}: {tag}: rank {victim} fenced while alive, then {ROUNDS} rounds without it: ok", flush=True)
if not problems:
    print(f"rank {me}: fence_live ok ({ctx.backend}, {time.monotonic() - t0:.1f} s)", flush=True)
if ctx.backend == "gpu":   # every rank is alive here: the fenced buffers' symmetric memory is freed with NVSHMEM
    from epcomm.backends.gpu.runtime import Runtime
    rt = Runtime.get()
    if rt:
        rt.close()
sys.exit(1 if problems else 0)
