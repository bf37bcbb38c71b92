"""How many blocks a persistent grid of the GPU backend may have: all of them must be resident at once.

The fused kernels (ep_dispatch, ep_combine) wait in their receive phase for the send blocks of the same grid, and every
rank's kernel waits for its peers' kernels. A block that never gets an SM therefore deadlocks the round (until the
device-side deadline). On a GPU of its own, one block per SM is always resident. When SMs are shared they are not:
- MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) or a green context limits the SMs this context may use: cuCtxGetExecAffinity
  (CU_EXEC_AFFINITY_TYPE_SM_COUNT) says how many;
- several ranks on one GPU (topology `share_gpus: true`) run their grids side by side under MPS, so together they must
  fit: each rank may count on its share of the device's SMs at most (without MPS they time-slice, and the same size is
  merely conservative);
- the kernel's own occupancy (registers, shared memory per block) may be below one block per SM.
Measured on one H200 (docs/GPU-NOTES "One H200, several ranks"): 2 ranks under MPS at 50 % with 60 blocks each hung
in 2 of 2 runs of ~650 rounds, with 40 blocks it completed; a grid that nominally fits exactly is not enough when
other work (NVSHMEM, the other process's short kernels) holds SMs, hence SHARED_HEADROOM.

grid_size() is the arithmetic (unit-tested on CPU); persistent_grid() asks the driver for its inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ...errors import EPError

log = logging.getLogger("epcomm.gpu")

# Fraction of the computed share a rank's grid may take when its SMs are shared (MPS limit or several ranks per GPU).
SHARED_HEADROOM = 0.6

SELF_WAIT_CAUSE = ("blocks of this rank's own grid did not all run: the grid may be larger than this context can keep "
                   "resident (MPS / shared GPU / num_sms)")


@dataclass(frozen=True)
class GridChoice:
    grid: int            # blocks of every persistent kernel
    limit: int           # the most blocks that are safe in this context
    device_sms: int
    context_sms: int     # SMs this context may use (MPS / green context), device_sms when unlimited
    blocks_per_sm: int   # occupancy of the least occupant persistent kernel at this block size
    ranks_per_gpu: int
    clamped: bool        # the caller asked for more than `limit`

    def describe(self) -> str:
        ctx = f", context limited to {self.context_sms} SMs" if self.context_sms < self.device_sms else ""
        share = f", {self.ranks_per_gpu} ranks on this GPU" if self.ranks_per_gpu > 1 else ""
        return (f"grid {self.grid} blocks (at most {self.limit} resident: {self.device_sms} SMs{ctx}{share}, "
                f"{self.blocks_per_sm} block(s)/SM)")


def grid_size(want: int | None, device_sms: int, context_sms: int | None, blocks_per_sm: int,
              ranks_per_gpu: int = 1, headroom: float = SHARED_HEADROOM) -> GridChoice:
    """The persistent grid for this context.

    want: the caller's block count (EPConfig.num_sms / EPCOMM_BLOCKS / blocks=), None for the default (as many as fit,
    one per SM at most: more blocks per SM only add spinning waiters). A `want` above the limit is clamped.
    """
    if device_sms < 1:
        raise ValueError(f"device_sms must be >= 1, got {device_sms}")
    ranks = max(1, int(ranks_per_gpu))
    ctx = device_sms if not context_sms or context_sms < 1 else min(int(context_sms), device_sms)
    share = min(ctx, device_sms // ranks) if ranks > 1 else ctx
    if blocks_per_sm < 1:
        raise EPError("epcomm gpu: the persistent kernels cannot run at their block size (occupancy 0 blocks per SM: "
                      "too many registers or too much shared memory per block)")
    # one block per SM at most, as on an unshared GPU: a second resident block per SM would only add spinning
    # waiters, so occupancy matters when it is below one (refused above); shared SMs keep headroom
    limit = max(1, share)
    if ranks > 1 or ctx < device_sms:
        limit = max(1, int(limit * headroom))
    if want is None or want < 1:
        return GridChoice(limit, limit, device_sms, ctx, blocks_per_sm, ranks, False)
    grid = min(int(want), limit)
    return GridChoice(grid, limit, device_sms, ctx, blocks_per_sm, ranks, int(want) > limit)


def self_wait_message(rank: int, timeout_s: float, phase: str, round_: int) -> str:
    """What an EPTimeoutError says when a rank waited for itself: the grid that did not fit, not a missing peer
    (a wait for another rank is worded by EPTimeoutError.peer_missing, the same on every backend)."""
    return (f"epcomm gpu: rank {rank} waited {timeout_s:g} s in {phase} round {round_}: {SELF_WAIT_CAUSE}; "
            f"this EPBuffer is unusable now")


# ------------------------------------------------------------------------------------------------ driver queries
def context_sm_count(device_sms: int) -> int:
    """SMs the current context may use (MPS active thread percentage, green context); device_sms when unlimited or
    when the driver cannot say."""
    from cuda.bindings import driver
    try:
        err, aff = driver.cuCtxGetExecAffinity(driver.CUexecAffinityType.CU_EXEC_AFFINITY_TYPE_SM_COUNT)
    except Exception:  # noqa: BLE001 - an older binding without it: no limit known
        return device_sms
    if err != driver.CUresult.CUDA_SUCCESS:
        return device_sms
    n = int(aff.param.smCount.val)
    return n if 0 < n <= device_sms else device_sms


def blocks_per_sm(functions, threads: int, dynamic_smem: int = 0) -> int:
    """The least occupancy (resident blocks per SM) over `functions` (CUfunction handles) at this block size."""
    from cuda.bindings import driver
    best = None
    for f in functions:
        err, n = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, int(threads), int(dynamic_smem))
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: {err}")
        best = int(n) if best is None else min(best, int(n))
    return 1 if best is None else best


def headroom_from_env(environ=None) -> float:
    """EPCOMM_GRID_HEADROOM (0 < h <= 1) replaces SHARED_HEADROOM: a knob for measuring on a shared GPU, not a
    setting to keep (a value that does not parse or is out of range is ignored with a warning)."""
    import os
    raw = (os.environ if environ is None else environ).get("EPCOMM_GRID_HEADROOM")
    if not raw:
        return SHARED_HEADROOM
    try:
        h = float(raw)
    except ValueError:
        h = -1.0
    if not 0.0 < h <= 1.0:
        log.warning("epcomm gpu: EPCOMM_GRID_HEADROOM=%r ignored (want 0 < h <= 1); using %g", raw, SHARED_HEADROOM)
        return SHARED_HEADROOM
    return h


PERSISTENT = ("ep_dispatch_send", "ep_dispatch_recv", "ep_dispatch", "ep_combine_send", "ep_combine_recv",
              "ep_combine")


def persistent_grid(functions: dict, threads: int, device_sms: int, want: int | None, ranks_per_gpu: int,
                    rank: int | None = None) -> GridChoice:
    """grid_size() with the driver's answers for this context; logs the choice (a warning when `want` is clamped)."""
    fns = [f for n, f in functions.items() if n in PERSISTENT] or list(functions.values())
    choice = grid_size(want, device_sms, context_sm_count(device_sms), blocks_per_sm(fns, threads), ranks_per_gpu,
                       headroom_from_env())
    who = f"rank {rank}: " if rank is not None else ""
    if choice.clamped:
        log.warning("epcomm gpu: %s%d blocks asked (num_sms / EPCOMM_BLOCKS), %d used: more would not all be "
                    "resident here and the kernels would wait for themselves; %s", who, want, choice.grid,
                    choice.describe())
    else:
        log.info("epcomm gpu: %s%s", who, choice.describe())
    return choice
