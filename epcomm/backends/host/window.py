"""The host backend's MPI one-sided window: its layout, and the RMA primitives every protocol step is made of.

Layout (bytes), per parity set (round r uses set r % 2), then once the abort flags and reasons:
    DISP  ht: [src rank][M] messages; ll: [src rank][local expert][M] messages (msg_bytes each)
    CW    ht only: [src rank][M][K] fp32 top-k weights
    COMB  ht: [expert rank][M] bf16 rows; ll: [M * K] bf16 rows
    SIG   int64 words: DISP [src][local expert] (ht uses [src][0]), CW [src], COMB [src]
    ABORT int64[R] flags, then bytes[R][256] reasons

A send is put (Put + Flush: remote completion) then signal (Accumulate(REPLACE), atomic, + Flush): data is visible
before its signal. Signal word = (round + 1) << 32 | count: the round tag makes stale words of earlier rounds
harmless, so nothing is ever reset. wait() polls this rank's own window with a growing backoff (so 16 ranks
oversubscribed on 2 cores still progress) until every word shows the round, or the deadline names the silent peer.
"""
from __future__ import annotations

import time

import numpy as np

from ...errors import EPError, EPTimeoutError

REASON_BYTES = 256
_ALIGN = 64


# Mark bit in the count field of a signal word: the sender refused its own input for this round (EPBuffer raised
# EPInputError there) and takes part with nothing. Counts stay below 2^31 (max_tokens_per_rank * topk).
REJECTED = 1 << 31
COUNT_MASK = REJECTED - 1


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


class Window:
    def __init__(self, cfg, ctx, msg_bytes: int):
        from mpi4py import MPI   # here, not at import: a world of one without MPI never makes a window
        self.MPI = MPI
        self.cfg, self.ctx = cfg, ctx
        self.rank, self.R = ctx.rank, cfg.world_size
        self.ll = cfg.mode == "ll"
        R, M, K, H, L = self.R, cfg.max_tokens_per_rank, cfg.topk, cfg.hidden, cfg.n_local_experts
        self.L = L
        self.msg_bytes = msg_bytes
        self.slots = L * M if self.ll else M                     # messages per source
        disp = R * self.slots * msg_bytes
        cw = 0 if self.ll else R * M * K * 4
        comb = (M * K if self.ll else R * M) * H * 2
        self.n_dsig = R * L
        sig = (self.n_dsig + 2 * R) * 8
        off = 0
        self.o_disp = off; off = _align(off + disp)   # noqa: E702
        self.o_cw = off; off = _align(off + cw)       # noqa: E702
        self.o_comb = off; off = _align(off + comb)   # noqa: E702
        self.o_sig = off; off = _align(off + sig)     # noqa: E702
        self.set_bytes = off
        self.o_abort = 2 * off
        self.o_reason = _align(self.o_abort + 8 * R)
        total = _align(self.o_reason + REASON_BYTES * R)
        self._keep: list = []          # origin buffers alive until the next flush
        self.closed = False
        self.win = MPI.Win.Allocate(total, disp_unit=1, comm=ctx.comm)
        self.mem = np.frombuffer(self.win.tomemory(), dtype=np.uint8, count=total)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.mem[:] = 0
        self.win.Sync()
        ctx.comm.Barrier()             # everyone zeroed before anyone writes

    # ------------------------------------------------------------------ offsets
    def region(self, r: int, name: str) -> int:
        """Offset of region "disp" / "cw" / "comb" of round r's parity set."""
        return (r & 1) * self.set_bytes + {"disp": self.o_disp, "cw": self.o_cw, "comb": self.o_comb}[name]

    def sig_off(self, r: int, phase: str, word: int) -> int:
        base = (r & 1) * self.set_bytes + self.o_sig
        if phase == "disp":
            return base + 8 * word
        if phase == "cw":
            return base + 8 * (self.n_dsig + word)
        return base + 8 * (self.n_dsig + self.R + word)

    # ------------------------------------------------------------------ RMA
    def put(self, data: np.ndarray, dest: int, off: int) -> None:
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if data.size == 0:
            return
        self._keep.append(data)
        self.win.Put([data, self.MPI.BYTE], dest, target=(off, data.size, self.MPI.BYTE))

    def signal(self, dest: int, off: int, r: int, counts) -> None:
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        words = (np.int64((r + 1) & 0x7FFFFFFF) << np.int64(32)) | counts
        self._keep.append(words)
        self.win.Accumulate([words, self.MPI.INT64_T], dest, target=(off, words.size, self.MPI.INT64_T),
                            op=self.MPI.REPLACE)

    def flush(self) -> None:
        self.win.Flush_all()
        self._keep.clear()

    def read(self, off: int, nbytes: int) -> np.ndarray:
        """A copy of nbytes of this rank's window (the data stays valid only until its region is reused)."""
        return self.mem[off:off + nbytes].copy()

    def _check_abort(self) -> None:
        flags = self.mem[self.o_abort:self.o_abort + 8 * self.R].view(np.int64)
        hit = np.nonzero(flags)[0]
        hit = hit[hit != self.rank]
        if len(hit):
            s = int(hit[0])
            raw = bytes(self.mem[self.o_reason + s * REASON_BYTES:self.o_reason + (s + 1) * REASON_BYTES])
            reason = raw.rstrip(b"\0").decode("utf-8", "replace")
            raise EPError(f"{self.ctx.describe(s)} aborted: {reason}")

    def wait(self, r: int, phase: str, words: list[int], peers: list[int], what: str) -> np.ndarray:
        """Counts carried by signal words `words` (one per peer in `peers`) once all show round r."""
        off = self.sig_off(r, phase, 0)
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

    # ------------------------------------------------------------------ lifecycle
    def abort(self, reason: str) -> None:
        """Write this rank's abort word into every peer's window (best effort, never raises)."""
        if self.closed:
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

    def close(self, collective: bool) -> None:
        """Free the window (collective), or only drop it locally when peers may be gone."""
        if self.closed:
            return
        self.closed = True
        if collective:
            self.win.Unlock_all()
            self.win.Free()
        self.win = None
        self.mem = None
