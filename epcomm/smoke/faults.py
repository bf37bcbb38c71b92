"""Fault injection of the smoke test itself: EPCOMM_SMOKE_FAULT (tests only).

Syntax: faults separated by ';', each ``KIND:key=value,...``:

    hang:rank=2[,stage=links]          rank 2 stops responding when it reaches that stage (default: links);
                                       stage=links-mid hangs after the links window exists (inside the stage)
    corrupt:rank=1[,stage=links|ep]    rank 1 sends wrong bytes: in the links stage (its puts) and/or in the EP
                                       stage (its tokens are altered after the reference was computed);
                                       default both
    slow_link:src=1,dst=3[,ms=2]       every timed put from rank 1 to rank 3 takes `ms` longer

EP traffic faults inside the backend are the host backend's own hook (EPCOMM_FAULT, epcomm/backends/host/faults.py);
the smoke test passes it through untouched.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .. import faultspec

ENV = "EPCOMM_SMOKE_FAULT"
KINDS = ("hang", "corrupt", "slow_link")


@dataclass
class SmokeFaults:
    hang: dict[int, str] = field(default_factory=dict)          # rank -> stage
    corrupt: dict[int, set] = field(default_factory=dict)       # rank -> {"links", "ep"}
    slow: dict[tuple[int, int], float] = field(default_factory=dict)  # (src, dst) -> seconds

    def maybe_hang(self, rank: int, where: str) -> None:
        if self.hang.get(rank) == where:
            print(f"[smoke] rank {rank}: injected hang at {where}", flush=True)
            while True:   # stuck for good; the others must notice and the job be aborted
                time.sleep(3600)

    def corrupts(self, rank: int, stage: str) -> bool:
        return stage in self.corrupt.get(rank, ())

    def delay(self, src: int, dst: int) -> float:
        return self.slow.get((src, dst), 0.0)

    def __bool__(self):
        return bool(self.hang or self.corrupt or self.slow)


def parse(spec: str | None) -> SmokeFaults:
    """SmokeFaults of a spec; ValueError (EPInputError) for a bad one."""
    out = SmokeFaults()
    for kind, part, kw in faultspec.parse(spec, ENV, KINDS):
        try:
            if kind == "hang":
                out.hang[int(kw["rank"])] = kw.get("stage", "links")
            elif kind == "corrupt":
                st = kw.get("stage")
                out.corrupt.setdefault(int(kw["rank"]), set()).update([st] if st else ["links", "ep"])
            else:   # slow_link
                out.slow[(int(kw["src"]), int(kw["dst"]))] = float(kw.get("ms", 2.0)) / 1000.0
        except KeyError as e:
            raise ValueError(f"{ENV}: fault {part!r} needs {e.args[0]}=") from None
    return out


def from_env() -> SmokeFaults:
    return parse(os.environ.get(ENV))
