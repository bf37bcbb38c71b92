"""GPU: a refused call harms no one (issue 15 item 1). Called by tests/gpu/worker.py once per mode (a plain bf16
config); the GPU twin of tests/mpi/scripts/refusals.py, through EPBuffer, checked against epcomm.reference.

Every kind of input the front end refuses, on rank 1 and then on every rank, each followed by a correct round on the
SAME buffer: the refusing rank raises EPInputError (one line) and takes part in the round with nothing (its signals
marked); a refused dispatch leaves the peers a correct round of the other ranks' tokens with
DispatchResult.rejected_ranks naming the refusing ranks; a peer whose tokens needed a refusing rank's experts gets
EPPeerRejectedError from the check after its combine (GPU calls return before their kernels run: synchronize() /
check() raise it), the others an exact result; the next round is correct everywhere. Last, a refused combine
whose round the peers then drop (release) instead of combining: the following rounds are still correct. On the GPU
also refusals between CUDA-graph replays on one buffer (refusals_between_graph_replays).
"""
from __future__ import annotations

import traceback

import numpy as np

import epcomm
from epcomm.arrays import to_torch
from epcomm.checks import Round
from epcomm.errors import EPInputError, EPPeerRejectedError
from epcomm.workload import World, make_world


class TorchOps:
    """The array operations the bad inputs are made with: torch tensors on this rank's GPU."""

    def __init__(self, torch, dev):
        self.torch, self.dev = torch, dev

    def put(self, a):
        return to_torch(a, self.dev)

    def zeros(self, shape, dtype):
        t = self.torch
        return t.zeros(shape, dtype={"bf16": t.bfloat16, "i32": t.int32}[dtype], device=self.dev)

    def cast(self, a, dtype):
        t = self.torch
        return a.to({"f32": t.float32, "f64": t.float64, "i16": t.int16}[dtype])

    def bits16(self, a):   # bf16 rows as int16: no bf16 for torch
        return a.view(self.torch.int16)

    def full_like(self, a, v):
        return self.torch.full_like(a, v)

    def other_kind(self):
        """Bad dispatch inputs of the GPU only: another kind or device than the rest (the front end refuses them),
        and what only the backend checks (device, contiguity, alignment; refused before it sends anything)."""
        return {"x on the CPU": lambda x, ids: (x.cpu(), ids), "numpy ids": lambda x, ids: (x, ids.cpu().numpy()),
                "x and ids on the CPU": lambda x, ids: (x.cpu(), ids.cpu()),
                "x not contiguous": lambda x, ids: (x.t().contiguous().t(), ids),
                "x not 16-byte aligned": lambda x, ids: (self._misaligned(x), ids)}

    def other_combine_kind(self):
        return {"expert_y not contiguous": lambda ey, h, w, old, foreign: (ey.t().contiguous().t(), h, w),
                "weights on the CPU": lambda ey, h, w, old, foreign: (ey, h, w.cpu())}

    def _misaligned(self, x):
        """x's values in a view that starts 2 bytes past a 16-byte boundary (the kernels' vector loads need 16)."""
        flat = self.torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
        v = flat[1:1 + x.numel()].view(x.shape)
        v.copy_(x)
        return v


class NumpyOps:
    """The same with numpy arrays (the host backend: a dry run of this check on a CPU machine)."""

    def put(self, a):
        return np.asarray(a)

    def zeros(self, shape, dtype):
        from epcomm.formats import BF16
        return np.zeros(shape, {"bf16": BF16, "i32": np.int32}[dtype])

    def cast(self, a, dtype):
        return a.astype({"f32": np.float32, "f64": np.float64, "i16": np.int16}[dtype])

    def bits16(self, a):
        return a.view(np.uint16)

    def full_like(self, a, v):
        return np.full_like(a, v)

    def other_kind(self):
        return {}

    def other_combine_kind(self):
        return {}


