"""Per-rank worker: epcomm.compat.deep_ep on the host backend, torch CPU tensors, a gloo group over the MPI ranks.

    python -m launch run -t tests/compat/cpu-2rank.yaml -- python tests/compat/worker.py --seed 5

Prints "ok in" when every rank passed; "FAIL rank R: ..." lines otherwise (exit 1).
"""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist
from mpi4py import MPI

from tests.compat.deepep_checks import print_summary, run_all


def init_gloo_from_mpi():
    comm = MPI.COMM_WORLD
    port = None
    if comm.Get_rank() == 0:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size())
    return comm.Get_rank(), comm.Get_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--suite", action="append", help="static, normal, ll (default: all)")
    args = ap.parse_args()
    rank, world = init_gloo_from_mpi()
    c = run_all(rank, world, "cpu", args.seed, tuple(args.suite or ("static", "normal", "ll")))
    results = MPI.COMM_WORLD.gather((c.passed, c.failures), root=0)
    code = 0
    if rank == 0:
        code = int(print_summary(results, f"ok in {c.elapsed:.1f}s ({world} ranks, seed {args.seed})"))
    code = MPI.COMM_WORLD.bcast(code, root=0)
    # every rank's gloo work done before any rank tears its group down: a peer that closes its connections while
    # another still has gloo traffic in flight can abort that one at exit (seen once in `make test`)
    dist.barrier()
    dist.destroy_process_group()
    MPI.COMM_WORLD.Barrier()
    sys.exit(code)


if __name__ == "__main__":
    main()
