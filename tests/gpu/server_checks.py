"""GPU checks of the server-facing calls (issue 13), through EPBuffer (so the front end's checks run too), against
epcomm.reference. Called by tests/gpu/worker.py once per plain config (no fused / skip_a2a):

* int64 topk_ids (narrowed on the device) give the int32 answer;
* combine(..., out=y) writes the caller's poisoned tensor and returns it;
* dispatch(..., stats_out=) accumulates tokens_per_expert over rounds (int64 and int32 counters);
* two micro-batches: dispatch A, dispatch B, (both outputs checked), combine A, combine B; a third live dispatch is
  refused before anything is sent;
* fp8: caller-quantised (x_fp8, x_scales) is delivered unchanged (scales epcomm would not compute itself);
* then, on a fresh buffer, eager calls and CUDA-graph replays mixed (tests/gpu/graph_checks.py).
"""
from __future__ import annotations

import numpy as np

import epcomm
from epcomm import reference as ref
from epcomm.errors import EPInputError
from epcomm.workload import distinct_experts, make_world


def _tb16(torch, a, dev):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(dev)


class World:
    """One world's inputs on this rank's GPU and the spec's answers."""

    def __init__(self, ck, cfg, seed, routing, tokens=None, ids64=False, huge_ids=False):
        torch, me, dev = ck.torch, ck.me, ck.dev
        self.w = make_world(cfg, seed=seed, routing_kind=routing, num_tokens=tokens)
        if huge_ids:   # int64 ids past the int32 range: out of range (no expert), must not wrap into a valid one
            self.w.topk_ids = [i.astype(np.int64) for i in self.w.topk_ids]
            for i in self.w.topk_ids:
                i[::3, 0] = 2 ** 32 + 1
                i[1::3, -1] = -(2 ** 40)
        self.x = _tb16(torch, self.w.xs[me], dev)
        ids = torch.from_numpy(self.w.topk_ids[me]).to(dev)
        self.ids = ids.to(torch.int64) if ids64 else ids
        self.weights = torch.from_numpy(self.w.topk_weights[me]).to(dev)
        self.refs = ref.dispatch(cfg, self.w.xs, self.w.topk_ids)
        self.eys = [distinct_experts(cfg, r) for r in self.refs]
        ey = self.eys[me].copy()
        ey[self.refs[me].src_info[..., 0] < 0] = np.float32("nan")   # rows without a token must never be read
        self.ey = _tb16(torch, ey, dev)
        self.yx, self.mag = ref.combine_exact(cfg, self.eys, self.refs, self.w.topk_weights)
        self.me, self.cfg = me, cfg

    def check_dispatch(self, res):
        return ref.compare_dispatch(self.cfg, res, self.refs[self.me])

    def check_combine(self, y):
        return ref.compare_combine(y, self.yx[self.me], self.mag[self.me])


def run(ck, cfg) -> None:
    tag = f"{cfg.mode}-{cfg.token_format} server"
    torch = ck.torch
    with epcomm.EPBuffer(cfg, ck.ctx) as buf:
        _guard(ck, f"{tag} int64 topk_ids", lambda: _ids64(ck, cfg, buf))
        _guard(ck, f"{tag} combine(out=)", lambda: _out(ck, cfg, buf))
        for dt in (torch.int64, torch.int32):
            _guard(ck, f"{tag} stats_out {dt}", lambda: _stats(ck, cfg, buf, dt))
        _guard(ck, f"{tag} caller-quantised input", lambda: _prequant(ck, cfg, buf))
        _guard(ck, f"{tag} two micro-batches", lambda: _microbatches(ck, cfg, buf))   # last: leaves buf failed
    import graph_checks      # eager calls and CUDA-graph replays on one (fresh) buffer; imports this module
    graph_checks.run(ck, cfg)


def _guard(ck, name, fn):
    import traceback
    try:
        problems = fn()
    except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        problems = [f"{type(e).__name__}: {e}"]
    ck.ok(name, problems)


def _ids64(ck, cfg, buf):
    problems = []
    for i, routing in enumerate(("minus1", "hot")):
        wd = World(ck, cfg, 7300 + i, routing, "ragged", ids64=True, huge_ids=i == 1)
        res = buf.dispatch(wd.x, wd.ids) if i == 0 else buf.dispatch_wait(buf.dispatch_async(wd.x, wd.ids))
        buf.synchronize()
        problems += wd.check_dispatch(res)
        y = buf.combine(wd.ey, res.handle, wd.weights)
        buf.synchronize()
        problems += wd.check_combine(y)
    return problems


