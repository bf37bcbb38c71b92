"""The syntax of fault-injection specs, shared by the host backend (EPCOMM_FAULT) and the smoke test
(EPCOMM_SMOKE_FAULT): faults separated by ';', each ``KIND:key=value,key=value``, e.g.

    skip_dispatch:rank=1,round=3; slow:rank=*,ms=50

parse() only splits and checks names; what a kind means and what its values are is its owner's business.
"""
from __future__ import annotations

from .errors import EPInputError


def parse(spec: str | None, env: str, kinds: tuple[str, ...],
          keys: tuple[str, ...] | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """[(kind, part, {key: value})] of `spec`, in order. `env` names the variable in messages; `keys` (if given)
    are the only keys allowed. EPInputError (a ValueError) for an unknown kind, a key without '=', or another key."""
    out = []
    for part in (spec or "").split(";"):
        part = part.strip()
        if not part:
            continue
        kind, _, args = part.partition(":")
        kind = kind.strip()
        if kind not in kinds:
            raise EPInputError(f"{env}: unknown fault {kind!r} in {spec!r} (expected one of {kinds})")
        values: dict[str, str] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            k, sep, v = item.partition("=")
            k = k.strip()
            if not sep or (keys is not None and k not in keys):
                expected = ", ".join(f"{x}=" for x in keys) if keys is not None else "key=value"
                raise EPInputError(f"{env}: bad argument {item!r} in {part!r} (expected {expected})")
            values[k] = v.strip()
        out.append((kind, part, values))
    return out
