"""NVSHMEM runtime of the GPU backend: one per process.

Init: nvshmem4py with a unique id (``initializer_method="uid"``) that rank 0 creates and the others receive through
whatever the caller has: an mpi4py communicator (Runtime.from_context / from_mpi), a torch.distributed group
(Runtime.from_torch) or the caller's own channel (Runtime.from_uid with the bytes of ``Runtime.new_uid()``).
The device is ctx.device. Symmetric buffers come from ``nvshmem.core.buffer``; peer pointers are taken only for peers
on the same node *by topology* (Topology.same_node), so a simulated second node on the same host still goes through
NVSHMEM put + signal. NVLink multicast stays off (NVSHMEM_DISABLE_NVLS=1 is forced before init).

Heap: NVSHMEM reserves its symmetric heap once, at init. Every bootstrap sizes it from what the first buffer needs
(layout.heap_bytes: its symmetric bytes + a documented margin) unless NVSHMEM_SYMMETRIC_SIZE is set: the MPI path
initialises when the first GpuBackend is made; torch_context / uid_context defer the init to that moment too (the
unique id goes out then, collectively) unless they are given symmetric_bytes.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time

import numpy as np

from .heap import NVSHMEM_DEFAULTS
from .layout import (CAPACITY_FIELDS, CAPACITY_RECORD_WORD, HEAP_MARGIN, OVERWRITE_RECORD_WORD, RECORD_WORDS,
                     REFUSAL_FIELDS, REFUSAL_RECORD_WORD, ErrorCode, Phase, heap_bytes)

log = logging.getLogger("epcomm.gpu")

_RT: "Runtime | None" = None
_DEFERRED = None    # torch_context / uid_context without a size: the bootstrap, run by the first buffer (its need)


def _set_safe_env(symmetric_bytes: int | None):
    """symmetric_bytes: what the process's buffers need; the heap gets that plus the margin (layout.heap_bytes).

    NVSHMEM reads its environment once, at the first nvshmemx_get_uniqueid or init of the process (env_vars.cpp
    nvshmemi_options_init): this runs before both (new_uid, the constructors), else rank 0, which makes the unique
    id, would keep what the environment said before."""
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"          # never NVLink multicast
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    for k, v in NVSHMEM_DEFAULTS.items():            # 2 MiB heap granules, 7 teams: heap.py says why
        os.environ.setdefault(k, v)
    if symmetric_bytes and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(heap_bytes(symmetric_bytes))


def _check(res, what="CUDA call"):
    from cuda.bindings import driver
    err = res[0] if isinstance(res, tuple) else res
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


# How long the failure paths (GpuBackend.abort and the read of an abort word) wait for their copies and NVSHMEM
# signals before giving up: a wedged device must not turn a failure into a hang.
ABORT_WAIT_S = 2.0


def wait_stream(st, seconds: float) -> bool:
    """Poll a stream until its work is done (True) or `seconds` passed (False); never blocks longer."""
    from cuda.bindings import driver
    end = time.monotonic() + seconds
    while True:
        res = driver.cuStreamQuery(st)
        err = res[0] if isinstance(res, tuple) else res
        if err == driver.CUresult.CUDA_SUCCESS:
            return True
        if err != driver.CUresult.CUDA_ERROR_NOT_READY or time.monotonic() > end:
            return False
        time.sleep(0.001)


class Runtime:
    """nvshmem init + device + symmetric allocations + peer pointers. Use Runtime.get(...) (one per process)."""

    def __init__(self, rank: int, world_size: int, device: int, same_node, node_of, uid_bytes: bytes,
                 symmetric_bytes: int | None = None):
        import nvshmem.core as nvc
        from cuda.core import Device

        _set_safe_env(symmetric_bytes)
        self.rank, self.world_size, self.device_id = rank, world_size, device
        self.same_node, self.node_of = same_node, node_of
        t0 = time.perf_counter()
        self.device = Device(device)
        self.device.set_current()
        uid = nvc.get_unique_id(empty=True)
        raw = np.frombuffer(uid_bytes, dtype=np.int8)
        uid._data.view(np.int8)[:] = raw
        nvc.init(device=self.device, uid=uid, rank=rank, nranks=world_size, initializer_method="uid")
        self.nvc = nvc
        if nvc.my_pe() != rank or nvc.n_pes() != world_size:
            raise RuntimeError(f"nvshmem PE {nvc.my_pe()}/{nvc.n_pes()} != rank {rank}/{world_size}")
        self._bufs = []
        self._allocated = 0      # bytes of the live symmetric buffers (for the "set the heap to ..." message)
        self.closed = False
        from cuda.bindings import driver
        self.num_sms = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device), "cuDeviceGetAttribute")
        log.info("epcomm gpu: nvshmem init rank %d/%d device %d in %.2f s (%s)", rank, world_size, device,
                 time.perf_counter() - t0, nvc.get_version())

    # ---------------------------------------------------------------- constructors
    @staticmethod
    def new_uid(symmetric_bytes: int | None = None) -> bytes:
        """A fresh NVSHMEM unique id (call on one rank, send the bytes to all, pass them to from_uid).
        NVSHMEM fixes this process's settings now (_set_safe_env): symmetric_bytes, when known, sizes its heap."""
        _set_safe_env(symmetric_bytes)
        import nvshmem.core as nvc
        return nvc.get_unique_id()._data.view(np.int8).tobytes()

    @classmethod
    def get(cls) -> "Runtime | None":
        return _RT if (_RT is not None and not _RT.closed) else None

    @classmethod
    def from_uid(cls, uid_bytes: bytes, rank: int, world_size: int, device: int, topology=None,
                 symmetric_bytes: int | None = None) -> "Runtime":
        global _RT
        if cls.get() is not None:
            return _RT
        if topology is None:
            same_node, node_of = (lambda a, b: True), (lambda r: 0)
        else:
            same_node, node_of = topology.same_node, topology.node_of
        _RT = cls(rank, world_size, device, same_node, node_of, uid_bytes, symmetric_bytes)
        return _RT

    @classmethod
    def from_context(cls, ctx, symmetric_bytes: int | None = None) -> "Runtime":
        """From an epcomm Context: the deferred bootstrap of torch_context / uid_context if there is one, else a uid
        broadcast over ctx.comm (mpi4py). symmetric_bytes: what the first buffer needs (sizes the heap)."""
        global _DEFERRED
        if cls.get() is not None:
            return _RT
        if _DEFERRED is not None:
            boot, _DEFERRED = _DEFERRED, None
            return boot(symmetric_bytes)
        comm = ctx.comm
        if comm is None:
            if ctx.world_size != 1:
                raise RuntimeError("gpu backend needs ctx.comm (mpi4py) to broadcast the NVSHMEM unique id")
            uid = cls.new_uid(symmetric_bytes)
        else:
            uid = comm.bcast(cls.new_uid(symmetric_bytes) if ctx.rank == 0 else None, root=0)
        return cls.from_uid(uid, ctx.rank, ctx.world_size, ctx.device, ctx.topology, symmetric_bytes)

    @classmethod
    def from_torch(cls, group=None, topology=None, device: int | None = None,
                   symmetric_bytes: int | None = None) -> "Runtime":
        """From a torch.distributed process group: uid broadcast with broadcast_object_list."""
        import torch
        import torch.distributed as dist
        if cls.get() is not None:
            return _RT
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        obj = [cls.new_uid(symmetric_bytes) if rank == 0 else None]
        dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        if device is None:
            device = torch.cuda.current_device()
        return cls.from_uid(obj[0], rank, world, device, topology, symmetric_bytes)

    # ---------------------------------------------------------------- memory
    def symmetric(self, nbytes: int):
        """Collective: a zeroed symmetric buffer; returns (buffer, local address, [peer address or 0 per rank])."""
        from cuda.bindings import driver
        nbytes = max(256, (int(nbytes) + 255) // 256 * 256)
        try:
            buf = self.nvc.buffer(nbytes)
        except Exception as e:  # the symmetric heap is sized once, at nvshmem init
            from ...errors import EPError
            want = self._allocated + nbytes + HEAP_MARGIN
            raise EPError(f"epcomm gpu: cannot allocate {nbytes / 2**20:.0f} MiB of NVSHMEM symmetric memory ({e}): "
                          f"the heap was sized at init, NVSHMEM_SYMMETRIC_SIZE="
                          f"{os.environ.get('NVSHMEM_SYMMETRIC_SIZE', 'default')}, and holds {len(self._bufs)} "
                          f"buffer(s) of {self._allocated / 2**20:.0f} MiB; this process needs "
                          f"NVSHMEM_SYMMETRIC_SIZE={want} ({want / 2**30:.2f} GiB; or the topology's "
                          f"nvshmem.symmetric_size) set before the first EPBuffer") from e
        ptr = int(buf.handle)
        _check(driver.cuMemsetD8(ptr, 0, nbytes), "cuMemsetD8")
        _check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
        peers = []
        for r in range(self.world_size):
            if r == self.rank:
                peers.append(ptr)
            elif self.same_node(self.rank, r):
                pb = self.nvc.get_peer_buffer(buf, r)
                peers.append(int(pb.handle) if pb is not None else 0)
            else:
                peers.append(0)
        self._bufs.append(buf)
        self._allocated += nbytes
        self._sizes = getattr(self, "_sizes", {})
        self._sizes[id(buf)] = nbytes
        self.barrier()
        return buf, ptr, peers

    def free(self, buf):
        if buf in self._bufs:
            self._bufs.remove(buf)
            self._allocated -= getattr(self, "_sizes", {}).pop(id(buf), 0)
            self.nvc.free(buf)

    def barrier(self):
        from cuda.core import Device
        s = Device(self.device_id).create_stream()
        self.nvc.barrier_all(stream=s)
        s.sync()
        s.close()

    def close(self):
        global _RT
        if self.closed:
            return
        for b in list(self._bufs):
            try:
                self.nvc.free(b)
            except Exception:
                pass
        self._bufs.clear()
        try:
            self.nvc.finalize()
        finally:
            self.closed = True
            if _RT is self:
                _RT = None


class HostErrorRecord:
    """int32 words in host-mapped pinned memory that kernels write: the error record (8 words, ErrRec in
    kernels/layout.cuh), written when they give up, then the capacity and refusal records (rounds that are not
    failures) and the overwrite record (launches refused because of a live result; layout.py). read() gives `code`
    as a layout.ErrorCode and `phase` as a layout.Phase where the values are known."""
    FIELDS = ("flag", "code", "peer", "what", "waiter", "round", "phase", "pad")

    def __init__(self):
        from cuda.bindings import driver
        flags = driver.CU_MEMHOSTALLOC_DEVICEMAP | driver.CU_MEMHOSTALLOC_PORTABLE
        self.host = _check(driver.cuMemHostAlloc(4 * RECORD_WORDS, flags), "cuMemHostAlloc")
        self.dev = int(_check(driver.cuMemHostGetDevicePointer(self.host, 0), "cuMemHostGetDevicePointer"))
        self.words = (ctypes.c_int32 * RECORD_WORDS).from_address(int(self.host))
        self.clear()   # also sets refusals_seen: the refusal record's count when the host last raised it

    def read(self) -> dict | None:
        if self.words[0] == 0:
            return None
        rec = {f: int(self.words[i]) for i, f in enumerate(self.FIELDS)}
        for field, kind in (("code", ErrorCode), ("phase", Phase)):
            if rec[field] in kind._value2member_map_:
                rec[field] = kind(rec[field])
        return rec

    def read_capacity(self) -> dict | None:
        """The receive-capacity record (words 8..: the latest void round; CapacityRec in kernels/layout.cuh), or None.
        Cleared once read: each void round is raised once."""
        w = CAPACITY_RECORD_WORD
        if self.words[w] == 0:
            return None
        rec = {f: int(self.words[w + i]) for i, f in enumerate(CAPACITY_FIELDS)}
        self.words[w] = 0
        return rec

    def read_refusal(self) -> dict | None:
        """The refusal record (words 16..; RefusalRec in kernels/layout.cuh) when its count moved since the last
        read: the latest combine whose tokens went to the experts of a rank that refused its input, and `more`, the
        earlier ones since the last read. None otherwise. The host never writes the record (the device may be
        writing the next one): fields read between two equal reads of the count."""
        w = REFUSAL_RECORD_WORD
        for _ in range(100):
            count = int(self.words[w])
            if count == self.refusals_seen:
                return None
            rec = {f: int(self.words[w + i]) for i, f in enumerate(REFUSAL_FIELDS)}
            if int(self.words[w]) == count:
                break
        rec["more"] = count - self.refusals_seen - 1
        self.refusals_seen = count
        return rec

    def read_overwrite(self) -> dict | None:
        """The overwrite record (words 24..: the first launch refused because of a live result since the last read,
        and how many; OverwriteRec in kernels/layout.cuh), or None. Cleared once read."""
        w = self.words
        at = OVERWRITE_RECORD_WORD
        if w[at] == 0:
            return None

        def u64(i):
            return (w[i] & 0xFFFFFFFF) | ((w[i + 1] & 0xFFFFFFFF) << 32)
        rec = {"count": int(w[at + 1]), "op": int(w[at + 2]), "why": int(w[at + 3]), "holder": u64(at + 4),
               "call": u64(at + 6)}
        w[at + 1] = 0
        w[at] = 0
        return rec

    def clear(self):
        for i in range(RECORD_WORDS):
            self.words[i] = 0
        self.refusals_seen = 0

    def close(self):
        from cuda.bindings import driver
        if self.host:
            driver.cuMemFreeHost(self.host)
            self.host = 0


# ------------------------------------------------------------------------------------------------ contexts without MPI
def _gpu_context(rank: int, world_size: int, device: int, topology=None):
    from ...context import Context
    from ...topology import Topology
    if topology is None:
        topology = Topology.single_node(world_size, backend="gpu", gpus=list(range(world_size)))
    return Context(comm=None, topology=topology, rank=rank, world_size=world_size, node=topology.node_of(rank),
                   local_rank=topology.local_rank(rank), device=device, backend="gpu")


def _defer(boot) -> None:
    global _DEFERRED
    if Runtime.get() is None:
        _DEFERRED = boot


def torch_context(group=None, topology=None, device: int | None = None, symmetric_bytes: int | None = None):
    """An epcomm Context for a torch.distributed job (torchrun, ...): NVSHMEM's unique id goes over the group.

        ctx = torch_context()                       # after torch.distributed.init_process_group(...)
        buf = epcomm.EPBuffer(cfg, ctx)
    Without a topology every rank counts as one node (peer pointers); pass a Topology for several nodes.
    NVSHMEM starts with the first EPBuffer (collective, as that is), its heap sized for that buffer; give
    symmetric_bytes (the symmetric bytes your buffers need, epcomm.memory) to start it now for several buffers.
    """
    import torch
    import torch.distributed as dist
    if device is None:
        device = torch.cuda.current_device()
    if symmetric_bytes:
        rt = Runtime.from_torch(group, topology, device, symmetric_bytes)
        return _gpu_context(rt.rank, rt.world_size, device, topology)
    _defer(lambda need: Runtime.from_torch(group, topology, device, need))
    return _gpu_context(dist.get_rank(group), dist.get_world_size(group), device, topology)


def uid_context(uid_bytes: bytes, rank: int, world_size: int, device: int, topology=None,
                symmetric_bytes: int | None = None):
    """An epcomm Context from a caller-supplied NVSHMEM unique id (Runtime.new_uid() on one rank, sent by any means).
    NVSHMEM starts with the first EPBuffer, sized for it, unless symmetric_bytes is given (as for torch_context)."""
    if symmetric_bytes:
        rt = Runtime.from_uid(uid_bytes, rank, world_size, device, topology, symmetric_bytes)
        return _gpu_context(rt.rank, rt.world_size, device, topology)
    _defer(lambda need: Runtime.from_uid(uid_bytes, rank, world_size, device, topology, need))
    return _gpu_context(rank, world_size, device, topology)
