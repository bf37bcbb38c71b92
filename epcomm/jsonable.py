"""One JSON sanitiser for the reports (bench, smoke): what json cannot hold, made plain."""
from __future__ import annotations

import math
from typing import Any


def jsonable(v: Any) -> Any:
    """v with dict keys as str, tuples and sets as lists, numpy arrays and scalars as Python values, and NaN / inf
    as None (strict JSON has no such numbers). Anything else is returned as it is."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return [jsonable(x) for x in sorted(v, key=repr)]
    if hasattr(v, "tolist") and callable(v.tolist):   # numpy arrays and scalars
        return jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
