"""Every kind of refused call, on one rank and then on every rank, each followed by a correct round on the SAME buffer.

    python -m launch run -t cpu-4rank -- python tests/mpi/scripts/refusals.py ht|ll

A refused call (EPInputError) must harm no one (epcomm/buffer.py): a refused dispatch leaves the peers a correct
round of the other ranks' tokens with DispatchResult.rejected_ranks naming the refusing ranks; a peer whose tokens
needed a refusing rank's experts gets EPPeerRejectedError from its combine, the others an exact result; the next
round is correct everywhere. Prints "FAIL ..." lines for what went wrong; exit 1 if anything did (every rank).
"""
from __future__ import annotations

import sys

import numpy as np

import epcomm
from epcomm.checks import Round
from epcomm.errors import EPInputError, EPPeerRejectedError
from epcomm.formats import BF16
from epcomm.workload import World, make_world

mode = sys.argv[1] if len(sys.argv) > 1 else "ht"
ctx = epcomm.init()
me, R = ctx.rank, ctx.world_size
cfg = epcomm.EPConfig(hidden=256, topk=2, num_experts=4 * R, max_tokens_per_rank=8, world_size=R, mode=mode,
                      timeout_s=30.0)
L, M, K, H, E = cfg.n_local_experts, cfg.max_tokens_per_rank, cfg.topk, cfg.hidden, cfg.num_experts
problems: list[str] = []
seen = {"peer refused": 0, "exact beside a refusal": 0}

# ---------------------------------------------------------------- the bad calls (each must raise EPInputError)
DISPATCH = {
    "3-D x": lambda x, ids: (x[None], ids),
    "wrong hidden": lambda x, ids: (np.zeros((len(x), H + 128), BF16), ids),
    "float32 x": lambda x, ids: (x.astype(np.float32), ids),
    "uint16 x": lambda x, ids: (x.view(np.uint16), ids),
    "too many tokens": lambda x, ids: (np.zeros((M + 1, H), BF16), np.zeros((M + 1, K), np.int32)),
    "int16 ids": lambda x, ids: (x, ids.astype(np.int16)),
    "ids shape": lambda x, ids: (x, ids[:, :1]),
    "ids rows": lambda x, ids: (x, ids[:-1]),
    "id too big": lambda x, ids: (x, np.full_like(ids, E)),
    "id -2": lambda x, ids: (x, np.full_like(ids, -2)),
    "list x": lambda x, ids: (x.tolist(), ids),
    "list ids": lambda x, ids: (x, ids.tolist()),
}
COMBINE = {   # (expert_y, handle, weights, the latest handle, an older handle, another buffer's handle) -> arguments
    "weights T": lambda ey, h, w, old, foreign: (ey, h, w[:-1]),
    "weights K": lambda ey, h, w, old, foreign: (ey, h, w[:, :1]),
    "weights float64": lambda ey, h, w, old, foreign: (ey, h, w.astype(np.float64)),
    "weights list": lambda ey, h, w, old, foreign: (ey, h, w.tolist()),
    "expert_y rows": lambda ey, h, w, old, foreign: (ey[:5], h, w),
    "expert_y float32": lambda ey, h, w, old, foreign: (ey.astype(np.float32), h, w),
    "expert_y hidden": lambda ey, h, w, old, foreign: (np.zeros((len(ey), H + 128), BF16), h, w),
    "handle None": lambda ey, h, w, old, foreign: (ey, None, w),
    "stale handle": lambda ey, h, w, old, foreign: (ey, old, w),
    "foreign handle": lambda ey, h, w, old, foreign: (ey, foreign, w),
}
LOCAL = ("combined twice", "dispatch_wait twice", "combine_wait of a dispatch")   # refused without a word to anyone


def fail(step: str, msg: str) -> None:
    problems.append(f"{step}: {msg}")
    print(f"FAIL rank {me} {step}: {msg}", flush=True)


def world_for(seed: int, local_rank0: bool) -> World:
    """Every rank's inputs; local_rank0: rank 0's tokens go to rank 0's own experts only (its combine then needs
    no other rank, so it must stay exact while the others get EPPeerRejectedError)."""
    w = make_world(cfg, seed)
    if local_rank0:
        t = len(w.topk_ids[0])
        w.topk_ids[0] = ((np.arange(t)[:, None] * K + np.arange(K)) % L).astype(np.int32)
    return w


def without(w: World, ranks) -> World:
    """The world as the peers see it when `ranks` sent nothing."""
    cut = lambda a, r: a[:0] if r in ranks else a  # noqa: E731
    return World([cut(a, r) for r, a in enumerate(w.xs)], [cut(a, r) for r, a in enumerate(w.topk_ids)],
                 [cut(a, r) for r, a in enumerate(w.topk_weights)])


def expect_refused(step: str, call) -> None:
    try:
        call()
    except EPInputError as e:
        if "\n" in str(e):
            fail(step, f"EPInputError is not one line: {e!r}")
        return
    except Exception as e:  # noqa: BLE001
        fail(step, f"raised {type(e).__name__}: {e} instead of EPInputError")
        return
    fail(step, "no EPInputError")


