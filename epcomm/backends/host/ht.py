"""Mode "ht" of the host backend: a token crosses once per destination rank, with its top-k ids; the receiver
expands it into its local experts. Combine in two steps: the token's rank sends the weights of the tokens it sent
(step 1); each expert rank reduces the rows of a token that live on it in fp32, weighted, and sends one bf16 row per
(token, rank) back (step 2); the token's rank sums those in fp32.

Message = token bytes | token id int32 | top-k ids int32[K], at [src rank][M] of the destination's DISP region.
"""
from __future__ import annotations

import numpy as np

from ...errors import EPError
from ...formats import BF16
from .steps import Received, in_order, refused
from .window import COUNT_MASK, REJECTED


def send_dispatch(be, r: int, payload: np.ndarray, ids: np.ndarray, dests, mark: int = 0) -> list[np.ndarray]:
    """Returns the tokens sent to each rank, in message order (combine sends their weights back in that order).
    mark: REJECTED when this rank refused its input (it then sends no tokens)."""
    win, K, tb, s = be.win, be.K, be.tb, be.rank
    dest_of = np.where(ids >= 0, ids // be.L, -1)
    sent = []
    for d in range(be.R):
        tok = np.nonzero((dest_of == d).any(axis=1))[0].astype(np.int32)
        sent.append(tok)
        if d not in dests or not len(tok):
            continue
        msgs = np.zeros((len(tok), be.msg), np.uint8)
        msgs[:, :tb] = payload[tok]
        msgs[:, tb:tb + 4] = tok.view(np.uint8).reshape(-1, 4)
        msgs[:, tb + 4:tb + 4 + 4 * K] = ids[tok].view(np.uint8).reshape(-1, 4 * K)
        win.put(msgs, d, win.region(r, "disp") + s * win.slots * be.msg)
    win.flush()
    for d in dests:
        win.signal(d, win.sig_off(r, "disp", s * be.L), r, [len(sent[d]) | mark])
    win.flush()
    return sent


def receive_dispatch(be, r: int) -> Received:
    win, K, L, M, tb, me = be.win, be.K, be.L, be.M, be.tb, be.rank
    raw = win.wait(r, "disp", [s * L for s in range(be.R)], list(range(be.R)), "dispatch tokens")
    counts = raw & COUNT_MASK
    blocks, srcs, mids = [], [], []
    for s in range(be.R):
        n = int(counts[s])
        if n > M:
            raise EPError(f"protocol error: {be.ctx.describe(s)} announced {n} tokens > {M}")
        base = win.region(r, "disp") + s * win.slots * be.msg
        blocks.append(win.read(base, n * be.msg).reshape(n, be.msg))
        srcs.append(np.full(n, s, np.int32))
        mids.append(np.arange(n, dtype=np.int32))
    msgs = np.concatenate(blocks)
    msrc, mmid = np.concatenate(srcs), np.concatenate(mids)
    mtok = msgs[:, tb:tb + 4].copy().view(np.int32).reshape(-1)
    mids_ = msgs[:, tb + 4:tb + 4 + 4 * K].copy().view(np.int32).reshape(-1, K)
    local = mids_ - me * L
    m_i, k_i = np.nonzero((mids_ >= 0) & (local >= 0) & (local < L))
    l_i, m_i, k_i = in_order(local[m_i, k_i], m_i, k_i)
    return Received(local=l_i, src=msrc[m_i], tok=mtok[m_i], slot=k_i.astype(np.int32), rows=msgs[m_i, :tb],
                    msg=mmid[m_i], src_msgs=counts.astype(np.int64),
                    rejected=tuple(int(s) for s in np.nonzero(raw & REJECTED)[0]))


def send_combine(be, r: int, h, expert_y: np.ndarray, w: np.ndarray) -> None:
    """Step 1: the weights of the tokens sent to each rank."""
    win, me = be.win, be.rank
    for d, tok in enumerate(h.sent_tokens):
        if len(tok):
            win.put(w[tok], d, win.region(r, "cw") + me * be.M * be.K * 4)
    win.flush()
    for d, tok in enumerate(h.sent_tokens):
        win.signal(d, win.sig_off(r, "cw", me), r, [len(tok)])
    win.flush()


def send_combine_rejected(be, r: int) -> None:
    """This rank will not combine round r: both steps' signals carry the REJECTED mark, without data."""
    win, me = be.win, be.rank
    for d in range(be.R):
        win.signal(d, win.sig_off(r, "cw", me), r, [REJECTED])
        win.signal(d, win.sig_off(r, "comb", me), r, [REJECTED])
    win.flush()


def receive_combine(be, r: int, h, routed: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """Step 2: weights in, reduce this rank's rows per (source, token), send one row per (token, rank); then add
    the rows that came back into y."""
    win, me, K, H = be.win, be.rank, be.K, be.H
    raw = win.wait(r, "cw", list(range(be.R)), list(range(be.R)), "combine weights")
    silent = (raw & REJECTED) != 0        # sources that will not combine: no weights, no rows back
    counts = raw & COUNT_MASK
    base = np.concatenate([[0], np.cumsum(h.src_msgs)]).astype(np.int64)
    wts = []
    for s in range(be.R):
        n = int(counts[s])
        if silent[s]:
            wts.append(np.zeros((int(h.src_msgs[s]), K), np.float32))
            continue
        if n != h.src_msgs[s]:
            raise EPError(f"protocol error: {be.ctx.describe(s)} sent weights for {n} tokens, "
                          f"dispatch delivered {int(h.src_msgs[s])}")
        o = win.region(r, "cw") + s * be.M * K * 4
        wts.append(win.read(o, n * K * 4).view(np.float32).reshape(n, K))
    wall = np.concatenate(wts) if wts else np.zeros((0, K), np.float32)
    g = base[h.row_src] + h.row_msg
    contrib = routed.astype(np.float32) * wall[g, h.row_k][:, None]
    partial = np.zeros((int(base[-1]), H), np.float32)
    if len(g):
        o = np.argsort(g, kind="stable")
        gs = g[o]
        starts = np.concatenate([[0], np.nonzero(np.diff(gs))[0] + 1])
        partial[gs[starts]] = np.add.reduceat(contrib[o], starts, axis=0)
    partial = partial.astype(BF16)
    be.maybe_slow(r)
    for s in range(be.R):
        if h.src_msgs[s] and not silent[s]:
            win.put(partial[base[s]:base[s + 1]], s, win.region(r, "comb") + me * be.M * H * 2)
    win.flush()
    for s in range(be.R):
        win.signal(s, win.sig_off(r, "comb", me), r, [0 if silent[s] else h.src_msgs[s]])
    win.flush()
    raw = win.wait(r, "comb", list(range(be.R)), list(range(be.R)), "combine rows")
    counts = raw & COUNT_MASK
    gone = [d for d, tok in enumerate(h.sent_tokens) if raw[d] & REJECTED and len(tok)]
    if gone:
        raise refused(be, gone, r, h, len(h.sent_tokens[gone[0]]))
    for d, tok in enumerate(h.sent_tokens):
        if raw[d] & REJECTED:
            continue                      # it refused, but none of this rank's tokens needed it
        if int(counts[d]) != len(tok):
            raise EPError(f"protocol error: {be.ctx.describe(d)} returned {int(counts[d])} rows, "
                          f"expected {len(tok)}")
        if len(tok):
            o = win.region(r, "comb") + d * be.M * H * 2
            y[tok] += win.read(o, len(tok) * H * 2).view(BF16).reshape(-1, H).astype(np.float32)
