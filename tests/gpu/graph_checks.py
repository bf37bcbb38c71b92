"""GPU checks of eager calls and CUDA-graph replays mixed on ONE EPBuffer (issue 13 item 6), every result against
epcomm.reference. Called by server_checks.run (so by tests/gpu/worker.py) once per plain config, on a fresh buffer:

* server arguments in a graph: dispatch_async / dispatch_wait with int64 ids (past the int32 range too) and
  stats_out=, combine_async / combine_wait with out=, captured once and replayed on new inputs; stats_out counts the
  replays (the capture itself runs nothing);
* vLLM: prefill eager (ragged T, skewed routings) and a decode graph (dispatch + combine, fixed T) through the same
  buffer, interleaved; an eager result held across a replay whose set is the other one stays intact;
* DBO / TBO: a graph of two micro-batches (dispatch A, dispatch B async, combine A, combine B async), replayed between
  eager rounds and eager two-micro-batch rounds;
* collisions, each the named EPOverwriteError from synchronize(), nothing corrupted, the buffer usable after it:
  a replay whose dispatch would overwrite an eager result still held (reason "live"; the held result is then
  combined correctly); an eager dispatch into a set a replayed dispatch-only graph still holds (the eager call is
  refused; release() of the graph's handle frees the set); a replay between dispatch_async and dispatch_wait
  (reason "pending").
"""
from __future__ import annotations

import numpy as np

from epcomm.errors import EPOverwriteError

from server_checks import World, _guard


class Static:
    """Fixed input tensors of captured calls (a replay reads the addresses of its capture); load() copies a World's."""

    def __init__(self, ck, cfg, T, ids64=False):
        torch = ck.torch
        self.x = torch.empty((T, cfg.hidden), dtype=torch.bfloat16, device=ck.dev)
        self.ids = torch.empty((T, cfg.topk), dtype=torch.int64 if ids64 else torch.int32, device=ck.dev)
        self.w = torch.empty((T, cfg.topk), dtype=torch.float32, device=ck.dev)
        self.ey = torch.empty((*cfg.rows_shape, cfg.hidden), dtype=torch.bfloat16, device=ck.dev)

    def load(self, wd):
        self.x.copy_(wd.x)
        self.ids.copy_(wd.ids)
        self.w.copy_(wd.weights)
        self.ey.copy_(wd.ey)


def capture(ck, buf, fn):
    """fn's EPBuffer calls captured in a CUDA graph (on a side stream, as torch.cuda.graph wants); (graph, fn())."""
    torch = ck.torch
    buf.synchronize()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=side):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def run(ck, cfg) -> None:
    import epcomm
    tag = f"{cfg.mode}-{cfg.token_format} graphs+eager"
    with epcomm.EPBuffer(cfg, ck.ctx) as buf:
        for name, fn in (("captured async/wait, int64 ids, stats_out=, out=", _server_args),
                         ("vLLM: prefill eager + decode graph", _vllm),
                         ("DBO: two micro-batches in a graph + eager", _dbo),
                         ("collisions: EPOverwriteError, nothing corrupted", _collisions)):
            _guard(ck, f"{tag} {name}", lambda: _then_clean(buf, fn(ck, cfg, buf)))


def _then_clean(buf, problems):
    buf.release()          # a failed check must not leave live results to the next one
    buf.synchronize()
    return problems


def _eager_round(buf, wd, problems, label):
    res = buf.dispatch(wd.x, wd.ids)
    y = buf.combine(wd.ey, res.handle, wd.weights)
    buf.synchronize()
    problems += [f"{label} dispatch: {p}" for p in wd.check_dispatch(res)]
    problems += [f"{label} combine: {p}" for p in wd.check_combine(y)]


