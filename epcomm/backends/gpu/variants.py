"""Kernel variants under measurement: compile-time alternatives picked by the environment, for A/B runs.

`EPCOMM_VARIANT=name[,name...]` (unset or empty: the baseline) turns each name into a -D define of the kernels
(jit.defines_for adds them, so the kernel cache keys on them) and, where a variant needs it, into host behaviour
(GpuBackend reads `active()`). One device call can then run the same bench with and without a variant, side by
side. A variant becomes the default only once measured (dev/GPU-LOG.md has each one's prediction and outcome); until
then nothing changes unless the variable is set.

Pure Python: no CUDA package needed (the CPU compile test builds every specialisation under every variant).
"""
from __future__ import annotations

import os

from ...errors import EPInputError

ENV = "EPCOMM_VARIANT"

# name -> (kernel define, what it changes). Each variant measured so far, with its prediction and outcome, is in
# dev/GPU-LOG.md: the winners became the unconditional code (cfast, qfast; qonce, sbase; cmeta; bscan, cload), the
# others were deleted (tma, tgrid; rdyn, nap, lean, sch; qpipe). A new variant adds its entry here and a
# `#ifndef EP_V_NAME / #define EP_V_NAME 0` default in the kernels (layout.cuh).
VARIANTS: dict[str, tuple[str, str]] = {
    # a test knob, not a candidate: the quantise-once path (dispatch.cuh qonce_pass, default from 512 tokens) at every
    # batch size, so that the GPU worker's small test sizes run it (and the 128-token rows measure its grid-wide wait)
    "qonceall": ("EP_V_QONCE_ALL", "ht fp8 dispatch quantises each token once at every batch size (default: from 512)"),
    # a measurement, not a candidate: the latest time of 7 events inside the phases (bench_quick prints them)
    "probe": ("EP_V_PROBE", "phase probes: state words 50..63 (count out, layout done, last flag waits, units done)"),
    # candidate (dev/GPU-LOG.md, ninth session "oneshot"): the small ht dispatch's count message leaves the data path
    "oneshot": ("EP_V_ONESHOT", "ht dispatch below 512 tokens (no receive capacity): each count message is a send item "
                                "of its own, beside the chunk items (not before the last chunk's data)"),
}


def _known() -> str:
    return ", ".join(sorted(VARIANTS)) or "none (only an empty EPCOMM_VARIANT is accepted)"


def active(environ=None) -> tuple[str, ...]:
    """The variant names in EPCOMM_VARIANT, sorted (an unknown name is an EPInputError naming the known ones)."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    names = sorted({n.strip() for n in raw.replace("+", ",").split(",") if n.strip()})
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise EPInputError(f"{ENV}={raw!r}: unknown variant(s) {', '.join(unknown)}; known: {_known()}")
    return tuple(names)


def defines(names=None) -> dict[str, int]:
    """-D defines of these variants (default: the active ones), each = 1. The baseline adds none, so its kernels
    keep the cache key (and PTX) they had before variants existed; the kernels default every EP_V_* to 0."""
    on = active() if names is None else tuple(sorted(names))
    unknown = [n for n in on if n not in VARIANTS]
    if unknown:
        raise EPInputError(f"unknown variant(s) {', '.join(unknown)}; known: {_known()}")
    return {VARIANTS[n][0]: 1 for n in on}


def label(names=None) -> str:
    """'baseline' or the names joined with '+' (for logs and bench notes)."""
    on = active() if names is None else tuple(sorted(names))
    return "+".join(on) if on else "baseline"
