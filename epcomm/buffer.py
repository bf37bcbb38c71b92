"""EPBuffer: the front end. Checks inputs with host-only information, forwards to a backend, keeps round bookkeeping.

    with epcomm.EPBuffer(cfg, ctx) as buf:             # collective: every rank creates it (and closes it)
        out = buf.dispatch(x, topk_ids)                # DispatchResult
        y = buf.combine(expert_y, out.handle, topk_weights)

Rules:
* Every check runs before anything is sent; a failure raises a one-line EPInputError saying what was expected and
  what came. A refused call harms no one: the rank still takes part in the round with nothing, marked
  "rejected", so the buffer stays usable on every rank. A refused dispatch: the peers get a correct round of the
  other ranks' tokens and DispatchResult.rejected_ranks names the refusing rank; since its experts will not run,
  that round's combine goes out at once too, marked and empty. A refused combine (bad arrays or handle, for the
  latest round not yet combined) is sent marked and empty. A peer whose tokens needed the refusing rank's experts
  gets EPPeerRejectedError from its combine instead of a partial sum (GPU backend: from check() / synchronize()
  after that combine, as every device-side verdict; the mark travels in the signal words, docs/FAILURES.md).
  A backend without the mark (no dispatch_rejected / combine_rejected) aborts instead, as on any failure below.
* Any other failure on one rank (timeouts included) first writes an abort word into every peer's window, so the
  peers raise EPError("rank R (node N) aborted: <reason>") at once instead of waiting for their deadline.
  After such a failure the buffer is unusable (on every rank); create a new one.
  EPCapacityError (a round over EPConfig.recv_capacity) is not a failure either: every rank raises it for that
  round by itself, nothing is aborted, the buffer stays usable (docs/MEMORY.md).
* Fencing (EPBuffer(..., fence_dead_ranks=True), host and GPU backends): a peer that misses a deadline, or that any
  rank names in fence(ranks), is declared dead and masked on every survivor instead of failing the buffer. The round
  it was lost in ends with EPRankLostError (naming it) from the combine of every rank whose tokens were on its
  experts; later rounds run without it: tokens routed to its experts are not sent (DispatchResult.dropped) and
  combine sums the live experts only. active_ranks says who is in. docs/FAILURES.md.
* Array kinds (epcomm.arrays): numpy in -> numpy out (host backend); torch / cupy in -> same out (gpu backend).
  bf16 is ml_dtypes.bfloat16 (numpy) / torch.bfloat16; cupy has no bf16, so cupy uint16 / int16 arrays are taken as
  raw bf16 bits. Token ids are range-checked on host arrays always, on device arrays only with check_ids=True (it
  syncs the device).
* A handle is valid for one combine: it must come from one of this buffer's two latest dispatches, not combined
  yet. At most two dispatches may be outstanding (two micro-batches: dispatch A, dispatch B, combine A, combine B);
  a third is refused (epcomm/microbatch.py).
* Eager calls and calls captured in CUDA graphs mix on one buffer: each kind counts its rounds and live dispatches
  apart (captured ones at capture); on replay the GPU refuses, on every rank alike, a launch that would overwrite a
  live result (EPOverwriteError from check() / synchronize(), the buffer usable); an *_async and its *_wait stay on
  one side of a capture. release() frees the sets on the device too (docs/ARCHITECTURE.md "Micro-batches, graphs
  and eager calls").
* Server-facing arguments (epcomm/server_args.py): dispatch((x_fp8, x_scales), ids) sends caller-quantised tokens
  unchanged; topk_ids int32 or int64; dispatch(..., stats_out=counts) adds tokens_per_expert to the caller's
  counters on the device; combine(..., out=y) writes into the caller's tensor and returns it.
* Operations are issued in order; starting a new one completes earlier outstanding ones (their results are kept
  for their *_wait), and waiting for one completes the outstanding ones issued before it: the backends see every
  send / receive pair in issue order on every rank. All ranks must issue the same sequence of operations.
* GPU: a *_wait runs on the caller's current stream; one other than the *_async's is made to wait for it first.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from . import backends, placement, server_args
from .arrays import describe, is_bf16, is_capturing
from .backends.base import Backend
from .config import EPConfig
from .context import init
from .errors import (EPCapacityError, EPError, EPFencedError, EPInputError, EPOverwriteError, EPPeerRejectedError,
                     EPRankLostError)
from .microbatch import LiveDispatches
from .results import DispatchResult

_serials = itertools.count()


@dataclass(eq=False)
class Handle:
    """What DispatchResult.handle holds: which buffer and round it belongs to, and the backend's own handle.
    captured: dispatched inside a CUDA-graph capture (captured calls count their rounds apart from eager ones)."""
    buffer_serial: int
    round: int
    num_tokens: int
    backend_handle: Any
    captured: bool = False


@dataclass(eq=False)
class Pending:
    kind: str
    round: int
    buffer_serial: int
    inner: Any
    num_tokens: int
    waited: bool = False
    result: Any = None          # the backend's receive result, once it ran (by the *_wait or a later operation)
    error: Exception | None = None   # a round error of that receive (_ROUND_ERRORS), raised by its own *_wait
    captured: bool = False      # issued inside a CUDA-graph capture: its receive must be captured too
    array_kind: str = "numpy"   # array kind of its inputs (whose current stream may be capturing)


def _fail(msg: str):
    raise EPInputError(msg)


# Errors of one round that leave the buffer usable on every rank: raised to the caller, not a failure (a peer's
# refusal, a round over capacity, a peer lost while this rank's tokens were on its experts, a call the device
# refused because of a live result).
_ROUND_ERRORS = (EPPeerRejectedError, EPCapacityError, EPRankLostError, EPOverwriteError)


def _capturing(a) -> bool:
    """Is `a`'s kind's current stream being captured into a CUDA graph (device arrays only)?"""
    info = describe(a[0] if isinstance(a, tuple) and a else a)
    return info is not None and not info.on_host and is_capturing(info.kind)


def _kind(a) -> str:
    info = describe(a[0] if isinstance(a, tuple) and a else a)
    return info.kind if info is not None else "numpy"


def _extra(arg) -> tuple:
    """The optional last argument of a backend call (stats_out / out), passed only when given."""
    return () if arg is None else (arg,)


class EPBuffer:
    def __init__(self, cfg: EPConfig, ctx=None, *, check_ids: bool = False, fence_dead_ranks: bool = False):
        if not isinstance(cfg, EPConfig):
            _fail(f"EPBuffer: cfg must be an EPConfig, got {type(cfg).__name__}")
        if ctx is None:
            ctx = init()
        if cfg.world_size != ctx.world_size:
            _fail(f"EPConfig.world_size={cfg.world_size} but the context has {ctx.world_size} ranks")
        self.cfg, self.ctx, self.check_ids = cfg, ctx, check_ids
        self._serial = next(_serials)
        self._round = 0                 # eager dispatches issued
        self._outstanding: list[Pending] = []   # *_async calls whose receive has not run yet, in issue order
        self._live = LiveDispatches()           # eager dispatches that may still be combined (two micro-batches)
        # dispatches captured in CUDA graphs: rounds and live ones counted apart from the eager ones (the two kinds
        # take the output sets in turn each; replays are checked on the device, see microbatch.py)
        self._graph_round = 0
        self._graph_live = LiveDispatches()
        self._closed = False
        self._failed: str | None = None
        self._backend: Backend = backends.make_backend(cfg, ctx)
        # Backends that can take part in a round with nothing (a "rejected" mark in their protocol): a refused call
        # then harms no one. The others abort on a refused call, like on any failure.
        self._can_refuse = all(callable(getattr(self._backend, m, None))
                               for m in ("dispatch_rejected", "combine_rejected"))
        self.fence_dead_ranks = bool(fence_dead_ranks)
        if self.fence_dead_ranks:
            enable = getattr(self._backend, "enable_fencing", None)
            if not callable(enable):
                self._backend.close()
                _fail(f"EPBuffer: fence_dead_ranks=True needs a backend that can fence off a dead rank (epcomm's "
                      f"host and GPU backends); the {ctx.backend} backend cannot yet: it has no enable_fencing "
                      f"(docs/FAILURES.md, 'Fencing off a dead rank')")
            enable()
        ctx._buffers.add(self)

    # ------------------------------------------------------------------ fencing
    @property
    def active_ranks(self) -> tuple:
        """The ranks this rank still exchanges tokens with (itself included): every rank, less the ones fenced off
        as of this rank's latest call (a peer's death notice is read at the next dispatch or wait)."""
        masked = set(getattr(self._backend, "masked_ranks", ()))
        return tuple(r for r in range(self.cfg.world_size) if r not in masked)

    def fence(self, ranks) -> None:
        """Declare `ranks` dead (e.g. a health check saw their GPU or host fail): masked here at once, and on every
        live peer at its next dispatch or wait (a notice written into its window; no collective). Needs
        fence_dead_ranks=True. Tokens routed to their experts are dropped from the next dispatch on."""
        self._usable()
        if not self.fence_dead_ranks:
            _fail("fence: make the EPBuffer with fence_dead_ranks=True to fence off ranks")
        ranks = sorted({int(r) for r in ranks})
        bad = [r for r in ranks if not 0 <= r < self.cfg.world_size or r == self.ctx.rank]
        if bad:
            _fail(f"fence: ranks must be peers in [0, {self.cfg.world_size}) other than this rank "
                  f"({self.ctx.rank}), got {bad}")
        self._complete()
        self._call(self._backend.fence, ranks)

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, x, topk_ids, stats_out=None) -> int:
        cfg = self.cfg
        x, x_scales = server_args.split_tokens(cfg, x)
        xi, ii = describe(x), describe(topk_ids)
        if xi is None:
            _fail(f"dispatch: x must be a numpy / torch / cupy array, got {type(x).__name__}")
        if ii is None:
            _fail(f"dispatch: topk_ids must be a numpy / torch / cupy array, got {type(topk_ids).__name__}")
        if len(xi.shape) != 2 or xi.shape[1] != cfg.hidden:
            _fail(f"dispatch: x must be 2-D [T, hidden={cfg.hidden}], got shape {list(xi.shape)}")
        t = xi.shape[0]
        if x_scales is not None:
            server_args.check_quantised(cfg, xi, describe(x_scales), t)
        elif not is_bf16(xi):
            _fail(f"dispatch: x must be bfloat16, got {xi.dtype} ({xi.kind})")
        if t > cfg.max_tokens_per_rank:
            _fail(f"dispatch: x has T={t} tokens > max_tokens_per_rank={cfg.max_tokens_per_rank}")
        if ii.shape != (t, cfg.topk):
            _fail(f"dispatch: topk_ids must be [T={t}, topk={cfg.topk}], got shape {list(ii.shape)}")
        server_args.check_ids_dtype(ii)
        if xi.kind != ii.kind or xi.device != ii.device:
            _fail(f"dispatch: x and topk_ids must be the same kind on the same device, got {xi} and {ii}")
        self._check_kind(xi, "dispatch")
        server_args.check_stats(cfg, stats_out, xi)
        self._check_placement("dispatch", (x, "x", True), (x_scales, "x_scales", False), (topk_ids, "topk_ids", False))
        if t and (ii.on_host or self.check_ids):
            if not ii.on_host and is_capturing(ii.kind):
                _fail("dispatch: check_ids=True reads the ids back to the host, which a CUDA-graph capture forbids; "
                      "make the buffer for captured calls with check_ids=False")
            ids = topk_ids if ii.kind == "numpy" else (topk_ids.cpu().numpy() if ii.kind == "torch"
                                                         else topk_ids.get())
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= cfg.num_experts:
                bad = lo if lo < -1 else hi
                _fail(f"dispatch: topk_ids must be in [-1, num_experts={cfg.num_experts}), got {bad}")
        return t

    def _check_kind(self, info, where: str):
        if self.ctx.backend == "host" and info.kind != "numpy":
            _fail(f"{where}: the host backend takes numpy arrays, got {info}")

    def _check_placement(self, where: str, *arrays) -> None:
        """GPU backend: every (array, name, moved in 16-byte vectors) on this rank's GPU, contiguous, aligned
        (epcomm/placement.py); checked here so that the backend never fails on them after the call began."""
        if self.ctx.backend == "gpu":
            placement.check_device_arrays(where, self.ctx.device, arrays)

    def _check_combine(self, expert_y, handle, topk_weights, out=None) -> None:
        cfg = self.cfg
        if not isinstance(handle, Handle) or handle.buffer_serial != self._serial:
            _fail("combine: handle must be DispatchResult.handle of a dispatch on this EPBuffer, "
                  f"got {type(handle).__name__}" + (" from another buffer" if isinstance(handle, Handle) else ""))
        self._live_of(handle).check_combine(handle.round, self._next_round(handle.captured) - 1)
        yi, wi = describe(expert_y), describe(topk_weights)
        if yi is None:
            _fail(f"combine: expert_y must be a numpy / torch / cupy array, got {type(expert_y).__name__}")
        if wi is None:
            _fail(f"combine: topk_weights must be a numpy / torch / cupy array, got {type(topk_weights).__name__}")
        if yi.shape != (*cfg.rows_shape, cfg.hidden):
            lead = (f"max_recv_rows={cfg.max_recv_rows}" if cfg.layout == "grouped" else
                    f"n_local_experts={cfg.n_local_experts}, capacity={cfg.batched_capacity}")
            _fail(f"combine: expert_y must be [{lead}, hidden={cfg.hidden}] (layout '{cfg.layout}'), "
                  f"got shape {list(yi.shape)}")
        if not is_bf16(yi):
            _fail(f"combine: expert_y must be bfloat16, got {yi.dtype} ({yi.kind})")
        t = handle.num_tokens
        if wi.shape != (t, cfg.topk):
            _fail(f"combine: topk_weights must be [T={t} (the dispatch's T), topk={cfg.topk}], "
                  f"got shape {list(wi.shape)}")
        if wi.dtype != "float32":
            _fail(f"combine: topk_weights must be float32, got {wi.dtype}")
        self._check_kind(yi, "combine")
        self._check_kind(wi, "combine")
        server_args.check_out(cfg, out, t, yi)
        self._check_placement("combine", (expert_y, "expert_y", True), (topk_weights, "topk_weights", False),
                              (out, "out", True))

    # ------------------------------------------------------------------ forwarding
    def _live_of(self, h) -> LiveDispatches:
        """The live dispatches of h's kind (a Handle or Pending: eager or captured)."""
        return self._graph_live if h.captured else self._live

    def _next_round(self, captured: bool) -> int:
        return self._graph_round if captured else self._round

    def _advance(self, captured: bool) -> None:
        if captured:
            self._graph_round += 1
        else:
            self._round += 1

    def _check_capture(self, where: str, captured: bool) -> None:
        """An *_async and its *_wait on the same side of a CUDA-graph capture: a receive run by a call on the other
        side would land in the graph (replayed with it) or out of it (the replays would lack it)."""
        for p in self._outstanding:
            if p.captured != captured:
                inside = "inside" if p.captured else "outside"
                _fail(f"{where}: {p.kind}_async of round {p.round} was issued {inside} a CUDA-graph capture and "
                      f"still waits for its {p.kind}_wait, which must run {inside} it too: call "
                      f"{p.kind}_wait before {'ending' if p.captured else 'starting'} the capture")

    def _usable(self):
        if self._closed:
            raise EPError("EPBuffer is closed")
        if self._failed is not None:
            raise EPError(f"EPBuffer unusable after an earlier failure: {self._failed}")

    def _call(self, fn, *args, refuse=None):
        """Run a check or backend call; on failure tell the peers (abort word) before raising. A peer's refusal
        (EPPeerRejectedError) is not a failure of this buffer. refuse: the backend call's own input checks (raised
        before it sent anything, backends/base.py) are refused like the front end's (_checked)."""
        try:
            return fn(*args)
        except _ROUND_ERRORS:
            raise
        except EPInputError as e:
            if refuse is None or not self._can_refuse:
                self._fail_with(e)
            refuse()
            raise
        except EPFencedError as e:
            self._failed = str(e)         # the peers declared this rank dead: they go on without it, nothing to tell
            raise
        except BaseException as e:
            self._fail_with(e)

    def _fail_with(self, e: BaseException):
        """This buffer failed: tell the peers, then raise e (from its except block)."""
        # A timeout aborts too: peers waiting on this rank would otherwise sit until their own deadline.
        # Only a peer's abort is not passed on (that peer already told everyone).
        self._failed = str(e) or type(e).__name__
        already = isinstance(e, EPError) and " aborted: " in str(e)
        if not already:
            try:
                self._backend.abort(f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                pass
        raise e

    def _complete(self, upto: Pending | None = None) -> None:
        """Run the receive of outstanding *_async calls in issue order (all, or up to and including `upto`): every
        backend then sees send / receive pairs in one order on every rank, whatever order the user waits in."""
        while self._outstanding:
            p = self._outstanding.pop(0)
            wait = self._backend.dispatch_wait if p.kind == "dispatch" else self._backend.combine_wait
            try:
                p.result = self._call(wait, p.inner)
            except _ROUND_ERRORS as e:
                p.error = e               # that call's own *_wait raises it
                if p.kind == "dispatch":
                    self._live_of(p).release(p.round)   # no handle comes of it: it can never be combined
            if p is upto:
                return

    def _checked(self, check, *args, refuse=None):
        """Run an input check. Where the backend can take part with nothing, a refused call is local: `refuse` (if
        any) keeps the peers' round whole, and the EPInputError goes to the caller, the buffer still usable.
        Elsewhere a refusal fails the buffer and aborts the peers (_call)."""
        if not self._can_refuse:
            return self._call(check, *args)
        try:
            return check(*args)
        except EPInputError:
            if refuse is not None:
                refuse()
            raise

    def _refuse_dispatch(self) -> None:
        """This rank's dispatch input was refused: take part in the round with no tokens (marked), so the peers
        get the round of the other ranks' tokens, and send that round's combine marked and empty right away (its
        experts will not run). Both are safe to send now: the combine's signals go out after this rank's receive of
        the same round, as in any round, and nothing is awaited for them."""
        self._complete()
        inner = self._call(self._backend.dispatch_rejected)
        self._call(self._backend.dispatch_wait, inner)   # the round's receive runs as usual; its result is dropped
        r, self._round = self._round, self._round + 1
        self._call(self._backend.combine_rejected, r)
        self._live.combined(r)     # never live (no handle); its combine is out

    def _refuse_combine(self, handle) -> None:
        """A combine was refused: the round it meant (its handle's when that dispatch is live, or else the latest) is
        sent marked and empty now, unless that round was combined already (then nobody waits for this call).
        Eager rounds only: the combine of a result captured in a CUDA graph cannot be sent empty from outside the
        graph, so such a refusal fails the buffer (the peers are aborted) as on a backend without the mark."""
        ours = isinstance(handle, Handle) and handle.buffer_serial == self._serial
        if ours and handle.captured:
            self._call(_fail, f"combine: refused for a dispatch captured in a CUDA graph (round {handle.round}); "
                              f"only an eager round can be combined empty in its place, so the buffer fails")
        latest = self._round - 1
        r = handle.round if ours and handle.round in self._live.rounds() else latest
        if r < 0 or self._live.was_combined(r):
            return
        self._complete()
        self._call(self._backend.combine_rejected, r)
        self._live.combined(r)

    def dispatch(self, x, topk_ids, *, stats_out=None) -> DispatchResult:
        """Send and receive in one call (one kernel launch on GPUs). x: bf16 [T, hidden], or (x_fp8, x_scales)
        already quantised (sent unchanged). stats_out: [n_local_experts] int32 / int64 counters the received rows
        per local expert are added to (on the device)."""
        self._usable()
        t = self._checked(self._check_tokens, x, topk_ids, stats_out, refuse=self._refuse_dispatch)
        captured = _capturing(x)
        self._checked(self._check_capture, "dispatch", captured)
        live, rnd = (self._graph_live, self._graph_round) if captured else (self._live, self._round)
        self._call(live.admit, rnd)
        self._complete()
        try:
            res = self._call(self._backend.dispatch, x, topk_ids, *_extra(stats_out), refuse=self._refuse_dispatch)
        except EPCapacityError:
            self._advance(captured)       # the backend used up the round
            raise
        res.handle = Handle(self._serial, rnd, t, res.handle, captured)
        live.track(rnd, res.handle)
        self._advance(captured)
        return res

    def dispatch_async(self, x, topk_ids, *, stats_out=None) -> Pending:
        self._usable()
        t = self._checked(self._check_tokens, x, topk_ids, stats_out, refuse=self._refuse_dispatch)
        captured = _capturing(x)
        self._checked(self._check_capture, "dispatch_async", captured)
        live, rnd = (self._graph_live, self._graph_round) if captured else (self._live, self._round)
        self._call(live.admit, rnd)
        self._complete()
        inner = self._call(self._backend.dispatch_async, x, topk_ids, *_extra(stats_out), refuse=self._refuse_dispatch)
        p = Pending("dispatch", rnd, self._serial, inner, t, captured=captured, array_kind=_kind(x))
        self._outstanding.append(p)
        live.track(rnd, p)
        self._advance(captured)
        return p

    def _check_pending(self, p, kind: str):
        if not isinstance(p, Pending) or p.buffer_serial != self._serial or p.kind != kind:
            _fail(f"{kind}_wait: expects the object {kind}_async of this EPBuffer returned, got {type(p).__name__}")
        if p.waited:
            _fail(f"{kind}_wait: round {p.round} was already waited for")
        if p.result is None and p.error is None:   # its receive is still to run: on its send's side of a capture
            self._check_capture(f"{kind}_wait", p.array_kind != "numpy" and is_capturing(p.array_kind))

    def dispatch_wait(self, pending: Pending) -> DispatchResult:
        self._usable()
        self._checked(self._check_pending, pending, "dispatch")
        self._complete(upto=pending)
        res, pending.result = pending.result, None
        pending.waited = True
        if pending.error is not None:
            raise pending.error
        res.handle = Handle(self._serial, pending.round, pending.num_tokens, res.handle, pending.captured)
        self._live_of(pending).track(pending.round, res.handle)
        return res

    def combine(self, expert_y, handle, topk_weights, *, out=None):
        """Send expert rows back and reduce them in one call (one kernel launch on GPUs). expert_y in the buffer's
        layout; out: the caller's bf16 [T, hidden] y to write (returned), else a buffer-owned one."""
        self._usable()
        self._checked(self._check_combine, expert_y, handle, topk_weights, out,
                      refuse=lambda: self._refuse_combine(handle))
        self._checked(self._check_capture, "combine", _capturing(expert_y))
        self._complete()
        try:
            y = self._call(self._backend.combine, expert_y, handle.backend_handle, topk_weights, *_extra(out),
                           refuse=lambda: self._refuse_combine(handle))
        except _ROUND_ERRORS:
            self._live_of(handle).combined(handle.round)   # it was sent: a round error of its receive
            raise
        self._live_of(handle).combined(handle.round)       # (after: a backend's refusal sends this round empty instead)
        return y

    def combine_async(self, expert_y, handle, topk_weights, *, out=None) -> Pending:
        self._usable()
        self._checked(self._check_combine, expert_y, handle, topk_weights, out,
                      refuse=lambda: self._refuse_combine(handle))
        captured = _capturing(expert_y)
        self._checked(self._check_capture, "combine_async", captured)
        self._complete()
        inner = self._call(self._backend.combine_async, expert_y, handle.backend_handle, topk_weights,
                           *_extra(out), refuse=lambda: self._refuse_combine(handle))
        self._live_of(handle).combined(handle.round)
        p = Pending("combine", handle.round, self._serial, inner, handle.num_tokens, captured=captured,
                    array_kind=_kind(expert_y))
        self._outstanding.append(p)
        return p

    def combine_wait(self, pending: Pending):
        self._usable()
        self._checked(self._check_pending, pending, "combine")
        self._complete(upto=pending)
        y, pending.result = pending.result, None
        pending.waited = True
        if pending.error is not None:
            err, pending.error = pending.error, None
            raise err
        return y

    def release(self, handle=None) -> None:
        """Declare that a dispatch will not be combined, so a later dispatch may reuse its buffers: `handle`'s
        (DispatchResult.handle; also one captured in a CUDA graph, whose replayed result is then released), or
        every dispatch not yet combined. Nothing is sent; the GPU backend frees the output set on the device too (a
        one-thread launch on the current stream), so that a graph replay may reuse it. Every rank releases the same
        rounds (no peer waits for a combine of them)."""
        self._usable()
        if handle is None:
            done = [h for live in (self._live, self._graph_live) for h in live.owners() if isinstance(h, Handle)]
            self._live.release()
            self._graph_live.release()
        else:
            if not isinstance(handle, Handle) or handle.buffer_serial != self._serial:
                _fail("release: handle must be DispatchResult.handle of a dispatch on this EPBuffer")
            self._live_of(handle).release(handle.round)
            done = [handle]
        release = getattr(self._backend, "release", None)
        if callable(release) and done:
            self._call(release, [h.backend_handle for h in done])

    def check(self) -> None:
        """Raise now an error that a kernel has recorded since the calls returned (GPU: a timeout or a peer's abort
        seen on the device; read from pinned host memory, no synchronisation). GPU calls return before their
        kernels run, so their outputs are only trustworthy once the stream has passed them: a server calls this
        (or synchronize) before handing results on. Host backend: errors are raised by the calls themselves."""
        self._usable()
        self._call(self._backend.raise_pending)

    def synchronize(self) -> None:
        """Run the receive of every outstanding *_async call (in issue order), then wait for the device."""
        self._usable()
        self._complete()
        self._call(self._backend.synchronize)

    @property
    def sms_used(self) -> int | None:
        """SMs (thread blocks of the persistent grid) the GPU kernels run on; None on the host backend."""
        return self._backend.sms_used

    def close(self) -> None:
        """Collective when the buffer is healthy (runs outstanding receives, frees shared memory on every rank);
        local after a failure."""
        if self._closed:
            return
        if self._failed is None:
            try:
                self._complete()
            except Exception:  # noqa: BLE001 - recorded in self._failed (and the peers told) by _call
                pass
        self._closed = True
        if self._failed is not None and self._backend.broken is None:
            self._backend.broken = self._failed   # peers may be gone: skip the collective free
        self._backend.close()

    @property
    def round(self) -> int:
        """Dispatches issued so far, eager and captured in CUDA graphs (each kind numbers its handles' rounds apart:
        Handle.round, Handle.captured)."""
        return self._round + self._graph_round

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._failed is None:
            self._failed = f"{exc_type.__name__}: {exc}"
            try:
                self._backend.abort(self._failed)
            except Exception:  # noqa: BLE001
                pass
        self.close()
        return False
