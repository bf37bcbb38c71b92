"""Checks of epcomm.compat.deep_ep against DeepEP's documented semantics, run on every rank of a job.

The expectations come from a small torch reference of DeepEP's layouts built from every rank's inputs
(all-gathered): token-major rows ordered by source rank then source token, local expert ids with -1 for experts
elsewhere, zero weights there, per-expert counts aligned up, batched rows per local expert ordered by
(source rank, token, slot), the handle's layout ranges, fp8 with per-128-channel scales (exact, or powers of two /
UE8M0 with round_scale). Used by tests/compat/worker.py (CPU, host backend) and tests/gpu/compat_worker.py (GPU).
"""
from __future__ import annotations

import random
import time

import ml_dtypes
import numpy as np
import torch
import torch.distributed as dist

from epcomm.compat import deep_ep
from epcomm.compat.deep_ep.bridge import from_backend
from epcomm.errors import EPError, EPInputError
from epcomm.formats import quantize_fp8
from tests.compat.stopgap_reference import StopgapLowLatency

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


class Checker:
    def __init__(self, rank: int, world: int, device: str, seed: int):
        self.rank, self.world, self.device = rank, world, device
        self.rng = np.random.default_rng(seed * 7919 + rank)
        self.shared = np.random.default_rng(seed)      # same stream on every rank (routing shapes)
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: bool, what: str):
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)

    def equal(self, a: torch.Tensor, b: torch.Tensor, what: str):
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.shape != b.shape:
            self.failures.append(f"{what}: shape {list(a.shape)} != {list(b.shape)}")
            return
        if a.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float32):
            a = a.contiguous().view(torch.uint8 if a.element_size() == 1 else
                                    (torch.int16 if a.element_size() == 2 else torch.int32))
            b = b.contiguous().view(a.dtype)
        bad = (a != b).reshape(a.shape[0], -1).any(1).nonzero().flatten().tolist() if a.numel() else []
        self.check(not bad, f"{what}: {len(bad)} rows differ, first {bad[:3]}")

    def close(self, actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, what: str):
        a, e, m = actual.detach().cpu().double(), expected.double(), magnitude.double()
        if a.shape != e.shape:
            self.failures.append(f"{what}: shape {list(a.shape)} != {list(e.shape)}")
            return
        tol = 2.0 ** -8 * e.abs() + 2.0 ** -7 * m + 1e-6
        bad = ((a - e).abs() > tol).nonzero().tolist()
        self.check(torch.isfinite(a).all().item() and not bad, f"{what}: {len(bad)} elements off, first {bad[:2]}")

    def raises(self, fn, exc, what: str):
        try:
            fn()
        except exc:
            self.passed += 1
            return
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{what}: raised {type(e).__name__}: {e}")
            return
        self.failures.append(f"{what}: did not raise")


def gather(t: torch.Tensor | None) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, None if t is None else t.detach().cpu())
    return out


def tokens(rng, t: int, h: int) -> torch.Tensor:
    rows = rng.standard_normal((t, h), dtype=np.float32) * np.exp2(rng.integers(-3, 4, size=(t, 1)))
    return torch.from_numpy(rows.astype(np.float32)).to(torch.bfloat16)


def routing(rng, t: int, k: int, num_experts: int, kind: str, world: int) -> torch.Tensor:
    """int64 [t, k] distinct experts per token; kinds: uniform, minus1 (random -1 slots), skip_last (no token goes to
    the last rank: an empty receiver), hot (most slots on expert 0)."""
    per_rank = num_experts // world
    pool = num_experts - per_rank if kind == "skip_last" else num_experts
    ids = np.stack([rng.permutation(pool)[:k] for _ in range(t)]) if t else np.zeros((0, k), np.int64)
    if kind == "hot" and t:
        ids[:, 0] = 0
        ids[:, 1:] = np.where(ids[:, 1:] == 0, 1 + (ids[:, 1:] % (num_experts - 1)), ids[:, 1:])
    if kind == "minus1" and t:
        ids[rng.random(ids.shape) < 0.3] = -1
    return torch.from_numpy(ids.astype(np.int64))


