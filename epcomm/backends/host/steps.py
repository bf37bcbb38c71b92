"""What both protocol modes' receive steps hand back to HostBackend (ht.py, ll.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import EPPeerRejectedError


@dataclass
class Received:
    """The routed rows a dispatch delivered to this rank, one entry per row, in the spec's order within an expert."""
    local: np.ndarray                     # local expert
    src: np.ndarray                       # source rank
    tok: np.ndarray                       # source token
    slot: np.ndarray                      # top-k slot
    rows: np.ndarray                      # token bytes (rows in the wire format, then scales)
    msg: np.ndarray | None = None         # ht: message index of the row within its source's block
    src_msgs: np.ndarray | None = None    # ht: messages received from each source
    rejected: tuple = ()                  # sources whose signals carried the REJECTED mark (they sent nothing)


def in_order(local: np.ndarray, *rest: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows sorted by local expert, stable (the order within an expert is kept)."""
    o = np.argsort(local, kind="stable")
    return (local[o],) + tuple(a[o] for a in rest)


def refused(be, peers: list[int], r: int, h, tokens: int) -> EPPeerRejectedError:
    """The error of a combine whose tokens needed the experts of ranks that refused their input for round r."""
    d = peers[0]
    why = ("refused its dispatch input, so its experts did not run" if d in h.rejected
           else "refused its combine input")
    more = f" (so did {', '.join(f'rank {p}' for p in peers[1:])})" if len(peers) > 1 else ""
    return EPPeerRejectedError(
        f"{be.ctx.describe(be.rank)}: {be.ctx.describe(d)} {why} in round {r}{more}: {tokens} token(s) of this "
        f"rank went to its experts ({be.cfg.holds(d)}) and have no output, so no partial sum is returned; the "
        f"buffer is still usable", rank=d, node=be.ctx.node_of(d), round=r,
        what="dispatch" if d in h.rejected else "combine")
