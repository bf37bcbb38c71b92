"""GPU: a rank SIGKILLed in the middle of a dispatch is fenced off; the survivors go on with the same buffer
(issue 15 item 4). The GPU twin of tests/mpi/scripts/fence_one_rank.py ("kill"), for ranks sharing one GPU:

    python3 -m launch run --keep-going -t configs/one-gpu-4.yaml --timeout 240 -- \
        python3 tests/gpu/fence_one_rank.py ll 100
    (dev/device/one_gpu_rig.sh fence4 runs it for ll and ht)

The last rank launches its dispatch of round LOST (dispatch_async: the send kernel is queued, maybe running) and
SIGKILLs itself before its receive. Every survivor: rounds before LOST exact; round LOST's dispatch is the spec with
or without the lost rank's tokens (they may have landed before the death), and its combine, followed by
synchronize() (GPU errors of a round are raised by the check after it), raises EPRankLostError naming the lost rank,
its node and experts, once; then AFTER rounds exact against epcomm.reference with masked_ranks=(lost,),
DispatchResult.dropped and active_ranks as the spec says. Closing is local (no NVSHMEM collective after a death).

The same script runs on the host backend (numpy arrays; `-t cpu-4rank`), which proves the script itself on a CPU
machine. A backend that refuses fence_dead_ranks=True makes every rank print "NOT BUILT: ..." and exit 2.
Prints "FAIL ..." lines; exit 1 on a failure, 137 for the job (the killed rank's code, launch --keep-going).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import epcomm
from epcomm import reference
from epcomm.arrays import to_numpy
from epcomm.backends.gpu.specs import fence_kill_config
from epcomm.errors import EPInputError, EPRankLostError
from epcomm.workload import distinct_experts, make_world
from tests.gpu.rank_io import Problems, device_put

mode = sys.argv[1] if len(sys.argv) > 1 else "ll"
AFTER = int(sys.argv[2]) if len(sys.argv) > 2 else 100
LOST = 2
ctx = epcomm.init()
me, R = ctx.rank, ctx.world_size
victim = R - 1
cfg = fence_kill_config(R, mode)   # the deadline (timeout_s 5) is the death detector: short, to keep the test short
put, dev = device_put(ctx)
problems = Problems(me)
fail = problems.fail


def world(r: int):
    w = make_world(cfg, 2000 + r, routing_kind=("uniform", "minus1", "skewed")[r % 3],
                   num_tokens="ragged" if r % 4 == 3 else None)
    if r == LOST:   # every rank's first token goes to the lost rank's first expert: every survivor needs it
        for ids in w.topk_ids:
            if len(ids):
                ids[0, 0] = victim * cfg.n_local_experts
    return w


lost_in: list[int] = []   # the round whose combine raised EPRankLostError on this rank (at most one)


def check_round(buf, r: int) -> None:
    w = world(r)
    full = reference.dispatch(cfg, w.xs, w.topk_ids)
    masked = reference.dispatch(cfg, w.xs, w.topk_ids, masked_ranks=(victim,))
    allowed = [full] if r < LOST else [full, masked] if r == LOST else [masked]
    res = buf.dispatch(put(w.xs[me]), put(w.topk_ids[me]))
    errs = [reference.compare_dispatch(cfg, res, a[me]) for a in allowed]
    if all(errs):
        fail(f"round {r} dispatch: {errs[-1][0]}")
    drop = None if res.dropped is None else to_numpy(res.dropped)
    wanted = [()] if r < LOST else [(), (victim,)] if r == LOST else [(victim,)]
    if drop is None or not any(np.array_equal(drop, reference.masked_slots(cfg, w.topk_ids[me], m)) for m in wanted):
        fail(f"round {r}: dropped {drop}")
    if r > LOST and tuple(res.masked_ranks) != (victim,):
        fail(f"round {r}: masked_ranks {res.masked_ranks} != {(victim,)}")
    try:
        y = buf.combine(put(distinct_experts(cfg, res)), res.handle, put(w.topk_weights[me]))
        buf.synchronize()   # the GPU raises a round's EPRankLostError from the check after its combine
    except EPRankLostError as e:
        if r != LOST or lost_in:
            fail(f"round {r}: unexpected {e}")
        elif (e.rank, e.node, e.experts, e.round) != (victim, ctx.node_of(victim), cfg.experts_of(victim), r):
            fail(f"round {r}: EPRankLostError names {(e.rank, e.node, e.experts, e.round)}: {e}")
        else:
            print(f"rank {me}: round {r}: {e}", flush=True)
        lost_in.append(r)
        return
    if r == LOST:
        fail(f"round {r}: combine returned, wanted EPRankLostError naming rank {victim}")
        return
    errs = []
    for a in allowed:
        eys = [None if d is None else distinct_experts(cfg, d) for d in a]
        ys, mags = reference.combine_exact(cfg, eys, a, w.topk_weights)
        errs.append(reference.compare_combine(y, ys[me], mags[me]))
    if all(errs):
        fail(f"round {r} combine: {errs[-1][0]}")


try:
    buf = epcomm.EPBuffer(cfg, ctx, fence_dead_ranks=True)
except EPInputError as e:
    if "cannot yet" not in str(e):
        raise
    print(f"rank {me}: NOT BUILT: {e}", flush=True)
    sys.exit(2)
if tuple(buf.active_ranks) != tuple(range(R)):
    fail(f"active_ranks {buf.active_ranks} at the start")
t0 = time.monotonic()
if me == victim:
    for r in range(LOST):
        check_round(buf, r)
    w = world(LOST)
    buf.dispatch_async(put(w.xs[me]), put(w.topk_ids[me]))   # the send kernel is queued (maybe running) ...
    os.kill(os.getpid(), signal.SIGKILL)                      # ... when the process dies
for r in range(LOST + 1 + AFTER):
    check_round(buf, r)
    if r == LOST + 1 and tuple(buf.active_ranks) != tuple(q for q in range(R) if q != victim):
        fail(f"active_ranks {buf.active_ranks} after round {r}")
buf.close()   # local: a collective would include the dead rank
if not lost_in:
    fail(f"no EPRankLostError naming rank {victim}")
if not problems:
    print(f"rank {me}: rank {victim} killed in round {LOST} ({mode}, {ctx.backend}), then {AFTER} rounds without "
          f"it: ok ({time.monotonic() - t0:.1f} s)", flush=True)
sys.exit(1 if problems else 0)
