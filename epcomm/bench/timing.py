"""Timed loops. Both timers run the same protocol per iteration:

    state = prepare(i)            untimed (pick input set i % n_sets, run an untimed dispatch before a combine, ...)
    sync; MPI barrier             untimed: every rank starts the iteration together
    [start] op(state) [end]       timed

HostTimer: time.perf_counter around op (the host backend returns finished numpy arrays).
CudaTimer: torch.cuda.Event(enable_timing=True) around op on the current stream. A short GPU spin
(torch.cuda._sleep) is queued before the start event so the host's launch overhead is hidden, as it is when a model
runs ahead of the GPU; the host time of the op call is recorded separately (host_us). Events are created before the
loop; nothing is allocated by the timer inside the timed region.
Returns per-iteration times in microseconds of this rank only; the driver gathers them over ranks.
"""
from __future__ import annotations

import time


class HostTimer:
    name = "perf_counter"

    def __init__(self, comm):
        self.comm = comm

    def sync(self) -> None:
        pass

    def run(self, warmup: int, iters: int, prepare, op) -> dict:
        times, host = [], []
        for i in range(warmup + iters):
            state = prepare(i)
            self.comm.Barrier()
            t0 = time.perf_counter()
            op(state)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e6)
                host.append((t1 - t0) * 1e6)
        return {"times_us": times, "host_us": host}


class CudaTimer:
    name = "cuda_events"
    # The GPU spins while the host launches the op, so the start event fires only once the op is queued. ~2 ms at
    # H100 clocks: 200k cycles (~100 us) was shorter than some launches (the ht combine after an fp8 dispatch took
    # ~240 us on the host), and the idle GPU time inside the window inflated that row by ~90 us.
    SPIN_CYCLES = 4_000_000

    def __init__(self, comm, torch):
        self.comm, self.torch = comm, torch
        self._spin = getattr(torch.cuda, "_sleep", None)

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def run(self, warmup: int, iters: int, prepare, op) -> dict:
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        host, wall = [], []
        for i in range(warmup + iters):
            state = prepare(i)
            torch.cuda.synchronize()
            self.comm.Barrier()
            j = i - warmup
            if self._spin is not None:
                self._spin(self.SPIN_CYCLES)
            t0 = time.perf_counter()
            if j >= 0:
                starts[j].record()
            op(state)
            if j >= 0:
                ends[j].record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if j >= 0:
                host.append((t1 - t0) * 1e6)
                wall.append((t2 - t0) * 1e6)
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        return {"times_us": times, "host_us": host, "wall_us": wall}
