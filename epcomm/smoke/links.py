"""Links stage: every ordered pair (src -> dst) does put + signal with a data check, timed.

One sender at a time (rank 0 hands out turns), so each pair is measured without the others' traffic and idle
ranks sleep instead of spinning. The sender times small puts (latency: put + completion) and large puts
(bandwidth, best of a few), reads the large buffer back, then puts a verification payload followed by a signal
word. After every sender had its turn, each receiver checks the payload and the signal of every source.

Methods:
  mpi-rma    host memory in an MPI window: Put + Flush, Get back, signal word (host configs; fallback on GPU
             configs for pairs on different physical hosts, where it tests the network path but not GPU RDMA)
  cuda-peer  GPU configs, pairs on one physical host: torch copy from the sender's GPU into a buffer the
             sender allocates on the receiver's GPU (NVLink / PCIe peer copy), checked on the device
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..stats import median
from .comm import FINISH, TURN, TURN_DONE, Deadline, StageTimeout, tag

SLOT = 4096          # verification payload per source
SMALL = 64           # latency message


def sizes(gpu: bool, quick: bool) -> dict[str, int]:
    host_big = (256 << 10) if quick else (1 << 20)
    return {"small": SMALL, "big": host_big, "gpu_big": (64 << 20) if quick else (256 << 20),
            "lat_reps": 20 if quick else 50, "bw_reps": 5 if quick else 8}


def pattern(n: int, seed: int) -> np.ndarray:
    """n deterministic bytes for (run, src, dst): what the receiver expects."""
    words = (n + 3) // 4
    x = np.arange(words, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(seed & 0xFFFFFFFF)
    x ^= x >> np.uint32(13)
    return x.view(np.uint8)[:n].copy()


def pair_seed(nonce: int, src: int, dst: int) -> int:
    return (nonce * 1000003 + src * 7919 + dst * 104729 + 1) & 0xFFFFFFFF


def signal_value(nonce: int, src: int) -> int:
    return ((nonce & 0xFFFFFFF) << 20) | (src + 1)


_KEEP: list = []   # windows stay allocated until exit: freeing is collective and a dead rank would hang it


class RmaLinks:
    method = "mpi-rma"

    def __init__(self, comm, world: int, big: int):
        from mpi4py import MPI
        self.MPI = MPI
        self.world = world
        self.big = big
        self.off_small = 8 * world
        self.off_big = self.off_small + SLOT * world
        self.win = MPI.Win.Allocate(self.off_big + big, 1, comm=comm)
        _KEEP.append(self.win)
        self.mem = np.frombuffer(self.win.tomemory(), dtype=np.uint8)
        self.win.Lock_all(MPI.MODE_NOCHECK)

    def measure(self, me: int, dst: int, nonce: int, sz: dict, corrupt: bool, delay: float) -> dict[str, Any]:
        B = self.MPI.BYTE
        win = self.win
        small = pattern(SMALL, pair_seed(nonce, me, dst) ^ 0x5A5A)
        lats = []
        for _ in range(sz["lat_reps"]):
            t0 = time.perf_counter()
            win.Put(small, dst, target=(self.off_small + me * SLOT, SMALL, B))
            win.Flush(dst)
            if delay:
                time.sleep(delay)
            lats.append(time.perf_counter() - t0)
        big = pattern(self.big, pair_seed(nonce, me, dst) ^ 0xB16)
        wire = big.copy()
        if corrupt:
            wire[::4093] ^= 0xFF
        bws = []
        for _ in range(sz["bw_reps"]):
            t0 = time.perf_counter()
            win.Put(wire, dst, target=(self.off_big, self.big, B))
            win.Flush(dst)
            if delay:
                time.sleep(delay)
            bws.append(self.big / (time.perf_counter() - t0) / 1e9)
        back = np.empty_like(big)
        win.Get(back, dst, target=(self.off_big, self.big, B))
        win.Flush(dst)
        readback_ok = bool(np.array_equal(back, big))
        self.signal(me, dst, nonce, corrupt)
        return {"method": self.method, "lat_us": min(lats) * 1e6, "lat_p50_us": median(lats) * 1e6,
                "bw_gbps": max(bws), "bytes_small": SMALL, "bytes_big": self.big, "readback_ok": readback_ok}

    def signal(self, me: int, dst: int, nonce: int, corrupt: bool) -> None:
        """Payload then signal word into dst's window; dst's verify() checks both (every pair, every method)."""
        B = self.MPI.BYTE
        payload = pattern(SLOT, pair_seed(nonce, me, dst))
        if corrupt:
            payload = payload.copy()
            payload[::97] ^= 0xFF
        self.win.Put(payload, dst, target=(self.off_small + me * SLOT, SLOT, B))
        self.win.Flush(dst)   # data complete at the target before the signal is written
        sig = np.array([signal_value(nonce, me)], dtype=np.uint64)
        self.win.Put(sig, dst, target=(me * 8, 8, B))
        self.win.Flush(dst)

    def verify(self, me: int, sources: list[int], nonce: int) -> list[dict[str, Any]]:
        """Check the signal word and payload every source wrote here."""
        self.win.Sync()
        out = []
        for s in sources:
            if s == me:
                continue
            sig = int(self.mem[s * 8:(s + 1) * 8].view(np.uint64)[0])
            got = self.mem[self.off_small + s * SLOT:self.off_small + (s + 1) * SLOT]
            exp = pattern(SLOT, pair_seed(nonce, s, me))
            data_ok = bool(np.array_equal(got, exp))
            bad = int(np.count_nonzero(got != exp))
            out.append({"src": s, "dst": me, "signal_ok": sig == signal_value(nonce, s), "payload_ok": data_ok,
                        "bad_bytes": bad})
        return out


class CudaPeer:
    method = "cuda-peer"

    def __init__(self, device: int, big: int, nonce: int):
        import torch
        self.torch = torch
        self.dev = device
        self.big = big
        torch.cuda.set_device(device)
        g = torch.Generator(device=f"cuda:{device}")
        g.manual_seed(nonce)
        self.src = torch.randint(0, 256, (big,), dtype=torch.uint8, device=f"cuda:{device}", generator=g)

    def _sync(self, *devs):
        for d in devs:
            self.torch.cuda.synchronize(d)

    def measure(self, me: int, dst_dev: int, sz: dict, corrupt: bool, delay: float) -> dict[str, Any]:
        torch = self.torch
        torch.cuda.set_device(self.dev)
        peer_ok = bool(torch.cuda.can_device_access_peer(self.dev, dst_dev)) if dst_dev != self.dev else True
        dst = torch.empty(self.big, dtype=torch.uint8, device=f"cuda:{dst_dev}")
        try:
            s_small, d_small = self.src[:SMALL], dst[:SMALL]
            d_small.copy_(s_small)
            self._sync(self.dev, dst_dev)
            lats = []
            for _ in range(sz["lat_reps"]):
                t0 = time.perf_counter()
                d_small.copy_(s_small, non_blocking=True)
                self._sync(self.dev, dst_dev)
                if delay:
                    time.sleep(delay)
                lats.append(time.perf_counter() - t0)
            dst.copy_(self.src)   # warm up the big path
            self._sync(self.dev, dst_dev)
            inner = 3
            bws = []
            for _ in range(sz["bw_reps"]):
                t0 = time.perf_counter()
                for _ in range(inner):
                    dst.copy_(self.src, non_blocking=True)
                self._sync(self.dev, dst_dev)
                if delay:
                    time.sleep(delay)
                bws.append(inner * self.big / (time.perf_counter() - t0) / 1e9)
            if corrupt:
                dst[::4093] = dst[::4093] ^ 0xFF
                self._sync(dst_dev)
            ok = bool(torch.equal(dst.to(f"cuda:{self.dev}"), self.src))
        finally:
            del dst
            with torch.cuda.device(dst_dev):
                torch.cuda.empty_cache()
        return {"method": self.method, "lat_us": min(lats) * 1e6, "lat_p50_us": median(lats) * 1e6,
                "bw_gbps": max(bws), "bytes_small": SMALL, "bytes_big": self.big, "readback_ok": ok,
                "peer_access": peer_ok}


def local_cuda_index(uuid: str | None, fallback: int | None) -> int | None:
    """The torch device index (in this process) of the GPU with this UUID; `fallback` when unknown."""
    if uuid:
        try:
            import torch
            from .inventory import norm_uuid
            for i in range(torch.cuda.device_count()):
                if norm_uuid(getattr(torch.cuda.get_device_properties(i), "uuid", None)) == uuid:
                    return i
        except Exception:
            pass
    return fallback


def run(env) -> dict[str, Any]:
    """One rank's part of the links stage (rank 0 also hands out the turns). Returns what it measured / saw."""
    R, me, i = env.world, env.rank, env.stage_index
    sz = sizes(env.gpu, env.opts.quick)
    payload = env.payload or {}
    nonce = int(payload.get("nonce", 12345))
    hostnames = payload.get("hostnames") or {}
    uuids = payload.get("uuids") or {}
    rma = RmaLinks(env.comm, R, sz["big"])       # collective; the caller runs this stage under a deadline
    env.faults.maybe_hang(me, "links-mid")
    peer = None
    peer_error = None
    if env.gpu and env.opts.link_method in ("auto", "peer"):
        try:
            peer = CudaPeer(env.device, sz["gpu_big"], nonce)
        except Exception as e:
            peer_error = f"cuda-peer not available: {type(e).__name__}: {e}"

    def measure_all() -> list[dict[str, Any]]:
        out = []
        for d in range(R):
            if d == me:
                continue
            rec: dict[str, Any] = {"src": me, "dst": d,
                                   "cls": "same_node" if env.topo.same_node(me, d) else "other_node"}
            same_host = hostnames.get(str(d), hostnames.get(d)) == hostnames.get(str(me), hostnames.get(me)) \
                and bool(hostnames)
            corrupt = env.faults.corrupts(me, "links")
            delay = env.faults.delay(me, d)
            env.talking_to = d   # a put or flush that never returns blames d, not this rank
            try:
                if peer is not None and same_host:
                    dev = local_cuda_index(uuids.get(str(d), uuids.get(d)), env.topo.device(d))
                    rec.update(peer.measure(me, dev, sz, corrupt, delay))
                    # The receiver checks a payload + signal from every sender, whatever carried the big copy.
                    rma.signal(me, d, nonce, corrupt)
                else:
                    rec.update(rma.measure(me, d, nonce, sz, corrupt, delay))
                    if env.gpu:
                        rec["note"] = peer_error or ("GPU RDMA not tested: host memory over MPI"
                                                     if not same_host else "cuda-peer disabled")
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            env.talking_to = None
            out.append(rec)
        return out

    sent: list[dict[str, Any]] = []
    measured = [me] if me != 0 else []
    unmeasured: list[int] = []
    stuck: list[int] = []
    if me == 0:
        # Turns end well before the stage deadline, so the others still hear FINISH while they wait for it,
        # even when a hung sender used up every turn's time (the others' deadlines start at about the same time).
        turns = Deadline(env.deadline.left() - min(2.0, 0.25 * env.deadline.seconds))
        for s in range(R):
            if turns.expired():
                unmeasured.append(s)
                continue
            if s == 0:
                sent = measure_all()
                measured.append(0)
                continue
            env.msgr.send(None, s, tag(i, TURN))
            got = env.msgr.wait_one(s, [tag(i, TURN_DONE)], turns)
            if got is None:
                stuck.append(s)
            else:
                measured.append(s)
        env.msgr.send_all({"sources": measured}, range(1, R), tag(i, FINISH))
        received = rma.verify(me, measured, nonce)
    else:
        while True:
            got = env.msgr.wait_one(0, [tag(i, TURN), tag(i, FINISH)], env.deadline)
            if got is None:
                raise StageTimeout("links: rank 0 sent neither a turn nor the end of the stage", waited_on=0)
            t, obj = got
            if t == tag(i, TURN):
                sent = measure_all()
                env.msgr.send(None, 0, tag(i, TURN_DONE))
                continue
            received = rma.verify(me, obj["sources"], nonce)
            break
    return {"sent": sent, "received": received, "stuck_senders": stuck, "unmeasured_senders": unmeasured,
            "sizes": sz, "peer_error": peer_error}


