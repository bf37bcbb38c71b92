"""What NVSHMEM's symmetric heap really takes on the GPU, for a process whose buffers need `symmetric_bytes`.

Read off the source of NVSHMEM 3.4.5 (the version the GPU image carries; src/host/mem/mem_heap.cpp,
src/host/team/team_internal.cpp, src/include/host/env/env_defs.h):

* NVSHMEM_SYMMETRIC_SIZE is what the process may allocate itself. NVSHMEM's own symmetric objects come on top
  ("heapextra", `nvshmem_own_bytes`): the proxy's g buffer (NVSHMEM_G_BUF_SIZE, 8 MiB) and coalescing buffer
  (2 MiB), the teams' memory (a psync area per team, NVSHMEM_MAX_TEAMS of them: ~4 MiB each, plus 8 KiB per PE for
  fcollect) and 24 allocations' 512-byte alignment (4 for NVSHMEM, 20 for the user's allocations).
* The heap is mapped in granules of NVSHMEM_CUMEM_GRANULARITY (default 512 MiB):
  - static heap (cudaMalloc; NVSHMEM_DISABLE_CUDA_VMM=1 or no CUDA VMM): round_up(SYMMETRIC_SIZE + heapextra,
    granularity), all at init;
  - dynamic heap (CUDA VMM, the default where the driver supports it): SYMMETRIC_SIZE is not used; physical memory is
    mapped on demand, each growth round_up(allocation + 512 B, granularity): NVSHMEM's own objects at init, then
    each buffer that does not fit in what is mapped.
  With the default granularity a 2.9 GiB buffer takes 3.5 GiB (512 MiB for NVSHMEM's objects, 3 GiB for the buffer).

So epcomm starts NVSHMEM with NVSHMEM_CUMEM_GRANULARITY = 2 MiB (the granularity CUDA recommends for VMM on Hopper;
the dynamic heap never goes below CUDA's own) and
NVSHMEM_MAX_TEAMS = 7 (its 6 predefined teams + 1; default 32, ~140 MiB of psync areas at 64 ranks; DeepEP sets 7
too), unless the environment sets them (`NVSHMEM_DEFAULTS`, runtime._set_safe_env). The cost of the small granule:
NVSHMEM's IBGDA transport keeps 64 local keys per granule in constant memory, the rest in global memory (at 64 ranks
the remote keys are there already with 512 MiB granules): set NVSHMEM_CUMEM_GRANULARITY=512M to keep the old
behaviour, at up to 512 MiB more per rank (epcomm.memory counts whatever the environment sets).

`heap_footprint` is the larger of the two heap kinds' figure (they differ by a few granules). Pure Python.
"""
from __future__ import annotations

import os

from .layout import heap_bytes

MiB = 1 << 20
# NVSHMEM settings epcomm starts NVSHMEM with unless the environment sets them (runtime._set_safe_env)
NVSHMEM_DEFAULTS = {"NVSHMEM_CUMEM_GRANULARITY": str(2 * MiB), "NVSHMEM_MAX_TEAMS": "7"}

# NVSHMEM 3.4.5 constants (src/include/device_host/nvshmem_common.cuh, env_defs.h, custom_malloc.h)
_SYNC_SIZE = 27648                 # longs; SYNC = 2x, BCAST = 10x, ALLTOALL = 1x of it
_REDUCE_SCRATCH = 512 << 10        # NVSHMEM_REDUCE_SCRATCH_SIZE
_FCOLLECT_LL_THRESHOLD = 2048      # NVSHMEM_FCOLLECT_LL_THRESHOLD (the LL128 threshold is 0: no psync for it)
_G_BUF = 8 * MiB                   # NVSHMEM_G_BUF_SIZE
_G_COALESCING_BUF = 128 * 64 * 32 * 8   # NVSHMEM_G_COALESCING_BUF_SIZE (2 MiB)
_MALLOC_ALIGN = 512                # NVSHMEMI_MALLOC_ALIGNMENT
_TEAMS_MIN = 6                     # NVSHMEM_TEAMS_MIN: its predefined teams
_PE_INFO = 16                      # sizeof(nvshmemi_team_creation_pe_info_t)
_NCCL_UID = 128                    # sizeof(ncclUniqueId), when NVSHMEM is built with NCCL


def parse_size(text: str) -> int:
    """An NVSHMEM size setting: a number with an optional k / m / g / t suffix (powers of 1024)."""
    t = str(text).strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def nvshmem_settings(env=None) -> tuple[int, int]:
    """(granularity bytes, max teams) NVSHMEM will run with: the environment's, else epcomm's defaults."""
    env = os.environ if env is None else env
    g = env.get("NVSHMEM_CUMEM_GRANULARITY") or NVSHMEM_DEFAULTS["NVSHMEM_CUMEM_GRANULARITY"]
    teams = env.get("NVSHMEM_MAX_TEAMS") or NVSHMEM_DEFAULTS["NVSHMEM_MAX_TEAMS"]
    return parse_size(g), int(teams)


def nvshmem_own_bytes(npes: int, max_teams: int) -> int:
    """NVSHMEM's own symmetric objects at `npes` PEs ("heapextra" of mem_heap.cpp set_heap_size_attr)."""
    teams = max(int(max_teams), _TEAMS_MIN)
    psync_bytes = max(32, -(-teams // 8))                  # N_PSYNC_BYTES: one bit per team
    fcollect = 2 * 2 * npes * _FCOLLECT_LL_THRESHOLD // 8   # longs
    psync_per_team = 2 * 2 * _SYNC_SIZE + _REDUCE_SCRATCH // 8 + 10 * _SYNC_SIZE + fcollect + 2 * _SYNC_SIZE
    teams_bytes = (8 * teams * psync_per_team + 2 * psync_bytes + 2 * 4 + 2 * 8 * teams + _NCCL_UID
                   + _PE_INFO * npes + psync_bytes * npes)
    return _G_BUF + teams_bytes + _G_COALESCING_BUF + 24 * _MALLOC_ALIGN


def _round_up(x: int, g: int) -> int:
    return -(-x // g) * g


def heap_footprint(symmetric_bytes: int, npes: int, env=None) -> dict[str, int]:
    """GPU memory of NVSHMEM's heap for a process whose buffers need symmetric_bytes (one allocation), with
    NVSHMEM_SYMMETRIC_SIZE = layout.heap_bytes(symmetric_bytes): the static and the dynamic heap's figure, and
    `bytes`, the larger."""
    g, teams = nvshmem_settings(env)
    own = nvshmem_own_bytes(npes, teams)
    static = _round_up(heap_bytes(symmetric_bytes) + own, g)
    dynamic = _round_up(own, g) + _round_up(int(symmetric_bytes) + _MALLOC_ALIGN, g)
    return {"bytes": max(static, dynamic), "static": static, "dynamic": dynamic, "nvshmem_own": own,
            "granularity": g, "max_teams": teams, "symmetric_size": heap_bytes(symmetric_bytes)}