# ------------------------------------------------------------------------------------------------ references
def ref_token_major(me, xs, ids, ws, in_ranks, per_rank, scales=None):
    """DeepEP's normal receive on rank `me`: rows, local ids, weights, (scales), source token per row."""
    rows, lid, lw, ls, src = [], [], [], [], []
    for s in range(len(xs)):
        toks = in_ranks[s][:, me].nonzero().flatten()
        rows.append(xs[s][toks])
        src.append(toks)
        if scales is not None:
            ls.append(scales[s][toks])
        if ids is not None:
            g = ids[s][toks]
            mine = (g >= me * per_rank) & (g < (me + 1) * per_rank)
            lid.append(torch.where(mine, g - me * per_rank, torch.full_like(g, -1)))
            lw.append(torch.where(mine, ws[s][toks], torch.zeros_like(ws[s][toks])))
    cat = (lambda parts: torch.cat(parts)) if rows else None
    return (cat(rows), cat(lid) if ids is not None else None, cat(lw) if ids is not None else None,
            cat(ls) if scales is not None else None, cat(src))


def ref_batched(me, ids, per_rank):
    """Per local expert: list of (source rank, token, slot), ordered by source rank, token, slot."""
    out = []
    for e in range(per_rank):
        ge = me * per_rank + e
        rows = []
        for s in range(len(ids)):
            t, k = (ids[s] == ge).nonzero(as_tuple=True)
            rows += list(zip([s] * len(t), t.tolist(), k.tolist()))
        out.append(rows)
    return out


def ref_pow2(x: torch.Tensor):
    """Numpy reference of round_scale: (q as uint8, scales fp32) per 128 channels."""
    xf = x.float().numpy()
    b = xf.reshape(xf.shape[0], -1, 128)
    amax = np.maximum(np.abs(b).max(-1), np.float32(1e-4))
    scale = np.exp2(np.ceil(np.log2(amax.astype(np.float64) / 448.0))).astype(np.float32)
    # log2 may land a hair above an exact power of two: take the smaller power when it still covers amax
    smaller = scale / 2
    scale = np.where(amax / 448.0 <= smaller, smaller, scale).astype(np.float32)
    q = np.clip(b / scale[..., None], -448, 448).astype(FP8).reshape(xf.shape)
    return torch.from_numpy(q.view(np.uint8)), torch.from_numpy(scale)


