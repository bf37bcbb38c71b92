"""How much NVSHMEM_SYMMETRIC_SIZE must exceed a buffer, and what the NVSHMEM heap really takes on the GPU.

    python3 -m launch run -t configs/one-gpu-2.yaml -- python3 dev/device/heap_margin.py [--json PATH]

Each rank (the launcher's; one node) runs one fresh process per trial (NVSHMEM sizes its heap once per process):
heap kind "vmm" (NVSHMEM's dynamic CUDA VMM heap, its default) and "static" (NVSHMEM_DISABLE_CUDA_VMM=1, cudaMalloc)
x margin 0 / 1 / 4 / 16 / 32 / 64 / 128 MiB. A trial starts NVSHMEM (unique id through a file) with
NVSHMEM_SYMMETRIC_SIZE = need + margin and epcomm's NVSHMEM settings (heap.NVSHMEM_DEFAULTS unless the environment sets
them), allocates one symmetric buffer of `need` bytes (default: the 64-rank, 8-node, fp8, factor-2 buffer of issue 12,
2976 MiB), and reads the GPU's free memory before NVSHMEM, after its init and after the allocation (divided by the
ranks that share the GPU, which do the same in step). Rank 0 prints one line per trial: whether the buffer fit, the
init / buffer / total bytes per rank, and epcomm.memory's figure for that heap kind (heap.heap_footprint), so that
layout.HEAP_MARGIN and the heap model can be confirmed on the GPU. Expected: every "vmm" trial fits (that heap
ignores NVSHMEM_SYMMETRIC_SIZE); "static" fits from a margin of 0 or a few MiB (NVSHMEM adds its own objects on top).
NVSHMEM's own defaults for comparison: prefix NVSHMEM_CUMEM_GRANULARITY=512M NVSHMEM_MAX_TEAMS=32 (the launcher passes
NVSHMEM_* on to the ranks; the model follows). --kinds / --margins / --need narrow the run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
KINDS = {"vmm": {}, "static": {"NVSHMEM_DISABLE_CUDA_VMM": "1"}}


def issue_buffer_bytes() -> int:
    from epcomm.backends.gpu.layout import Layout
    from epcomm.config import EPConfig
    cfg = EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=4096, world_size=64, mode="ht",
                   token_format="fp8", recv_capacity_factor=2)
    return Layout(cfg, any_remote=True).total


def wait_files(paths, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def free_bytes() -> int:
    from cuda.bindings import driver
    err, free, _total = driver.cuMemGetInfo()
    return int(free)


def child(a) -> None:
    """One trial on one rank: prints one JSON line."""
    from cuda.core import Device

    from epcomm.backends.gpu.runtime import Runtime
    out = {"kind": a.kind, "margin_mib": a.margin, "rank": a.rank, "ok": False}
    dev = Device(a.device)
    dev.set_current()
    free0 = free_bytes()
    d = Path(a.dir)
    (d / f"ctx-{a.rank}").touch()          # every rank measured before any starts NVSHMEM
    if not wait_files([d / f"ctx-{r}" for r in range(a.world)], 60):
        raise SystemExit("peers did not start")
    uid_path = d / "uid"
    if a.rank == 0:
        tmp = d / "uid.tmp"
        tmp.write_bytes(Runtime.new_uid())   # NVSHMEM reads this process's settings (the trial's env) here
        os.replace(tmp, uid_path)
    if not wait_files([uid_path], 60):
        raise SystemExit("no unique id")
    rt = Runtime.from_uid(uid_path.read_bytes(), a.rank, a.world, a.device)
    rt.barrier()
    free1 = free_bytes()
    rt.barrier()
    try:
        rt.symmetric(a.need)
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - the trial's result
        out["error"] = str(e).splitlines()[0][:200]
    rt.barrier()
    free2 = free_bytes()
    rt.barrier()
    share = max(1, a.share)
    out.update(init_bytes=(free0 - free1) // share, buffer_bytes=(free1 - free2) // share,
               total_bytes=(free0 - free2) // share)
    print("RESULT " + json.dumps(out), flush=True)
    rt.close()


def launcher_rank():
    env = os.environ
    rank = int(env.get("EPCOMM_RANK", env.get("OMPI_COMM_WORLD_RANK", 0)))
    world = int(env.get("EPCOMM_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", 1)))
    device = int(env.get("EPCOMM_DEVICE", 0))
    share = world
    from epcomm.topology import Topology
    topo = Topology.from_env()
    if topo is not None:
        share = topo.ranks_per_gpu(rank)
    return rank, world, device, share


def model(need: int, margin_mib: int, world: int, kind: str) -> tuple[int, int]:
    """epcomm's heap model (heap.py) for this trial: (bytes at NVSHMEM init, bytes for the buffer), per rank."""
    from epcomm.backends.gpu.heap import _MALLOC_ALIGN, _round_up, nvshmem_own_bytes, nvshmem_settings
    g, teams = nvshmem_settings()
    own = nvshmem_own_bytes(world, teams)
    if kind == "static":
        return _round_up(need + margin_mib * MiB + own, g), 0
    return _round_up(own, g), _round_up(need + _MALLOC_ALIGN, g)