def combine_and_check(step: str, buf, rnd: Round, out, refusing, what: str) -> None:
    """This rank's combine of `out`: EPPeerRejectedError naming a refusing rank if a token of ours went to one,
    else exact."""
    x, ids, w = rnd.inputs()
    needs = sorted({int(d) for d in np.unique(ids[ids >= 0] // L)} & set(refusing))
    try:
        y = buf.combine(rnd.expert_y(out, poison_tail=True), out.handle, w)
    except EPPeerRejectedError as e:
        if not needs:
            fail(step, f"EPPeerRejectedError although no token went to {refusing}: {e}")
        elif e.rank not in needs or e.what != what or f"rank {e.rank} " not in str(e) or "\n" in str(e):
            fail(step, f"EPPeerRejectedError names rank {e.rank} ({e.what}), expected one of {needs} ({what}): {e}")
        seen["peer refused"] += 1
        return
    except Exception as e:  # noqa: BLE001
        fail(step, f"combine raised {type(e).__name__}: {e}")
        return
    if needs:
        fail(step, f"combine returned although tokens went to refusing rank(s) {needs} (a partial sum)")
        return
    for p in rnd.check_combine(y):
        fail(step, f"combine: {p}")
    if refusing:
        seen["exact beside a refusal"] += 1


def good_round(step: str, buf, seed: int) -> None:
    rnd = Round(cfg, world_for(seed, False), me, experts="distinct")
    x, ids, w = rnd.inputs()
    try:
        out = buf.dispatch(x, ids)
    except Exception as e:  # noqa: BLE001
        fail(step, f"correct round: dispatch raised {type(e).__name__}: {e}")
        raise SystemExit(1) from e
    for p in rnd.check_dispatch(out):
        fail(step, f"correct round: dispatch: {p}")
    if tuple(out.rejected_ranks) != ():
        fail(step, f"correct round: rejected_ranks {out.rejected_ranks}")
    combine_and_check(step + " (correct round)", buf, rnd, out, [], "-")


def dispatch_kind(step: str, buf, make_bad, refusing, seed: int) -> None:
    world = world_for(seed, local_rank0=0 not in refusing)
    x, ids, _ = Round(cfg, world, me).inputs()
    if me in refusing:
        expect_refused(step, lambda: buf.dispatch(*make_bad(x, ids)))
        return
    rnd = Round(cfg, without(world, refusing), me, experts="distinct")
    out = buf.dispatch(x, ids)
    for p in rnd.check_dispatch(out):
        fail(step, f"dispatch: {p}")
    if tuple(out.rejected_ranks) != tuple(refusing):
        fail(step, f"rejected_ranks {out.rejected_ranks}, expected {tuple(refusing)}")
    combine_and_check(step, buf, rnd, out, refusing, "dispatch")


def combine_kind(step: str, buf, make_bad, refusing, seed: int, foreign) -> None:
    world = world_for(seed, local_rank0=0 not in refusing)
    rnd = Round(cfg, world, me, experts="distinct")
    x, ids, w = rnd.inputs()
    old = None
    if step.endswith("stale handle"):   # a round combined already: its handle is good for nothing now
        first = buf.dispatch(x, ids)
        buf.combine(rnd.expert_y(first), first.handle, w)
        old = first.handle
    out = buf.dispatch(x, ids)
    for p in rnd.check_dispatch(out):
        fail(step, f"dispatch: {p}")
    if me in refusing:
        ey = rnd.expert_y(out)
        expect_refused(step, lambda: buf.combine(*make_bad(ey, out.handle, w, old, foreign)))
        return
    combine_and_check(step, buf, rnd, out, refusing, "combine")


def local_kind(step: str, buf, kind: str, refusing, seed: int) -> None:
    rnd = Round(cfg, world_for(seed, False), me, experts="distinct")
    x, ids, w = rnd.inputs()
    if kind == "combined twice":
        out = buf.dispatch(x, ids)
        combine_and_check(step, buf, rnd, out, [], "-")
        if me in refusing:
            expect_refused(step, lambda: buf.combine(rnd.expert_y(out), out.handle, w))
    elif kind == "dispatch_wait twice":
        p = buf.dispatch_async(x, ids)
        out = buf.dispatch_wait(p)
        if me in refusing:
            expect_refused(step, lambda: buf.dispatch_wait(p))
        combine_and_check(step, buf, rnd, out, [], "-")
    else:
        p = buf.dispatch_async(x, ids)
        if me in refusing:
            expect_refused(step, lambda: buf.combine_wait(p))
        out = buf.dispatch_wait(p)
        combine_and_check(step, buf, rnd, out, [], "-")


with epcomm.EPBuffer(cfg, ctx) as buf, epcomm.EPBuffer(cfg, ctx) as other:
    fx, fids, _ = Round(cfg, world_for(1, False), me).inputs()
    foreign = other.dispatch(fx, fids).handle
    seed, steps = 100, 0
    for refusing in ([1], list(range(R))):
        who = "rank 1" if len(refusing) == 1 else "every rank"
        for name, bad in DISPATCH.items():
            dispatch_kind(f"[{mode}] {who}: dispatch {name}", buf, bad, refusing, seed)
            good_round(f"[{mode}] {who}: after dispatch {name}", buf, seed + 1)
            seed, steps = seed + 2, steps + 1
        for name, bad in COMBINE.items():
            combine_kind(f"[{mode}] {who}: combine {name}", buf, bad, refusing, seed, foreign)
            good_round(f"[{mode}] {who}: after combine {name}", buf, seed + 1)
            seed, steps = seed + 2, steps + 1
        for name in LOCAL:
            local_kind(f"[{mode}] {who}: {name}", buf, name, refusing, seed)
            good_round(f"[{mode}] {who}: after {name}", buf, seed + 1)
            seed, steps = seed + 2, steps + 1
    rounds = buf.round
total = ctx.comm.allreduce(len(problems))
counts = {k: ctx.comm.allreduce(v) for k, v in seen.items()}
if me == 0:
    print(f"refusals [{mode}]: {steps} refused calls then a correct round each, {rounds} rounds on one buffer, "
          f"{R} ranks; peers' combines: {counts['peer refused']} EPPeerRejectedError, "
          f"{counts['exact beside a refusal']} exact beside a refusal: {'ok' if total == 0 else f'{total} FAILED'}",
          flush=True)
sys.exit(1 if total else 0)
