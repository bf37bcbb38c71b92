"""Host backend: expert-parallel dispatch / combine on numpy over MPI one-sided windows.

The same protocol as the GPU kernels, with MPI RMA in place of NVSHMEM. This file: the calls, the parts both modes
share (the payload, expert_x assembly, skip_a2a, the fused shared expert), and the buffer-reuse argument.
window.py: the window's layout and the RMA primitives (put, signal, wait with a deadline, abort). ht.py and ll.py:
the two modes' send and receive steps.

* One window per EPBuffer (``MPI.Win.Allocate``, collective), locked once with ``Lock_all`` (passive target).
  A send is ``Put`` of the data, ``Flush`` (remote completion), then a signal word written with
  ``Accumulate(REPLACE)`` (atomic) and ``Flush``. The receiver polls its own window until every signal it needs
  shows the current round, with a deadline of cfg.timeout_s per wait.
* Two buffer sets alternate by round parity (round = dispatch number of this buffer; a combine uses the round of
  the dispatch whose handle it gets). skip_a2a never communicates.
* Receive capacity (EPConfig.recv_rows). Every sender puts its routed rows to every rank into every peer's ROWS
  region before its dispatch signals, so a receiver that has all signals sees the whole [source][rank] matrix, and
  every rank reaches the same verdict: a round in which some rank would receive more rows than the capacity raises
  EPCapacityError on every rank before any output is assembled (skip_a2a: the rank itself only). Nothing is written
  past the capacity, and the next round is unaffected (signals are round-tagged; nothing needs resetting).

Why 100 back-to-back rounds need no barrier (buffer reuse argument). Every phase is all-to-all: each rank signals
every peer (count 0 when it has nothing), and a rank starts a new operation only after it finished reading all
data of its earlier operations (EPBuffer completes anything outstanding before a new dispatch_async /
combine_async). A rank S writes data of round r+2 into rank D's parity set p = r % 2 only after S's dispatch of
round r+1 saw D's round r+1 dispatch signal (S's dispatch r+2 starts after its dispatch r+1 completed), and D sent
that signal only after D finished reading everything of round r (its dispatch r and, if called, combine r). For
combine regions the chain is one step shorter: S writes combine r+2 data after S's dispatch r+2 saw D's round r+2
signal, which D sends after finishing combine r (and r+1). Signal words of round r are overwritten only by round
r+2 signals, which by the same chain come after D consumed the round r word. Put + Flush before the signal's
Accumulate + Flush makes data visible before its signal.

Fencing (EPBuffer(fence_dead_ranks=True), docs/FAILURES.md): the argument above holds among the live ranks, since
every phase stays all-to-all among them. A masked rank gets no sends (its top-k slots are set to -1 before the
send and reported as DispatchResult.dropped) and no waits (window.py); a rank masked while this rank's tokens of
a round were on its experts makes that round's combine raise EPRankLostError, after this rank's sends of the round
are done, so no live peer waits for it.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from ...errors import EPCapacityError
from ... import layouts
from ...formats import BF16
from ...results import DispatchResult
from . import faults as _faults
from . import ht, ll
from .steps import Received, in_order
from .window import REJECTED, Window


@dataclass
class HostHandle:
    """What combine needs (backend-private)."""
    round: int
    num_tokens: int
    topk_ids: np.ndarray                  # this rank's ids [T, K] (copy)
    n_shared: int                         # shared rows at the top of expert_x
    shared_tokens: np.ndarray             # their token ids
    group_counts: np.ndarray              # rows per output group (where combine finds them: epcomm.layouts)
    row_src: np.ndarray                   # routed rows: source rank
    row_tok: np.ndarray                   # routed rows: source token
    row_k: np.ndarray                     # routed rows: top-k slot
    row_msg: np.ndarray | None = None     # ht: message index of the row within its source's block
    src_msgs: np.ndarray | None = None    # ht: messages received from each source
    sent_tokens: list | None = None       # ht: tokens this rank sent to each destination (message order)
    rejected: tuple = ()                  # ranks that refused their dispatch input in this round (sent nothing)
    dropped: np.ndarray | None = None     # [T, K]: slots not sent (their expert's rank was masked)


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
        self.rank, self.R = ctx.rank, cfg.world_size
        self.M, self.K, self.H, self.L = cfg.max_tokens_per_rank, cfg.topk, cfg.hidden, cfg.n_local_experts
        self.fmt = cfg.token_format
        self.tb = cfg.token_bytes()
        self.ll = cfg.mode == "ll"
        self.steps = ll if self.ll else ht
        self.faults = _faults.FaultSet(_faults.parse(fault) if fault is not None else _faults.from_env(), self.rank)
        self.round = 0
        self.msg = (self.tb + 4 + (self.K if self.ll else 4 * self.K) + 7) // 8 * 8   # message bytes, 8-aligned
        self.win = None if cfg.skip_a2a else Window(cfg, ctx, self.msg)   # skip_a2a: no communication at all

    def maybe_slow(self, r: int) -> None:
        f = self.faults.hit("slow", r)
        if f is not None:
            time.sleep(f.ms / 1000.0)

    def abort(self, reason: str) -> None:
        """Write this rank's abort word into every peer's window (best effort, never raises)."""
        if self.win is not None:
            self.win.abort(reason)

    # ------------------------------------------------------------------ fencing (docs/FAILURES.md)
    def enable_fencing(self) -> None:
        """A deadline declares the silent peer dead instead of raising; peers' death notices mask ranks."""
        if self.win is not None:
            self.win.fencing = True

    def fence(self, ranks) -> None:
        """Declare `ranks` dead: masked here now, and on every live peer at its next wait or dispatch."""
        if self.win is not None:
            self.win.declare_dead(ranks)

    @property
    def masked_ranks(self) -> tuple:
        """Ranks this rank treats as dead (no sends, no waits), as of its latest call."""
        return tuple(sorted(self.win.masked)) if self.win is not None else ()

    def live_peers(self) -> list[int]:
        """Every rank not masked, this one included (whom a phase sends to and waits for)."""
        masked = self.win.masked if self.win is not None else ()
        return [d for d in range(self.R) if d not in masked]

    def _drop_masked(self, ids: np.ndarray) -> np.ndarray:
        """[T, K] bool: the top-k slots whose expert lives on a masked rank (not sent; combine leaves them out)."""
        masked = self.masked_ranks
        if not masked:
            return np.zeros(ids.shape, bool)
        return (ids >= 0) & np.isin(np.where(ids >= 0, ids // self.L, -1), masked)

    # ------------------------------------------------------------------ dispatch
    def _payload(self, x) -> np.ndarray:
        """Token rows as they travel: the rows in the wire format, then their scales (if any), as bytes. x: bf16
        [T, H] (quantised here in the configured scale format), or a caller-quantised (x_fp8, x_scales), unchanged."""
        if isinstance(x, tuple):
            rows, scales = np.asarray(x[0]).view(self.fmt.dtype), np.asarray(x[1], np.float32)
        else:
            rows, scales = self.fmt.quantize(np.asarray(x), self.cfg.scale_format)
        t = rows.shape[0]
        scales = None if scales is None else np.ascontiguousarray(scales)
        parts = [np.ascontiguousarray(rows).view(np.uint8).reshape(t, self.fmt.element_bytes * self.H)]
        if scales is not None:
            parts.append(scales.view(np.uint8).reshape(t, 4 * self.fmt.scale_cols(self.H)))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def dispatch(self, x, topk_ids, stats_out=None) -> DispatchResult:
        return self.dispatch_wait(self.dispatch_async(x, topk_ids, stats_out))

    def dispatch_async(self, x, topk_ids, stats_out=None) -> _Pending:
        return self._dispatch_send(x, topk_ids, 0, stats_out)

    def dispatch_rejected(self) -> _Pending:
        """This rank refused its input for the next round: it takes part with no tokens, its signals carry the
        REJECTED mark (peers report it in DispatchResult.rejected_ranks). Its dispatch_wait runs as usual."""
        return self._dispatch_send(np.zeros((0, self.H), BF16), np.zeros((0, self.K), np.int32), REJECTED)

    def combine_rejected(self, r: int) -> None:
        """This rank will not combine round r (it refused that round's dispatch, so its experts do not run, or its
        combine input): every combine signal of round r goes out with the REJECTED mark and no data, and nothing is
        awaited (a peer that needed this rank's rows raises EPPeerRejectedError; one that did not is unaffected)."""
        if self.win is not None:
            self.steps.send_combine_rejected(self, r)

    def _dispatch_send(self, x, topk_ids, mark: int, stats_out=None) -> _Pending:
        r = self.round
        self.round += 1
        ids = np.ascontiguousarray(topk_ids, dtype=np.int32)    # int64 ids: range-checked by EPBuffer first
        if self.win is not None and self.win.fencing:
            self.win.read_notices()          # deaths declared since the last wait: masked from this round on
        dropped = self._drop_masked(ids)
        if dropped.any():
            ids = np.where(dropped, np.int32(-1), ids)
        payload = self._payload(x)
        if self.faults.hit("corrupt", r) is not None and len(payload):
            payload = payload.copy()
            payload[:, 1] ^= 0x40  # exponent bits of the first channel (bf16) / a value byte (fp8)
        p = _Pending("dispatch", r, {"payload": payload, "ids": ids, "dropped": dropped, "stats": stats_out})
        if not self.cfg.skip_a2a:
            self.maybe_slow(r)
            skip = self.faults.hit("skip_dispatch", r) is not None
            dests = [self.rank] if skip else self.live_peers()
            die = self.faults.hit("die", r) is not None
            if die:   # fault "die": a rank lost in the middle of a dispatch (the fencing tests)
                dests = dests[:max(1, len(dests) // 2)]
            rows = self._rows_to_each_rank(ids)
            for d in dests:            # visible with the data: send_dispatch flushes before it signals
                self.win.put(rows, d, self.win.region(r, "rows") + self.rank * self.R * 8)
            p.state["sent"] = self.steps.send_dispatch(self, r, payload, ids, dests, mark)
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
        return p

    def _rows_to_each_rank(self, ids: np.ndarray) -> np.ndarray:
        """int64 [R]: the routed rows (valid (token, slot) entries) this rank sends to each rank."""
        flat = ids.reshape(-1)
        return np.bincount(flat[(flat >= 0) & (flat < self.cfg.num_experts)] // self.L,
                           minlength=self.R).astype(np.int64)

    def _check_capacity(self, r: int, ids: np.ndarray) -> None:
        """EPCapacityError for round r if a rank would receive more routed rows than the capacity (called once the
        round's dispatch signals are in: every sender's ROWS are visible then)."""
        if self.cfg.skip_a2a:
            need = np.zeros(self.R, np.int64)
            need[self.rank] = self._rows_to_each_rank(ids)[self.rank]
        else:
            need = self.win.read(self.win.region(r, "rows"), self.R * self.R * 8).view(np.int64).reshape(self.R, self.R)
            need[list(self.win.masked)] = 0   # a fenced-off sender's row is stale: it sent nothing this round
            need = need.sum(axis=0)
        if (need > self.cfg.recv_rows).any():
            raise EPCapacityError.for_round(self.cfg, need, r, describe=self.ctx.describe)

    def _own_rows(self, payload: np.ndarray, ids: np.ndarray) -> Received:
        """skip_a2a: the rows of this rank's own tokens routed to its own experts."""
        me, L = self.rank, self.L
        local = ids - me * L
        t_i, k_i = np.nonzero((ids >= 0) & (local >= 0) & (local < L))
        l_i, t_i, k_i = in_order(local[t_i, k_i], t_i, k_i)
        return Received(local=l_i, src=np.full(len(l_i), me, np.int32), tok=t_i.astype(np.int32),
                        slot=k_i.astype(np.int32), rows=payload[t_i])

    def dispatch_wait(self, pending: _Pending) -> DispatchResult:
        cfg, r, me, L = self.cfg, pending.round, self.rank, self.L
        payload, ids, sent = pending.state["payload"], pending.state["ids"], pending.state.get("sent")
        dropped = pending.state["dropped"]
        stats_out = pending.state["stats"]
        pending.state = {}
        T = ids.shape[0]
        got = self._own_rows(payload, ids) if cfg.skip_a2a else self.steps.receive_dispatch(self, r)
        self._check_capacity(r, ids)

        # shared expert rows first (group 0), then routed groups
        share = np.arange(T, dtype=np.int32)[cfg.shared_share(me, T).start:cfg.shared_share(me, T).stop] \
            if cfg.fused_shared_expert else np.zeros(0, np.int32)
        n_sh = len(share)
        n_rows = n_sh + len(got.tok)
        routed_counts = np.bincount(got.local, minlength=L).astype(np.int64) if len(got.local) \
            else np.zeros(L, np.int64)
        group_counts = np.concatenate([[n_sh], routed_counts]) if cfg.fused_shared_expert else routed_counts
        info = np.full((n_rows, 3), -1, np.int32)
        info[:n_sh, 0], info[:n_sh, 1] = me, share
        info[n_sh:] = np.stack([got.src, got.tok, got.slot], axis=1)
        allrows = np.concatenate([payload[share], got.rows]) if n_sh else got.rows
        row_bytes = self.fmt.element_bytes * self.H
        rows = np.ascontiguousarray(allrows[:, :row_bytes]).view(self.fmt.dtype)
        row_scales = (np.ascontiguousarray(allrows[:, row_bytes:self.tb]).view(np.float32)
                      if self.fmt.quantized else None)
        layouts.check_capacity(cfg, group_counts, me)
        expert_x, scales, row_offsets, src_info = layouts.arrange(cfg, group_counts, info, rows, row_scales)
        if stats_out is not None:
            stats_out += routed_counts.astype(stats_out.dtype)
        expert_ids = np.array(([-1] if cfg.fused_shared_expert else []) + [me * L + g for g in range(L)],
                              dtype=np.int32)
        handle = HostHandle(round=r, num_tokens=T, topk_ids=ids, n_shared=n_sh, shared_tokens=share,
                            group_counts=group_counts,
                            row_src=got.src.astype(np.int32), row_tok=got.tok.astype(np.int32), row_k=got.slot,
                            row_msg=got.msg, src_msgs=got.src_msgs, sent_tokens=sent, rejected=got.rejected,
                            dropped=dropped)
        return DispatchResult(expert_x=expert_x, expert_scales=scales, row_offsets=row_offsets,
                              expert_ids=expert_ids, src_info=src_info,
                              tokens_per_expert=routed_counts.astype(np.int32), handle=handle,
                              rejected_ranks=got.rejected, dropped=dropped, masked_ranks=self.masked_ranks)

    # ------------------------------------------------------------------ combine
    def combine(self, expert_y, handle, topk_weights, out=None):
        return self.combine_wait(self.combine_async(expert_y, handle, topk_weights, out))

    def combine_async(self, expert_y, handle: HostHandle, topk_weights, out=None) -> _Pending:
        r = handle.round
        ey = layouts.packed(self.cfg, expert_y, handle.group_counts)   # rows group after group, as received
        w = np.ascontiguousarray(topk_weights, dtype=np.float32)
        p = _Pending("combine", r, {"ey": ey, "w": w, "h": handle, "out": out})
        if not self.cfg.skip_a2a:
            self.maybe_slow(r)
            die = self.faults.hit("die_in_combine", r) is not None
            if die:   # send to the first half of the peers only: the others look dead to this dying process
                live = self.live_peers()
                self.win.masked.update(live[max(1, len(live) // 2):])
            self.steps.send_combine(self, r, handle, ey, w)
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
        return p

    def combine_wait(self, pending: _Pending):
        r, K, H = pending.round, self.K, self.H
        ey, w, h, out = pending.state["ey"], pending.state["w"], pending.state["h"], pending.state["out"]
        pending.state = {}
        T = h.num_tokens
        y = np.zeros((T, H), np.float32)
        n_sh = h.n_shared
        if n_sh:
            y[h.shared_tokens] += ey[:n_sh].astype(np.float32)
        routed = ey[n_sh:n_sh + len(h.row_tok)]
        if self.cfg.skip_a2a:
            dense = np.zeros((T * K, H), np.float32)
            slot = h.row_tok.astype(np.int64) * K + h.row_k
            dense[slot] = routed.astype(np.float32) * w[h.row_tok, h.row_k][:, None]
            y += dense.reshape(T, K, H).sum(axis=1)
        else:
            self.steps.receive_combine(self, r, h, routed, w, y)
        if out is None:
            return y.astype(BF16)
        out[...] = y.astype(BF16)
        return out

    # ------------------------------------------------------------------ lifecycle
    def synchronize(self) -> None:
        """Nothing to wait for: every call finished its MPI operations before returning."""

    def raise_pending(self) -> None:
        """Errors are raised by the calls themselves: nothing is ever recorded for later."""

    @property
    def sms_used(self) -> None:
        return None

    def close(self) -> None:
        """Collective (frees the window) unless the buffer failed (broken) or a rank was fenced off (a dead rank
        never joins a collective); then only local state is dropped."""
        if self.win is not None:
            fenced = bool(self.win.masked) or bool(self.win.notices())
            self.win.close(collective=self.broken is None and not fenced)
            self.win = None
