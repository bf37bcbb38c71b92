"""A rank lost in the middle of a dispatch is fenced off; the survivors go on with the same buffer.

    python -m launch run -t cpu-4rank --keep-going -x EPCOMM_FAULT=die:rank=3,round=2 -- \
        python tests/mpi/scripts/fence_one_rank.py ht kill
    python -m launch run -t cpu-4rank -- python tests/mpi/scripts/fence_one_rank.py ll stall
    python -m launch run -t cpu-4rank -- python tests/mpi/scripts/fence_one_rank.py ht fence 100 fp8

kill: the last rank sends its dispatch of round LOST to half of its peers, then SIGKILLs itself (fault "die"; with
EPCOMM_FAULT=die_in_combine:rank=3,round=2 the same happens in its combine of that round instead: a survivor whose
rows came back before the death has an exact round LOST and learns of the loss in round LOST + 1).
stall: the last rank stays alive but never calls dispatch again (what a hung GPU looks like); it checks later that
its own next call is refused (EPFencedError), since the others declared it dead.
fence: rank 0 calls buf.fence([last]) before round LOST while the last rank goes on calling: its round LOST raises
EPFencedError; a survivor's round LOST is exact without it, or (where its tokens were already sent to it, the notice
not yet read) its combine raises EPRankLostError.
A 4th argument "fp8": fp8 tokens and a fused shared expert.
Every survivor: rounds before LOST exact; round LOST's combine raises EPRankLostError naming the lost rank, its
node and experts (its dispatch is exact for the world with or without the lost rank's tokens: it may have arrived
before the death); then AFTER rounds exact against epcomm.reference with masked_ranks=(lost,), DispatchResult.dropped
and active_ranks as the spec says. Even rounds (the lost one too) go through dispatch_async / combine_async.
Prints "FAIL ..." lines; exit 1 on a failure.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

import epcomm
from epcomm import reference
from epcomm.errors import EPFencedError, EPRankLostError
from epcomm.workload import distinct_experts, make_world

mode, how = sys.argv[1], sys.argv[2]
LOST, AFTER = 2, int(sys.argv[3]) if len(sys.argv) > 3 else 100
ctx = epcomm.init()
me, R = ctx.rank, ctx.world_size
victim = R - 1
fp8 = len(sys.argv) > 4 and sys.argv[4] == "fp8"
cfg = epcomm.EPConfig(hidden=128, topk=2, num_experts=2 * R, max_tokens_per_rank=6, world_size=R, mode=mode,
                      token_format="fp8" if fp8 else "bf16", fused_shared_expert=fp8,
                      # kill / stall: the deadline is the death detector: short, to keep the test short. fence:
                      # nobody dies (the notice is the detector), and a short deadline under a loaded CI machine
                      # declared a live but slow rank dead in round 1 (seen twice on 2 busy cores)
                      timeout_s=60.0 if how == "fence" else 5.0)
problems: list[str] = []


def fail(msg: str) -> None:
    problems.append(msg)
    print(f"FAIL rank {me}: {msg}", flush=True)


def world(r: int):
    w = make_world(cfg, 1000 + r, routing_kind=("uniform", "minus1", "skewed")[r % 3], num_tokens="ragged"
                   if r % 4 == 3 else None)
    if r == LOST:   # every rank's first token goes to the lost rank's first expert: every survivor needs it
        for ids in w.topk_ids:
            if len(ids):
                ids[0, 0] = victim * cfg.n_local_experts
    return w


# Where a survivor may learn of the loss one round late (the lost rank's combine rows reached it before the death,
# or an explicit fence): rounds LOST and LOST + 1 are the transition; anywhere else only one answer is right.
LATE = how == "fence" or "die_in_combine" in os.environ.get("EPCOMM_FAULT", "")
lost_in: list[int] = []     # the round whose combine raised EPRankLostError on this rank (at most one)


def combine_of(w, results):
    eys = [None if d is None else distinct_experts(cfg, d) for d in results]
    return reference.combine_exact(cfg, eys, results, w.topk_weights)


def check_round(buf, r: int) -> None:
    """Round r on this survivor: before LOST exact with every rank; in the transition (LOST, and LOST + 1 where LATE)
    the spec with or without the lost rank, or EPRankLostError once; after it, the spec with masked_ranks=(victim,)."""
    w = world(r)
    full = reference.dispatch(cfg, w.xs, w.topk_ids)
    masked = reference.dispatch(cfg, w.xs, w.topk_ids, masked_ranks=(victim,))
    transition = r == LOST or (LATE and r == LOST + 1)
    allowed = [full] if r < LOST else [full, masked] if transition else [masked]
    allowed = [a for a in allowed if a[me] is not None]   # the lost rank itself has no masked answer
    run_async = r % 2 == 0   # even rounds (the lost one too) through *_async / *_wait
    res = buf.dispatch_wait(buf.dispatch_async(w.xs[me], w.topk_ids[me])) if run_async else \
        buf.dispatch(w.xs[me], w.topk_ids[me])
    problems_ = [reference.compare_dispatch(cfg, res, a[me]) for a in allowed]
    if all(problems_):
        n = int(res.row_offsets[-1])
        fail(f"round {r} dispatch: {problems_[-1][0]} (sources {sorted(set(res.src_info[:n, 0].tolist()))})")
    dropped_ok = [np.array_equal(res.dropped, reference.masked_slots(cfg, w.topk_ids[me], m))
                  for m in ([()] if r < LOST else [(), (victim,)] if transition else [(victim,)])]
    if res.dropped is None or not any(dropped_ok):
        fail(f"round {r}: dropped {res.dropped}")
    if r > LOST + 1 and tuple(res.masked_ranks) != (victim,):
        fail(f"round {r}: masked_ranks {res.masked_ranks} != {(victim,)}")
    ey = distinct_experts(cfg, res)
    try:
        y = buf.combine_wait(buf.combine_async(ey, res.handle, w.topk_weights[me])) if run_async else \
            buf.combine(ey, res.handle, w.topk_weights[me])
    except EPRankLostError as e:
        if not transition or lost_in:
            fail(f"round {r}: unexpected {e}")
        elif (e.rank, e.node, e.experts, e.round) != (victim, ctx.node_of(victim), cfg.experts_of(victim), r):
            fail(f"round {r}: EPRankLostError names {(e.rank, e.node, e.experts, e.round)}: {e}")
        else:
            print(f"rank {me}: round {r}: {e}", flush=True)
        lost_in.append(r)
        return
    if r == LOST and not LATE:
        fail(f"round {r}: combine returned, wanted EPRankLostError naming rank {victim}")
        return
    errs = []
    for a in allowed:
        ys, mags = combine_of(w, a)
        errs.append(reference.compare_combine(y, ys[me], mags[me]))
    if all(errs):
        fail(f"round {r} combine: {errs[-1][0]}")


buf = epcomm.EPBuffer(cfg, ctx, fence_dead_ranks=True)
if tuple(buf.active_ranks) != tuple(range(R)):
    fail(f"active_ranks {buf.active_ranks} at the start")
t0 = time.monotonic()
if me == victim and how == "stall":
    for r in range(LOST):
        check_round(buf, r)
    time.sleep(3 * cfg.timeout_s)   # never calls dispatch in time: the survivors declare it dead and go on
    try:
        buf.dispatch(*[a[me] for a in (world(LOST).xs, world(LOST).topk_ids)])
        fail("a dispatch of the fenced-off rank went through")
    except EPFencedError as e:
        print(f"rank {me}: fenced off, as it should: {e}", flush=True)
    buf.close()
elif me == victim and how == "fence":
    for r in range(LOST + 1):
        try:
            check_round(buf, r)
            if r == LOST:
                fail(f"round {r} went through on the fenced-off rank")
        except EPFencedError as e:
            if r != LOST or e.by != 0:
                fail(f"round {r}: {e}")
            else:
                print(f"rank {me}: fenced off, as it should: {e}", flush=True)
    buf.close()
else:
    for r in range(LOST + 1 + AFTER):
        if how == "fence" and r == LOST and me == 0:
            buf.fence([victim])
        check_round(buf, r)
        if r == LOST + 1 and tuple(buf.active_ranks) != tuple(q for q in range(R) if q != victim):
            fail(f"active_ranks {buf.active_ranks} after round {r}")
    buf.close()
    if not lost_in and not LATE:
        fail(f"no EPRankLostError naming rank {victim}")
    if not problems:
        print(f"rank {me}: rank {victim} lost in round {LOST} ({how}, {mode}), then {AFTER} rounds without it: ok "
              f"({time.monotonic() - t0:.1f} s)", flush=True)
sys.exit(1 if problems else 0)