def _dispatch_kinds(ops, cfg):
    H, M, K, E = cfg.hidden, cfg.max_tokens_per_rank, cfg.topk, cfg.num_experts
    return {
        "3-D x": lambda x, ids: (x[None], ids),
        "wrong hidden": lambda x, ids: (ops.zeros((len(x), H + 128), "bf16"), ids),
        "float32 x": lambda x, ids: (ops.cast(x, "f32"), ids),
        "16-bit integer x": lambda x, ids: (ops.bits16(x), ids),
        "too many tokens": lambda x, ids: (ops.zeros((M + 1, H), "bf16"), ops.zeros((M + 1, K), "i32")),
        "int16 ids": lambda x, ids: (x, ops.cast(ids, "i16")),
        "ids shape": lambda x, ids: (x, ids[:, :1]),
        "ids rows": lambda x, ids: (x, ids[:-1]),
        "id too big": lambda x, ids: (x, ops.full_like(ids, E)),
        "id -2": lambda x, ids: (x, ops.full_like(ids, -2)),
        "list x": lambda x, ids: (x.tolist(), ids),
        "list ids": lambda x, ids: (x, ids.tolist()),
        **ops.other_kind(),
    }


def _combine_kinds(ops, cfg):
    H = cfg.hidden
    return {   # (expert_y, handle, weights, an older handle, another buffer's handle) -> arguments
        "weights T": lambda ey, h, w, old, foreign: (ey, h, w[:-1]),
        "weights K": lambda ey, h, w, old, foreign: (ey, h, w[:, :1]),
        "weights float64": lambda ey, h, w, old, foreign: (ey, h, ops.cast(w, "f64")),
        "weights list": lambda ey, h, w, old, foreign: (ey, h, w.tolist()),
        "expert_y rows": lambda ey, h, w, old, foreign: (ey[:5], h, w),
        "expert_y float32": lambda ey, h, w, old, foreign: (ops.cast(ey, "f32"), h, w),
        "expert_y hidden": lambda ey, h, w, old, foreign: (ops.zeros((len(ey), H + 128), "bf16"), h, w),
        "handle None": lambda ey, h, w, old, foreign: (ey, None, w),
        "stale handle": lambda ey, h, w, old, foreign: (ey, old, w),
        "foreign handle": lambda ey, h, w, old, foreign: (ey, foreign, w),
        **ops.other_combine_kind(),
    }


LOCAL = ("combined twice", "dispatch_wait twice", "combine_wait of a dispatch")   # refused without a word to anyone


