"""The floor's latency term, measured in the bench run (the `latency` case; kernels in latency.cu).

Without it the floor is bytes / bandwidth only, which reads ~0.04 us at 1 token: no ratio at small sizes says how far
an operation is from what the hardware allows. Two costs every dispatch or combine pays, whatever its design:
* launch: one empty kernel timed exactly as the operations are (CudaTimer: GPU spin, CUDA events around the
  launch, slowest rank per iteration, median), eagerly and as a CUDA-graph replay (the graph rows' term);
* handshake: one flag round trip to the peer: the initiator raises a flag word in the peer's memory, the peer raises
  one back (the echo), timed in the kernel over many round trips. On one node through peer pointers (release store,
  as the EP kernels raise their ready flags); to another node (simulated nodes included) through NVSHMEM signals.
  Rank 0 measures with every other rank in turn; the slowest pair counts (an operation ends with its last rank).
Per-op latency = launch + handshake (graph rows: graph launch + handshake); floor.with_latency adds it per op.

The probe needs the GPU backend's NVSHMEM runtime (it starts one when no EPBuffer has, with a heap for the probe
only; the case runs after the epcomm cases, whose first buffer sized the heap) and nvcc (built like the EP kernels,
cached next to them: no defines, so one cubin per nvcc / NVSHMEM version).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..stats import median, slowest_rank

SOURCE = Path(__file__).resolve().with_name("latency.cu")
# the header it shares with the EP kernels (the clock, the memory-order loads and stores)
ORDERING = Path(__file__).resolve().parents[1] / "backends" / "gpu" / "kernels" / "ordering.cuh"
KERNELS = ("probe_empty", "probe_flag_pingpong")
FLAG_BYTES = 256            # one flag word per rank, on its own cache line
WARMUP_ROUNDS = 50
ROUNDS = 2000               # ~2-3 us each on NVLink: a few ms per pair
TIMEOUT_S = 5.0             # a peer that never answers is a named error, never a hang


class ProbeError(RuntimeError):
    """The latency probe could not be built or did not complete (a peer did not answer in time)."""


def cubin_key(arch: str, nvcc: str, nvshmem_version: str) -> str:
    """Cache key of the probe cubin: its source, the arch, the nvcc and NVSHMEM versions."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    sources = SOURCE.read_bytes() + ORDERING.read_bytes()
    src = repr((hashlib.sha256(sources).hexdigest(), arch, out.splitlines()[-1] if out else nvcc,
                nvshmem_version))
    return hashlib.sha256(src.encode()).hexdigest()[:24]


