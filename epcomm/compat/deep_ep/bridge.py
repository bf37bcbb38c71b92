"""The seam between a DeepEP caller's torch world and epcomm: group collectives, the epcomm Context, tensors across
the backend boundary, and the EPBuffers of one shape ("lanes" of a pool).

Backends: on a machine with CUDA the GPU backend (Context from the torch group, NVSHMEM unique id sent over it; the
group may be NCCL or gloo), else the host backend (numpy over MPI: the group's ranks must be MPI.COMM_WORLD's, as
when a gloo group is initialised from the MPI ranks). Host-backend calls take and give numpy arrays; torch CPU
tensors are viewed as numpy at the boundary (no copy for inputs) and results viewed back.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import EPError, EPInputError

LANES = 2   # EPBuffers per shape by default: two dispatches may be outstanding (dual micro-batch) before one is reused


class Group:
    """The few collectives the compat layer needs, over a torch.distributed group or an mpi4py communicator."""

    def __init__(self, group=None, comm=None):
        self.group, self.comm = group, comm
        if group is not None:
            import torch.distributed as dist
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
            self._nccl = "nccl" in str(dist.get_backend(group)).lower()
        elif comm is not None:
            self.rank, self.size = comm.Get_rank(), comm.Get_size()
            self._nccl = False
        else:
            raise EPInputError("Buffer: pass a torch.distributed group (or an mpi4py comm=)")

    def allreduce_max(self, values: list[int]) -> list[int]:
        return self._allreduce(values, "max")

    def allreduce_sum(self, values: list[int]) -> list[int]:
        return self._allreduce(values, "sum")

    def _allreduce(self, values: list[int], op: str) -> list[int]:
        if self.group is None:
            from mpi4py import MPI
            return [int(v) for v in self.comm.allreduce(np.asarray(values, np.int64),
                                                         op=MPI.MAX if op == "max" else MPI.SUM)]
        import torch.distributed as dist
        dev = torch.device("cuda", torch.cuda.current_device()) if self._nccl else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return [int(v) for v in t.tolist()]

    def allgather(self, obj) -> list:
        if self.group is None:
            return self.comm.allgather(obj)
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def choose_backend(backend: str) -> str:
    if backend not in ("auto", "gpu", "host"):
        raise EPInputError(f"Buffer: epcomm_backend must be 'auto', 'gpu' or 'host', got {backend!r}")
    if backend == "auto":
        return "gpu" if torch.cuda.is_available() else "host"
    return backend


def make_context(group: Group, backend: str, symmetric_bytes: int | None):
    if backend == "gpu":
        if group.group is not None:
            from ...backends.gpu.runtime import torch_context
            return torch_context(group.group, symmetric_bytes=symmetric_bytes)
        import epcomm
        return epcomm.init(comm=group.comm, backend="gpu")
    import epcomm
    ctx = epcomm.init(comm=group.comm, backend="host") if group.comm is not None else epcomm.init(backend="host")
    if ctx.world_size != group.size or ctx.rank != group.rank:
        raise EPInputError(f"Buffer on the host backend: the group's rank {group.rank} of {group.size} must be the "
                           f"MPI rank {ctx.rank} of {ctx.world_size} (initialise the gloo group from MPI.COMM_WORLD)")
    return ctx


# --------------------------------------------------------------------------------------- tensors across the boundary
def to_backend(t: torch.Tensor, host: bool):
    """What EPBuffer takes: the tensor itself (GPU backend) or a numpy view of a CPU tensor (host backend)."""
    if not host:
        # the GPU kernels take contiguous rows read with 16-byte loads: copy a strided or mid-vector view
        if not t.is_contiguous() or t.data_ptr() % 16:
            t = t.clone(memory_format=torch.contiguous_format)
        return t
    if t.device.type != "cpu":
        raise EPInputError(f"the host backend takes CPU tensors, got one on {t.device}")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        from ...formats import BF16
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def from_backend(a) -> torch.Tensor | None:
    """A torch view of what EPBuffer returned (numpy on the host backend; unsigned offsets become int64). Strides are
    kept: column-major fp8 scales stay column-major, and the tensor shares the array's memory (no copy)."""
    if a is None or isinstance(a, torch.Tensor):
        if isinstance(a, torch.Tensor) and a.dtype == torch.uint32:
            return a.view(torch.int32).long()
        return a
    from ...formats import BF16, FP8
    a = np.asarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == FP8:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    if a.dtype == np.uint32:
        return torch.from_numpy(a.astype(np.int64))
    return torch.from_numpy(a)


