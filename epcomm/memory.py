"""GPU memory of an EPBuffer before you make one (capacity planning): the NVSHMEM symmetric buffer, the NVSHMEM heap
that the first buffer of a process reserves, and the ordinary device arrays (outputs, handles, counters).

    python -m epcomm.memory --tokens 4096 --world 16 --nodes 2 --format fp8
    python -m epcomm.memory --tokens 4096 --world 64 --nodes 8 --format fp8 --recv-capacity-factor 2
    python -m epcomm.memory --tokens 128 --world 8 --mode ll --json mem.json

In code: `epcomm.memory.estimate(cfg, nodes=1)`. The figures are those of the GPU backend's own layout
(epcomm/backends/gpu/layout.py: the symmetric regions and the list of device arrays GpuBackend allocates), per rank.
The host backend needs no GPU memory.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .backends.gpu.heap import heap_footprint
from .backends.gpu.layout import HEAP_MARGIN, HEAP_MIN, OUTPUT_SETS, Layout, device_arrays, heap_bytes
from .config import EPConfig

BYTES = {"bf16": 2, "fp8": 1, "f32": 4, "i32": 4, "u32": 4, "i64": 8, "bool": 1}
MiB = 1 << 20


def local_buffers(cfg: EPConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every device array GpuBackend allocates outside the symmetric heap."""
    arrays = device_arrays(cfg)
    out: list[tuple[str, tuple[int, ...], str]] = []
    for copies, n in (("one", 1), ("dispatch", OUTPUT_SETS), ("combine", OUTPUT_SETS)):
        for i in range(n):
            out += [(a.label(i), a.shape, a.dtype) for a in arrays if a.copies == copies]
    return out


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = BYTES[dtype]
    for d in shape:
        n *= d
    return n


def heap_reserved(symmetric_bytes: int) -> int:
    """NVSHMEM_SYMMETRIC_SIZE that the GPU runtime sets for the first buffer of a process: its symmetric bytes plus
    HEAP_MARGIN, at least HEAP_MIN (layout.heap_bytes), on every bootstrap (MPI, torch, unique id). What the heap
    takes on the GPU is more: heap_footprint (NVSHMEM's own objects, granularity)."""
    return heap_bytes(symmetric_bytes)


def estimate(cfg: EPConfig, nodes: int = 1, env=None) -> dict[str, Any]:
    """Bytes per rank: symmetric buffer (exact), what NVSHMEM's heap takes for it (heap.heap_footprint), device
    arrays, their sum. env: the NVSHMEM settings to assume (NVSHMEM_CUMEM_GRANULARITY, NVSHMEM_MAX_TEAMS; default
    os.environ, where unset epcomm's defaults)."""
    if nodes < 1 or cfg.world_size % nodes:
        raise ValueError(f"nodes must divide world_size {cfg.world_size}, got {nodes}")
    L = Layout(cfg, any_remote=nodes > 1)
    bufs = [{"name": n, "shape": list(s), "dtype": d, "bytes": nbytes(s, d)} for n, s, d in local_buffers(cfg)]
    local = sum(b["bytes"] for b in bufs)
    regions = L.regions()
    heap = heap_footprint(L.total, cfg.world_size, env)   # NVSHMEM_SYMMETRIC_SIZE + NVSHMEM's own, in granules
    reserved = heap["bytes"]
    return {"config": {"hidden": cfg.hidden, "topk": cfg.topk, "num_experts": cfg.num_experts,
                       "max_tokens_per_rank": cfg.max_tokens_per_rank, "world_size": cfg.world_size, "nodes": nodes,
                       "mode": cfg.mode, "token_format": cfg.token_format,
                       "fused_shared_expert": cfg.fused_shared_expert, "max_recv_rows": cfg.max_recv_rows,
                       "recv_capacity": cfg.recv_rows, "worst_case_recv_rows": cfg.worst_case_recv_rows},
            "symmetric_bytes": L.total, "symmetric_regions": regions, "heap_reserved_bytes": reserved,
            "nvshmem_symmetric_size": heap["symmetric_size"], "nvshmem_heap": heap,
            "local_bytes": local, "local_buffers": bufs, "total_bytes": reserved + local}


DOC_RANKS = (8, 16, 64, 256)
DOC_TOKENS = (128, 4096)


def doc_config(world: int, tokens: int, fmt: str, **capacity) -> EPConfig:
    """The shapes of the docs table: hidden 7168, top-8 of 256 experts, 8 ranks a node; 4096 tokens in ht mode,
    128 tokens (and 256 ranks, beyond ht's 64) in ll mode."""
    mode = "ht" if tokens > 128 and world <= 64 else "ll"
    return EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=tokens, world_size=world, mode=mode,
                    token_format=fmt, **capacity)