# ------------------------------------------------------------------------------------------------ normal mode
def normal_case(c: Checker, buf, h, k, per_rank, kind, t, fp8=False, align=1, worst=False, tag=""):
    me, world, dev = c.rank, c.world, c.device
    e = per_rank * world
    x = tokens(c.rng, t, h)
    ids = routing(c.rng, t, k, e, kind, world)
    w = torch.from_numpy(c.rng.random((t, k), dtype=np.float32))
    xd, idsd, wd = x.to(dev), ids.to(dev), w.to(dev)
    per_rank_t, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idsd, e)
    # get_dispatch_layout against a direct computation
    rank_of = torch.where(ids >= 0, ids // per_rank, torch.full_like(ids, world))
    if t:
        exp_in = torch.stack([(rank_of == r).any(1) for r in range(world)], 1)
    else:
        exp_in = torch.zeros(0, world, dtype=torch.bool)
    c.equal(in_rank.cpu(), exp_in, f"{tag} is_token_in_rank")
    c.equal(per_rank_t.cpu(), exp_in.sum(0).int(), f"{tag} num_tokens_per_rank")
    c.equal(per_expert.cpu(), torch.stack([(ids == i).sum() for i in range(e)]).int(), f"{tag} num_tokens_per_expert")
    c.check(per_node is None, f"{tag} num_tokens_per_rdma_rank is None on one node")
    c.check(in_rank.dtype == torch.bool and per_rank_t.dtype == torch.int32, f"{tag} layout dtypes")

    xs, idss, wss, ins = gather(x), gather(ids), gather(w), gather(in_rank)
    if fp8:
        q, s = quantize_fp8(x.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        xq = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
        sc = torch.from_numpy(s).t().contiguous().t()                      # column-major scales, as DeepEP's test
        xin = (xq.to(dev), sc.to(dev))
        qs, ss = gather(xq.view(torch.uint8)), gather(torch.from_numpy(s))
        exp_rows, exp_ids, exp_w, exp_sc, exp_src = ref_token_major(me, qs, idss, wss, ins, per_rank, ss)
    else:
        xin = xd
        exp_rows, exp_ids, exp_w, _, exp_src = ref_token_major(me, xs, idss, wss, ins, per_rank)
    nwt = t_max(c) * world if worst else 0
    recv_x, recv_ids, recv_w, counts, handle, event = buf.dispatch(
        xin, num_tokens_per_rank=per_rank_t, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idsd, topk_weights=wd, expert_alignment=align, num_worst_tokens=nwt, async_finish=True)
    event.current_stream_wait()
    n = exp_rows.shape[0]
    rows_out = recv_x[0] if fp8 else recv_x
    if worst:
        c.check(counts == [] and rows_out.shape[0] == nwt and recv_ids.shape[0] == nwt,
                f"{tag} num_worst_tokens: {len(counts)} counts, {rows_out.shape[0]} rows, expected {nwt}")
        c.check(bool((recv_ids[n:] == -1).all()), f"{tag} rows past the received ones have topk_idx -1")
    else:
        exp_counts = [int((exp_ids == i).sum()) for i in range(per_rank)]
        exp_counts = [(v + align - 1) // align * align for v in exp_counts]
        c.check(counts == exp_counts, f"{tag} num_recv_tokens_per_expert_list {counts} != {exp_counts}")
        c.check(rows_out.shape[0] == n, f"{tag} received {rows_out.shape[0]} rows, expected {n}")
    c.equal(rows_out[:n].cpu().view(torch.uint8) if fp8 else rows_out[:n], exp_rows, f"{tag} recv_x")
    if fp8:
        c.equal(recv_x[1][:n], exp_sc, f"{tag} recv scales")
        c.check(recv_x[1].stride(0) == 1 or recv_x[1].shape[0] <= 1 or t <= 1,
                f"{tag} scales keep the caller's column-major layout")
    c.check(recv_ids.dtype == torch.int64 and recv_w.dtype == torch.float32, f"{tag} recv topk dtypes")
    c.equal(recv_ids[:n], exp_ids, f"{tag} recv_topk_idx")
    c.equal(recv_w[:n], exp_w, f"{tag} recv_topk_weights")
    c.equal(handle.recv_src_idx[:n].long(), exp_src.long(), f"{tag} handle.recv_src_idx")

    # combine: each rank sends rows scaled by (rank + 1); a token gets the sum over the ranks it went to
    base = exp_rows_bf16(c, xs, ins)        # what every rank received, as bf16 (fp8 runs too)
    y = (base * (me + 1)).to(torch.bfloat16)
    y_full = torch.zeros(rows_out.shape[0], h, dtype=torch.bfloat16)
    y_full[:n] = y
    bias = tokens(c.rng, t, h)
    comb, comb_w, _ = buf.combine(y_full.to(dev), handle, topk_weights=recv_w, bias=bias.to(dev))
    exp_y = torch.zeros(t, h)
    mag = torch.zeros(t, h)
    for r in range(world):
        part = (xs[me].float() * (r + 1)).to(torch.bfloat16).float() * ins[me][:, r:r + 1].float()
        exp_y += part
        mag += part.abs()
    c.close(comb.cpu(), exp_y + bias.float(), mag + bias.float().abs(), f"{tag} combined_x")
    c.equal(comb_w, torch.where(ids >= 0, w, torch.zeros_like(w)), f"{tag} combined_topk_weights")
    return x, ids, w, in_rank, handle, n


def exp_rows_bf16(c, xs, ins):
    me = c.rank
    return torch.cat([xs[s][ins[s][:, me]] for s in range(len(xs))]).float()


def t_max(c: Checker) -> int:
    return 12


def micro_batches(c: Checker, buf, h, k, pr, order):
    """Dispatches outstanding together, combined in `order`: with two lanes A and B overlap freely; a third (or a
    second with one lane) takes a lane from an earlier one, whose combine then re-dispatches. All must be right."""
    outs = []
    for i in range(len(order)):
        xi = tokens(c.rng, 8, h)
        idsi = routing(c.rng, 8, k, pr * c.world, "uniform", c.world)
        _, _, _, inr, _ = buf.get_dispatch_layout(idsi.to(c.device), pr * c.world)
        ne = torch.zeros(pr * c.world, dtype=torch.int32, device=c.device)
        rx, _, _, _, hd, _ = buf.dispatch(xi.to(c.device), is_token_in_rank=inr, num_tokens_per_expert=ne,
                                          num_tokens_per_rank=inr.sum(0))
        outs.append((xi, inr.cpu(), rx, hd))
    for i in order:
        xi, inr, rx, hd = outs[i]
        comb, _, _ = buf.combine(rx, hd)
        exp = xi.float() * inr.sum(1, keepdim=True).float()
        c.close(comb.cpu(), exp, exp.abs(), f"micro-batch combine {i} of {len(order)} (order {order})")


def normal_suite(c: Checker, buf):
    h, k, pr = 256, 4, 4
    cases = [("uniform", "max"), ("minus1", "ragged"), ("skip_last", "ragged"), ("hot", "max"), ("uniform", "zero")]
    for kind, tok in cases:
        t = {"max": 12, "ragged": int(c.rng.integers(0, 13)), "zero": 0 if c.rank == 0 else 9}[tok]
        for fp8 in (False, True):
            tag = f"normal {kind} T={t} {'fp8' if fp8 else 'bf16'}"
            normal_case(c, buf, h, k, pr, kind, t, fp8=fp8, tag=tag)
    normal_case(c, buf, h, k, pr, "minus1", 7, align=4, tag="normal expert_alignment=4")
    normal_case(c, buf, h, 1, pr, "uniform", 10, tag="normal K=1 (fewer slots than ranks)")
    normal_case(c, buf, h, k, pr, "uniform", 12, worst=True, tag="normal num_worst_tokens")
    normal_case(c, buf, h, k, pr, "skip_last", 5, fp8=True, worst=True, tag="normal num_worst_tokens fp8")

    # cached dispatch (handle reuse) and a handle combined twice
    x, ids, w, in_rank, handle, n = normal_case(c, buf, h, k, pr, "uniform", 10, tag="normal handle")
    x2 = tokens(c.rng, x.shape[0], h)
    xs2, ins = gather(x2), gather(in_rank)
    exp2 = exp_rows_bf16(c, xs2, ins).to(torch.bfloat16)
    r2, a, b, cl, hh, ev = buf.dispatch(x2.to(c.device), handle=handle)
    c.check(a is None and b is None and cl is None and hh is None, "cached dispatch returns Nones")
    c.equal(r2, exp2, "cached dispatch recv_x")
    q, sc = quantize_fp8(x2.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    q = torch.from_numpy(q.view(np.uint8))
    qs = gather(q)
    exp_q = torch.cat([qs[s][ins[s][:, c.rank]] for s in range(c.world)])
    (rq, rs), *_ = buf.dispatch((q.view(torch.float8_e4m3fn).to(c.device), torch.from_numpy(sc).to(c.device)),
                                handle=handle)
    c.equal(rq.cpu().view(torch.uint8), exp_q, "cached fp8 dispatch recv_x")
    c.check(rs.shape == (exp_q.shape[0], 2) and rs.dtype == torch.float32, "cached fp8 dispatch scales")
    for rep in range(2):
        comb, comb_w, _ = buf.combine(r2, handle)
        exp = sum((xs2[c.rank].float() * ins[c.rank][:, r:r + 1].float()) for r in range(c.world))
        c.close(comb.cpu(), exp, exp.abs(), f"combine of a cached dispatch #{rep}")
        c.check(comb_w is None, "combine without topk_weights returns None weights")

    micro_batches(c, buf, h, k, pr, order=(1, 0, 2))

    c.raises(lambda: buf.dispatch(x.to(c.device), handle=handle, topk_idx=ids.to(c.device)), EPInputError,
             "cached dispatch with topk_idx")
    c.raises(lambda: buf.dispatch(x.float().to(c.device), is_token_in_rank=in_rank), EPInputError, "fp32 x")
    # one rank's bad input fails every rank at once (none waits for it), and the Buffer stays usable
    bad = x.float() if c.rank == 0 else x
    c.raises(lambda: buf.dispatch(bad.to(c.device), is_token_in_rank=in_rank.to(c.device)), EPInputError,
             "rank 0's fp32 x refused on every rank")
    normal_case(c, buf, h, k, pr, "uniform", 6, tag="normal after a refused call")


# ------------------------------------------------------------------------------------------------ low latency
def ll_case(c: Checker, buf, h, k, pr, m, kind, t, use_fp8, round_scale=False, ue8m0=False, hook=False,
            zero_copy=False, use_out=False, before: StopgapLowLatency | None = None, tag=""):
    """One low-latency dispatch and combine against the reference of DeepEP's batched layout; with `before`, also
    bit for bit against the path that gathered the layout from a grouped EPBuffer (stopgap_reference.py)."""
    me, world, dev = c.rank, c.world, c.device
    e, cap = pr * world, m * world
    x = tokens(c.rng, t, h)
    ids = routing(c.rng, t, k, e, kind, world)
    w = torch.from_numpy(c.rng.random((t, k), dtype=np.float32))
    stats = torch.zeros(pr, dtype=torch.int32, device=dev)
    recv, count, handle, event, hk = buf.low_latency_dispatch(
        x.to(dev), ids.to(dev), m, e, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=ue8m0, async_finish=not hook, return_recv_hook=hook)
    c.check((hk is not None) == hook, f"{tag} hook returned iff return_recv_hook")
    if hook:
        hk()
    else:
        event.current_stream_wait()
    xs, idss = gather(x), gather(ids)
    exp = ref_batched(me, idss, pr)
    rx = recv[0] if use_fp8 else recv
    c.check(tuple(rx.shape) == (pr, cap, h), f"{tag} recv_x shape {list(rx.shape)}")
    c.check(rx.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16), f"{tag} recv_x dtype {rx.dtype}")
    c.equal(count.cpu(), torch.tensor([len(r) for r in exp], dtype=torch.int32), f"{tag} recv_count")
    c.equal(stats.cpu(), count.cpu(), f"{tag} cumulative_local_expert_recv_stats")
    if use_fp8:
        sc = recv[1]
        cols = h // 512 if ue8m0 else h // 128
        c.check(tuple(sc.shape) == (pr, cap, cols) and sc.stride(1) == 1 and sc.stride(2) == cap,
                f"{tag} scales shape {list(sc.shape)} strides {sc.stride()} (column-major)")
        c.check(sc.dtype == (torch.int32 if ue8m0 else torch.float32), f"{tag} scales dtype {sc.dtype}")
    src_info, layout_range = handle[0], handle[1]
    c.check(len(handle) == 5 and handle[2] == m and handle[3] == h and handle[4] == e, f"{tag} handle tuple")
    for le, rows in enumerate(exp):
        n = len(rows)
        if not n:
            continue
        src = torch.tensor([s for s, _, _ in rows])
        tok = torch.tensor([tt for _, tt, _ in rows])
        sent = torch.stack([xs[s][tt] for s, tt, _ in rows])
        c.equal(src_info[le, :n].cpu().long(), tok, f"{tag} src_info expert {le}")
        cnt = torch.bincount(src, minlength=world)
        lr = layout_range[le].cpu()
        c.equal(lr & 0xFFFFFFFF, cnt, f"{tag} layout_range counts expert {le}")
        c.equal(lr >> 32, cnt.cumsum(0) - cnt, f"{tag} layout_range begins expert {le}")
        if not use_fp8:
            c.equal(rx[le, :n], sent, f"{tag} recv_x expert {le}")
        elif not round_scale:
            q, s = quantize_fp8(sent.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
            c.equal(rx[le, :n].cpu().view(torch.uint8), torch.from_numpy(q.view(np.uint8)), f"{tag} fp8 expert {le}")
            c.equal(recv[1][le, :n].contiguous(), torch.from_numpy(s), f"{tag} scales expert {le}")
        else:
            q, s = ref_pow2(sent)
            c.equal(rx[le, :n].cpu().view(torch.uint8), q, f"{tag} fp8 (pow2 scales) expert {le}")
            got = recv[1][le, :n].cpu().contiguous()
            if ue8m0:
                # ue8m0: four exponent bytes packed in an int32; byte << 23 is the float32 2**(byte - 127)
                exps = got.flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8).to(torch.int32)
                got = (exps << 23).view(torch.float32).reshape(n, -1)
            c.equal(got, s, f"{tag} pow2 scales expert {le}")

    if not hook:
        # no gather, no copy: what dispatch returned is the EPBuffer's own output (layout "batched")
        res = handle.result
        c.check(rx.data_ptr() == from_backend(res.expert_x).data_ptr()
                and count.data_ptr() == from_backend(res.tokens_per_expert).data_ptr(),
                f"{tag} recv_x and recv_count are views of the EPBuffer's outputs")
        if use_fp8 and not ue8m0:
            c.check(recv[1].data_ptr() == from_backend(res.expert_scales).data_ptr(),
                    f"{tag} scales are a view of the EPBuffer's expert_scales")
    if before is not None:
        ox, osc, ocount, osrc, olr = before.dispatch(x.to(dev), ids.to(dev), m, e, use_fp8, round_scale, ue8m0)
        c.equal(count, ocount, f"{tag} recv_count as before (gathered from a grouped EPBuffer)")
        c.equal(src_info, osrc, f"{tag} handle src_info as before")
        c.equal(layout_range, olr, f"{tag} handle layout_range as before")
        for le in range(pr):
            n = int(ocount[le])
            c.equal(rx[le, :n], ox[le, :n], f"{tag} recv_x as before, expert {le}")
            if use_fp8:
                c.equal(recv[1][le, :n], osc[le, :n], f"{tag} scales as before, expert {le}")

    # combine: expert e's outputs are its inputs times (1 + e/8); y[t] = sum_k w[t,k] * that
    y = torch.zeros(pr, cap, h, dtype=torch.bfloat16)
    for le, rows in enumerate(exp):
        for p, (s, tt, _) in enumerate(rows):
            y[le, p] = (xs[s][tt].float() * (1 + (me * pr + le) / 8)).to(torch.bfloat16)
    if zero_copy:
        buf.get_next_low_latency_combine_buffer(handle).copy_(y.to(dev))
        y_in = torch.empty(pr, cap, h, dtype=torch.bfloat16, device=dev)      # ignored with zero_copy
    else:
        y_in = y.to(dev)
    out = torch.full((t, h), 7.0, dtype=torch.bfloat16, device=dev) if use_out else None
    comb, event, hk = buf.low_latency_combine(y_in, ids.to(dev), w.to(dev), handle, zero_copy=zero_copy,
                                             async_finish=not hook, return_recv_hook=hook, out=out)
    if hook:
        hk()
    c.check(out is None or comb is out, f"{tag} combine writes into out=")
    exp_y, mag = torch.zeros(t, h), torch.zeros(t, h)
    for tt in range(t):
        for kk in range(k):
            g = int(ids[tt, kk])
            if g < 0:
                continue
            part = w[tt, kk] * (x[tt].float() * (1 + g / 8)).to(torch.bfloat16).float()
            exp_y[tt] += part
            mag[tt] += part.abs()
    c.close(comb.cpu(), exp_y, mag, f"{tag} low_latency_combine")
    if before is not None:
        c.equal(comb, before.combine(y.to(dev), w.to(dev)), f"{tag} low_latency_combine as before (bit for bit)")
    return handle


def ll_suite(c: Checker, buf):
    h, k, pr, m = 512, 4, 4, 12
    before = StopgapLowLatency(buf)
    for kind in ("uniform", "minus1", "skip_last", "hot"):
        t = 12 if kind != "minus1" else int(c.rng.integers(0, 13))
        ll_case(c, buf, h, k, pr, m, kind, t, use_fp8=False, before=before, tag=f"ll {kind} bf16")
        ll_case(c, buf, h, k, pr, m, kind, t, use_fp8=True, before=before, tag=f"ll {kind} fp8")
    ll_case(c, buf, h, k, pr, m, "uniform", 9, use_fp8=True, round_scale=True, before=before, tag="ll round_scale")
    ll_case(c, buf, h, k, pr, m, "minus1", 9, use_fp8=True, round_scale=True, ue8m0=True, before=before,
            tag="ll ue8m0")
    ll_case(c, buf, h, k, pr, m, "uniform", 11, use_fp8=False, hook=True, before=before, tag="ll hooks")
    ll_case(c, buf, h, k, pr, m, "uniform", 11, use_fp8=True, hook=True, zero_copy=True, use_out=True,
            before=before, tag="ll hooks zero_copy out=")
    before.close()
    ll_out_and_stats(c, buf, h, k, pr, m)
    ll_case(c, buf, h, k, pr, m, "uniform", 0 if c.rank == c.world - 1 else 5, use_fp8=False, tag="ll empty rank")
    buf.clean_low_latency_buffer(m, h, pr * c.world)

    # three dispatches before their combines (the first lane is reused): combines still right, in any order
    h2 = 256
    saved = []
    for i in range(3):
        x = tokens(c.rng, 6, h2)
        ids = routing(c.rng, 6, k, pr * c.world, "uniform", c.world)
        recv, count, handle, _, _ = buf.low_latency_dispatch(x.to(c.device), ids.to(c.device), 8, pr * c.world,
                                                             use_fp8=False)
        saved.append((x, ids, recv.clone(), handle))
    for i in (0, 2, 1):
        x, ids, recv, handle = saved[i]
        w = torch.ones(ids.shape, dtype=torch.float32)
        comb, _, _ = buf.low_latency_combine(recv, ids.to(c.device), w.to(c.device), handle)
        exp = x.float() * (ids >= 0).sum(1, keepdim=True).float()
        c.close(comb.cpu(), exp, exp.abs(), f"ll outstanding dispatch {i} combined late")

    # two micro-batches with zero-copy combine inputs: each handle gets its own buffer
    pair = []
    for i in range(2):
        x = tokens(c.rng, 5, h2)
        ids = routing(c.rng, 5, k, pr * c.world, "minus1", c.world)
        recv, _, handle, _, _ = buf.low_latency_dispatch(x.to(c.device), ids.to(c.device), 8, pr * c.world,
                                                         use_fp8=False)
        zc = buf.get_next_low_latency_combine_buffer(handle)
        zc.copy_(recv)
        pair.append((x, ids, handle, zc))
    c.check(pair[0][3].data_ptr() != pair[1][3].data_ptr(), "zero-copy buffers of two outstanding handles differ")
    for x, ids, handle, zc in pair:
        w = torch.ones(ids.shape, dtype=torch.float32)
        comb, _, _ = buf.low_latency_combine(zc, ids.to(c.device), w.to(c.device), handle, zero_copy=True)
        exp = x.float() * (ids >= 0).sum(1, keepdim=True).float()
        c.close(comb.cpu(), exp, exp.abs(), "ll micro-batch zero-copy combine")

    c.raises(lambda: buf.low_latency_dispatch(tokens(c.rng, 2, 512).to(c.device), torch.zeros(2, 4, dtype=torch.int64,
             device=c.device), 8, 4 * c.world, use_ue8m0=True), EPInputError, "use_ue8m0 without round_scale")
    c.raises(lambda: buf.low_latency_dispatch(tokens(c.rng, 9, 512).to(c.device), torch.zeros(9, 4, dtype=torch.int64,
             device=c.device), 8, 4 * c.world), EPInputError, "more tokens than num_max_dispatch_tokens_per_rank")
    c.raises(lambda: buf.low_latency_update_mask_buffer(0, True), EPError, "rank masking is refused")
    if c.device == "cpu":   # an int64 id past the int32 range must stay out of range, not wrap into expert 3
        huge = torch.full((2, 4), (1 << 32) + 3, dtype=torch.int64)
        c.raises(lambda: buf.low_latency_dispatch(tokens(c.rng, 2, 512), huge, 8, 4 * c.world), EPInputError,
                 "int64 id past the int32 range")


def ll_out_and_stats(c: Checker, buf, h, k, pr, m):
    """combine's out= (a strided one too) and a fresh result without it; cumulative_local_expert_recv_stats as
    dispatch's stats_out= (int32 / int64, with the hook, strided) and what a re-dispatch leaves alone."""
    dev, e = c.device, pr * c.world
    x, ids = tokens(c.rng, 10, h).to(dev), routing(c.rng, 10, k, e, "minus1", c.world).to(dev)
    w = torch.from_numpy(c.rng.random(tuple(ids.shape), dtype=np.float32)).to(dev)
    stats = torch.arange(5, 5 + pr, dtype=torch.int64, device=dev)      # counters that already hold something
    start = stats.clone()
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, ids, m, e, cumulative_local_expert_recv_stats=stats,
                                                         use_fp8=False)
    c.equal(stats.cpu(), start.cpu() + count.cpu().long(), "ll int64 stats accumulate (stats_out=)")
    y = (recv.float() * 0.5).to(torch.bfloat16)
    fresh, _, _ = buf.low_latency_combine(y, ids, w, handle)
    kept = fresh.clone()
    wide = torch.full((10, 2 * h), 3.0, dtype=torch.bfloat16, device=dev)
    strided = wide[:, h:]                                                  # not contiguous: written through a copy
    got, _, _ = buf.low_latency_combine(y, ids, w, handle, out=strided)   # combined twice: re-dispatched first
    c.check(got is strided, "ll combine returns the strided out= it was given")
    c.equal(strided, fresh, "ll combine into a strided out= (a second combine of the handle: re-dispatched)")
    c.check(bool((wide[:, :h] == 3.0).all()), "ll combine leaves the rest of out='s storage alone")
    c.equal(stats.cpu(), start.cpu() + count.cpu().long(), "ll stats untouched by a re-dispatch")

    # with the hook: added when it runs; int32 counters, and strided ones (added after the receive)
    grid = torch.zeros(pr, 2, dtype=torch.int32, device=dev)
    for stats, what in ((torch.zeros(pr, dtype=torch.int32, device=dev), "int32"), (grid[:, 1], "strided")):
        recv, count, handle, _, hook = buf.low_latency_dispatch(x, ids, m, e, cumulative_local_expert_recv_stats=stats,
                                                                use_fp8=True, return_recv_hook=True)
        hook()
        c.equal(stats.cpu(), count.cpu(), f"ll {what} stats with the hook")
        out, _, _ = buf.low_latency_combine(torch.zeros(pr, m * c.world, h, dtype=torch.bfloat16, device=dev), ids, w,
                                            handle)
        c.check(bool((out == 0).all()), f"ll combine of zeros ({what} stats round)")
    c.check(bool((grid[:, 0] == 0).all()), "ll strided stats: the other column untouched")
    for _ in range(2):     # two more rounds: a result returned without out= is the caller's, not a buffer's
        r2, _, h2, _, _ = buf.low_latency_dispatch(x, ids, m, e, use_fp8=False)
        buf.low_latency_combine(r2, ids, w, h2)
    c.equal(fresh, kept, "ll combine result without out= is a fresh tensor (unchanged two rounds later)")
    c.raises(lambda: buf.low_latency_dispatch(x, ids, m, e, cumulative_local_expert_recv_stats=torch.zeros(
        pr + 1, dtype=torch.int32, device=dev)), EPInputError, "ll stats of the wrong length refused")
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, ids, m, e, use_fp8=False)   # still usable everywhere
    comb, _, _ = buf.low_latency_combine(recv, ids, w, handle)
    exp = (x.float() * torch.where(ids >= 0, w, torch.zeros_like(w)).sum(1, keepdim=True)).cpu()
    c.close(comb.cpu(), exp, exp.abs(), "ll round after a refused stats tensor")


def ll_slab_overflow(c: Checker):
    """Tokens that list one expert twice take two rows each: more rows for one expert than DeepEP's capacity M * ranks
    is an EPError naming the expert on its rank (the peers learn of it: EPError naming that rank), never rows
    silently dropped. Its own Buffer: the failed EPBuffer is unusable afterwards. CPU only (the GPU raises it from a
    later call, as every error its kernels record)."""
    b3 = deep_ep.Buffer(dist.group.WORLD, explicitly_destroy=True, lanes_per_shape=1, timeout_s=20.0)
    ids = torch.tensor([[0, 0]], dtype=torch.int64)     # 2 rows per rank for expert 0: 2 * ranks > M * ranks = ranks
    errors = []
    try:
        recv, count, handle, _, _ = b3.low_latency_dispatch(tokens(c.rng, 1, 128), ids, 1, 2 * c.world,
                                                             use_fp8=False)
        b3.low_latency_combine(recv, ids, torch.ones(1, 2), handle)
    except EPError as e:
        errors.append(str(e))
    named = "local expert 0" if c.rank == 0 else "rank 0"
    c.check(len(errors) == 1 and named in errors[0], f"ll slab overflow: expected an EPError naming {named!r}, "
            f"got {errors}")
    b3.destroy()


def static_suite(c: Checker, buf):
    cfg = deep_ep.Buffer.get_dispatch_config(c.world)
    c.check(isinstance(cfg, deep_ep.Config) and isinstance(deep_ep.Buffer.get_combine_config(c.world), deep_ep.Config),
            "get_dispatch_config / get_combine_config return Config")
    c.check(cfg.get_nvl_buffer_size_hint(7168 * 2, c.world) > 0, "Config size hint")
    c.check(deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, c.world, 32 * c.world) > 0, "rdma size hint")
    before = deep_ep.Buffer.num_sms
    deep_ep.Buffer.set_num_sms(24)
    c.check(deep_ep.Buffer.num_sms == 24, "set_num_sms")
    deep_ep.Buffer.set_num_sms(before)
    c.raises(lambda: deep_ep.Buffer.set_num_sms(23), EPInputError, "odd SM count")
    c.check(deep_ep.topk_idx_t is torch.int64, "topk_idx_t")
    with deep_ep.Buffer.capture():
        pass
    c.raises(lambda: buf.destroy(), EPInputError, "destroy without explicitly_destroy")
    c.raises(lambda: deep_ep.Buffer(dist.group.WORLD, enable_shrink=True), EPError, "enable_shrink is refused")


