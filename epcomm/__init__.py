"""epcomm: expert-parallel dispatch and combine for Mixture-of-Experts inference.

    ctx = epcomm.init()                                   # inside a job started by `python -m launch run`
    buf = epcomm.EPBuffer(epcomm.EPConfig(hidden=7168, topk=8, num_experts=256,
                                          max_tokens_per_rank=4096, world_size=ctx.world_size), ctx)
    out = buf.dispatch(x, topk_ids)                       # tokens grouped by local expert
    y = buf.combine(expert_y, out.handle, topk_weights)   # weighted sum back on the token's rank
"""
from .config import EPConfig
from .errors import EPError, EPInputError, EPTimeoutError
from .results import DispatchResult

__all__ = ["EPConfig", "EPError", "EPInputError", "EPTimeoutError", "DispatchResult", "init", "EPBuffer"]


def __getattr__(name):  # the front end imports MPI; load it only when asked for
    if name == "init":
        from .context import init
        return init
    if name == "EPBuffer":
        from .buffer import EPBuffer
        return EPBuffer
    raise AttributeError(name)