def parent(a) -> int:
    rank, world, device, share = launcher_rank()
    need = a.need or issue_buffer_bytes()
    need = (need + 255) // 256 * 256                  # Runtime.symmetric's rounding
    comm = None
    if world > 1:   # the launcher's ranks agree on a fresh scratch folder (a stale unique id must not be read)
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    nonce = comm.bcast(time.time_ns() if rank == 0 else None, root=0) if comm is not None else time.time_ns()
    base = Path(a.dir or "/tmp") / f"epcomm-heap-margin-{nonce}"
    margins = [int(m) for m in a.margins.split(",")]
    rows = []
    if rank == 0:
        print(f"heap_margin: buffer {need / MiB:.1f} MiB, {world} ranks ({share} on this GPU), "
              f"NVSHMEM_CUMEM_GRANULARITY={os.environ.get('NVSHMEM_CUMEM_GRANULARITY', 'epcomm default')} "
              f"NVSHMEM_MAX_TEAMS={os.environ.get('NVSHMEM_MAX_TEAMS', 'epcomm default')}; per rank, MiB:", flush=True)
    for kind in a.kinds.split(","):
        for m in margins:
            d = base / f"{kind}-{m}"
            d.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, NVSHMEM_SYMMETRIC_SIZE=str(need + m * MiB), **KINDS[kind])
            cmd = [sys.executable, __file__, "--child", "--kind", kind, "--margin", str(m), "--need", str(need),
                   "--rank", str(rank), "--world", str(world), "--device", str(device), "--share", str(share),
                   "--dir", str(d)]
            t0 = time.monotonic()
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
                res = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
                last = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
                row = res[0] if res else {"kind": kind, "margin_mib": m, "ok": False,
                                          "error": f"exit {p.returncode}: {last}"}
            except subprocess.TimeoutExpired:
                row = {"kind": kind, "margin_mib": m, "ok": False, "error": f"timed out after {a.timeout} s"}
            row["model_init_bytes"], row["model_buffer_bytes"] = model(need, m, world, kind)
            row["seconds"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            if comm is not None:
                comm.Barrier()
            if rank == 0:
                def mb(k):
                    return f"{row[k] / MiB:7.1f}" if k in row else "      -"
                print(f"  {kind:6s} margin {m:4d}: {'fits ' if row['ok'] else 'FAILS'}  init {mb('init_bytes')} "
                      f"(model {mb('model_init_bytes')})  buffer {mb('buffer_bytes')} "
                      f"(model {mb('model_buffer_bytes')})  total {mb('total_bytes')}"
                      + ("" if row["ok"] else f"  {row.get('error', '')}"), flush=True)
    if rank == 0 and a.json:
        Path(a.json).write_text(json.dumps({"need_bytes": need, "world": world, "share": share, "rows": rows},
                                           indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--margins", default="0,1,4,16,32,64,128", help="MiB over the buffer (comma list)")
    ap.add_argument("--kinds", default="vmm,static", help="heap kinds: vmm (default NVSHMEM), static")
    ap.add_argument("--need", type=int, default=0, help="buffer bytes (default: issue 12's 64-rank factor-2 buffer)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per trial (default 60)")
    ap.add_argument("--json", help="rank 0 writes the rows here")
    ap.add_argument("--dir", help="where the scratch folder goes (default /tmp)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("kind", "margin", "rank", "world", "device", "share"):
        ap.add_argument(f"--{k}", type=str if k == "kind" else int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