def run_all(rank: int, world: int, device: str, seed: int, suites=("static", "normal", "ll")) -> Checker:
    c = Checker(rank, world, device, seed)
    random.seed(seed)
    torch.manual_seed(seed + rank)
    t0 = time.monotonic()
    buf = deep_ep.Buffer(dist.group.WORLD, int(1e9), 0, low_latency_mode=True, timeout_s=60.0)
    if "static" in suites:
        static_suite(c, buf)
    if "normal" in suites:
        normal_suite(c, buf)
    if "ll" in suites:
        ll_suite(c, buf)
    b2 = deep_ep.Buffer(dist.group.WORLD, explicitly_destroy=True, lanes_per_shape=1, num_max_tokens_per_rank=8)
    normal_case(c, b2, 128, 2, 2, "uniform", 4, tag="second Buffer")
    micro_batches(c, b2, 128, 2, 2, order=(0, 1))
    b2.destroy()
    if "ll" in suites and device == "cpu":
        ll_slab_overflow(c)
    c.elapsed = time.monotonic() - t0
    return c


def print_summary(results, ok_line: str) -> bool:
    """Rank 0's summary of every rank's (passed, failures): the failures (20 per rank), one count line per rank (the
    one-GPU rig's summary reads them), and `ok_line` when none failed. Returns whether any rank failed."""
    bad = False
    for r, (passed, failures) in enumerate(results):
        for f in failures[:20]:
            print(f"FAIL rank {r}: {f}")
        bad |= bool(failures)
        print(f"rank {r}: {passed} checks passed, {len(failures)} failed")
    if not bad:
        print(ok_line)
    return bad
