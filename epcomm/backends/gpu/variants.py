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

# name -> (kernel define, what it changes). The four of the sixth session were measured
# on 2 x H200 (dev/GPU-LOG.md, "Sixth session (perf engineer ...)", outcome); "cfast" (ht combine) and "qfast" (fp8
# quantiser) became the unconditional code, "tma" and "tgrid" lost and were deleted. A new variant adds its entry here
# and a `#ifndef EP_V_NAME / #define EP_V_NAME 0` default in the kernels.
VARIANTS: dict[str, tuple[str, str]] = {
    # seventh session (dev/GPU-LOG.md, "perf2"): prediction written there before its A/B; qonce and sbase won it
    # (eighth session, call 1) and are the default code now (layout.cuh defines them to 1): naming them changes
    # nothing, and is still accepted so that the recorded commands (BASE=sbase ...) keep working
    "qonce": ("EP_V_QONCE", "(default) ht fp8 dispatch quantises each token once (stage region), send items copy it"),
    # the same at every batch size (qonce: from 512 tokens): the GPU worker's test sizes reach the copy path, and the
    # 128-token rows measure the pass's grid-wide wait
    "qonceall": ("EP_V_QONCE_ALL", "qonce at every batch size"),
    # dev/GPU-LOG.md, seventh session: the 128-token fixed cost
    "sbase": ("EP_V_SBASE", "(default) ht dispatch: no receive-buffer reservation where every source's worst case "
                            "fits"),
    # eighth session (dev/GPU-LOG.md, "Eighth session: small-batch variants"): the fixed cost at 128 tokens
    "rdyn": ("EP_V_RDYN", "ht receives of small rounds take their units by whole blocks from a counter, in arrival "
                          "order (blocks free early do the work)"),
    "nap": ("EP_V_NAP", "waits of rounds of <= 512 tokens back off to 128 ns (flags) / 64 ns (signals)"),
    "lean": ("EP_V_LEAN", "receive hand-overs at device scope, the count item's rank counts per warp; with sbase: "
                          "no base publish / reservation clear"),
    # host only (backend.py, layout.send_chunk_tokens): the kernels are the baseline's (the define is unused)
    "sch": ("EP_V_SCH", "ht items of up to 16 tokens halved (~2 per block): twice the blocks hold peer items"),
    # eighth session (dev/GPU-LOG.md, "Eighth session: a 24-SM variant (sm24)"): the ht combine at 24 SMs
    "cmeta": ("EP_V_CMETA", "ht combine expert side: each chunk item's message metadata (hinfo, weights, compacted "
                            "rows) staged in shared memory once per message, not per (message, slice) unit"),
    # a measurement, not a candidate: the latest time of 7 events inside the phases (bench_quick prints them)
    "probe": ("EP_V_PROBE", "phase probes: state words 50..63 (count out, layout done, last flag waits, units done)"),
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