class _Run:
    def __init__(self, ck, cfg, ops):
        self.ck, self.cfg, self.ops, self.me = ck, cfg, ops, ck.me
        self.R, self.L, self.K = cfg.world_size, cfg.n_local_experts, cfg.topk
        self.problems: list[str] = []
        self.seen = {"peer refused": 0, "exact beside a refusal": 0}

    def fail(self, step, msg):
        self.problems.append(f"{step}: {msg}")
        print(f"[rank {self.me}] FAIL {step}: {msg}", flush=True)

    def put(self, a):
        return self.ops.put(a)

    def world_for(self, seed, local_rank0):
        """Every rank's inputs; local_rank0: rank 0's tokens go to one of its own experts each (the other slots -1),
        so its combine needs no other rank and must stay exact while the others get EPPeerRejectedError."""
        w = make_world(self.cfg, seed)
        if local_rank0:
            t = len(w.topk_ids[0])
            ids = np.full((t, self.K), -1, np.int32)
            ids[:, 0] = np.arange(t) % self.L
            w.topk_ids[0] = ids
        return w

    @staticmethod
    def without(w, ranks):
        """The world as the peers see it when `ranks` sent nothing."""
        cut = lambda a, r: a[:0] if r in ranks else a  # noqa: E731
        return World([cut(a, r) for r, a in enumerate(w.xs)], [cut(a, r) for r, a in enumerate(w.topk_ids)],
                     [cut(a, r) for r, a in enumerate(w.topk_weights)])

    def inputs(self, rnd):
        return tuple(self.put(a) for a in rnd.inputs())

    def expect_refused(self, step, call):
        try:
            call()
        except EPInputError as e:
            if "\n" in str(e):
                self.fail(step, f"EPInputError is not one line: {e!r}")
            return
        except Exception as e:  # noqa: BLE001
            self.fail(step, f"raised {type(e).__name__}: {e} instead of EPInputError")
            return
        self.fail(step, "no EPInputError")

    def combine_and_check(self, step, buf, rnd, out, refusing, what):
        """This rank's combine of `out`, then synchronize(): EPPeerRejectedError naming a refusing rank if a token
        of ours went to one, else exact."""
        _, ids, w = rnd.inputs()
        needs = sorted({int(d) for d in np.unique(ids[ids >= 0] // self.L)} & set(refusing))
        try:
            y = buf.combine(self.put(rnd.expert_y(out, poison_tail=True)), out.handle, self.put(w))
            buf.synchronize()
        except EPPeerRejectedError as e:
            if not needs:
                self.fail(step, f"EPPeerRejectedError although no token went to {refusing}: {e}")
            elif e.rank != needs[0] or e.what != what or f"rank {e.rank} " not in str(e) or "\n" in str(e):
                self.fail(step, f"EPPeerRejectedError names rank {e.rank} ({e.what}), expected {needs[0]} ({what}): "
                                f"{e}")
            self.seen["peer refused"] += 1
            return
        except Exception as e:  # noqa: BLE001
            self.fail(step, f"combine raised {type(e).__name__}: {e}")
            return
        if needs:
            self.fail(step, f"combine returned although tokens went to refusing rank(s) {needs} (a partial sum)")
            return
        for p in rnd.check_combine(y):
            self.fail(step, f"combine: {p}")
        if refusing:
            self.seen["exact beside a refusal"] += 1

    def good_round(self, step, buf, seed):
        rnd = Round(self.cfg, self.world_for(seed, False), self.me, experts="distinct")
        x, ids, _ = self.inputs(rnd)
        out = buf.dispatch(x, ids)
        buf.synchronize()
        for p in rnd.check_dispatch(out):
            self.fail(step, f"correct round: dispatch: {p}")
        if tuple(out.rejected_ranks) != ():
            self.fail(step, f"correct round: rejected_ranks {tuple(out.rejected_ranks)}")
        self.combine_and_check(step + " (correct round)", buf, rnd, out, [], "-")

    @staticmethod
    def local_rank0(refusing, seed) -> bool:
        """Every other step: rank 0's tokens stay on its own experts (an exact combine beside a refusal); the other
        steps spread them (an EPPeerRejectedError on rank 0 too: at 2 ranks it is the only peer)."""
        return 0 not in refusing and (seed // 2) % 2 == 0

    def dispatch_kind(self, step, buf, make_bad, refusing, seed):
        world = self.world_for(seed, local_rank0=self.local_rank0(refusing, seed))
        x, ids, _ = self.inputs(Round(self.cfg, world, self.me))
        if self.me in refusing:
            self.expect_refused(step, lambda: buf.dispatch(*make_bad(x, ids)))
            return
        rnd = Round(self.cfg, self.without(world, refusing), self.me, experts="distinct")
        out = buf.dispatch(x, ids)
        buf.synchronize()
        for p in rnd.check_dispatch(out):
            self.fail(step, f"dispatch: {p}")
        if tuple(out.rejected_ranks) != tuple(refusing):
            self.fail(step, f"rejected_ranks {tuple(out.rejected_ranks)}, expected {tuple(refusing)}")
        self.combine_and_check(step, buf, rnd, out, refusing, "dispatch")

    def combine_kind(self, step, buf, make_bad, refusing, seed, foreign):
        world = self.world_for(seed, local_rank0=self.local_rank0(refusing, seed))
        rnd = Round(self.cfg, world, self.me, experts="distinct")
        x, ids, w = self.inputs(rnd)
        old = None
        if step.endswith("stale handle"):   # a round combined already: its handle is good for nothing now
            first = buf.dispatch(x, ids)
            buf.combine(self.put(rnd.expert_y(first)), first.handle, w)
            old = first.handle
        out = buf.dispatch(x, ids)
        buf.synchronize()
        for p in rnd.check_dispatch(out):
            self.fail(step, f"dispatch: {p}")
        if self.me in refusing:
            ey = self.put(rnd.expert_y(out))
            self.expect_refused(step, lambda: buf.combine(*make_bad(ey, out.handle, w, old, foreign)))
            return
        self.combine_and_check(step, buf, rnd, out, refusing, "combine")

    def local_kind(self, step, buf, kind, refusing, seed):
        rnd = Round(self.cfg, self.world_for(seed, False), self.me, experts="distinct")
        x, ids, w = self.inputs(rnd)
        if kind == "combined twice":
            out = buf.dispatch(x, ids)
            self.combine_and_check(step, buf, rnd, out, [], "-")
            if self.me in refusing:
                self.expect_refused(step, lambda: buf.combine(self.put(rnd.expert_y(out)), out.handle, w))
        elif kind == "dispatch_wait twice":
            p = buf.dispatch_async(x, ids)
            out = buf.dispatch_wait(p)
            if self.me in refusing:
                self.expect_refused(step, lambda: buf.dispatch_wait(p))
            self.combine_and_check(step, buf, rnd, out, [], "-")
        else:
            p = buf.dispatch_async(x, ids)
            if self.me in refusing:
                self.expect_refused(step, lambda: buf.combine_wait(p))
            out = buf.dispatch_wait(p)
            self.combine_and_check(step, buf, rnd, out, [], "-")

    def dropped_round(self, step, buf, seed):
        """Rank 1 refuses its combine; the peers drop that round (release) instead of combining it: no peer waits
        for anything, and the next rounds are correct (combine rounds are the dispatch's on the GPU, so a round some
        ranks never combine shifts nothing)."""
        rnd = Round(self.cfg, self.world_for(seed, False), self.me, experts="distinct")
        x, ids, w = self.inputs(rnd)
        out = buf.dispatch(x, ids)
        if self.me == 1:
            self.expect_refused(step, lambda: buf.combine(self.put(rnd.expert_y(out)), out.handle,
                                                          self.ops.cast(w, "f64")))
        else:
            buf.release(out.handle)
        for i in range(3):
            self.good_round(f"{step}, then round {i}", buf, seed + 1 + i)


def first_of_its_mode(cfg, done: set) -> bool:
    """The config the worker runs this check with: the first plain bf16 one of each mode (adds its mode to done)."""
    if cfg.mode in done or cfg.token_format != "bf16" or cfg.layout != "grouped" or cfg.fused_shared_expert \
            or cfg.skip_a2a:
        return False
    done.add(cfg.mode)
    return True


def run(ck, cfg, ops=None) -> None:
    """Every refused kind on rank 1, then on every rank, each followed by a correct round; one buffer. ops: how the
    bad inputs are made (default: torch tensors on this rank's GPU)."""
    tag = f"{cfg.mode}-{cfg.token_format} refusals"
    run_ = _Run(ck, cfg, ops or TorchOps(ck.torch, ck.dev))
    try:
        every_refused_call_harms_no_one(run_, cfg)
    except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        run_.problems.append(f"{type(e).__name__}: {e}")
    if isinstance(run_.ops, TorchOps):   # CUDA graphs: the GPU only
        try:
            refusals_between_graph_replays(run_, cfg)
        except Exception as e:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            run_.problems.append(f"between graph replays: {type(e).__name__}: {e}")
    seen = {k: ck.ctx.comm.allreduce(v) for k, v in run_.seen.items()}
    if not run_.problems and (seen["peer refused"] == 0 or seen["exact beside a refusal"] == 0):
        run_.problems.append(f"a peer's combine answer was never exercised: {seen}")   # the check could not fail
    print(f"[rank {ck.me}] {tag}: peers' combines {seen['peer refused']} EPPeerRejectedError, "
          f"{seen['exact beside a refusal']} exact beside a refusal", flush=True)
    ck.ok(f"{tag}: every refused call on one rank and on every rank, then correct rounds on the same buffer",
          run_.problems)


def every_refused_call_harms_no_one(run_, cfg) -> None:
    # check_ids=True: device ids are range-checked too (it syncs: a test setting)
    with epcomm.EPBuffer(cfg, run_.ck.ctx, check_ids=True) as buf, epcomm.EPBuffer(cfg, run_.ck.ctx) as other:
        fx, fids, _ = run_.inputs(Round(cfg, run_.world_for(1, False), run_.me))
        foreign = other.dispatch(fx, fids).handle
        seed = 100
        for refusing in ([1], list(range(run_.R))):
            who = "rank 1" if len(refusing) == 1 else "every rank"
            for name, bad in _dispatch_kinds(run_.ops, cfg).items():
                run_.dispatch_kind(f"{who}: dispatch {name}", buf, bad, refusing, seed)
                run_.good_round(f"{who}: after dispatch {name}", buf, seed + 1)
                seed += 2
            for name, bad in _combine_kinds(run_.ops, cfg).items():
                run_.combine_kind(f"{who}: combine {name}", buf, bad, refusing, seed, foreign)
                run_.good_round(f"{who}: after combine {name}", buf, seed + 1)
                seed += 2
            for name in LOCAL:
                run_.local_kind(f"{who}: {name}", buf, name, refusing, seed)
                run_.good_round(f"{who}: after {name}", buf, seed + 1)
                seed += 2
        run_.dropped_round("rank 1 refuses a combine the peers drop", buf, seed)
        other.synchronize()


def refusals_between_graph_replays(run_, cfg) -> None:
    """Refusals among eager calls and CUDA-graph replays on one buffer (issue 13 item 6 with issue 15 item 1): a
    decode graph (dispatch + combine) is replayed between eager rounds in which rank 1 refuses a dispatch or a
    combine. The refusing rank's empty launches are eager calls to the device's admission check (kernels/results.cuh)
    like the peers' real ones, so every rank admits the same launches: every replay and every later round is exact,
    and no EPOverwriteError comes up anywhere (a rank out of step would hang until its deadline or be refused)."""
    import graph_checks                 # beside this file (tests/gpu), as the worker imports this one
    from server_checks import World
    ck = run_.ck
    with epcomm.EPBuffer(cfg, ck.ctx) as buf:
        g, st, gres, gy, T = graph_checks._decode_graph(ck, cfg, buf, 500)
        seed = 510
        steps = (("dispatch", "int16 ids"), ("combine", "weights float64"), ("dispatch", "x not contiguous"),
                 ("combine", "expert_y rows"))
        for i, (kind, name) in enumerate(steps):
            problems: list[str] = []
            graph_checks._replay_checked(buf, g, st, gres, gy, World(ck, cfg, seed, "uniform", T), problems,
                                         f"replay {i}")
            step = f"between graph replays: rank 1 refuses {kind} {name}"
            for p in problems:
                run_.fail(step, p)
            if kind == "dispatch":
                run_.dispatch_kind(step, buf, _dispatch_kinds(run_.ops, cfg)[name], [1], seed + 1)
            else:
                run_.combine_kind(step, buf, _combine_kinds(run_.ops, cfg)[name], [1], seed + 1, None)
            run_.good_round(f"{step}, then an eager round", buf, seed + 2)
            seed += 3
        problems = []
        graph_checks._replay_checked(buf, g, st, gres, gy, World(ck, cfg, seed, "uniform", T), problems,
                                     "the last replay")
        for p in problems:
            run_.fail("between graph replays", p)
        buf.synchronize()


if __name__ == "__main__":   # a dry run of this check on the host backend: python -m launch run -t cpu-2rank -- ...
    import sys
    from types import SimpleNamespace

    ctx = epcomm.init(backend="host")
    fails = []
    ck = SimpleNamespace(me=ctx.rank, ctx=ctx, ok=lambda name, p: (fails.extend(p), print(
        f"[rank {ctx.rank}] {'FAIL' if p else 'PASS'} {name}", flush=True)))
    from epcomm.backends.gpu.specs import test_configs
    done: set = set()
    for cfg in test_configs(ctx.world_size):     # the worker's configs
        if first_of_its_mode(cfg, done):
            run(ck, cfg.replace(timeout_s=30.0), NumpyOps())
    sys.exit(1 if ctx.comm.allreduce(len(fails)) else 0)
