"""Host backend: expert-parallel dispatch / combine on numpy over MPI one-sided windows.

The same protocol as the GPU kernels, with MPI RMA in place of NVSHMEM:

* One window per EPBuffer (``MPI.Win.Allocate``, collective), locked once with ``Lock_all`` (passive target).
  A send is ``Put`` of the data, ``Flush`` (remote completion), then a signal word written with
  ``Accumulate(REPLACE)`` (atomic) and ``Flush``. The receiver polls its own window (``Win.Sync()`` + load) until
  every signal it needs shows the current round, sleeping with a growing backoff (so 16 ranks oversubscribed on
  2 cores still progress), with a deadline of cfg.timeout_s per wait.
* Signal word = (round + 1) << 32 | count. The round tag makes stale words from earlier rounds harmless, so
  nothing is ever reset.
* Two buffer sets alternate by round parity (round = dispatch number of this buffer; a combine uses the round of
  the dispatch whose handle it gets).

Window layout (bytes), per parity set:
    DISP  ht: [src rank][M] messages       = token bytes | token id int32 | top-k ids int32[K]
          ll: [src rank][local expert][M]  = token bytes | token id int32 | slot flags uint8[K]
    CW    ht only: [src rank][M][K] fp32 top-k weights of the tokens src sent here (combine step 1)
    COMB  ht: [expert rank][M] bf16 rows: the weighted fp32 sum of a token's rows on that rank, one per (token, rank)
          ll: [M * K] bf16 rows, slot t*K + k: the expert row of (token t, top-k slot k)
    SIG   int64 words: DISP [src][local expert] (ht uses [src][0]), CW [src], COMB [src]
then, once: ABORT flags int64[R] and reasons bytes[R][256].

Modes. ht sends a token once per destination rank with its top-k ids; the receiver expands it into its local
experts. Its combine sends the weights to the expert ranks (step 1), each expert rank reduces the rows of a token
that live on it in fp32 (weighted) and sends one bf16 row per (token, rank) back (step 2); the token's rank sums them
in fp32. ll writes one message per (token, local expert) into fixed per-(expert, source) slots (a token that picks
the same expert twice sends one message flagging both slots); its combine sends one row per (token, slot) to fixed
slots, and the token's rank does the whole weighted sum. skip_a2a never communicates.

Why 100 back-to-back rounds need no barrier (buffer reuse argument). Every phase is all-to-all: each rank signals
every peer (count 0 when it has nothing), and a rank starts a new operation only after it finished reading all
data of its earlier operations (a new dispatch_async / combine_async first completes anything outstanding).
A rank S writes data of round r+2 into rank D's parity set p = r % 2 only after S's dispatch of round r+1 saw D's
round r+1 dispatch signal (S's dispatch r+2 starts after its dispatch r+1 completed), and D sent that signal only
after D finished reading everything of round r (its dispatch r and, if called, combine r). For combine regions the
chain is one step shorter: S writes combine r+2 data after S's dispatch r+2 saw D's round r+2 signal, which D sends
after finishing combine r (and r+1). Signal words of round r are overwritten only by round r+2 signals, which by the
same chain come after D consumed the round r word. Put + Flush before the signal's Accumulate + Flush makes data
visible before its signal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...errors import EPError, EPTimeoutError
from ...formats import BF16
from ...results import DispatchResult
from . import faults as _faults

REASON_BYTES = 256
_ALIGN = 64


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class HostHandle:
    """What combine needs (backend-private)."""
    round: int
    num_tokens: int
    topk_ids: np.ndarray                  # this rank's ids [T, K] (copy)
    n_shared: int                         # shared rows at the top of expert_x
    shared_tokens: np.ndarray             # their token ids
    row_src: np.ndarray                   # routed rows: source rank
    row_tok: np.ndarray                   # routed rows: source token
    row_k: np.ndarray                     # routed rows: top-k slot
    row_msg: np.ndarray | None = None     # ht: message index of the row within its source's block
    src_msgs: np.ndarray | None = None    # ht: messages received from each source
    sent_tokens: list | None = None       # ht: tokens this rank sent to each destination (message order)


@dataclass
class _Pending:
    """A sent operation whose receive has not run (EPBuffer runs the receives in issue order, each once)."""
    kind: str                 # "dispatch" | "combine"
    round: int
    state: dict = field(default_factory=dict)


class HostBackend:
    broken: str | None = None   # set by EPBuffer after a failure: close() then skips the collective free

    def __init__(self, cfg, ctx, fault: str | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.comm = ctx.comm
        self.rank, self.R = ctx.rank, cfg.world_size
        self.M, self.K, self.H, self.L = cfg.max_tokens_per_rank, cfg.topk, cfg.hidden, cfg.n_local_experts
        self.fmt = cfg.token_format
        self.tb = cfg.token_bytes()
        self.ll = cfg.mode == "ll"
        self.faults = _faults.FaultSet(_faults.parse(fault) if fault is not None else _faults.from_env(), self.rank)
        self.round = 0
        self._keep: list = []          # origin buffers alive until the next flush
        self.win = None
        self.closed = False
        if cfg.skip_a2a:
            return                     # no communication at all
        R, M, K, H, L = self.R, self.M, self.K, self.H, self.L
        self.msg = _align(self.tb + 4 + (K if self.ll else 4 * K), 8)
        self.slots = L * M if self.ll else M                     # messages per source
        disp = R * self.slots * self.msg
        cw = 0 if self.ll else R * M * K * 4
        comb = (M * K if self.ll else R * M) * H * 2
        self.n_dsig = R * L
        sig = (self.n_dsig + 2 * R) * 8
        off = 0
        self.o_disp = off; off = _align(off + disp)
        self.o_cw = off; off = _align(off + cw)
        self.o_comb = off; off = _align(off + comb)
        self.o_sig = off; off = _align(off + sig)
        self.set_bytes = off
        self.o_abort = 2 * off
        self.o_reason = _align(self.o_abort + 8 * R)
        total = _align(self.o_reason + REASON_BYTES * R)
        from mpi4py import MPI
        self.MPI = MPI
        self.win = MPI.Win.Allocate(total, disp_unit=1, comm=self.comm)
        self.mem = np.frombuffer(self.win.tomemory(), dtype=np.uint8, count=total)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.mem[:] = 0
        self.win.Sync()
        self.comm.Barrier()            # everyone zeroed before anyone writes

    # ------------------------------------------------------------------ window helpers
    def _set(self, r: int) -> int:
        return (r & 1) * self.set_bytes

    def _sig_off(self, r: int, phase: str, word: int) -> int:
        base = self._set(r) + self.o_sig
        if phase == "disp":
            return base + 8 * word
        if phase == "cw":
            return base + 8 * (self.n_dsig + word)
        return base + 8 * (self.n_dsig + self.R + word)

    def _put(self, data: np.ndarray, dest: int, off: int) -> None:
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if data.size == 0:
            return
        self._keep.append(data)
        self.win.Put([data, self.MPI.BYTE], dest, target=(off, data.size, self.MPI.BYTE))

    def _signal(self, dest: int, off: int, r: int, counts) -> None:
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        words = (np.int64((r + 1) & 0x7FFFFFFF) << np.int64(32)) | counts
        self._keep.append(words)
        self.win.Accumulate([words, self.MPI.INT64_T], dest, target=(off, words.size, self.MPI.INT64_T),
                            op=self.MPI.REPLACE)

    def _flush(self) -> None:
        self.win.Flush_all()
        self._keep.clear()

    def _maybe_slow(self, r: int) -> None:
        f = self.faults.hit("slow", r)
        if f is not None:
            time.sleep(f.ms / 1000.0)

    def _check_abort(self) -> None:
        flags = self.mem[self.o_abort:self.o_abort + 8 * self.R].view(np.int64)
        hit = np.nonzero(flags)[0]
        hit = hit[hit != self.rank]
        if len(hit):
            s = int(hit[0])
            raw = bytes(self.mem[self.o_reason + s * REASON_BYTES:self.o_reason + (s + 1) * REASON_BYTES])
            reason = raw.rstrip(b"\0").decode("utf-8", "replace")
            raise EPError(f"{self.ctx.describe(s)} aborted: {reason}")

    def _wait(self, r: int, phase: str, words: list[int], peers: list[int], what: str) -> np.ndarray:
        """Counts carried by signal words `words` (one per peer in `peers`) once all show round r."""
        off = self._sig_off(r, phase, 0)
        n_all = self.n_dsig if phase == "disp" else self.R
        tag = (r + 1) & 0x7FFFFFFF
        idx = np.asarray(words, dtype=np.int64)
        deadline = time.monotonic() + self.cfg.timeout_s
        sleep = 0.0
        while True:
            self.win.Sync()
            vals = self.mem[off:off + 8 * n_all].view(np.int64)[idx].copy()
            ok = (vals >> 32) == tag
            if ok.all():
                return vals & 0xFFFFFFFF
            self._check_abort()
            if time.monotonic() > deadline:
                missing = [peers[i] for i in np.nonzero(~ok)[0]]
                peer = missing[0]
                if phase == "disp" and self.ll:
                    w0 = int(idx[np.nonzero(~ok)[0][0]])
                    what = f"{what} for expert {self.rank * self.L + w0 % self.L}"
                raise EPTimeoutError.peer_missing(
                    waiter=self.rank, waiter_node=self.ctx.node_of(self.rank), peer=peer,
                    node=self.ctx.node_of(peer), experts=self.cfg.experts_of(peer), what=what, round=r,
                    timeout_s=self.cfg.timeout_s, missing=missing)
            time.sleep(sleep)
            sleep = min(max(sleep * 2, 20e-6), 2e-3)

    def abort(self, reason: str) -> None:
        """Write this rank's abort word into every peer's window (best effort, never raises)."""
        if self.win is None or self.closed:
            return
        try:
            raw = str(reason).encode("utf-8", "replace")[:REASON_BYTES - 1]
            buf = np.zeros(REASON_BYTES, np.uint8)
            buf[:len(raw)] = np.frombuffer(raw, np.uint8)
            flag = np.ones(1, np.int64)
            for d in range(self.R):
                if d != self.rank:
                    self.win.Put([buf, self.MPI.BYTE], d,
                                 target=(self.o_reason + self.rank * REASON_BYTES, REASON_BYTES, self.MPI.BYTE))
            self.win.Flush_all()
            for d in range(self.R):
                if d != self.rank:
                    self.win.Accumulate([flag, self.MPI.INT64_T], d,
                                        target=(self.o_abort + 8 * self.rank, 1, self.MPI.INT64_T),
                                        op=self.MPI.REPLACE)
            self.win.Flush_all()
        except Exception:  # noqa: BLE001 - abort is best effort
            pass

    # ------------------------------------------------------------------ dispatch
    def _payload(self, x: np.ndarray) -> np.ndarray:
        """Token rows as they travel: the rows in the wire format, then their scales (if any), as bytes."""
        t = x.shape[0]
        rows, scales = self.fmt.quantize(x)
        parts = [np.ascontiguousarray(rows).view(np.uint8).reshape(t, self.fmt.element_bytes * self.H)]
        if scales is not None:
            parts.append(scales.view(np.uint8).reshape(t, 4 * self.fmt.scale_cols(self.H)))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def dispatch(self, x, topk_ids) -> DispatchResult:
        return self.dispatch_wait(self.dispatch_async(x, topk_ids))

    def dispatch_async(self, x, topk_ids) -> _Pending:
        r = self.round
        self.round += 1
        x = np.ascontiguousarray(x)
        ids = np.ascontiguousarray(topk_ids, dtype=np.int32)
        payload = self._payload(x)
        if self.faults.hit("corrupt", r) is not None and len(payload):
            payload = payload.copy()
            payload[:, 1] ^= 0x40  # exponent bits of the first channel (bf16) / a value byte (fp8)
        p = _Pending("dispatch", r, {"payload": payload, "ids": ids})
        if not self.cfg.skip_a2a:
            self._maybe_slow(r)
            skip = self.faults.hit("skip_dispatch", r) is not None
            dests = [self.rank] if skip else range(self.R)
            (self._send_ll if self.ll else self._send_ht)(p, r, payload, ids, dests)
        return p

    def _send_ht(self, p, r, payload, ids, dests) -> None:
        K, tb, s = self.K, self.tb, self.rank
        dest_of = np.where(ids >= 0, ids // self.L, -1)
        sent = []
        for d in range(self.R):
            tok = np.nonzero((dest_of == d).any(axis=1))[0].astype(np.int32)
            sent.append(tok)
            if d not in dests or not len(tok):
                continue
            msgs = np.zeros((len(tok), self.msg), np.uint8)
            msgs[:, :tb] = payload[tok]
            msgs[:, tb:tb + 4] = tok.view(np.uint8).reshape(-1, 4)
            msgs[:, tb + 4:tb + 4 + 4 * K] = ids[tok].view(np.uint8).reshape(-1, 4 * K)
            self._put(msgs, d, self._set(r) + self.o_disp + s * self.slots * self.msg)
        self._flush()
        for d in dests:
            self._signal(d, self._sig_off(r, "disp", s * self.L), r, [len(sent[d])])
        self._flush()
        p.state["sent"] = sent

    def _send_ll(self, p, r, payload, ids, dests) -> None:
        K, L, M, E, tb, s = self.K, self.L, self.M, self.cfg.num_experts, self.tb, self.rank
        t_idx, k_idx = np.nonzero(ids >= 0)
        keys = t_idx.astype(np.int64) * E + ids[t_idx, k_idx]
        uniq, inv = np.unique(keys, return_inverse=True)       # one message per (token, expert), by token
        ut, ue = (uniq // E).astype(np.int32), (uniq % E).astype(np.int64)
        order = np.argsort(ue, kind="stable")                   # by expert, then token
        flags = np.zeros((len(uniq), K), np.uint8)
        flags[inv.reshape(-1), k_idx] = 1
        msgs = np.zeros((len(uniq), self.msg), np.uint8)
        msgs[:, :tb] = payload[ut[order]]
        msgs[:, tb:tb + 4] = ut[order].view(np.uint8).reshape(-1, 4)
        msgs[:, tb + 4:tb + 4 + K] = flags[order]
        counts = np.bincount(ue, minlength=E).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for d in dests:
            for l in range(L):
                e = d * L + l
                if counts[e]:
                    self._put(msgs[starts[e]:starts[e + 1]], d,
                              self._set(r) + self.o_disp + ((s * L + l) * M) * self.msg)
        self._flush()
        for d in dests:
            self._signal(d, self._sig_off(r, "disp", s * L), r, counts[d * L:(d + 1) * L])
        self._flush()

    def dispatch_wait(self, pending: _Pending) -> DispatchResult:
        cfg, r, me = self.cfg, pending.round, self.rank
        K, L, M, tb = self.K, self.L, self.M, self.tb
        payload, ids, sent = pending.state["payload"], pending.state["ids"], pending.state.get("sent")
        pending.state = {}
        T = ids.shape[0]
        row_msg = src_msgs = None
        if cfg.skip_a2a:
            local = ids - me * L
            t_i, k_i = np.nonzero((ids >= 0) & (local >= 0) & (local < L))
            l_i = local[t_i, k_i]
            o = np.argsort(l_i, kind="stable")
            l_i, row_tok, row_k = l_i[o], t_i[o].astype(np.int32), k_i[o].astype(np.int32)
            row_src = np.full(len(o), me, np.int32)
            rows = payload[row_tok]
        elif not self.ll:
            counts = self._wait(r, "disp", [s * L for s in range(self.R)], list(range(self.R)), "dispatch tokens")
            blocks, srcs, mids = [], [], []
            for s in range(self.R):
                n = int(counts[s])
                if n > M:
                    raise EPError(f"protocol error: {self.ctx.describe(s)} announced {n} tokens > {M}")
                base = self._set(r) + self.o_disp + s * self.slots * self.msg
                blocks.append(self.mem[base:base + n * self.msg].reshape(n, self.msg).copy())
                srcs.append(np.full(n, s, np.int32))
                mids.append(np.arange(n, dtype=np.int32))
            msgs = np.concatenate(blocks)
            msrc, mmid = np.concatenate(srcs), np.concatenate(mids)
            mtok = msgs[:, tb:tb + 4].copy().view(np.int32).reshape(-1)
            mids_ = msgs[:, tb + 4:tb + 4 + 4 * K].copy().view(np.int32).reshape(-1, K)
            local = mids_ - me * L
            m_i, k_i = np.nonzero((mids_ >= 0) & (local >= 0) & (local < L))
            l_i = local[m_i, k_i]
            o = np.argsort(l_i, kind="stable")
            l_i, m_i, row_k = l_i[o], m_i[o], k_i[o].astype(np.int32)
            row_src, row_tok, row_msg = msrc[m_i], mtok[m_i], mmid[m_i]
            rows = msgs[m_i, :tb]
            src_msgs = counts.astype(np.int64)
        else:
            counts = self._wait(r, "disp", list(range(self.R * L)), [w // L for w in range(self.R * L)],
                                "dispatch tokens").reshape(self.R, L)
            blocks, srcs, ls = [], [], []
            for l in range(L):
                for s in range(self.R):
                    n = int(counts[s, l])
                    if n > M:
                        raise EPError(f"protocol error: {self.ctx.describe(s)} announced {n} tokens > {M}")
                    base = self._set(r) + self.o_disp + ((s * L + l) * M) * self.msg
                    blocks.append(self.mem[base:base + n * self.msg].reshape(n, self.msg).copy())
                    srcs.append(np.full(n, s, np.int32))
                    ls.append(np.full(n, l, np.int64))
            msgs = np.concatenate(blocks)
            msrc, ml = np.concatenate(srcs), np.concatenate(ls)
            mtok = msgs[:, tb:tb + 4].copy().view(np.int32).reshape(-1)
            m_i, k_i = np.nonzero(msgs[:, tb + 4:tb + 4 + K])     # (l, src, token) order, then slot
            l_i, row_src, row_tok, row_k = ml[m_i], msrc[m_i], mtok[m_i], k_i.astype(np.int32)
            rows = msgs[m_i, :tb]

        # shared expert rows first (group 0), then routed groups
        share = np.arange(T, dtype=np.int32)[cfg.shared_share(me, T).start:cfg.shared_share(me, T).stop] \
            if cfg.fused_shared_expert else np.zeros(0, np.int32)
        n_sh = len(share)
        n_rows = n_sh + len(row_tok)
        routed_counts = np.bincount(l_i, minlength=L).astype(np.int64) if len(l_i) else np.zeros(L, np.int64)
        group_counts = np.concatenate([[n_sh], routed_counts]) if cfg.fused_shared_expert else routed_counts
        row_offsets = np.concatenate([[0], np.cumsum(group_counts)]).astype(np.uint32)
        mr = cfg.max_recv_rows
        src_info = np.full((mr, 3), -1, np.int32)
        src_info[:n_sh, 0], src_info[:n_sh, 1] = me, share
        src_info[n_sh:n_rows] = np.stack([row_src, row_tok, row_k], axis=1)
        allrows = np.concatenate([payload[share], rows]) if n_sh else rows
        row_bytes = self.fmt.element_bytes * self.H
        expert_x = np.zeros((mr, self.H), self.fmt.dtype)
        expert_x.view(np.uint8)[:n_rows] = allrows[:, :row_bytes]
        scales = None
        if self.fmt.quantized:
            scales = np.zeros(self.fmt.scale_shape(mr, self.H), np.float32)
            scales.view(np.uint8)[:n_rows] = allrows[:, row_bytes:tb]
        expert_ids = np.array(([-1] if cfg.fused_shared_expert else []) + [me * L + l for l in range(L)],
                              dtype=np.int32)
        handle = HostHandle(round=r, num_tokens=T, topk_ids=ids, n_shared=n_sh, shared_tokens=share,
                            row_src=row_src.astype(np.int32), row_tok=row_tok.astype(np.int32), row_k=row_k,
                            row_msg=row_msg, src_msgs=src_msgs, sent_tokens=sent)
        return DispatchResult(expert_x=expert_x, expert_scales=scales, row_offsets=row_offsets,
                              expert_ids=expert_ids, src_info=src_info,
                              tokens_per_expert=routed_counts.astype(np.int32), handle=handle)

    # ------------------------------------------------------------------ combine
    def combine(self, expert_y, handle, topk_weights):
        return self.combine_wait(self.combine_async(expert_y, handle, topk_weights))

    def combine_async(self, expert_y, handle: HostHandle, topk_weights) -> _Pending:
        r, me, K = handle.round, self.rank, self.K
        ey = np.asarray(expert_y)
        w = np.ascontiguousarray(topk_weights, dtype=np.float32)
        p = _Pending("combine", r, {"ey": ey, "w": w, "h": handle})
        if not self.cfg.skip_a2a:
            self._maybe_slow(r)
            if not self.ll:            # step 1: the weights of the tokens sent to each rank
                for d, tok in enumerate(handle.sent_tokens):
                    if len(tok):
                        self._put(w[tok], d, self._set(r) + self.o_cw + me * self.M * K * 4)
                self._flush()
                for d, tok in enumerate(handle.sent_tokens):
                    self._signal(d, self._sig_off(r, "cw", me), r, [len(tok)])
                self._flush()
            else:                      # one row per (token, slot) into fixed slots on the token's rank
                n_sh = handle.n_shared
                rows = ey[n_sh:n_sh + len(handle.row_tok)].view(np.uint16)
                slot = handle.row_tok.astype(np.int64) * K + handle.row_k
                counts = np.bincount(handle.row_src, minlength=self.R) if len(slot) else np.zeros(self.R, int)
                for s in range(self.R):
                    sel = np.nonzero(handle.row_src == s)[0]
                    if not len(sel):
                        continue
                    sl = slot[sel]
                    o = np.argsort(sl, kind="stable")
                    sl, data = sl[o], rows[sel[o]]
                    brk = np.nonzero(np.diff(sl) != 1)[0] + 1      # runs of consecutive slots: one Put each
                    starts = np.concatenate([[0], brk])
                    ends = np.concatenate([brk, [len(sl)]])
                    for a, b in zip(starts, ends):
                        self._put(data[a:b], s, self._set(r) + self.o_comb + int(sl[a]) * self.H * 2)
                self._flush()
                for s in range(self.R):
                    self._signal(s, self._sig_off(r, "comb", me), r, [counts[s]])
                self._flush()
        return p

    def combine_wait(self, pending: _Pending):
        cfg, r, me, K, H = self.cfg, pending.round, self.rank, self.K, self.H
        ey, w, h = pending.state["ey"], pending.state["w"], pending.state["h"]
        pending.state = {}
        T = h.num_tokens
        y = np.zeros((T, H), np.float32)
        n_sh = h.n_shared
        if n_sh:
            y[h.shared_tokens] += ey[:n_sh].astype(np.float32)
        routed = ey[n_sh:n_sh + len(h.row_tok)]
        if cfg.skip_a2a:
            dense = np.zeros((T * K, H), np.float32)
            slot = h.row_tok.astype(np.int64) * K + h.row_k
            dense[slot] = routed.astype(np.float32) * w[h.row_tok, h.row_k][:, None]
            y += dense.reshape(T, K, H).sum(axis=1)
        elif not self.ll:
            # step 2: weights in, reduce this rank's rows per (source, token), send one row per (token, rank)
            counts = self._wait(r, "cw", list(range(self.R)), list(range(self.R)), "combine weights")
            base = np.concatenate([[0], np.cumsum(h.src_msgs)]).astype(np.int64)
            wts = []
            for s in range(self.R):
                n = int(counts[s])
                if n != h.src_msgs[s]:
                    raise EPError(f"protocol error: {self.ctx.describe(s)} sent weights for {n} tokens, "
                                  f"dispatch delivered {int(h.src_msgs[s])}")
                o = self._set(r) + self.o_cw + s * self.M * K * 4
                wts.append(self.mem[o:o + n * K * 4].copy().view(np.float32).reshape(n, K))
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
            self._maybe_slow(r)
            for s in range(self.R):
                if h.src_msgs[s]:
                    self._put(partial[base[s]:base[s + 1]], s, self._set(r) + self.o_comb + me * self.M * H * 2)
            self._flush()
            for s in range(self.R):
                self._signal(s, self._sig_off(r, "comb", me), r, [h.src_msgs[s]])
            self._flush()
            counts = self._wait(r, "comb", list(range(self.R)), list(range(self.R)), "combine rows")
            for d, tok in enumerate(h.sent_tokens):
                if int(counts[d]) != len(tok):
                    raise EPError(f"protocol error: {self.ctx.describe(d)} returned {int(counts[d])} rows, "
                                  f"expected {len(tok)}")
                if len(tok):
                    o = self._set(r) + self.o_comb + d * self.M * H * 2
                    y[tok] += self.mem[o:o + len(tok) * H * 2].copy().view(BF16).reshape(-1, H).astype(np.float32)
        else:
            counts = self._wait(r, "comb", list(range(self.R)), list(range(self.R)), "combine rows")
            ids = h.topk_ids
            valid = ids >= 0
            expect = np.bincount(ids[valid] // self.L, minlength=self.R)
            for d in range(self.R):
                if int(counts[d]) != int(expect[d]):
                    raise EPError(f"protocol error: {self.ctx.describe(d)} returned {int(counts[d])} rows, "
                                  f"expected {int(expect[d])}")
            o = self._set(r) + self.o_comb
            rows = self.mem[o:o + T * K * H * 2].copy().view(BF16).reshape(T, K, H).astype(np.float32)
            wv = np.where(valid, w, np.float32(0))[:, :, None]
            y += np.where(valid[:, :, None], rows * wv, np.float32(0)).sum(axis=1)
        return y.astype(BF16)

    # ------------------------------------------------------------------ lifecycle
    def synchronize(self) -> None:
        """Nothing to wait for: every call finished its MPI operations before returning."""

    def raise_pending(self) -> None:
        """Errors are raised by the calls themselves: nothing is ever recorded for later."""

    @property
    def sms_used(self) -> None:
        return None

    def close(self) -> None:
        """Collective (frees the window) unless the buffer failed (broken); then only local state is dropped."""
        if self.closed:
            return
        self.closed = True
        if self.win is not None:
            if self.broken is None:
                self.win.Unlock_all()
                self.win.Free()
            self.win = None
            self.mem = None