def build(arch: str = "sm_90", use_cache: bool = True) -> Path:
    """Compile latency.cu into a cubin linked with NVSHMEM's device library (as the EP kernels are); needs no GPU."""
    from ..backends.gpu import jit
    nvcc, home = jit.find_nvcc(), jit.nvshmem_home()
    out = jit.cache_dir() / f"probe-{arch}-{cubin_key(arch, nvcc, jit.nvshmem_version(home))}.cubin"
    if use_cache and out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="epcomm-probe-") as tmp:
        obj, cub = Path(tmp) / "probe.o", Path(tmp) / "probe.cubin"
        for cmd in ([nvcc, "-rdc=true", f"-arch={arch}", "-O3", "-std=c++17", f"-I{home / 'include'}",
                     f"-I{ORDERING.parent}", "-c",
                     str(SOURCE), "-o", str(obj)],
                    [nvcc, f"-arch={arch}", "-dlink", "-cubin", str(obj), f"-L{home / 'lib'}", "-lnvshmem_device",
                     "-o", str(cub)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise ProbeError(f"latency probe build failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}")
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(cub, tmp_out)
        os.replace(tmp_out, out)
    return out


def _args(*values) -> ctypes.Array:
    """cuLaunchKernel's kernelParams: an array of pointers to each argument (kept alive with the array)."""
    arr = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    arr._keep = values
    return arr


class LatencyProbe:
    """The probe kernels loaded on this rank, a symmetric flag buffer, and the measurements. Collective: every rank
    creates it, calls the same methods in the same order and closes it."""

    def __init__(self, torch, ctx, comm, timer):
        from cuda.bindings import driver
        from cuda.core import ObjectCode
        import nvshmem.core as nvc
        from nvshmem.core.nvshmem_types import NvshmemKernelObject

        from ..backends.gpu.runtime import Runtime
        self.torch, self.ctx, self.comm, self.timer = torch, ctx, comm, timer
        self.rank, self.world = ctx.rank, ctx.world_size
        # a process without EPBuffers gets a runtime sized for the probe alone
        self.rt = Runtime.get() or Runtime.from_context(ctx, symmetric_bytes=FLAG_BYTES * max(1, self.world))
        self.buf, self.flag, self.peers = self.rt.symmetric(FLAG_BYTES)
        self.obj = ObjectCode.from_cubin(build().read_bytes())
        kernels = {n: self.obj.get_kernel(n) for n in KERNELS}
        self._nv = NvshmemKernelObject.from_obj(self.obj)
        nvc.library_init(self._nv)
        self.fn = {}
        for n, k in kernels.items():
            err, f = driver.cuKernelGetFunction(k.handle)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise ProbeError(f"cuKernelGetFunction({n}): {err}")
            self.fn[n] = f
        self.out = torch.zeros(2, dtype=torch.int64, device=torch.device("cuda", ctx.device))
        self.seq = 0       # the flag rounds used so far (the same on every rank)

    def _launch(self, name: str, args=None) -> None:
        from cuda.bindings import driver
        stream = driver.CUstream(self.torch.cuda.current_stream().cuda_stream)
        params = 0 if args is None else ctypes.addressof(args)
        err = driver.cuLaunchKernel(self.fn[name], 1, 1, 1, 1, 1, 1, 0, stream, params, 0)
        err = err[0] if isinstance(err, tuple) else err
        if err != driver.CUresult.CUDA_SUCCESS:
            raise ProbeError(f"launch {name}: {err}")

    # ------------------------------------------------------------------------------------------------ launch
    def launch_us(self, warmup: int, iters: int) -> float:
        """Median (slowest rank per iteration) of an empty kernel between two CUDA events, as the ops are timed."""
        tm = self.timer.run(warmup, iters, lambda i: None, lambda _: self._launch("probe_empty"))
        return self._slowest_median(tm)

    def launch_graph_us(self, warmup: int, iters: int) -> float:
        """The same for an empty kernel captured in a CUDA graph and replayed (what the graph rows pay)."""
        torch = self.torch
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._launch("probe_empty")
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            self._launch("probe_empty")
        torch.cuda.synchronize()
        tm = self.timer.run(warmup, iters, lambda i: None, lambda _: g.replay())
        return self._slowest_median(tm)

    def _slowest_median(self, tm: dict) -> float:
        return median(slowest_rank([p["times_us"] for p in self.comm.allgather(tm)]))

    # ------------------------------------------------------------------------------------------------ handshake
    def flag_round_trip(self, peer: int, warmup: int = WARMUP_ROUNDS, rounds: int = ROUNDS) -> dict:
        """Rank 0 with `peer`: {'peer', 'path', 'rtt_us'} on every rank (the others only keep step). Raises
        ProbeError on every rank when a side timed out."""
        torch = self.torch
        me_in = self.rank in (0, peer)
        other = peer if self.rank == 0 else 0
        via_pointer = bool(self.peers[other]) if me_in else False
        base = self.seq
        self.seq += warmup + rounds
        torch.cuda.synchronize()
        self.comm.Barrier()
        if me_in:
            peer_flag = self.peers[other] if via_pointer else 0
            args = _args(ctypes.c_uint64(self.flag), ctypes.c_uint64(peer_flag), ctypes.c_int(other),
                         ctypes.c_int(int(self.rank == 0)), ctypes.c_uint64(base), ctypes.c_int(warmup),
                         ctypes.c_int(rounds), ctypes.c_uint64(int(TIMEOUT_S * 1e9)),
                         ctypes.c_uint64(self.out.data_ptr()))
            self._launch("probe_flag_pingpong", args)
            torch.cuda.synchronize()
            ns, stuck = (int(v) for v in self.out.cpu().tolist())
        else:
            ns, stuck = 0, 0
        rows = self.comm.allgather((self.rank, me_in, via_pointer, ns, stuck))
        bad = [f"rank {r} waited {TIMEOUT_S:g} s for flag round {s - base}" for r, _, _, _, s in rows if s]
        if bad:
            raise ProbeError(f"flag round trip 0 <-> {peer}: " + "; ".join(bad))
        ns0 = rows[0][3]
        return {"peer": peer, "path": "peer pointer" if rows[0][2] else "nvshmem signal",
                "rtt_us": ns0 / rounds / 1e3}

    def close(self) -> None:
        import nvshmem.core as nvc
        try:
            nvc.library_finalize(self._nv)
        finally:
            self.rt.free(self.buf)


def measure(torch, ctx, comm, timer, warmup: int, iters: int, log=None) -> dict:
    """The doc's floor_latency: launch (eager, graph), each pair's flag round trip, and the per-op terms."""
    t0 = time.perf_counter()
    try:   # every rank builds (or finds) the cubin first and they agree, so none enters a collective alone
        build()
        why = None
    except Exception as e:  # noqa: BLE001
        why = f"rank {ctx.rank}: {type(e).__name__}: {e}"
    whys = [w for w in comm.allgather(why) if w]
    if whys:
        raise ProbeError("; ".join(whys))
    probe = LatencyProbe(torch, ctx, comm, timer)
    try:
        eager = probe.launch_us(warmup, iters)
        graph = probe.launch_graph_us(warmup, iters)
        pairs = [probe.flag_round_trip(p) for p in range(1, ctx.world_size)]
    finally:
        probe.close()
    rtt = max((p["rtt_us"] for p in pairs), default=0.0)
    out = {"status": "ok", "launch_us": eager, "launch_graph_us": graph, "flag_rtt_us": rtt,
           "pairs": pairs, "per_op_us": eager + rtt, "per_op_graph_us": graph + rtt,
           "method": "empty kernel between CUDA events (CudaTimer, median of the slowest rank), eager and graph "
                     f"replay; flag round trip rank 0 <-> each rank ({ROUNDS} round trips in one kernel, "
                     "%globaltimer), slowest pair",
           "seconds": time.perf_counter() - t0}
    if log:
        log(f"latency: launch {eager:.2f} us (graph {graph:.2f}), flag round trip "
            + ", ".join(f"0<->{p['peer']} {p['rtt_us']:.2f} us ({p['path']})" for p in pairs)
            + f"; per op {out['per_op_us']:.2f} us (graph {out['per_op_graph_us']:.2f})")
    return out
