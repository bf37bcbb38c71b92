"""Rank 1 ends in one of several ways while the other ranks sit in a collective that needs it.

    python tests/mpi/scripts/end_one_rank.py HOW WHERE
HOW:   exit3 (sys.exit(3)) | exit0 (sys.exit(0)) | raise (RuntimeError) | sigkill | sigterm |
       all3 (no rank ends early: after the collective every rank calls sys.exit(3), a verdict all ranks share)
WHERE: barrier (the others wait in MPI_Barrier) | buffer (the others create an EPBuffer; with HOW=raise, rank 1
       raises inside its own EPBuffer creation)
Every rank but 1 prints "rank R: done" if it gets through, which must not happen.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import epcomm  # noqa: E402

how, where = sys.argv[1], sys.argv[2]
ctx = epcomm.init()
cfg = epcomm.EPConfig(hidden=128, topk=2, num_experts=2 * ctx.world_size, max_tokens_per_rank=4,
                      world_size=ctx.world_size, timeout_s=60.0)


def end_rank_1():
    time.sleep(0.5)   # the others are in their collective by now
    print(f"rank 1: ending with {how} ({where})", flush=True)
    if how == "exit3":
        sys.exit(3)
    if how == "exit0":
        sys.exit(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if how == "raise" and where == "buffer":
        import epcomm.backends as backends

        def broken(cfg, ctx):
            raise RuntimeError("boom inside EPBuffer creation on rank 1")
        backends.make_backend = broken
        epcomm.EPBuffer(cfg, ctx)
    raise RuntimeError("boom on rank 1")


if ctx.rank == 1 and how != "all3":
    end_rank_1()
if where == "barrier":
    ctx.comm.Barrier()
else:
    epcomm.EPBuffer(cfg, ctx).close()
print(f"rank {ctx.rank}: done", flush=True)
if how == "all3":
    sys.exit(3)