def merge(results: dict[int, dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """All pairs from every rank's stage result: sender measurements + receiver checks -> data_ok."""
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    for r, res in results.items():
        for rec in (res or {}).get("sent", []):
            pairs[(rec["src"], rec["dst"])] = dict(rec)
    for r, res in results.items():
        for chk in (res or {}).get("received", []):
            p = pairs.get((chk["src"], chk["dst"]))
            if p is None:
                continue
            p["signal_ok"] = chk["signal_ok"]
            p["payload_ok"] = chk["payload_ok"]
    for p in pairs.values():
        checks = [p.get(k) for k in ("readback_ok", "signal_ok", "payload_ok") if k in p]
        if p.get("error"):
            p["data_ok"] = None
        elif checks:
            p["data_ok"] = all(checks)
    return [pairs[k] for k in sorted(pairs)]


def matrices(pairs: list[dict[str, Any]], world: int) -> tuple[list[list], list[list]]:
    """(bandwidth GB/s, latency us) as world x world lists (None on the diagonal and where not measured)."""
    bw = [[None] * world for _ in range(world)]
    lat = [[None] * world for _ in range(world)]
    for p in pairs:
        if p.get("bw_gbps") is not None:
            bw[p["src"]][p["dst"]] = round(float(p["bw_gbps"]), 4)
        if p.get("lat_us") is not None:
            lat[p["src"]][p["dst"]] = round(float(p["lat_us"]), 3)
    return bw, lat
