"""GpuBackend: the EPBuffer backend that runs dispatch / combine as CUDA kernels (kernels/ep.cu).

Its memory layout (symmetric regions, kernel parameter struct, device arrays) is in layout.py.

Public behaviour (what EPBuffer forwards to):
  dispatch(x, topk_ids, stats_out) -> DispatchResult  one launch (send + receive phases); int64 ids are narrowed
                                                      into a preallocated int32 copy, stats_out += tokens_per_expert
  dispatch_async(x, topk_ids) -> pending              send phase only; dispatch_wait(pending) -> DispatchResult
  combine(expert_y, handle, topk_weights, out) -> y   one launch (out=: y written into the caller's tensor)
  combine_async(...) -> pending ; combine_wait(pending) -> y
  dispatch_rejected() / combine_rejected(r)           a refused call (EPBuffer): this rank takes part in the round
                                                      with nothing, its signals marked "rejected" (docs/FAILURES.md)
  enable_fencing() / fence(ranks) / masked_ranks      fencing off dead ranks (EPBuffer(fence_dead_ranks=True);
                                                      kernels/fence.cuh, docs/FAILURES.md)
  synchronize()  waits for the device; raises EPTimeoutError / EPError recorded by a kernel
  close()        collective (frees symmetric memory); local once a rank was fenced off

Arrays: torch tensors or cupy arrays on this rank's GPU (cupy bf16 = uint16 bits). Kernels run on the caller's current
stream (torch.cuda.current_stream() / cupy's current stream); nothing here synchronises the host or allocates on the
hot path. Outputs are views of preallocated buffers, double buffered: a DispatchResult stays valid until the second
dispatch after it (a combine output until the second combine after it). Every call is CUDA-graph capturable: rounds
and buffer parities of the communication buffers live in device memory.

Eager calls and graph replays on one buffer: eager calls take the output sets in turn, and so do captured calls,
each kind counted apart (a captured call writes the set of its capture at every replay: its tensors are the graph's).
The device knows which call's result each set holds and refuses a launch that would overwrite a live result or
combine one that is not live (kernels/results.cuh); the refusal is raised as EPOverwriteError by check / synchronize.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import (EPCapacityError, EPError, EPFencedError, EPInputError, EPOverwriteError, EPPeerRejectedError,
                      EPRankLostError, EPTimeoutError)
from ...results import DispatchResult
from ...arrays import describe, is_capturing
from . import jit, occupancy, variants
from .arrays import DeviceArrays, aligned, array_kind, current_stream, device_pointer
from .layout import (OUTPUT_SETS, REFUSED_DISPATCH, REFUSED_LOST, ST_REJECTED, ErrorCode, Layout, Phase, Refusal,
                     RefusedOp, call_word, device_arrays, params_struct, send_chunk_tokens, st_masked)
from .runtime import HostErrorRecord, Runtime, _check

log = logging.getLogger("epcomm.gpu")




class RejectedRanks(Sequence):
    """DispatchResult.rejected_ranks on the GPU: the ranks that refused their input in that round (they took part
    with nothing, their count signals marked), read from the output set's status words on first use and kept. (With
    fencing, DispatchResult.masked_ranks likewise: the ranks the round's snapshot masked, kernels/fence.cuh.)

    Nothing syncs unless it is read: the read is a device-to-host copy ordered after the dispatch on the current
    stream (so not inside a CUDA-graph capture). Read it before the second dispatch after this one, like every output
    of the set."""

    def __init__(self, flags):
        self._flags, self._ranks = flags, None

    def _get(self) -> tuple:
        if self._ranks is None:
            f = self._flags
            vals = f.cpu().tolist() if hasattr(f, "cpu") else f.get().tolist()
            self._ranks, self._flags = tuple(r for r, v in enumerate(vals) if v), None
        return self._ranks

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and self._get() == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._get())


@dataclass
class GpuHandle:
    hp: int          # which output set the dispatch wrote
    num_tokens: int
    kind: str
    call: int = 0    # its Params.call (layout.call_word): the device knows the result by it (kernels/results.cuh)


@dataclass
class _Pending:
    op: str
    hp: int
    num_tokens: int
    kind: str
    stream: int
    params: object
    handle: object = None
    keep: tuple = ()
    stats: object = None     # dispatch: the caller's stats_out, added to after the receive


class GpuBackend:
    broken: str | None = None   # set (by EPBuffer) to a reason when peers may be gone: close() then skips collectives
    fencing: bool = False       # enable_fencing (EPBuffer(fence_dead_ranks=True))

    def __init__(self, cfg, ctx, runtime: Runtime | None = None, threads: int = jit.DEFAULT_THREADS,
                 blocks: int | None = None):
        self.cfg, self.ctx = cfg, ctx
        R = cfg.world_size
        self.me = ctx.rank
        topo = getattr(ctx, "topology", None)
        same = (lambda a, b: topo.same_node(a, b)) if topo is not None else (lambda a, b: True)
        self.node_of = (lambda r: topo.node_of(r)) if topo is not None else (lambda r: 0)
        any_remote = any(not same(a, b) for a in range(R) for b in range(R))
        self.layout = Layout(cfg, any_remote)
        # NVSHMEM's heap is sized here when this is the process's first buffer: its need + layout.HEAP_MARGIN
        self.rt = runtime or Runtime.get() or Runtime.from_context(ctx, symmetric_bytes=self.layout.total)
        if self.rt.world_size != R:
            raise EPInputError(f"EPConfig.world_size={R} but the NVSHMEM world has {self.rt.world_size} ranks")
        t0 = time.perf_counter()
        built = jit.build(jit.defines_for(cfg, threads))
        self.kernels = jit.Kernels(built.cubin, ctx.device)
        log.info("epcomm gpu: kernels %s in %.2f s (%s)", built.key, time.perf_counter() - t0,
                 "cached" if built.cached else "built")
        self.threads = threads
        want = blocks or getattr(cfg, "num_sms", None) or int(os.environ.get("EPCOMM_BLOCKS", "0")) or None
        # persistent grid: every block resident at once (MPS / green contexts / ranks sharing the GPU), occupancy.py
        self.grid_choice = occupancy.persistent_grid(self.kernels.functions, threads, self.rt.num_sms, want,
                                                     topo.ranks_per_gpu(self.me) if topo is not None else 1, self.me)
        self.grid = self.grid_choice.grid
        # kernel variants under measurement (variants.py, EPCOMM_VARIANT): the kernels were built with them
        self.variants = variants.active()
        if self.variants:
            log.info("epcomm gpu: kernel variant %s", variants.label(self.variants))
        # ht tuning knobs, read once (docs/GPU-LOG.md call 13 measured the defaults on 2 x H100):
        # EPCOMM_SEND_WAVES=w: about w send items per block (1 wave 332 us bf16 dispatch at 4096 tokens, 2 waves 361)
        # EPCOMM_CRECV_BLOCKS=n: in the fused combine, n blocks sum arriving rows from the start instead of sending
        # (off: the combine is HBM-bound there and 16-33 such blocks made it 5-20 us slower)
        self._send_waves = max(1, int(os.environ.get("EPCOMM_SEND_WAVES", "1")))
        self._crecv_blocks = max(0, int(os.environ.get("EPCOMM_CRECV_BLOCKS", "0"))) if cfg.mode == "ht" else 0
        self.Params = params_struct(R)

        A = self.alloc = DeviceArrays(ctx.device)
        self._sym_buf, self.sym, peers = self.rt.symmetric(self.layout.total)
        self.peers = [p if (r == self.me or same(self.me, r)) else 0 for r, p in enumerate(peers)]
        if any(p == 0 for r, p in enumerate(self.peers) if same(self.me, r)):
            raise EPError("gpu backend: no peer pointer for a same-node rank (are the GPUs peer-accessible?)")
        # every device array of layout.device_arrays: shared ones as attributes, one dict per dispatch output set
        # (keyed by the Params field), the combine outputs in ybufs
        self.sets = [{} for _ in range(OUTPUT_SETS)]
        self.ybufs = []
        for a in device_arrays(cfg):
            new = A.zeros if a.zeroed else A.empty
            if a.copies == "one":
                setattr(self, a.param, new(a.shape, a.dtype))
            elif a.copies == "dispatch":
                for s in self.sets:
                    s[a.param] = new(a.shape, a.dtype)
            else:
                self.ybufs = [new(a.shape, a.dtype) for _ in range(OUTPUT_SETS)]
        # each set's refusal flags (status words ST_REJECTED..), viewed once: DispatchResult.rejected_ranks reads them;
        # and (fencing) the round's masked ranks (ST_MASKED..): DispatchResult.masked_ranks
        self._rejected_flags = [s["hstatus"][ST_REJECTED:ST_REJECTED + R] for s in self.sets]
        self._masked_flags = [s["hstatus"][st_masked(R):st_masked(R) + R] for s in self.sets]
        self.fencing = False
        self._declared: set[int] = set()   # ranks this rank declared dead (fence)
        # int64 topk_ids are clamped to [-1, num_experts] (an id past the int32 range must stay out of range, not wrap
        # into a valid expert) and narrowed into int32 copies (one per output set: a dispatch_async's receive still
        # reads them): stream-ordered on the caller's stream, no allocation, no sync (the kernels read int32 ids)
        # (eager and captured calls apart: a replay must not overwrite the ids an eager dispatch_async still reads)
        self._ids64 = [new((cfg.max_tokens_per_rank, cfg.topk), "i64") for _ in range(2 * OUTPUT_SETS)]
        self._ids32 = [new((cfg.max_tokens_per_rank, cfg.topk), "i32") for _ in range(2 * OUTPUT_SETS)]
        self.err = HostErrorRecord()
        # dispatch / combine calls so far, [eager, captured]: each kind takes the output sets in turn
        self._dispatches = [0, 0]
        self._combines = [0, 0]
        self._call_ids = itertools.count(1)
        self._eager_calls = [0] * OUTPUT_SETS   # the call word of the latest eager dispatch of each output set
        self._closed = False
        self.broken = None   # set (by EPBuffer) to a reason when peers may be gone: close() then skips collectives
        self._tmpl = {}
        self._join_events = {}   # (operation, output set) -> the event of _after
        self._check_params_size()
        self._make_join_events()
        if A.torch is not None:
            A.torch.cuda.synchronize(ctx.device)
        self.rt.barrier()

    @property
    def sms_used(self) -> int:
        """Blocks (= SMs) every kernel of this buffer runs on."""
        return self.grid

    # ---------------------------------------------------------------- plumbing
    def _check_params_size(self):
        from cuda.bindings import driver
        buf = self.alloc.zeros((2,), "i32")
        ptr = ctypes.c_uint64(self.alloc.ptr(buf))
        pp = (ctypes.c_void_p * 1)(ctypes.addressof(ptr))
        _check(driver.cuLaunchKernel(self.kernels.functions["ep_params_size"], 1, 1, 1, 1, 1, 1, 0, 0,
                                     ctypes.addressof(pp), 0), "launch ep_params_size")
        _check(driver.cuCtxSynchronize(), "sync")
        n = int(buf.cpu()[0]) if hasattr(buf, "cpu") else int(buf.get()[0])
        if n != ctypes.sizeof(self.Params):
            raise EPError(f"gpu backend: Params size mismatch device {n} host {ctypes.sizeof(self.Params)}")

    def _base_params(self, hp: int, T: int):
        tm = self._tmpl.get(hp)
        if tm is None:
            tm = self._tmpl[hp] = bytes(self._make_params(hp))
        p = self.Params.from_buffer_copy(tm)
        p.T = T
        ndest = 1 if self.cfg.skip_a2a else self.cfg.world_size
        p.ch = send_chunk_tokens(T, ndest, self.grid, self.cfg.mode == "ht", self.layout.max_chunks, self._send_waves)
        p.crb = self._crecv_blocks
        return p

    def _make_params(self, hp: int):
        p = self.Params()
        s = self.sets[hp]
        P = self.alloc.ptr
        for n, a in s.items():     # escale only in fp8 (else 0)
            setattr(p, n, P(a))
        p.sym = self.sym
        p.state = P(self.state)
        p.fdec = P(self.fdec)
        p.hist_acc = P(self.hist_acc)
        p.dbase = P(self.dbase)
        p.err = self.err.dev
        p.timeout_ns = int(self.cfg.timeout_s * 1e9)
        for n, v in self.layout.offset.items():
            setattr(p, "off_" + n, v)
        p.me = self.me
        p.maxr = math.prod(self.cfg.rows_shape)    # rows of expert_x in any layout (epcomm/layouts.py)
        p.cap = self.cfg.recv_rows
        p.recv_tokens = self.layout.recv_tokens
        p.fence = int(self.fencing)
        for r, v in enumerate(self.peers):
            p.peer[r] = v
        return p

    def _make_join_events(self):
        from cuda.bindings import driver
        for op in ("dispatch", "combine"):
            for s in range(OUTPUT_SETS):
                self._join_events[(op, s)] = _check(
                    driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")

    def _launch(self, name: str, params, stream: int, blocks: int | None = None, threads: int | None = None):
        """One launch of kernel `name` with `params` on `stream`: the persistent grid unless blocks / threads say."""
        from cuda.bindings import driver
        pp = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        res = driver.cuLaunchKernel(self.kernels.functions[name], blocks or self.grid, 1, 1, threads or self.threads,
                                    1, 1, 0, driver.CUstream(stream), ctypes.addressof(pp), 0)
        _check(res, f"launch {name}")

    def _raise_recorded(self):
        rec = self.err.read()
        if rec is None:
            return
        code, peer, waiter, rnd = rec["code"], rec["peer"], rec["waiter"], rec["round"]
        phase = rec["phase"].label if isinstance(rec["phase"], Phase) else "?"
        known = 0 <= peer < self.cfg.world_size
        node = self.node_of(peer) if known else None
        if code == ErrorCode.TIMEOUT:
            experts = self.cfg.experts_of(peer) if known else None
            if peer == waiter:   # waited for its own blocks: the grid, not a peer
                raise EPTimeoutError(occupancy.self_wait_message(peer, self.cfg.timeout_s, phase, rnd),
                                     rank=peer, node=node, what=f"{phase} round {rnd}", waiter=peer, experts=experts)
            raise EPTimeoutError.peer_missing(
                waiter=waiter, waiter_node=self.node_of(waiter) if 0 <= waiter < self.cfg.world_size else None,
                peer=peer, node=node, experts=experts, what=phase, round=rnd, timeout_s=self.cfg.timeout_s)
        if code == ErrorCode.SLOT_OVERFLOW:
            raise EPError(f"epcomm gpu: rank {self.me}: more rows for local expert {rec['what']} of rank {peer} than "
                          f"max_tokens_per_rank slots (duplicate expert ids in one token are not allowed in 'll' mode)")
        if code == ErrorCode.SLAB_OVERFLOW:
            raise EPError(f"epcomm gpu: rank {peer}: local expert {rec['what']} received more rows than "
                          f"expert_capacity={self.cfg.batched_capacity} of layout 'batched' (the rest were dropped; "
                          f"a token that lists one expert twice needs two rows: raise expert_capacity)")
        if code == ErrorCode.ABORT:
            word = self._abort_word(peer) if known else None
            if word is not None and word >= 2 and word - 2 < self.cfg.world_size:
                by = word - 2   # abort() of rank `by` gave up on `peer` after its own deadline
                raise EPError(f"epcomm gpu: rank {peer} (node {node}) did not arrive: rank {by} (node "
                              f"{self.node_of(by)}) gave up on it at its deadline (seen by rank {waiter} in "
                              f"{phase} round {rnd}); this EPBuffer is unusable now")
            raise EPError(f"epcomm gpu: rank {peer} (node {node}) aborted (seen by rank {waiter} in {phase} "
                          f"round {rnd}); this EPBuffer is unusable now")
        if code == ErrorCode.FENCED:   # fencing: the snapshot found a notice naming this rank (kernels/fence.cuh)
            me, by = self._name(self.me), (self._name(peer) if known else f"rank {peer}")
            raise EPFencedError(f"epcomm gpu: {me} was fenced off by {by} (it missed a deadline or was "
                                f"fenced explicitly); the others go on without it, so this EPBuffer is unusable here",
                                rank=self.me, by=peer)
        if code == ErrorCode.BAD_SOURCE:
            raise EPError(f"epcomm gpu: rank {self.me}: combine found an out-of-range source entry (row {rec['what']},"
                          f" source rank {peer}): the handle does not belong to this buffer / was overwritten")
        raise EPError(f"epcomm gpu: device error record {rec}")

    def _name(self, r: int) -> str:
        """Rank r as the messages name it: the context's own words (host and node) where it has them."""
        name = getattr(self.ctx, "describe", None)
        return name(r) if name is not None else f"rank {r} (node {self.node_of(r)})"

    def _raise_capacity(self):
        """EPCapacityError for a void round the kernels recorded (raised once; the buffer stays usable)."""
        rec = self.err.read_capacity()
        if rec is None:
            return
        rank, needed = rec["rank"], rec["needed"]
        need = [0] * self.cfg.world_size
        if 0 <= rank < len(need):
            need[rank] = needed
        raise EPCapacityError.for_round(self.cfg, need, rec["flag"] - 1, describe=getattr(self.ctx, "describe", None),
                                        ranks_over=rec["over"])

    def _raise_refusal(self):
        """EPPeerRejectedError for a combine the kernels found short of a refusing peer's rows (raised once; the
        buffer stays usable)."""
        rec = self.err.read_refusal()
        if rec is None:
            return
        d, rnd = rec["rank"], rec["round"] - 1   # device rounds count from 1, EPBuffer rounds from 0
        peer = self._name(d)
        if rec["what"] == REFUSED_LOST:   # fencing: the host backend's message (host/steps.py lost)
            me = self._name(self.me)
            raise EPRankLostError(
                f"{me}: {peer} was lost (declared dead and fenced off) in round {rnd}: {rec['tokens']} token(s) of "
                f"this rank went to its experts ({self.cfg.holds(d)}) and have no output, so that combine's y is not "
                f"a sum (do not use it); the buffer is still usable, later rounds run without it "
                f"(EPBuffer.active_ranks)", rank=d, node=self.node_of(d), experts=self.cfg.experts_of(d), round=rnd,
                tokens=rec["tokens"])
        what = "dispatch" if rec["what"] == REFUSED_DISPATCH else "combine"
        why = ("refused its dispatch input, so its experts did not run" if what == "dispatch"
               else "refused its combine input")
        more = (f"; {rec['more']} earlier combine(s) since the last check missed a refusing peer's rows too"
                if rec["more"] else "")
        raise EPPeerRejectedError(
            f"epcomm gpu: rank {self.me}: {peer} {why} in round {rnd}: {rec['tokens']} token(s) of this rank went to "
            f"its experts ({self.cfg.holds(d)}) and have no output, so that combine's y is not a sum (do not use "
            f"it){more}; the buffer is still usable", rank=d, node=self.node_of(d), round=rnd, what=what)

    def _check_open(self):
        if self._closed:
            raise EPError("EPBuffer is closed")
        self._raise_recorded()

    def next_output_set(self, captured: bool = False) -> int:
        """The output set the next dispatch of that kind (eager / captured in a CUDA graph) writes."""
        return self._dispatches[int(captured)] % OUTPUT_SETS

    def _narrow_ids(self, topk_ids, slot: int, T: int, kind: str):
        """int64 ids -> int32 staging `slot` (stream-ordered cast); int32 ids as they are."""
        if describe(topk_ids) is None or describe(topk_ids).dtype != "int64":
            return topk_ids
        if kind == "cai":
            raise EPInputError("gpu backend: int64 topk_ids need a torch tensor or cupy array (or pass int32)")
        # the same device / contiguity checks as int32 ids get in _inputs, before the cast is queued: a CPU or
        # other-GPU tensor gets the named EPInputError, not a torch error from the clamp
        device_pointer(topk_ids, array_kind(topk_ids), self.ctx.device)
        wide, stage = self.alloc.view(self._ids64[slot], kind)[:T], self.alloc.view(self._ids32[slot], kind)[:T]
        if kind == "torch":
            import torch
            torch.clamp(topk_ids, -1, self.cfg.num_experts, out=wide)
            stage.copy_(wide)
        else:
            import cupy
            cupy.clip(topk_ids, -1, self.cfg.num_experts, out=wide)
            stage[...] = wide
        return stage

    def _add_stats(self, stats_out, hp: int, kind: str) -> None:
        """stats_out += tokens_per_expert of set hp, on the caller's current stream (after the receive)."""
        if stats_out is None:
            return
        tpe = self.alloc.view(self.sets[hp]["tpe"], kind)
        if kind == "torch":
            stats_out.add_(tpe)
        else:
            import cupy
            cupy.add(stats_out, tpe, out=stats_out, casting="same_kind")

    def _inputs(self, x, topk_ids):
        kind = array_kind(x)
        T = int(x.shape[0])
        if T > self.cfg.max_tokens_per_rank:
            raise EPInputError(f"{T} tokens > max_tokens_per_rank={self.cfg.max_tokens_per_rank}")
        dev = self.ctx.device
        x_ptr = aligned(device_pointer(x, kind, dev), "x")
        return kind, T, x_ptr, device_pointer(topk_ids, array_kind(topk_ids), dev)

    # ---------------------------------------------------------------- dispatch
    def _dispatch_params(self, x, topk_ids):
        self._check_open()
        x, x_scales = x if isinstance(x, tuple) else (x, None)   # caller-quantised: (e4m3 [T, H], fp32 scales)
        captured = is_capturing(array_kind(x))
        hp = self.next_output_set(captured)
        topk_ids = self._narrow_ids(topk_ids, hp + OUTPUT_SETS * captured, int(x.shape[0]), array_kind(x))
        kind, T, xp, ip = self._inputs(x, topk_ids)
        # sent unchanged (row-major [T, scale_cols]; the kernels copy instead of quantising)
        sp = None if x_scales is None else device_pointer(x_scales, array_kind(x_scales), self.ctx.device)
        # every EPInputError above: nothing launched that sends, nothing counted (EPBuffer refuses the call, harmless)
        self._dispatches[captured] += 1
        p = self._base_params(hp, T)
        p.x, p.ids = xp, ip
        p.call = call_word(next(self._call_ids), hp, eager=not captured)
        if not captured:
            self._eager_calls[hp] = p.call   # a refused combine of this round carries it (combine_rejected)
        if sp is not None:
            p.x_scales = sp
        st = current_stream(kind, self.ctx.device)
        self._fence_snapshot(p, hp, st)
        return kind, T, hp, p, st

    def _fence_snapshot(self, p, hp: int, stream: int) -> None:
        """Fencing: the round's mask and masked ids (kernels/fence.cuh: one block, right before the dispatch on its
        stream, so a CUDA graph captures and replays the two together); the dispatch then reads its ids from the set's
        handle copy. Nothing without fencing."""
        if self.fencing:
            self._launch("ep_fence_snapshot", p, stream, blocks=1)
            p.ids = self.alloc.ptr(self.sets[hp]["hids"])

    def _result(self, hp: int, T: int, kind: str, call: int) -> DispatchResult:
        s, v = self.sets[hp], self.alloc.view
        scales = self._scales_view(v(s.get("escale"), kind), kind)
        # fencing: the slots not sent (their expert's rank masked) and the masked ranks, as the snapshot wrote them
        fence = {} if not self.fencing else {"dropped": v(s["hdropped"], kind)[:T],
                                             "masked_ranks": RejectedRanks(self._masked_flags[hp])}
        return DispatchResult(expert_x=v(s["ex"], kind), expert_scales=scales,
                              row_offsets=v(s["row_offsets"], kind), expert_ids=v(s["expert_ids"], kind),
                              src_info=v(s["src_info"], kind), tokens_per_expert=v(s["tpe"], kind),
                              handle=GpuHandle(hp, T, kind, call),
                              rejected_ranks=RejectedRanks(self._rejected_flags[hp]), **fence)

    def _scales_view(self, store, kind: str):
        """expert_scales as the caller sees them: the storage itself (row-major), or a column-major view of it
        (scale_layout "col": storage [.., cols, aligned rows] -> [.., rows, cols], no copy)."""
        if store is None or self.cfg.scale_layout != "col":
            return store
        rows = self.cfg.rows_shape[-1]
        cut = store[..., :rows]
        return cut.transpose(-1, -2) if kind == "torch" else cut.swapaxes(-1, -2)

    def dispatch(self, x, topk_ids, stats_out=None) -> DispatchResult:
        kind, T, hp, p, st = self._dispatch_params(x, topk_ids)
        self._launch("ep_dispatch", p, st)
        self._add_stats(stats_out, hp, kind)
        return self._result(hp, T, kind, p.call)

    def dispatch_async(self, x, topk_ids, stats_out=None):
        kind, T, hp, p, st = self._dispatch_params(x, topk_ids)
        self._launch("ep_dispatch_send", p, st)
        return _Pending("dispatch", hp, T, kind, st, p, keep=(x, topk_ids), stats=stats_out)

    def _after(self, pending, stream: int) -> None:
        """A wait on another stream than its *_async must not start before the send: that stream waits for all the
        async call's stream has queued so far (fork / join with an event; nothing to do on the same stream). One
        event per (operation, output set), made with the buffer, no create / destroy per call: re-recording it is
        safe, since cuStreamWaitEvent takes the event's state at the time of the call."""
        if stream == pending.stream:
            return
        from cuda.bindings import driver
        ev = self._join_events[(pending.op, pending.hp)]
        _check(driver.cuEventRecord(ev, driver.CUstream(pending.stream)), "cuEventRecord")
        _check(driver.cuStreamWaitEvent(driver.CUstream(stream), ev, 0), "cuStreamWaitEvent")

    def dispatch_wait(self, pending) -> DispatchResult:
        self._check_open()
        st = current_stream(pending.kind, self.ctx.device)
        self._after(pending, st)
        self._launch("ep_dispatch_recv", pending.params, st)
        self._add_stats(pending.stats, pending.hp, pending.kind)
        return self._result(pending.hp, pending.num_tokens, pending.kind, pending.params.call)

    # ---------------------------------------------------------------- refused calls (docs/FAILURES.md)
    def _own_kind(self) -> str:
        return "torch" if self.alloc.torch is not None else "cupy"

    def _refusal_stream(self, what: str) -> tuple[str, int]:
        """The kind and current stream of a refused call's launch: eager only. Inside a CUDA-graph capture the empty
        round would be captured and replayed, so the refusal cannot take part (EPBuffer then fails the buffer)."""
        kind = self._own_kind()
        if is_capturing(kind):
            raise EPError(f"epcomm gpu: rank {self.me}: a {what} refused inside a CUDA-graph capture cannot take part "
                          f"in its round empty (the graph would replay the refusal); check the inputs before capturing")
        return kind, current_stream(kind, self.ctx.device)

    def dispatch_rejected(self) -> _Pending:
        """This rank refused its input for the next round (EPBuffer): it takes part with no tokens, its count signals
        carry the "rejected" mark, so every peer gets the round of the other ranks' tokens and names it in
        rejected_ranks. Its dispatch_wait runs as usual. One launch on the current stream: no sync, no allocation.

        On the device it is an eager dispatch like any other (kernels/results.cuh): a fresh call on the next eager
        output set, admitted or refused by the same rule as the peers' dispatches of that round (their sets and
        owner words are in step), so every rank admits the same launches."""
        self._check_open()
        kind, st = self._refusal_stream("dispatch")
        hp = self.next_output_set(False)
        self._dispatches[0] += 1
        p = self._base_params(hp, 0)
        p.rejected = 1
        p.call = call_word(next(self._call_ids), hp, eager=True)
        self._eager_calls[hp] = p.call
        self._fence_snapshot(p, hp, st)
        self._launch("ep_dispatch_send", p, st)
        return _Pending("dispatch", hp, 0, kind, st, p)

    def combine_rejected(self, r: int) -> None:
        """This rank will not combine round r (its eager dispatch number on this buffer: it refused that round's
        dispatch, so its experts do not run, or its combine input): the round's combine signals go out marked, with
        no rows, and nothing is awaited. A peer whose tokens went to this rank's experts gets EPPeerRejectedError
        from its check() / synchronize() instead of a partial sum; the others are unaffected (also if they never
        combine that round: combine rounds are the dispatch's, kernels/combine.cuh). One launch, no sync.

        It carries the call word of dispatch r, so the device admits it as that result's combine, and it ends the
        result's life as a combine does (the owner word is cleared: results.cuh result_combined). No y buffer is
        taken (it writes none)."""
        self._check_open()
        n = self._dispatches[0]
        if not n - OUTPUT_SETS <= r < n:
            raise EPError(f"gpu backend: combine_rejected({r}): only the latest {OUTPUT_SETS} dispatch rounds "
                          f"(of {n}) can be combined")
        _, st = self._refusal_stream("combine")
        hs = r % OUTPUT_SETS                       # the output set (handle) of eager dispatch r
        p = self._base_params(hs, 0)
        p.rejected = 1
        p.call = self._eager_calls[hs]
        self._launch("ep_combine", p, st)

    # ---------------------------------------------------------------- combine
    def _combine_params(self, expert_y, handle, topk_weights, out=None):
        self._check_open()
        if not isinstance(handle, GpuHandle):
            raise EPInputError("combine: handle must come from this GPU buffer's dispatch")
        kind = array_kind(expert_y)
        T = handle.num_tokens
        p = self._base_params(handle.hp, T)
        p.expert_y = aligned(device_pointer(expert_y, kind, self.ctx.device), "expert_y")
        p.weights = device_pointer(topk_weights, array_kind(topk_weights), self.ctx.device)
        # out=: the kernels write y straight into the caller's tensor (no copy)
        yp = None if out is None else aligned(device_pointer(out, kind, self.ctx.device), "out")
        # every EPInputError above: nothing launched, nothing counted (EPBuffer refuses the call, harmless)
        p.call = handle.call      # the device combines only the live result of that dispatch
        captured = is_capturing(kind)
        cp = self._combines[captured] % OUTPUT_SETS
        self._combines[captured] += 1
        p.y = self.alloc.ptr(self.ybufs[cp]) if yp is None else yp
        return kind, T, cp, p, current_stream(kind, self.ctx.device)

    def _y(self, cp, T, kind, out=None):
        if out is not None:
            return out
        return self.alloc.view(self.ybufs[cp][:T], kind) if kind != "cupy" else \
            self.alloc.view(self.ybufs[cp], kind)[:T]

    def combine(self, expert_y, handle, topk_weights, out=None):
        kind, T, cp, p, st = self._combine_params(expert_y, handle, topk_weights, out)
        self._launch("ep_combine", p, st)
        return self._y(cp, T, kind, out)

    def combine_async(self, expert_y, handle, topk_weights, out=None):
        kind, T, cp, p, st = self._combine_params(expert_y, handle, topk_weights, out)
        self._launch("ep_combine_send", p, st)
        return _Pending("combine", cp, T, kind, st, p, handle, keep=(expert_y, topk_weights, out))

    def combine_wait(self, pending):
        self._check_open()
        st = current_stream(pending.kind, self.ctx.device)
        self._after(pending, st)
        self._launch("ep_combine_recv", pending.params, st)
        return self._y(pending.hp, pending.num_tokens, pending.kind, pending.keep[2])

    def release(self, handles) -> None:
        """The results of these dispatches (GpuHandle) will not be combined: their output sets are free on the
        device for any call (a one-thread launch each, on the caller's current stream, ordered after the dispatch);
        a set that holds another result by now is left as it is."""
        self._check_open()
        for h in handles:
            if not isinstance(h, GpuHandle):
                continue
            p = self._base_params(h.hp, 0)
            p.call = h.call
            self._launch("ep_release", p, current_stream(h.kind, self.ctx.device), blocks=1, threads=1)

    def _raise_overwrite(self):
        """EPOverwriteError for a launch the device refused because of a live result (raised once; usable)."""
        rec = self.err.read_overwrite()
        if rec is not None:
            raise overwrite_error(rec, self.me)

    # ---------------------------------------------------------------- lifecycle
    def synchronize(self):
        """Wait for the device; raise what a kernel recorded: a failure, else a round over capacity, else a launch
        refused because of a live result (EPOverwriteError), else a combine short of a refusing peer's rows
        (EPPeerRejectedError)."""
        from cuda.bindings import driver
        _check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
        self._raise_recorded()
        self._raise_capacity()
        self._raise_overwrite()
        self._raise_refusal()

    def raise_pending(self) -> None:
        """Raise what a kernel recorded (timeout, abort, bad entry; else a round over capacity, else a launch refused
        because of a live result, else a combine short of a refusing peer's rows), if any: pinned memory, no
        synchronisation. Calls that launch kernels raise only failures, never EPCapacityError / EPOverwriteError /
        EPPeerRejectedError: those rounds are not failures (every rank's device voids or refuses the same launch),
        and every rank keeps issuing the same operations."""
        self._raise_recorded()
        self._raise_capacity()
        self._raise_overwrite()
        self._raise_refusal()

    def pending_error(self) -> dict | None:
        """The device error record, read from pinned memory without synchronising (None if none)."""
        return self.err.read()

    def abort(self, reason: str = ""):
        """Best effort, never raises: tell every peer, on every node, that this rank gives up, so that their waits
        stop at once instead of at their own deadline.

        * this rank's abort word (value 1) in every peer's symmetric region: same-node peers through the peer pointer
          (a copy), other-node peers through NVSHMEM (a host-initiated signal on a stream);
        * after a timeout, the silent peer's word too (value 2 + this rank), in every peer but the silent one: a
          kernel's wait checks only the word of the rank it waits for, and the peers still waiting are waiting for
          the silent rank, not for this one. They raise EPError saying who gave up on it.
        The stream work is bounded (ABORT_WAIT_S): a wedged device must not turn a failure into a hang."""
        log.error("epcomm gpu: rank %d aborts: %s", self.me, reason)
        self._closed = True
        try:
            words = [(self.me, 1)]
            rec = self.err.read()   # this rank's own timeout names the silent peer
            silent = rec["peer"] if rec is not None and rec["code"] == ErrorCode.TIMEOUT else None
            if silent is not None and 0 <= silent < self.cfg.world_size and silent != self.me:
                words.append((silent, 2 + self.me))
            off = self.layout.offset["abort"]
            self._put_words([(r, off + 8 * who, v) for r in range(len(self.peers)) if r != self.me
                             for who, v in words if r != who])   # the silent rank is not told that it is silent
        except Exception:  # noqa: BLE001 - best effort
            pass

    def _put_words(self, plan) -> bool:
        """Best effort, never raises: write each (rank, symmetric offset, u64 value) of `plan` into that rank's
        symmetric region, in plan order per transport: this rank's own and same-node peers' through a host -> device
        copy on a side stream (the peer pointer), other-node peers' through a host-initiated NVSHMEM signal on it, then
        one quiet. No collective and no reply: a dead peer cannot block it. Bounded by ABORT_WAIT_S (a wedged device
        must not turn a failure into a hang); True when the stream finished in time."""
        try:
            from cuda.bindings import driver

            from .runtime import ABORT_WAIT_S, wait_stream
            err, st = driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING))
            if err != driver.CUresult.CUDA_SUCCESS:
                return False
            keep = {v: (ctypes.c_uint64 * 1)(v) for _, _, v in plan}
            remote = []
            for r, off, v in plan:
                base = self.sym if r == self.me else self.peers[r]
                if base:
                    driver.cuMemcpyHtoDAsync(base + off, ctypes.addressof(keep[v]), 8, st)
                else:
                    remote.append((r, off, v))
            if remote:
                try:
                    import nvshmem.bindings as nb
                    for r, off, v in remote:
                        nb.signal_op_on_stream(self.sym + off, v, int(nb.Signal_op.SIGNAL_SET), r, int(st))
                    nb.quiet_on_stream(int(st))
                except Exception as e:  # noqa: BLE001 - same-node peers are still told
                    log.error("epcomm gpu: rank %d could not signal its other-node peers: %s", self.me, e)
            if wait_stream(st, ABORT_WAIT_S):
                driver.cuStreamDestroy(st)
                return True
            return False
        except Exception:  # noqa: BLE001 - best effort
            return False

    # ---------------------------------------------------------------- fencing (issue 15 item 4)
    # EPBuffer(fence_dead_ranks=True); docs/FAILURES.md, "GPU backend". The death notices follow the host backend's
    # protocol (epcomm/backends/host/window.py declare_dead); the kernels read them only through the snapshot taken
    # before each dispatch (kernels/fence.cuh).
    def enable_fencing(self) -> None:
        """Fence off dead ranks: every dispatch is preceded by the mask snapshot, and the kernels send nothing to,
        and await nothing from, a masked rank. EPBuffer calls it once, before the first call, on every rank."""
        self.fencing = True
        self._tmpl = {}   # the parameter templates carry Params.fence

    def fence(self, ranks) -> None:
        """Declare `ranks` dead (EPBuffer.fence): their death notices here and in every live peer's region
        (declare_dead). Masked from this rank's next dispatch on, and from each peer's next dispatch after the notice
        reached it; a round already sent to them completes as the design says (docs/FAILURES.md)."""
        ranks = sorted({int(r) for r in ranks} - {self.me})
        self._declared.update(ranks)
        if not self.declare_dead(ranks):
            log.error("epcomm gpu: rank %d: the death notices for %s may not have reached every peer", self.me, ranks)

    @property
    def masked_ranks(self) -> tuple:
        """The ranks this rank treats as dead: the notices in its region (its own fence() and its peers'), read
        with a side-stream copy (EPBuffer.active_ranks; a round's own mask is DispatchResult.masked_ranks)."""
        if not self.fencing:
            return ()
        words = self.read_dead_words() or {}
        return tuple(sorted((self._declared | set(words)) - {self.me}))

    def _fenced(self) -> bool:
        """Some rank was declared dead (or the notices cannot be read): no collective may include it any more."""
        if not self.fencing:
            return False
        return bool(self._declared) or self.read_dead_words() != {}

    def declare_dead(self, ranks) -> bool:
        """Death notices for `ranks`: dead[D] = this rank + 1 in this rank's region, in every live peer's, and last,
        best effort, in D's own (a rank that is only stuck learns that it is out). Same transports as abort()."""
        dead = [int(d) for d in ranks if int(d) != self.me]
        live = [r for r in range(len(self.peers)) if r != self.me and r not in dead]
        off = self.layout.offset["dead"]
        notice = [(r, off + 8 * d, self.me + 1) for r in [self.me, *live] for d in dead]
        last = [(d, off + 8 * d2, self.me + 1) for d in dead for d2 in dead]
        return self._put_words(notice + last)

    def read_dead_words(self) -> dict[int, int] | None:
        """The death notices in this rank's own region: {rank D: declarer} for every D with dead[D] != 0 (None when
        they cannot be read in ABORT_WAIT_S). A side-stream copy: the host's view for masked_ranks, off the hot path."""
        try:
            from cuda.bindings import driver

            from .runtime import ABORT_WAIT_S, wait_stream
            R = self.cfg.world_size
            err, st = driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING))
            if err != driver.CUresult.CUDA_SUCCESS:
                return None
            out = (ctypes.c_uint64 * R)()
            driver.cuMemcpyDtoHAsync(ctypes.addressof(out), self.sym + self.layout.offset["dead"], 8 * R, st)
            if not wait_stream(st, ABORT_WAIT_S):
                return None
            driver.cuStreamDestroy(st)
            return {d: int(v) - 1 for d, v in enumerate(out) if v}
        except Exception:  # noqa: BLE001
            return None

    def _abort_word(self, r: int) -> int | None:
        """Rank r's abort word in this rank's symmetric region (None when it cannot be read in ABORT_WAIT_S)."""
        try:
            from cuda.bindings import driver

            from .runtime import ABORT_WAIT_S, wait_stream
            err, st = driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING))
            if err != driver.CUresult.CUDA_SUCCESS:
                return None
            out = (ctypes.c_uint64 * 1)(0)
            driver.cuMemcpyDtoHAsync(ctypes.addressof(out), self.sym + self.layout.offset["abort"] + 8 * r, 8, st)
            if not wait_stream(st, ABORT_WAIT_S):
                return None
            driver.cuStreamDestroy(st)
            return int(out[0])
        except Exception:  # noqa: BLE001
            return None

    def close(self):
        if getattr(self, "_freed", False):
            return
        self._freed = True
        self._closed = True
        from cuda.bindings import driver
        try:
            driver.cuCtxSynchronize()
            # peers may be gone after a failure, or fenced off (a dead rank never joins a collective): skip the
            # collectives (the symmetric memory goes with the process)
            if not self.broken and not self._fenced():
                self.rt.barrier()
                self.rt.free(self._sym_buf)
        finally:
            for ev in getattr(self, "_join_events", {}).values():
                driver.cuEventDestroy(ev)
            self._join_events = {}
            self.kernels.close()
            self.err.close()


