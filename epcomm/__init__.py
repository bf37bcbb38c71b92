"""epcomm: expert-parallel dispatch and combine for Mixture-of-Experts inference.

    ctx = epcomm.init()                                   # inside a job started by `python -m launch run`
    buf = epcomm.EPBuffer(epcomm.EPConfig(hidden=7168, topk=8, num_experts=256,
                                          max_tokens_per_rank=4096, world_size=ctx.world_size), ctx)
    out = buf.dispatch(x, topk_ids)                       # tokens grouped by local expert
    y = buf.combine(expert_y, out.handle, topk_weights)   # weighted sum back on the token's rank

Without MPI (inference servers, GPU): `epcomm.torch_context()` after torch.distributed.init_process_group, or
`epcomm.uid_context(uid, rank, world_size, device)` with your own unique-id channel.
"""
from .config import EPConfig
from .errors import (EPCapacityError, EPError, EPFencedError, EPInputError, EPOverwriteError, EPPeerRejectedError,
                     EPRankLostError, EPTimeoutError)
from .results import DispatchResult

__all__ = ["EPConfig", "EPError", "EPInputError", "EPPeerRejectedError", "EPTimeoutError", "EPCapacityError",
           "EPRankLostError", "EPFencedError", "EPOverwriteError", "DispatchResult", "init",
           "EPBuffer", "torch_context", "uid_context"]


def __getattr__(name):
    # Loaded only when asked for: the front end needs numpy (and MPI for init); the contexts without MPI
    # (torch.distributed, or a caller's own unique-id channel) need the GPU packages.
    if name == "init":
        from .context import init
        return init
    if name == "EPBuffer":
        from .buffer import EPBuffer
        return EPBuffer
    if name in ("torch_context", "uid_context"):
        from .backends.gpu import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'epcomm' has no attribute {name!r}")