def _decode_graph(ck, cfg, buf, seed):
    """A captured dispatch + combine at a fixed decode T: (graph, static inputs, result, y, T)."""
    T = max(1, cfg.max_tokens_per_rank // 4)
    st = Static(ck, cfg, T)
    st.load(World(ck, cfg, seed, "uniform", T))

    def decode():
        r = buf.dispatch(st.x, st.ids)
        return r, buf.combine(st.ey, r.handle, st.w)
    g, (gres, gy) = capture(ck, buf, decode)
    return g, st, gres, gy, T


def _replay_checked(buf, g, st, gres, gy, wd, problems, label):
    st.load(wd)
    g.replay()
    buf.synchronize()
    problems += [f"{label} dispatch: {p}" for p in wd.check_dispatch(gres)]
    problems += [f"{label} combine: {p}" for p in wd.check_combine(gy)]


def _server_args(ck, cfg, buf):
    torch = ck.torch
    T = max(1, cfg.max_tokens_per_rank // 2)
    st = Static(ck, cfg, T, ids64=True)
    st.load(World(ck, cfg, 8000, "uniform", T, ids64=True))
    stats = torch.zeros(cfg.n_local_experts, dtype=torch.int64, device=ck.dev)
    out = torch.empty((T, cfg.hidden), dtype=torch.bfloat16, device=ck.dev)

    def calls():
        r = buf.dispatch_wait(buf.dispatch_async(st.x, st.ids, stats_out=stats))
        return r, buf.combine_wait(buf.combine_async(st.ey, r.handle, st.w, out=out))
    g, (gres, gy) = capture(ck, buf, calls)
    problems = [] if gy is out else ["captured combine(out=y) did not return y"]
    want = np.zeros(cfg.n_local_experts, np.int64)
    for i, routing in enumerate(("hot", "minus1", "skewed")):
        wd = World(ck, cfg, 8001 + i, routing, T, ids64=True, huge_ids=i == 1)
        out.fill_(float("nan"))
        _replay_checked(buf, g, st, gres, gy, wd, problems, f"replay {i}")
        want += wd.refs[ck.me].tokens_per_expert
    got = stats.cpu().numpy()
    if not np.array_equal(got, want):
        problems.append(f"stats_out after 3 replays {got.tolist()} != {want.tolist()}")
    del g
    return problems


def _vllm(ck, cfg, buf):
    problems = []
    for i, tokens in enumerate(("ragged", None, 5)):      # eager rounds of various T before the capture
        _eager_round(buf, World(ck, cfg, 8090 + i, "skewed", tokens), problems, f"eager before capture {i}")
    g, st, gres, gy, T = _decode_graph(ck, cfg, buf, 8100)
    g_set = gres.handle.backend_handle.hp
    steps = ("eager", "graph", "graph", "eager", "eager", "graph", "eager", "graph", "held", "graph")
    for i, step in enumerate(steps):
        if step == "graph":
            wd = World(ck, cfg, 8110 + i, ("hot", "minus1", "skewed", "uniform")[i % 4], T)
            _replay_checked(buf, g, st, gres, gy, wd, problems, f"step {i} replay")
        elif step == "eager":
            wd = World(ck, cfg, 8110 + i, ("skewed", "empty_rank", "uniform")[i % 3], (None, "ragged", 3)[i % 3])
            _eager_round(buf, wd, problems, f"step {i} eager")
        else:   # an eager prefill result held across a decode replay: the eager set is the other one
            if buf._backend.next_output_set() == g_set:
                _eager_round(buf, World(ck, cfg, 8150, "uniform", "ragged"), problems, f"step {i} eager (turn)")
            held = World(ck, cfg, 8110 + i, "hot", "ragged")
            res = buf.dispatch(held.x, held.ids)
            _replay_checked(buf, g, st, gres, gy, World(ck, cfg, 8160, "skewed", T), problems,
                            f"step {i} replay over a held result")
            problems += [f"step {i} held dispatch: {p}" for p in held.check_dispatch(res)]
            y = buf.combine(held.ey, res.handle, held.weights)
            buf.synchronize()
            problems += [f"step {i} held combine: {p}" for p in held.check_combine(y)]
    del g
    return problems


def _dbo(ck, cfg, buf):
    M = cfg.max_tokens_per_rank
    Ta, Tb = max(1, M // 2), max(1, M // 3)
    sa, sb = Static(ck, cfg, Ta), Static(ck, cfg, Tb)
    sa.load(World(ck, cfg, 8200, "uniform", Ta))
    sb.load(World(ck, cfg, 8201, "uniform", Tb))

    def two():
        ra = buf.dispatch(sa.x, sa.ids)
        rb = buf.dispatch_wait(buf.dispatch_async(sb.x, sb.ids))
        ya = buf.combine(sa.ey, ra.handle, sa.w)
        yb = buf.combine_wait(buf.combine_async(sb.ey, rb.handle, sb.w))
        return ra, rb, ya, yb
    g, (ra, rb, ya, yb) = capture(ck, buf, two)
    problems = []
    for i, step in enumerate(("graph", "eager2", "graph", "eager", "graph", "graph", "eager2", "graph")):
        if step == "graph":
            a = World(ck, cfg, 8210 + 2 * i, ("hot", "skewed", "minus1")[i % 3], Ta)
            b = World(ck, cfg, 8211 + 2 * i, ("empty_rank", "uniform", "hot")[i % 3], Tb)
            sa.load(a)
            sb.load(b)
            g.replay()
            buf.synchronize()
            for label, wd, res, y in (("A", a, ra, ya), ("B", b, rb, yb)):
                problems += [f"step {i} replay {label}: {p}" for p in wd.check_dispatch(res) + wd.check_combine(y)]
        elif step == "eager":
            _eager_round(buf, World(ck, cfg, 8210 + 2 * i, "skewed", "ragged"), problems, f"step {i} eager")
        else:   # eager dispatch A, dispatch B, combine A, combine B
            a = World(ck, cfg, 8210 + 2 * i, "minus1", "ragged")
            b = World(ck, cfg, 8211 + 2 * i, "hot", None)
            xa = buf.dispatch(a.x, a.ids)
            xb = buf.dispatch(b.x, b.ids)
            buf.synchronize()
            problems += [f"step {i} eager A: {p}" for p in a.check_dispatch(xa)]
            problems += [f"step {i} eager B: {p}" for p in b.check_dispatch(xb)]
            y_a = buf.combine(a.ey, xa.handle, a.weights)
            y_b = buf.combine(b.ey, xb.handle, b.weights)
            buf.synchronize()
            problems += [f"step {i} eager A: {p}" for p in a.check_combine(y_a)]
            problems += [f"step {i} eager B: {p}" for p in b.check_combine(y_b)]
    del g
    return problems


def _expect_refusal(buf, problems, label, **want):
    try:
        buf.synchronize()
        problems.append(f"{label}: no EPOverwriteError")
    except EPOverwriteError as e:
        got = {k: getattr(e, k) for k in want}
        if got != want:
            problems.append(f"{label}: {got} != {want}: {e}")


def _turn_to(ck, cfg, buf, output_set, problems):
    """Eager rounds (checked) until the next eager dispatch writes `output_set`."""
    if buf._backend.next_output_set() != output_set:
        _eager_round(buf, World(ck, cfg, 8390, "uniform", "ragged"), problems, "turn")


def _collisions(ck, cfg, buf):
    problems = []
    g, st, gres, gy, T = _decode_graph(ck, cfg, buf, 8300)
    g_set = gres.handle.backend_handle.hp
    # 1. a replay over an eager result still held in its set: refused (dispatch and its combine), the result intact
    _turn_to(ck, cfg, buf, g_set, problems)
    held = World(ck, cfg, 8301, "skewed", "ragged")
    res = buf.dispatch(held.x, held.ids)
    st.load(World(ck, cfg, 8302, "hot", T))
    g.replay()
    _expect_refusal(buf, problems, "replay over a held eager result", op="dispatch", reason="live", captured=True,
                    holder="eager", output_set=g_set, count=2)
    problems += [f"held after the refused replay: {p}" for p in held.check_dispatch(res)]
    y = buf.combine(held.ey, res.handle, held.weights)
    buf.synchronize()
    problems += [f"held combine: {p}" for p in held.check_combine(y)]
    _replay_checked(buf, g, st, gres, gy, World(ck, cfg, 8303, "minus1", T), problems, "the replay after it")
    # 2. a replay between dispatch_async and dispatch_wait: refused, the eager call's round intact
    pend = World(ck, cfg, 8304, "uniform", "ragged")
    p = buf.dispatch_async(pend.x, pend.ids)
    g.replay()
    res = buf.dispatch_wait(p)
    y = buf.combine(pend.ey, res.handle, pend.weights)
    _expect_refusal(buf, problems, "replay between dispatch_async and its wait", op="dispatch", reason="pending",
                    captured=True)
    problems += [f"pending call: {p}" for p in pend.check_dispatch(res) + pend.check_combine(y)]
    # 3. an eager dispatch into the set of a replayed dispatch-only graph (its result not combined): refused;
    # release() of the graph's handle frees the set for eager calls
    sd = Static(ck, cfg, T)
    sd.load(World(ck, cfg, 8305, "uniform", T))
    gd, dres = capture(ck, buf, lambda: buf.dispatch(sd.x, sd.ids))
    d_set = dres.handle.backend_handle.hp
    wd = World(ck, cfg, 8306, "hot", T)
    sd.load(wd)
    gd.replay()
    buf.synchronize()
    problems += [f"dispatch-only replay: {p}" for p in wd.check_dispatch(dres)]
    _turn_to(ck, cfg, buf, d_set, problems)
    late = World(ck, cfg, 8307, "skewed", "ragged")
    refused = buf.dispatch(late.x, late.ids)
    _expect_refusal(buf, problems, "eager dispatch over a replayed result", op="dispatch", reason="live",
                    captured=False, holder="captured", output_set=d_set)
    problems += [f"replayed result after the refused eager dispatch: {p}" for p in wd.check_dispatch(dres)]
    buf.release(refused.handle)        # never ran: nothing to combine
    buf.release(dres.handle)
    _turn_to(ck, cfg, buf, d_set, problems)
    _eager_round(buf, World(ck, cfg, 8308, "minus1", "ragged"), problems, "eager after release")
    del g, gd
    return problems
