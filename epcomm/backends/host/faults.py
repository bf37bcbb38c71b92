"""Fault injection for tests and smoke runs: EPCOMM_FAULT (or HostBackend(..., fault=...)).

Syntax: one or more faults separated by ';', each ``KIND:key=value,key=value``:

    skip_dispatch:rank=1[,round=N]   rank 1 sends nothing to its peers in dispatch round N (default: every round);
                                     the peers then time out naming rank 1 (EPTimeoutError).
    corrupt:rank=1[,round=N]         rank 1 flips bits in the token bytes it sends in dispatch (the receivers'
                                     outputs then differ from epcomm.reference).
    slow:rank=1,ms=50[,round=N]      rank 1 sleeps 50 ms before each send phase (dispatch and combine).
    die:rank=1,round=N               rank 1 sends its dispatch round N to the first half of its peers, then kills
                                     itself (SIGKILL): a rank lost mid-dispatch (fencing, docs/FAILURES.md).
    die_in_combine:rank=1,round=N    the same in the combine of round N (its first send step, to half the peers).

rank=* means every rank. Rounds count dispatches of one EPBuffer from 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ... import faultspec
from ...errors import EPInputError

KINDS = ("skip_dispatch", "corrupt", "slow", "die", "die_in_combine")
ENV = "EPCOMM_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None          # None = every rank
    round: int | None = None  # None = every round
    ms: float = 0.0

    def hits(self, kind: str, rank: int, round_: int) -> bool:
        return (self.kind == kind and (self.rank is None or self.rank == rank)
                and (self.round is None or self.round == round_))


def parse(spec: str | None) -> list[Fault]:
    faults = []
    for kind, part, kw in faultspec.parse(spec, ENV, KINDS, keys=("rank", "round", "ms")):
        if "rank" not in kw:
            raise EPInputError(f"{ENV}: fault {part!r} needs rank=N (or rank=*)")
        try:
            rank = None if kw["rank"] == "*" else int(kw["rank"])
            round_ = int(kw["round"]) if "round" in kw else None
            ms = float(kw.get("ms", 0.0))
        except ValueError:
            raise EPInputError(f"{ENV}: bad value in {part!r}") from None
        faults.append(Fault(kind, rank, round_, ms))
    return faults


def from_env() -> list[Fault]:
    return parse(os.environ.get(ENV))


class FaultSet:
    def __init__(self, faults: list[Fault], rank: int):
        self.faults = faults
        self.rank = rank

    def hit(self, kind: str, round_: int) -> Fault | None:
        for f in self.faults:
            if f.hits(kind, self.rank, round_):
                return f
        return None