def _out(ck, cfg, buf):
    torch = ck.torch
    problems = []
    for use_async in (False, True):
        wd = World(ck, cfg, 7400 + use_async, "skewed", "ragged")
        res = buf.dispatch(wd.x, wd.ids)
        y = torch.full((wd.x.shape[0], cfg.hidden), float("nan"), dtype=torch.bfloat16, device=ck.dev)
        got = buf.combine_wait(buf.combine_async(wd.ey, res.handle, wd.weights, out=y)) if use_async else \
            buf.combine(wd.ey, res.handle, wd.weights, out=y)
        buf.synchronize()
        if got is not y:
            problems.append("combine(out=y) did not return y")
        problems += wd.check_combine(y)
    return problems


def _stats(ck, cfg, buf, dtype):
    torch = ck.torch
    stats = torch.zeros(cfg.n_local_experts, dtype=dtype, device=ck.dev)
    want = np.zeros(cfg.n_local_experts, np.int64)
    problems = []
    for i, routing in enumerate(("hot", "empty_rank", "uniform")):
        wd = World(ck, cfg, 7500 + i, routing)
        res = buf.dispatch(wd.x, wd.ids, stats_out=stats) if i != 1 else \
            buf.dispatch_wait(buf.dispatch_async(wd.x, wd.ids, stats_out=stats))
        want += wd.refs[ck.me].tokens_per_expert
        buf.combine(wd.ey, res.handle, wd.weights)
    buf.synchronize()
    got = stats.cpu().numpy().astype(np.int64)
    if not np.array_equal(got, want):
        problems.append(f"stats_out {got.tolist()} != {want.tolist()}")
    return problems


def _microbatches(ck, cfg, buf):
    """Three rounds of A, B, combine A, combine B; then a third live dispatch, which must be refused (that refusal
    marks the buffer failed on every rank, so it comes last)."""
    problems = []
    for rnd in range(3):
        a = World(ck, cfg, 7600 + 2 * rnd, ("skewed", "hot", "minus1")[rnd], "ragged")
        b = World(ck, cfg, 7601 + 2 * rnd, ("uniform", "empty_rank", "hot")[rnd])
        ra = buf.dispatch(a.x, a.ids)
        rb = buf.dispatch_wait(buf.dispatch_async(b.x, b.ids)) if rnd == 1 else buf.dispatch(b.x, b.ids)
        buf.synchronize()
        problems += ["A: " + p for p in a.check_dispatch(ra)] + ["B: " + p for p in b.check_dispatch(rb)]
        ya = buf.combine(a.ey, ra.handle, a.weights)
        yb = buf.combine_wait(buf.combine_async(b.ey, rb.handle, b.weights)) if rnd == 2 else \
            buf.combine(b.ey, rb.handle, b.weights)
        buf.synchronize()
        problems += ["A: " + p for p in a.check_combine(ya)] + ["B: " + p for p in b.check_combine(yb)]
    ra, rb = buf.dispatch(a.x, a.ids), buf.dispatch(b.x, b.ids)
    try:
        buf.dispatch(a.x, a.ids)
        problems.append("a third live dispatch was not refused")
    except EPInputError as e:
        if "at most 2" not in str(e):
            problems.append(f"third dispatch: {e}")
    ck.ctx.comm.Barrier()    # every rank refused before any closes the (now failed) buffer
    return problems


def _prequant(ck, cfg, buf):
    """(x_fp8, x_scales) sent unchanged: scales epcomm would not compute (each row's times a power of two)."""
    if not cfg.token_format.quantized:
        return []
    torch = ck.torch
    problems = []
    for i, routing in enumerate(("hot", "minus1")):
        w = make_world(cfg, seed=7700 + i, routing_kind=routing, num_tokens="ragged" if i else None)
        rng = np.random.default_rng(7700 + i)
        pairs = []
        for x in w.xs:
            q, s = cfg.token_format.quantize(x, cfg.scale_format)
            pairs.append((q, (s * np.exp2(rng.integers(-3, 4, size=(len(x), 1)))).astype(np.float32)))
        q, s = pairs[ck.me]
        qd = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).to(ck.dev).view(torch.float8_e4m3fn)
        sd = torch.from_numpy(s).to(ck.dev)
        ids = torch.from_numpy(w.topk_ids[ck.me]).to(ck.dev)
        res = buf.dispatch((qd, sd), ids)
        buf.synchronize()
        refs = ref.dispatch(cfg, pairs, w.topk_ids)
        problems += ref.compare_dispatch(cfg, res, refs[ck.me])
        eys = [distinct_experts(cfg, r) for r in refs]
        y = buf.combine(_tb16(torch, eys[ck.me], ck.dev), res.handle,
                        torch.from_numpy(w.topk_weights[ck.me]).to(ck.dev))
        buf.synchronize()
        yx, mag = ref.combine_exact(cfg, eys, refs, w.topk_weights)
        problems += ref.compare_combine(y, yx[ck.me], mag[ck.me])
    return problems
