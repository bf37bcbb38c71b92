"""GPU-side pieces of the bench, all on torch tensors: copy-engine link figures, the NCCL all_to_all baseline a user
would write, and small tensor helpers. torch is imported by the caller and passed in (this module imports nothing
from torch at import time, so CPU-only machines can import the package).
"""
from __future__ import annotations

import socket

from ..stats import median


# ---------------------------------------------------------------- tensor helpers

def dequant_fp8_into(torch, out, q, scales, n: int) -> None:
    """out[:n] = bf16(fp32(q[:n]) * scale per 128 channels): identity experts after an fp8 dispatch."""
    if n <= 0:
        return
    h = q.shape[1]
    deq = q[:n].float().view(n, h // 128, 128) * scales[:n].float().unsqueeze(-1)
    out[:n].copy_(deq.view(n, h))


# ---------------------------------------------------------------- copy-engine bandwidth

def copy_gbps(torch, src_dev: int, dst_dev: int, nbytes: int, reps: int = 10, trials: int = 3) -> float:
    """GB/s (1e9 B/s) of torch copies of `nbytes` from cuda:src to cuda:dst, timed with CUDA events on the source
    device's current stream (where torch issues a device-to-device copy). Same device: counts bytes read + written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}")
    a.random_(0, 256)
    b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    factor = 2 if src_dev == dst_dev else 1
    rates = []
    with torch.cuda.device(src_dev):
        for _ in range(2):
            b.copy_(a, non_blocking=True)
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        for _ in range(trials):
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps):
                b.copy_(a, non_blocking=True)
            e.record()
            e.synchronize()
            ms = s.elapsed_time(e)
            rates.append(factor * nbytes * reps / (ms * 1e-3) / 1e9)
    torch.cuda.synchronize(dst_dev)
    del a, b
    torch.cuda.empty_cache()
    return median(rates)


def measure_links(torch, ctx, comm, log, peer_bytes: int = 1 << 30, local_bytes: int = 1 << 30) -> dict:
    """Each rank measures its outgoing link to rank+1 (one rank at a time, then all at once) and its device-local
    copy bandwidth. Peers on another host (or without a known GPU) are 'n/a'."""
    rank, world, topo = ctx.rank, ctx.world_size, ctx.topology
    peer = (rank + 1) % world
    peer_dev = topo.device(peer) if world > 1 else None
    same_host = world > 1 and topo.host_of(peer) == topo.host_of(rank)
    measurable = same_host and peer_dev is not None and peer_dev != ctx.device
    p2p = bool(measurable and torch.cuda.can_device_access_peer(ctx.device, peer_dev))
    one_way = None
    for r in range(world):  # one direction at a time
        comm.Barrier()
        if r == rank and measurable:
            log(f"links: rank {rank} cuda:{ctx.device} -> cuda:{peer_dev} alone ({peer_bytes >> 20} MiB)",
                everyone=True)
            one_way = copy_gbps(torch, ctx.device, peer_dev, peer_bytes)
    comm.Barrier()
    concurrent = copy_gbps(torch, ctx.device, peer_dev, peer_bytes) if measurable else None
    comm.Barrier()
    local = copy_gbps(torch, ctx.device, ctx.device, local_bytes)
    comm.Barrier()
    rows = comm.allgather((peer, peer_dev, p2p, one_way, concurrent, local))
    conc = [r[4] for r in rows]
    return {
        "status": "ok" if all(c is not None for c in conc) else "partial",
        "method": "torch copy_ between devices (copy engine), CUDA events on the source stream, median of 3 x 10",
        "peer_rank": [r[0] for r in rows], "peer_device": [r[1] for r in rows], "p2p": [r[2] for r in rows],
        "one_way_gbps": [r[3] for r in rows],
        "concurrent_gbps": conc,
        "concurrent_total_gbps": sum(c for c in conc if c is not None) if any(c is not None for c in conc) else None,
        "local_copy_gbps": [r[5] for r in rows],
        "peer_bytes": peer_bytes, "local_bytes": local_bytes,
    }


# ---------------------------------------------------------------- NCCL baseline

def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def init_torch_dist(torch, comm, rank: int, world: int, backend: str = "nccl", device=None):
    """torch.distributed from MPI: rank 0 picks a free loopback port and broadcasts it (single host; on several
    hosts rank 0's address is broadcast instead)."""
    import os
    import torch.distributed as dist
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        info = (addr, free_port())
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    kwargs = {}
    if device is not None and backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    except TypeError:  # older torch without device_id
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    return dist


class A2ABaseline:
    """What a user without an EP library writes, with torch.distributed all_to_all_single:

    dispatch: destination ranks of each token from topk_ids; tokens sorted by destination rank, each sent once per
    destination rank; all_to_all_single of the per-destination counts (then .tolist(): a host sync the API needs),
    all_to_all_single of the tokens and of their (ids, weights); the receiver gathers rows into expert order
    (source rank, token, slot inside each local expert), as epcomm lays them out.
    combine: the expert side sums w * expert_y of a token's rows on this rank (fp32), sends one bf16 row back per
    (token, rank), and the token's rank adds them up (fp32 -> bf16).
    """

    def __init__(self, torch, dist, n_local_experts: int, rank: int, world: int, group=None):
        self.torch, self.dist = torch, dist
        self.n_local, self.rank, self.world, self.group = n_local_experts, rank, world, group

    def dispatch(self, x, ids, w) -> dict:
        torch, dist = self.torch, self.dist
        t, k = ids.shape
        h = x.shape[1]
        r_count = self.world
        dest = torch.where(ids >= 0, torch.div(ids, self.n_local, rounding_mode="floor"),
                           torch.full_like(ids, r_count)).long()
        hit = torch.zeros(t, r_count + 1, dtype=torch.bool, device=x.device)
        hit.scatter_(1, dest, True)
        hit = hit[:, :r_count]
        d_idx, t_idx = hit.t().nonzero(as_tuple=True)           # sorted by destination rank, then token
        send_counts = hit.sum(dim=0).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        n_recv = int(sum(rc))
        meta = torch.cat([ids, w.view(torch.int32)], dim=1)     # ids and weights travel together
        send_x = x.index_select(0, t_idx)
        send_meta = meta.index_select(0, t_idx)
        recv_x = x.new_empty((n_recv, h))
        recv_meta = meta.new_empty((n_recv, 2 * k))
        dist.all_to_all_single(recv_x, send_x, rc, sc, group=self.group)
        dist.all_to_all_single(recv_meta, send_meta, rc, sc, group=self.group)
        r_ids = recv_meta[:, :k]
        local = r_ids - self.rank * self.n_local
        mine = (r_ids >= 0) & (local >= 0) & (local < self.n_local)
        row, slot = mine.nonzero(as_tuple=True)                  # by received row (source rank, token), then slot
        le = local[row, slot]
        order = torch.argsort(le, stable=True)
        row, slot, le = row[order], slot[order], le[order]
        expert_x = recv_x.index_select(0, row)
        counts = torch.bincount(le, minlength=self.n_local)
        return {"expert_x": expert_x, "tokens_per_expert": counts, "row": row, "slot": slot,
                "recv_w": recv_meta[:, k:].contiguous().view(torch.float32), "n_recv": n_recv,
                "sc": sc, "rc": rc, "t_idx": t_idx, "t": t}

    def combine(self, expert_y, st: dict):
        torch, dist = self.torch, self.dist
        h = expert_y.shape[1]
        n = st["row"].numel()
        wsel = st["recv_w"][st["row"], st["slot"]]
        partial = torch.zeros((st["n_recv"], h), dtype=torch.float32, device=expert_y.device)
        partial.index_add_(0, st["row"], expert_y[:n].float() * wsel.unsqueeze(1))
        back = expert_y.new_empty((sum(st["sc"]), h))
        dist.all_to_all_single(back, partial.to(expert_y.dtype), st["sc"], st["rc"], group=self.group)
        y = torch.zeros((st["t"], h), dtype=torch.float32, device=expert_y.device)
        y.index_add_(0, st["t_idx"], back.float())
        return y.to(expert_y.dtype)
