"""epcomm.init(): who am I (rank, node, device), which communicator and topology, which backend.

    ctx = epcomm.init()          # MPI.COMM_WORLD, topology from EPCOMM_TOPOLOGY (set by `python -m launch`)

The topology comes from, in order: the `topology` argument (a Topology or a YAML path / configs name), the
EPCOMM_TOPOLOGY environment variable, else a single node holding every rank. Its world size must equal the
communicator's. init() is idempotent: a second call with no arguments (or the same ones) returns the same Context.
finalize() forgets it and closes the EPBuffers still open on it (collective, like their creation).
"""
from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EPInputError
from .topology import Topology

BACKENDS = ("auto", "host", "gpu")

_CTX: "Context | None" = None
_CTX_KEY: tuple | None = None


@dataclass(eq=False)
class Context:
    comm: Any                 # mpi4py communicator (None only for a world of one built without MPI)
    topology: Topology
    rank: int
    world_size: int
    node: int
    local_rank: int
    device: int
    backend: str              # "host" | "gpu"
    _buffers: "weakref.WeakSet" = field(default_factory=weakref.WeakSet, repr=False)

    def same_node(self, a: int, b: int) -> bool:
        return self.topology.same_node(a, b)

    def node_of(self, rank: int) -> int:
        return self.topology.node_of(rank)

    def describe(self, rank: int) -> str:
        """'rank 3 (node 1)': how errors name a peer."""
        return f"rank {rank} (node {self.node_of(rank)})"

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes


def _load_topology(topology) -> Topology | None:
    if topology is None or isinstance(topology, Topology):
        return topology
    if isinstance(topology, (str, os.PathLike)):
        p = Path(topology)
        if not p.is_file():
            for c in (Path("configs") / p, Path("configs") / f"{p}.yaml",
                      Path(__file__).resolve().parent.parent / "configs" / f"{p}.yaml"):
                if c.is_file():
                    p = c
                    break
        return Topology.load(p)
    raise EPInputError(f"init: topology must be a Topology or a YAML path, got {type(topology).__name__}")


def _world_comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _abort_job_on_uncaught_exception(comm) -> None:
    """An exception that ends one rank ends the job: print it, then MPI_Abort.

    Without this, the rank that raised waits in MPI_Finalize at exit while its peers wait for it in a collective (or a
    signal), and the job only ends at the launcher's --timeout (seen on the GPU machine when one rank failed to import
    a module inside EPBuffer()). Installed once, by the first init() of a multi-rank job."""
    if getattr(sys.excepthook, "_epcomm_abort", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if not issubclass(exc_type, KeyboardInterrupt):
            sys.stderr.write(f"epcomm: rank {comm.Get_rank()} ended with {exc_type.__name__}; aborting the job\n")
        sys.stderr.flush()
        comm.Abort(1)

    hook._epcomm_abort = True
    sys.excepthook = hook


def init(topology=None, comm=None, backend: str = "auto", abort_on_error: bool = True) -> Context:
    """The Context of this process (see module doc). Raises EPInputError on a topology / communicator mismatch.

    abort_on_error: an exception that reaches the top of a rank's program aborts every rank (MPI_Abort) instead of
    leaving the peers waiting for their deadline; pass False to handle it yourself."""
    global _CTX, _CTX_KEY
    if backend not in BACKENDS:
        raise EPInputError(f"init: backend must be one of {BACKENDS}, got {backend!r}")
    key = (id(topology) if topology is not None else None, id(comm) if comm is not None else None, backend)
    if _CTX is not None and (key == _CTX_KEY or (topology is None and comm is None and backend == "auto")):
        return _CTX

    comm = _world_comm() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if abort_on_error and size > 1:
        _abort_job_on_uncaught_exception(comm)
    topo = _load_topology(topology)
    if topo is None:
        topo = Topology.from_env()
    if topo is None:
        topo = Topology.single_node(size)
    if topo.world_size != size:
        raise EPInputError(f"topology {topo.name!r} has world_size {topo.world_size} "
                           f"({topo.num_nodes} node(s) x {topo.ranks_per_node}) but the communicator has "
                           f"{size} ranks")
    node, local = topo.rank_to_node(rank)
    env_node = os.environ.get("EPCOMM_NODE")
    if topology is None and env_node not in (None, "") and int(env_node) != node:
        raise EPInputError(f"rank {rank}: EPCOMM_NODE={env_node} but topology {topo.name!r} puts it on node {node}")
    env_dev = os.environ.get("EPCOMM_DEVICE")
    if env_dev not in (None, ""):
        device = int(env_dev)
    else:
        dev = topo.device(rank)
        device = local if dev is None else dev
    resolved = topo.resolved_backend() if backend == "auto" else backend
    ctx = Context(comm=comm, topology=topo, rank=rank, world_size=size, node=node, local_rank=local,
                  device=device, backend=resolved)
    _CTX, _CTX_KEY = ctx, key
    return ctx


def current() -> Context | None:
    return _CTX


def finalize() -> None:
    """Close every EPBuffer still open on the current Context and forget it. Does not finalize MPI."""
    global _CTX, _CTX_KEY
    ctx = _CTX
    _CTX, _CTX_KEY = None, None
    if ctx is not None:
        for buf in sorted(list(ctx._buffers), key=lambda b: b._serial):
            buf.close()
