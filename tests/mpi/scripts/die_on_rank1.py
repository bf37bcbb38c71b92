"""Rank 1 raises before a collective the others are already in: the job must end at once, not at --timeout."""
import epcomm

ctx = epcomm.init()
if ctx.rank == 1:
    raise RuntimeError("boom on rank 1")
ctx.comm.bcast(None, root=1)
