"""Mode "ll" of the host backend: one message per (token, local expert) into fixed per-(expert, source) slots (a
token that picks the same expert twice sends one message flagging both slots); combine sends one row per (token,
slot) into fixed slots on the token's rank, which does the whole weighted sum.

Message = token bytes | token id int32 | slot flags uint8[K], at [src rank][local expert][M] of the destination's
DISP region; combine rows at slot t * K + k of the token's rank's COMB region.
"""
from __future__ import annotations

import numpy as np

from ...errors import EPError
from ...formats import BF16
from .steps import Received, lost, refused
from .window import COUNT_MASK, REJECTED


def send_dispatch(be, r: int, payload: np.ndarray, ids: np.ndarray, dests, mark: int = 0) -> None:
    """mark: REJECTED when this rank refused its input (it then sends no tokens)."""
    win, K, L, M, E, tb, s = be.win, be.K, be.L, be.M, be.cfg.num_experts, be.tb, be.rank
    t_idx, k_idx = np.nonzero(ids >= 0)
    keys = t_idx.astype(np.int64) * E + ids[t_idx, k_idx]
    uniq, inv = np.unique(keys, return_inverse=True)       # one message per (token, expert), by token
    ut, ue = (uniq // E).astype(np.int32), (uniq % E).astype(np.int64)
    order = np.argsort(ue, kind="stable")                   # by expert, then token
    flags = np.zeros((len(uniq), K), np.uint8)
    flags[inv.reshape(-1), k_idx] = 1
    msgs = np.zeros((len(uniq), be.msg), np.uint8)
    msgs[:, :tb] = payload[ut[order]]
    msgs[:, tb:tb + 4] = ut[order].view(np.uint8).reshape(-1, 4)
    msgs[:, tb + 4:tb + 4 + K] = flags[order]
    counts = np.bincount(ue, minlength=E).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for d in dests:
        for le in range(L):
            e = d * L + le
            if counts[e]:
                win.put(msgs[starts[e]:starts[e + 1]], d, win.region(r, "disp") + ((s * L + le) * M) * be.msg)
    win.flush()
    for d in dests:
        win.signal(d, win.sig_off(r, "disp", s * L), r, counts[d * L:(d + 1) * L] | mark)
    win.flush()


def receive_dispatch(be, r: int) -> Received:
    win, K, L, M, tb, R = be.win, be.K, be.L, be.M, be.tb, be.R
    raw = win.wait(r, "disp", list(range(R * L)), [w // L for w in range(R * L)],
                   "dispatch tokens").reshape(R, L)
    counts = raw & COUNT_MASK
    blocks, srcs, ls = [], [], []
    for le in range(L):
        for s in range(R):
            n = int(counts[s, le])
            if n > M:
                raise EPError(f"protocol error: {be.ctx.describe(s)} announced {n} tokens > {M}")
            base = win.region(r, "disp") + ((s * L + le) * M) * be.msg
            blocks.append(win.read(base, n * be.msg).reshape(n, be.msg))
            srcs.append(np.full(n, s, np.int32))
            ls.append(np.full(n, le, np.int64))
    msgs = np.concatenate(blocks)
    msrc, ml = np.concatenate(srcs), np.concatenate(ls)
    mtok = msgs[:, tb:tb + 4].copy().view(np.int32).reshape(-1)
    m_i, k_i = np.nonzero(msgs[:, tb + 4:tb + 4 + K])     # (le, src, token) order, then slot
    return Received(local=ml[m_i], src=msrc[m_i], tok=mtok[m_i], slot=k_i.astype(np.int32), rows=msgs[m_i, :tb],
                    rejected=tuple(int(s) for s in np.nonzero((raw & REJECTED).any(axis=1))[0]))


def send_combine(be, r: int, h, expert_y: np.ndarray, w: np.ndarray) -> None:
    """One row per (token, slot) into fixed slots on the token's rank."""
    win, me, K = be.win, be.rank, be.K
    n_sh = h.n_shared
    rows = expert_y[n_sh:n_sh + len(h.row_tok)].view(np.uint16)
    slot = h.row_tok.astype(np.int64) * K + h.row_k
    counts = np.bincount(h.row_src, minlength=be.R) if len(slot) else np.zeros(be.R, int)
    live = be.live_peers()
    for s in live:
        sel = np.nonzero(h.row_src == s)[0]
        if not len(sel):
            continue
        sl = slot[sel]
        o = np.argsort(sl, kind="stable")
        sl, data = sl[o], rows[sel[o]]
        brk = np.nonzero(np.diff(sl) != 1)[0] + 1      # runs of consecutive slots: one Put each
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [len(sl)]])
        for a, b in zip(starts, ends):
            win.put(data[a:b], s, win.region(r, "comb") + int(sl[a]) * be.H * 2)
    win.flush()
    for s in live:
        win.signal(s, win.sig_off(r, "comb", me), r, [counts[s]])
    win.flush()


def send_combine_rejected(be, r: int) -> None:
    """This rank will not combine round r: its combine signal carries the REJECTED mark, without rows."""
    win, me = be.win, be.rank
    for d in be.live_peers():
        win.signal(d, win.sig_off(r, "comb", me), r, [REJECTED])
    win.flush()


def receive_combine(be, r: int, h, routed: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """Every (token, slot) row of this rank's tokens, weighted and summed into y."""
    win, K, H, T = be.win, be.K, be.H, h.num_tokens
    raw = win.wait(r, "comb", list(range(be.R)), list(range(be.R)), "combine rows")
    counts = raw & COUNT_MASK
    ids = h.topk_ids
    valid = ids >= 0
    expect = np.bincount(ids[valid] // be.L, minlength=be.R)
    dead = [d for d in range(be.R) if d in win.masked and expect[d]]
    if dead:                              # every send of this round is done: raising strands no live peer
        dest = np.where(valid, ids // be.L, -1)
        raise lost(be, dead, r, int((dest == dead[0]).any(axis=1).sum()))
    gone = [d for d in range(be.R) if raw[d] & REJECTED and expect[d]]
    if gone:
        dest = np.where(valid, ids // be.L, -1)
        raise refused(be, gone, r, h, int((dest == gone[0]).any(axis=1).sum()))
    for d in range(be.R):
        if raw[d] & REJECTED:
            continue                      # it refused, but none of this rank's tokens needed it
        if int(counts[d]) != int(expect[d]):
            raise EPError(f"protocol error: {be.ctx.describe(d)} returned {int(counts[d])} rows, "
                          f"expected {int(expect[d])}")
    rows = win.read(win.region(r, "comb"), T * K * H * 2).view(BF16).reshape(T, K, H).astype(np.float32)
    wv = np.where(valid, w, np.float32(0))[:, :, None]
    y += np.where(valid[:, :, None], rows * wv, np.float32(0)).sum(axis=1)