def writable(t: torch.Tensor, host: bool, align: int = 1):
    """What EPBuffer writes into so that `t` itself changes (combine's out=, dispatch's stats_out=): the tensor (GPU
    backend) or a numpy view of its memory (host backend); None where it cannot be written in place (not contiguous,
    or on the GPU not `align`-byte aligned): the caller then lets EPBuffer write elsewhere and copies."""
    if not t.is_contiguous() or (not host and t.data_ptr() % align):
        return None
    return to_backend(t, host)


# --------------------------------------------------------------------------------------- EPBuffers of one shape
class Lane:
    """One EPBuffer and which of its dispatches may still be combined (epcomm combines only the latest dispatch of
    a buffer, once)."""

    def __init__(self, ep):
        self.ep = ep
        self.open_round: int | None = None    # the latest dispatch, while it has not been combined
        self.closed = False
        self.scratch = None                   # normal-mode combine rows, allocated on first use
        self.zero_copy_input = None           # low-latency get_next_low_latency_combine_buffer tensor

    def dispatch(self, x, ids, host: bool, async_: bool = False, stats_out=None):
        """(the EPBuffer's DispatchResult, or its Pending with async_, and the round). stats_out: a backend array
        (writable()) the received rows per local expert are added to."""
        args = (to_backend(x, host), to_backend(ids, host))
        self.ep.release()   # a lane combines only its latest dispatch: the earlier ones will not be combined here
        call = self.ep.dispatch_async if async_ else self.ep.dispatch
        out = call(*args, stats_out=stats_out)
        self.open_round = self.ep.round - 1
        return out, self.open_round

    def can_combine(self, rnd: int) -> bool:
        return not self.closed and self.open_round == rnd

    def close(self):
        if not self.closed:
            self.closed = True
            self.ep.close()


class Pool:
    """The lanes of one shape key. A dispatch takes a lane with nothing left to combine, else opens a second one
    (collective: every rank issues the same calls, so every rank decides the same), else reuses the lane whose open
    dispatch is oldest (that dispatch's handle is then re-dispatched if it is combined later)."""

    def __init__(self, make_ep, cfg, max_lanes: int = LANES):
        self.make_ep, self.cfg, self.max_lanes = make_ep, cfg, max_lanes
        self.lanes: list[Lane] = []
        self._age = 0
        self._used: dict[int, int] = {}

    def lane_for_dispatch(self) -> Lane:
        free = [ln for ln in self.lanes if ln.open_round is None]
        if free:
            lane = free[0]
        elif len(self.lanes) < self.max_lanes:
            lane = Lane(self.make_ep(self.cfg))
            self.lanes.append(lane)
        else:
            lane = min(self.lanes, key=lambda ln: self._used.get(id(ln), 0))
        self._age += 1
        self._used[id(lane)] = self._age
        return lane

    def close(self):
        for ln in self.lanes:
            ln.close()
        self.lanes = []


def check_tensor(name: str, t, dtypes: tuple, ndim: int, where: str):
    if not isinstance(t, torch.Tensor):
        raise EPInputError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise EPInputError(f"{where}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise EPInputError(f"{where}: {name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def unsupported(what: str):
    raise EPError(f"epcomm.compat.deep_ep: {what} is not supported (docs/COMPAT-DEEPEP.md)")
