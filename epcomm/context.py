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


_EXIT: dict = {"code": None}   # the code of the last sys.exit / exit() on the main thread


def _record_exit_code(code) -> None:
    """The code a SystemExit carries, as the interpreter will turn it into an exit status (main thread only: a
    SystemExit in another thread ends just that thread)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    if code is None:
        _EXIT["code"] = 0
    elif isinstance(code, int):
        _EXIT["code"] = code & 0xFF
    else:   # sys.exit("message") prints it and exits 1
        _EXIT["code"] = 1


def _end_job(comm, code: int, reason: str) -> None:
    """This rank ends while its peers may sit in a collective waiting for it: say so, leave an exit record for the
    launcher, then MPI_Abort so every rank ends now with this code (instead of at the launcher's --timeout)."""
    from . import exitrecord
    rank = comm.Get_rank()
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed stdout must not stop the abort
        pass
    try:
        sys.stderr.write(f"epcomm: rank {rank} ended with {reason}; aborting the job (exit {code})\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    exitrecord.write(rank, code, reason, by="rank")
    comm.Abort(code)
    os._exit(code)   # MPI_Abort may return (MPICH did, from an atexit handler): never go on to MPI_Finalize


def _everyone_ending(world: int) -> bool:
    import time

    from . import exitrecord
    job_dir = os.environ.get(exitrecord.ENV)
    if not job_dir:
        return False
    end = time.monotonic() + exitrecord.COLLECTIVE_EXIT_WAIT_S
    while True:
        if len(exitrecord.ranks_ending(exitrecord.read_all(job_dir))) >= world:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def _install_exit_guard(comm) -> None:
    """Any end of this rank that its peers cannot see coming ends the whole job, with this rank's code.

    * an uncaught exception: printed, then MPI_Abort(1). Without it the rank that raised waits in MPI_Finalize
      while its peers wait for it (seen on the GPU machine when one rank failed to import a module inside EPBuffer());
    * sys.exit(n) / exit(n) with n != 0: MPI_Abort(n) at interpreter exit. Without it the rank would wait in
      MPI_Finalize for peers that wait for it in a collective (a barrier, an EPBuffer creation), and the job would
      only end at the launcher's --timeout (the code lost). Under the launcher, when every rank is ending within
      exitrecord.COLLECTIVE_EXIT_WAIT_S (all exit 1 after a failed check, say), the exit is a normal one, code n;
    * sys.exit(0) or the end of the script: a normal end, MPI_Finalize as usual.
    A SystemExit raised directly (`raise SystemExit(3)`) carries a code that Python shows to no hook: it counts as
    a normal end here (the launcher's --exit-wait covers it). A kill -9 is seen by the launcher's rank wrapper.
    Installed once, by the first init() of a multi-rank job."""
    if getattr(sys.excepthook, "_epcomm_abort", False):
        return
    import atexit
    import builtins

    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if issubclass(exc_type, KeyboardInterrupt):
            sys.stderr.flush()
            comm.Abort(1)
            return
        first = (str(exc).splitlines() or [""])[0]
        _end_job(comm, 1, f"{exc_type.__name__}: {first}" if first else exc_type.__name__)

    hook._epcomm_abort = True
    sys.excepthook = hook

    real_exit = sys.exit

    def exit_(code=None):
        _record_exit_code(code)
        real_exit(code)

    exit_.__doc__ = real_exit.__doc__
    sys.exit = exit_
    for name in ("exit", "quit"):   # the site builtins raise SystemExit themselves
        q = getattr(builtins, name, None)
        if q is not None and type(q).__name__ == "Quitter":
            setattr(builtins, name, _Quitter(q))

    def at_exit():
        from . import exitrecord
        code = _EXIT["code"]
        if not code:   # a normal end: the launcher learns it now, not after MPI_Finalize
            exitrecord.write(comm.Get_rank(), 0, "finished", by="rank")
            return
        # atexit handlers run before mpi4py's MPI_Finalize, which would wait for peers that may wait for this rank
        if exitrecord.write(comm.Get_rank(), code, f"SystemExit({code})", by="rank") and \
                _everyone_ending(comm.Get_size()):
            return   # every rank is ending (a program that exits 1 or 3 on all ranks): finalize as usual
        _end_job(comm, code, f"SystemExit({code})")

    atexit.register(at_exit)


class _Quitter:
    """builtins.exit / quit that also note the code for the exit guard."""

    def __init__(self, inner):
        self._inner = inner

    def __repr__(self):
        return repr(self._inner)

    def __call__(self, code=None):
        _record_exit_code(code)
        self._inner(code)


def init(topology=None, comm=None, backend: str = "auto", abort_on_error: bool = True) -> Context:
    """The Context of this process (see module doc). Raises EPInputError on a topology / communicator mismatch.

    abort_on_error: an exception that reaches the top of a rank's program, or sys.exit(n) with n != 0, aborts every
    rank (MPI_Abort, with that code) instead of leaving the peers waiting for their deadline; pass False to handle
    it yourself (docs/FAILURES.md)."""
    global _CTX, _CTX_KEY
    if backend not in BACKENDS:
        raise EPInputError(f"init: backend must be one of {BACKENDS}, got {backend!r}")
    key = (id(topology) if topology is not None else None, id(comm) if comm is not None else None, backend)
    if _CTX is not None and (key == _CTX_KEY or (topology is None and comm is None and backend == "auto")):
        return _CTX

    comm = _world_comm() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if abort_on_error and size > 1:
        _install_exit_guard(comm)
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
