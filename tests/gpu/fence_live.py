"""GPU: an explicit fence of a LIVE rank (issue 15 item 4; EPBuffer.fence, e.g. after a health check): the survivors
go on with the same buffer, every round the spec with masked_ranks. For ranks sharing one GPU:

    python3 -m launch run -t configs/one-gpu-4.yaml --timeout 200 -- python3 tests/gpu/fence_live.py [ROUNDS]
    (dev/device/one_gpu_rig.sh fencelive runs it)

For each of ll / ht x bf16 / fp8, on a fresh EPBuffer(fence_dead_ranks=True): PRE rounds with every rank (nothing
dropped, nothing masked), then rank 0 fences the last rank (alive, idle: it makes no more calls on that buffer), a
barrier (fence() returns once its notices are written, so every survivor's next dispatch reads them), then ROUNDS
(default 20) rounds on the survivors, each checked against epcomm.reference with masked_ranks=(last,):
DispatchResult (ragged and skewed routing, hot experts, -1 slots), DispatchResult.dropped (= reference
masked_slots), DispatchResult.masked_ranks, active_ranks, and combine (the live experts only). Every rank closes
locally (a fenced buffer frees nothing collectively). Half of the checked rounds use dispatch_async / combine_async.
On the GPU also a CUDA graph (dispatch + combine) captured before the fence, replayed twice before it on every rank
and every fifth round after it on the survivors, each replay against the spec of its own time (the mask snapshot is
a node of the graph).

The same script runs on the host backend (numpy arrays; `-t cpu-4rank`), which proves the script itself on a CPU
machine (tests/mpi/test_fencing.py). Prints "FAIL ..." lines; exit 1 on a failure.
"""
from __future__ import annotations

import sys
import time
import traceback

import numpy as np

import epcomm
from epcomm import reference
from epcomm.arrays import to_numpy
from epcomm.backends.gpu.specs import fence_live_configs
from epcomm.workload import distinct_experts, make_world
from tests.gpu.rank_io import Problems, device_put

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
PRE = 2
GRAPH_T = 8   # tokens of the captured decode round (GPU)
ctx = epcomm.init()
me, R = ctx.rank, ctx.world_size
victim = R - 1
put, dev = device_put(ctx)
problems = Problems(me)
fail = problems.fail
if ctx.backend == "gpu":
    import torch   # the captured decode graph (DecodeGraph)


def world(cfg, r: int):
    w = make_world(cfg, 3000 + r, routing_kind=("uniform", "minus1", "skewed", "hot")[r % 4],
                   num_tokens="ragged" if r % 3 == 2 else None)
    for ids in w.topk_ids:   # every rank's first token goes to the fenced rank's first expert: something is dropped
        if len(ids):
            ids[0, 0] = victim * cfg.n_local_experts
    return w


def check_round(buf, cfg, tag: str, r: int, masked: tuple) -> None:
    w = world(cfg, r)
    want = reference.dispatch(cfg, w.xs, w.topk_ids, masked_ranks=masked)
    use_async = r % 2 == 1
    x, ids = put(w.xs[me]), put(w.topk_ids[me])
    res = buf.dispatch_wait(buf.dispatch_async(x, ids)) if use_async else buf.dispatch(x, ids)
    buf.synchronize()
    err = reference.compare_dispatch(cfg, res, want[me])
    if err:
        fail(f"{tag} round {r} dispatch: {err[0]}")
    drop = None if res.dropped is None else to_numpy(res.dropped)
    if drop is None or not np.array_equal(drop, reference.masked_slots(cfg, w.topk_ids[me], masked)):
        fail(f"{tag} round {r}: dropped {drop}")
    if tuple(res.masked_ranks) != masked:
        fail(f"{tag} round {r}: masked_ranks {tuple(res.masked_ranks)} != {masked}")
    eys = [None if d is None else distinct_experts(cfg, d) for d in want]
    ey = put(eys[me])
    y = buf.combine_wait(buf.combine_async(ey, res.handle, put(w.topk_weights[me]))) if use_async \
        else buf.combine(ey, res.handle, put(w.topk_weights[me]))
    buf.synchronize()
    ys, mags = reference.combine_exact(cfg, eys, want, w.topk_weights)
    err = reference.compare_combine(y, ys[me], mags[me])
    if err:
        fail(f"{tag} round {r} combine: {err[0]}")


