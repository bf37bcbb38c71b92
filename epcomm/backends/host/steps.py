"""What both protocol modes' receive steps hand back to HostBackend (ht.py, ll.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def in_order(local: np.ndarray, *rest: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows sorted by local expert, stable (the order within an expert is kept)."""
    o = np.argsort(local, kind="stable")
    return (local[o],) + tuple(a[o] for a in rest)