def overwrite_error(rec: dict, me: int) -> EPOverwriteError:
    """The EPOverwriteError of an overwrite record (runtime.HostErrorRecord.read_overwrite)."""
    call, holder = rec["call"], rec["holder"]
    captured = not call & 1
    output_set = (call >> 1) & 1
    op = "combine" if rec["op"] in (RefusedOp.COMBINE, RefusedOp.COMBINE_RECV) else "dispatch"
    holder_kind = None if holder == 0 else ("eager" if holder & 1 else "captured")
    held = {"eager": "an eager dispatch", "captured": "a dispatch captured in a CUDA graph", None: "nothing"}
    what = f"rank {me}: {'a replayed' if captured else 'an eager'} {op} (output set {output_set}) was refused: "
    why = rec["why"]
    if why == Refusal.LIVE:
        what += (f"that set still held the result of {held[holder_kind]}, not combined yet; combine it, or "
                 f"EPBuffer.release() it, before a call that reuses its set")
        reason = "live"
    elif why == Refusal.NOT_LIVE:
        what += ("the dispatch result it combines was not live: its dispatch was refused, or that result was "
                 "combined or released already (a graph's combine replayed without its dispatch?)")
        reason = "not_live"
    else:
        what += ("it was launched while a dispatch_async / combine_async of this buffer still waited for its *_wait "
                 "(a CUDA-graph replay in between?); run the *_wait first")
        reason = "pending"
    more = rec["count"] - 1
    what += ("; nothing of the refused call ran, on any rank: a result held is intact, the buffer stays usable"
             + (f" ({more} more call{'s' if more > 1 else ''} refused since)" if more > 0 else ""))
    return EPOverwriteError(f"epcomm gpu: {what}", op=op, reason=reason, output_set=output_set, captured=captured,
                            holder=holder_kind, count=max(1, rec["count"]))