def markdown_table() -> str:
    """docs/MEMORY.md's table: total_bytes per rank (GiB) at the default capacity and at recv_capacity_factor 2."""
    lines = ["| ranks / nodes | tokens | mode | fp8 default | fp8 factor 2 | bf16 default | bf16 factor 2 |",
             "|---|---|---|---|---|---|---|"]
    for world in DOC_RANKS:
        for tokens in DOC_TOKENS:
            cells = []
            for fmt in ("fp8", "bf16"):
                for cap in ({}, {"recv_capacity_factor": 2}):
                    cfg = doc_config(world, tokens, fmt, **cap)
                    est = estimate(cfg, max(1, world // 8), env={})   # epcomm's NVSHMEM settings
                    cells.append(f"{est['total_bytes'] / 2**30:.2f} GiB")
            lines.append(f"| {world} / {max(1, world // 8)} | {tokens} | {doc_config(world, tokens, 'fp8').mode} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(est: dict[str, Any]) -> str:
    c = est["config"]
    lines = [f"EPBuffer on the GPU backend, per rank: hidden {c['hidden']}, top-{c['topk']} of {c['num_experts']}, "
             f"{c['max_tokens_per_rank']} tokens, {c['world_size']} ranks on {c['nodes']} node(s), mode {c['mode']}, "
             f"{c['token_format']}{', shared expert' if c['fused_shared_expert'] else ''} "
             f"(receive capacity {c['recv_capacity']} rows of worst case {c['worst_case_recv_rows']}, "
             f"max_recv_rows {c['max_recv_rows']})"]
    lines.append(f"  symmetric buffer        {est['symmetric_bytes'] / MiB:10.1f} MiB   "
                 + ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(est["symmetric_regions"].items(),
                                                                    key=lambda kv: -kv[1]) if v >= MiB))
    h = est["nvshmem_heap"]
    lines.append(f"  NVSHMEM heap            {est['heap_reserved_bytes'] / MiB:10.1f} MiB   (NVSHMEM_SYMMETRIC_SIZE "
                 f"{h['symmetric_size'] / MiB:.1f}: symmetric + {HEAP_MARGIN / MiB:.0f} MiB margin, at least "
                 f"{HEAP_MIN / MiB:.0f}; + NVSHMEM's own {h['nvshmem_own'] / MiB:.1f} at {h['max_teams']} teams; "
                 f"in {h['granularity'] / MiB:g} MiB granules)")
    big = sorted(est["local_buffers"], key=lambda b: -b["bytes"])[:4]
    lines.append(f"  device arrays           {est['local_bytes'] / MiB:10.1f} MiB   largest: "
                 + ", ".join(f"{b['name']} {b['bytes'] / MiB:.1f}" for b in big))
    lines.append(f"  total                   {est['total_bytes'] / MiB:10.1f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epcomm.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096, help="max_tokens_per_rank (default 4096)")
    ap.add_argument("--world", type=int, default=8, help="ranks (GPUs) in the EP group (default 8)")
    ap.add_argument("--nodes", type=int, default=1,
                    help="nodes they span: other-node traffic needs staging (default 1)")
    ap.add_argument("--mode", choices=("ht", "ll"), default="ht")
    ap.add_argument("--format", choices=("bf16", "fp8"), default="bf16", help="dispatch token format")
    ap.add_argument("--shared", action="store_true", help="fused shared expert")
    cap = ap.add_mutually_exclusive_group()
    cap.add_argument("--recv-capacity", type=int, metavar="ROWS",
                     help="EPConfig.recv_capacity: routed rows one rank may receive per round (default: worst case)")
    cap.add_argument("--recv-capacity-factor", type=float, metavar="F",
                     help="EPConfig.recv_capacity_factor: capacity = F x tokens x topk (F = 2: twice the uniform load)")
    ap.add_argument("--json", metavar="PATH", help="also write the estimate as JSON")
    ap.add_argument("--docs-table", action="store_true", help="print docs/MEMORY.md's table (8..256 ranks) and exit")
    a = ap.parse_args(argv)
    if a.docs_table:
        print(markdown_table())
        return 0
    try:
        cfg = EPConfig(hidden=a.hidden, topk=a.topk, num_experts=a.experts, max_tokens_per_rank=a.tokens,
                       world_size=a.world, mode=a.mode, token_format=a.format, fused_shared_expert=a.shared,
                       recv_capacity=a.recv_capacity, recv_capacity_factor=a.recv_capacity_factor)
        est = estimate(cfg, a.nodes)
    except ValueError as e:   # EPInputError is a ValueError
        print(f"epcomm.memory: {e}", file=sys.stderr)
        return 2
    print(table(est))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(est, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
