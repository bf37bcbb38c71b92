"""Order statistics of timing samples (pure Python, no numpy needed): the one median of the bench, the smoke test
and the demo."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default 'linear')."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} outside 0..100")
    s = sorted(float(v) for v in samples)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(samples: Iterable[float | None]) -> float | None:
    """Median of the samples that are numbers (None and NaN are skipped, e.g. unmeasured pairs); None if none are."""
    present = [float(v) for v in samples if v is not None and not math.isnan(v)]
    return percentile(present, 50.0) if present else None


def summarize(samples: Sequence[float]) -> dict:
    """{'median', 'p10', 'p90', 'min', 'max', 'mean', 'n'} of the samples (same unit as the samples)."""
    return {"median": median(samples), "p10": percentile(samples, 10.0), "p90": percentile(samples, 90.0),
            "min": float(min(samples)), "max": float(max(samples)),
            "mean": float(sum(samples)) / len(samples), "n": len(samples)}


def slowest_rank(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per iteration, the largest time over ranks (an operation ends when its last rank ends).

    per_rank[r][i] = rank r's time of iteration i; every rank must have the same number of iterations."""
    if not per_rank:
        return []
    n = len(per_rank[0])
    if any(len(p) != n for p in per_rank):
        raise ValueError(f"ranks timed different numbers of iterations: {[len(p) for p in per_rank]}")
    return [max(p[i] for p in per_rank) for i in range(n)]