class DecodeGraph:
    """GPU only: a dispatch + combine of GRAPH_T tokens captured in a CUDA graph before the fence and replayed before
    and after it. The mask snapshot is a node of the graph, so a replay masks what the notices of its own time say."""

    def __init__(self, buf, cfg, tag: str):
        self.buf, self.cfg, self.tag = buf, cfg, tag
        self.x = torch.empty((GRAPH_T, cfg.hidden), dtype=torch.bfloat16, device=dev)
        self.ids = torch.empty((GRAPH_T, cfg.topk), dtype=torch.int32, device=dev)
        self.w = torch.empty((GRAPH_T, cfg.topk), dtype=torch.float32, device=dev)
        self.ey = torch.empty((*cfg.rows_shape, cfg.hidden), dtype=torch.bfloat16, device=dev)
        self._load(100, ())   # valid inputs for the capture (which runs nothing)
        buf.synchronize()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(self.graph, stream=side):
            self.res = buf.dispatch(self.x, self.ids)
            self.y = buf.combine(self.ey, self.res.handle, self.w)
        torch.cuda.synchronize()
        self.masked_read = False

    def _load(self, r: int, masked: tuple):
        w = make_world(self.cfg, 5000 + r, routing_kind=("uniform", "skewed", "minus1")[r % 3], num_tokens=GRAPH_T)
        for ids in w.topk_ids:
            ids[0, 0] = victim * self.cfg.n_local_experts
        want = reference.dispatch(self.cfg, w.xs, w.topk_ids, masked_ranks=masked)
        eys = [None if d is None else distinct_experts(self.cfg, d) for d in want]
        self.x.copy_(put(w.xs[me]))
        self.ids.copy_(put(w.topk_ids[me]))
        self.w.copy_(put(w.topk_weights[me]))
        self.ey.copy_(put(eys[me]))
        return w, want, eys

    def replay(self, r: int, masked: tuple) -> None:
        cfg, label = self.cfg, f"{self.tag} graph replay {r}"
        w, want, eys = self._load(r, masked)
        self.graph.replay()
        self.buf.synchronize()
        err = reference.compare_dispatch(cfg, self.res, want[me])
        if err:
            fail(f"{label} dispatch: {err[0]}")
        drop = to_numpy(self.res.dropped)
        if not np.array_equal(drop, reference.masked_slots(cfg, w.topk_ids[me], masked)):
            fail(f"{label}: dropped {drop}")
        if masked and not self.masked_read:   # (read once: the result object keeps what it read first)
            self.masked_read = True
            if tuple(self.res.masked_ranks) != masked:
                fail(f"{label}: masked_ranks {tuple(self.res.masked_ranks)} != {masked}")
        ys, mags = reference.combine_exact(cfg, eys, want, w.topk_weights)
        err = reference.compare_combine(self.y, ys[me], mags[me])
        if err:
            fail(f"{label} combine: {err[0]}")


t0 = time.monotonic()
for cfg in fence_live_configs(R):
    tag = f"{cfg.mode}-{cfg.token_format}"
    buf = epcomm.EPBuffer(cfg, ctx, fence_dead_ranks=True)
    for r in range(PRE):
        check_round(buf, cfg, tag, r, ())
    graph = None
    if ctx.backend == "gpu":
        try:
            graph = DecodeGraph(buf, cfg, tag)
            for r in range(2):
                graph.replay(r, ())
        except Exception as e:  # noqa: BLE001 - a FAIL line, and the script goes on (without the graph)
            traceback.print_exc()
            fail(f"{tag} graph before the fence: {e!r}")
            graph = None
    if tuple(buf.active_ranks) != tuple(range(R)):
        fail(f"{tag}: active_ranks {buf.active_ranks} before the fence")
    ctx.comm.Barrier()
    if me == 0:
        buf.fence([victim])
        if victim in buf.active_ranks:
            fail(f"{tag}: active_ranks {buf.active_ranks} right after fence([{victim}])")
    ctx.comm.Barrier()   # the notices are in every region: every survivor's next dispatch masks the rank
    if me != victim:
        live = tuple(q for q in range(R) if q != victim)
        for r in range(PRE, PRE + ROUNDS):
            check_round(buf, cfg, tag, r, (victim,))
            if tuple(buf.active_ranks) != live:   # (the host backend reads a peer's notice at its next dispatch)
                fail(f"{tag}: active_ranks {buf.active_ranks} after round {r}, wanted {live}")
            if graph is not None and r % 5 == 4:   # the graph captured before the fence, between eager rounds
                try:
                    graph.replay(r, (victim,))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    fail(f"{tag} graph replay {r} after the fence: {e!r}")
                    graph = None
    graph = None
    buf.close()           # local on every rank: a fenced buffer never frees collectively
    ctx.comm.Barrier()
    if me != victim and not problems:
        print(f"rank {me}: {tag}: rank {victim} fenced while alive, then {ROUNDS} rounds without it: ok", flush=True)
if not problems:
    print(f"rank {me}: fence_live ok ({ctx.backend}, {time.monotonic() - t0:.1f} s)", flush=True)
if ctx.backend == "gpu":   # every rank is alive here: the fenced buffers' symmetric memory is freed with NVSHMEM
    from epcomm.backends.gpu.runtime import Runtime
    rt = Runtime.get()
    if rt:
        rt.close()
sys.exit(1 if problems else 0)
