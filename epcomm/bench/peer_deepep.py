"""DeepEP as a benchmark peer (the bench's `deepep` case): its legacy `Buffer` API (deepseek-ai/DeepEP at 9249c25,
../shared/peers) on the bench's own inputs, shapes and SM budgets, timed exactly like epcomm's rows (CudaTimer:
GPU spin, CUDA events, slowest rank per iteration, median; CUDA-graph replays for the low-latency rows). DeepEP is
not a dependency: `deep_ep` is imported when present (built in the device call), and none of its code is here.

Rows (impl "deepep", case "ht" / "ll" like the epcomm rows they sit beside; `mode` names DeepEP's call):
* ht, at every SM budget of --peer-sms (Buffer.set_num_sms and Config(num_sms, chunk, 256, 6, 128); the chunk is
  tuned per budget over DeepEP's own default and a few sizes, as DeepEP's tests do; the winner is `peer_config`):
  - dispatch, mode "cached": Buffer.dispatch with the handle of an earlier dispatch of the same routing (the call
    DeepEP's tests time: no layout, no top-k, no host wait), bf16, and fp8 fed pre-quantised (per 128 channels,
    fp32 scales, quantised outside the timed region; epcomm quantises inside its dispatch);
  - dispatch, mode "normal": get_dispatch_layout + Buffer.dispatch with top-k ids and weights (what a server calls per
    layer; the host waits for the received counts);
  - combine, mode "normal": Buffer.combine of the bf16 rows received (identity experts) with their top-k weights.
  DeepEP writes each token once per receiving rank (token-major); epcomm's figure includes the expert-grouped layout.
* ll (--ll-tokens, fp8): low_latency_dispatch and low_latency_combine, mode "low_latency", captured in CUDA graphs
  (dispatch and combine replays alternate, as DeepEP's double buffer needs), eager calls if capture fails.
Every shape is checked before timing (received rows and per-expert counts against the routing; the combine against
x x destination ranks (normal) or x x sum of weights (low latency, fp8 tolerance)), so a wrong call is "wrong",
not a time. A failure of the peer is a note and doc["peers"]["deepep"], never a failed epcomm run.

DeepEP's low-latency kernels start NVSHMEM themselves, so they run only in a process where epcomm does not: a bench
run whose cases are `deepep` alone (and `links`, `baseline`). The device script runs that first and passes its JSON
to the main run with --peer-json, which imports the peer rows (import_rows) so the table shows epcomm / DeepEP.
"""
from __future__ import annotations

import importlib
import json

import numpy as np

from ..config import EPConfig
from ..formats import FORMAT_NAMES
from ..stats import median, slowest_rank
from .graphs import capture_failed

PEER = "deepep"
MODULE = "deep_ep"
NVL_RECV_TOKENS = 256            # Config's receive ring per channel (DeepEP's default)
RDMA_CHUNK, RDMA_RECV = 6, 128    # unused on one node, but Config wants them
DISPATCH_CHUNKS = (8, 16, 32)     # tuned besides DeepEP's default for the rank count (24 for 2 ranks)
COMBINE_CHUNKS = (4, 8, 16)       # (default 10 for 2 ranks)
TUNE_WARMUP, TUNE_ITERS = 2, 8
LL_COMBINE_TOL = 0.05             # relative error of an fp8 round trip (per-128 e4m3 scales): ~0.02 measured
# cases that start epcomm's NVSHMEM runtime in this process: DeepEP's low-latency buffer must not share it
CASES_STARTING_NVSHMEM = ("ht", "ll", "sweep", "latency")


def load(name: str = MODULE):
    """(module, None) when DeepEP imports, else (None, why not)."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 (ImportError, or a missing shared library / symbol)
        return None, f"{name} not importable ({type(e).__name__}: {e})"
    missing = [n for n in ("Buffer", "Config") if not hasattr(mod, n)]
    if missing:
        return None, f"{name} has no {', '.join(missing)}: not DeepEP's legacy Buffer API"
    return mod, None


# ------------------------------------------------------------------------------------------------ expectations
def expected_counts(ids_per_rank, rank: int, n_local: int, world: int) -> dict:
    """What rank `rank` must receive from the routing of every rank: tokens per local expert, (token, rank) pairs,
    and each of its own tokens' destination ranks."""
    lo = rank * n_local
    per_expert = np.zeros(n_local, np.int64)
    pairs = 0
    for ids in ids_per_rank:
        ids = np.asarray(ids).reshape(len(ids), -1)
        mine = ids[(ids >= lo) & (ids < lo + n_local)] - lo
        per_expert += np.bincount(mine, minlength=n_local)
        pairs += int(((ids >= lo) & (ids < lo + n_local)).any(axis=1).sum())
    own = np.asarray(ids_per_rank[rank]).reshape(len(ids_per_rank[rank]), -1)
    dest = np.where(own >= 0, own // n_local, world)
    hit = np.zeros((own.shape[0], world + 1), bool)
    if own.shape[0]:
        np.put_along_axis(hit, dest.astype(np.int64), True, axis=1)
    return {"per_expert": per_expert, "pairs": pairs, "dest_ranks": hit[:, :world].sum(axis=1)}


def quantize_fp8(torch, x):
    """Per token and 128 channels: e4m3 values and fp32 scales (amax / 448), the input DeepEP's fp8 dispatch takes."""
    t, h = x.shape
    blocks = x.float().view(t, h // 128, 128)
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    q = (blocks / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(t, h)
    return q.contiguous(), scale.contiguous()


def dequantize_fp8(torch, q, scales):
    """bf16 of e4m3 rows [..., h] with fp32 scales [..., h / 128] (any strides)."""
    h = q.shape[-1]
    v = q.float().view(*q.shape[:-1], h // 128, 128) * scales.float().unsqueeze(-1)
    return v.view(q.shape).to(torch.bfloat16)


def relative_error(torch, got, want) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp(min=1e-12))


class DeepEPPeer:
    """DeepEP's buffers and calls on this rank, for the bench's shapes. Collective: every rank makes the same calls."""

    def __init__(self, deep_ep, torch, comm, world: int, hidden: int, num_experts: int):
        self.ep, self.torch, self.comm = deep_ep, torch, comm
        self.world, self.hidden, self.num_experts = world, hidden, num_experts
        self.n_local = num_experts // world
        self.topk_dtype = getattr(deep_ep, "topk_idx_t", None) or torch.int64   # DeepEP's build picks it (int64)
        self.buffer = None

    # ---------------------------------------------------------------- normal (high-throughput) kernels
    def open_normal(self, budgets) -> None:
        """One buffer for every budget: its NVLink ring sized by DeepEP for the largest (bf16 rows)."""
        nvl = max(self.ep.Config(b, DISPATCH_CHUNKS[0], NVL_RECV_TOKENS, RDMA_CHUNK, RDMA_RECV)
                  .get_nvl_buffer_size_hint(self.hidden * 2, self.world) for b in budgets)
        self.buffer = self.ep.Buffer(None, int(nvl), 0, low_latency_mode=False, explicitly_destroy=True,
                                     comm=self.comm)

    def candidates(self, op: str, sms: int) -> list:
        """(label, Config) to tune over: DeepEP's default for this rank count, then chunk sizes."""
        self.ep.Buffer.set_num_sms(sms)
        default = (self.ep.Buffer.get_dispatch_config(self.world) if op == "dispatch"
                   else self.ep.Buffer.get_combine_config(self.world))
        chunks = DISPATCH_CHUNKS if op == "dispatch" else COMBINE_CHUNKS
        return [("default", default)] + [
            (f"chunk {c}", self.ep.Config(sms, c, NVL_RECV_TOKENS, RDMA_CHUNK, RDMA_RECV)) for c in chunks]

    def layout(self, ids):
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(ids, self.num_experts)
        return per_rank, per_expert, in_rank

    def dispatch(self, x, ids, w, config):
        """The per-layer call: layout, then dispatch with top-k (waits on the host for the counts)."""
        per_rank, per_expert, in_rank = self.layout(ids)
        recv_x, _, recv_w, counts, handle, _ = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=ids, topk_weights=w, config=config)
        return recv_x, recv_w, counts, handle

    def dispatch_cached(self, x, handle, config):
        return self.buffer.dispatch(x, handle=handle, config=config)[0]

    def combine(self, recv_x, handle, recv_w, config):
        return self.buffer.combine(recv_x, handle, topk_weights=recv_w, config=config)[0]

    # ---------------------------------------------------------------- low-latency kernels
    def open_low_latency(self, max_tokens: int) -> None:
        rdma = self.ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, self.hidden, self.world, self.num_experts)
        self.buffer = self.ep.Buffer(None, 0, int(rdma), low_latency_mode=True, num_qps_per_rank=self.n_local,
                                     explicitly_destroy=True, comm=self.comm)

    def ll_dispatch(self, x, ids, max_tokens: int):
        (q, scales), counts, handle, _, _ = self.buffer.low_latency_dispatch(
            x, ids, max_tokens, self.num_experts, use_fp8=True, async_finish=False, return_recv_hook=False)
        return q, scales, counts, handle

    def ll_reset(self, max_tokens: int) -> None:
        """Zero both low-latency buffers' signals: after a failed graph capture the host's buffer switch and the
        cleaning the kernels do for the next call no longer agree."""
        self.torch.cuda.synchronize()
        self.comm.Barrier()
        self.buffer.clean_low_latency_buffer(max_tokens, self.hidden, self.num_experts)
        self.torch.cuda.synchronize()
        self.comm.Barrier()

    def ll_combine(self, expert_y, ids, w, handle, out=None):
        return self.buffer.low_latency_combine(expert_y, ids, w, handle, async_finish=False, return_recv_hook=False,
                                               out=out)[0]

    def close(self) -> None:
        if self.buffer is not None:
            self.torch.cuda.synchronize()
            self.comm.Barrier()
            try:
                self.buffer.destroy()
            finally:
                self.buffer = None


# ------------------------------------------------------------------------------------------------ the case
class DeepEPCase:
    """The bench's deepep case on every rank (bench: cases.Bench)."""

    def __init__(self, bench, deep_ep):
        self.b, self.a = bench, bench.args
        self.torch = bench.torch
        self.peer = DeepEPPeer(deep_ep, bench.torch, bench.comm, bench.world, self.a.hidden, self.a.experts)
        self.status = bench.records.doc["peers"][PEER]

    def cfg(self, fmt: str, tokens: int, sms=None, mode: str = "ht") -> EPConfig:
        a = self.a
        return EPConfig(hidden=a.hidden, topk=a.topk, num_experts=a.experts, max_tokens_per_rank=tokens,
                        world_size=self.b.world, token_format=fmt, mode=mode, num_sms=sms)

    def inputs(self, cfg, t: int) -> tuple[list[dict], dict]:
        """Device input sets (ids as int64, DeepEP's topk_idx_t; fp8 copies quantised here, untimed) and what this
        rank must receive from set 0."""
        torch = self.torch
        sets = self.b.verify.device_sets(cfg, t)
        for s in sets:
            s["ids64"] = s["ids"].to(self.peer.topk_dtype).contiguous()
            s["w"] = s["w"].float().contiguous()
            s["x"] = s["x"].contiguous()
            s["xq"] = quantize_fp8(torch, s["x"]) if self.a.hidden % 128 == 0 else None
        world0 = self.b.verify.world_sets(cfg, t)[0]
        return sets, expected_counts(world0.topk_ids, self.b.rank, self.peer.n_local, self.b.world)

    def time(self, prepare, op) -> dict:
        return self.b.timer.run(self.a.warmup, self.a.iters, prepare, op)

    def fastest(self, candidates, prepare, make_op):
        """The candidate config whose short run (slowest rank, median) is fastest: the same choice on every rank."""
        best = None
        for label, config in candidates:
            tm = self.b.timer.run(TUNE_WARMUP, TUNE_ITERS, prepare, make_op(config))
            m = median(slowest_rank([p["times_us"] for p in self.b.comm.allgather(tm)]))
            if best is None or m < best[0]:
                best = (m, label, config)
        return best[1], best[2]

    def record(self, case, op, cfg, t, mode, *, timing=None, status="ok", error=None, graph=False, sms=None,
               config=None) -> None:
        rec = self.b.records.record(case, PEER, op, cfg, t, graph=graph, status=status, verified=status == "ok",
                                    error=error, timing=timing, sms=sms, mode=mode)
        rec["peer_config"] = config

    # ---------------------------------------------------------------- normal kernels
    def run_normal(self) -> None:
        a, torch = self.a, self.torch
        t = a.tokens
        budgets = list(a.peer_sms)
        self.peer.open_normal(budgets)
        try:
            sets, want = self.inputs(self.cfg("bf16", t), t)
            n = len(sets)
            for sms in budgets:
                self.b.log(f"deepep ht: {sms} SMs")
                for fmt in FORMAT_NAMES:
                    cfg = self.cfg(fmt, t, sms)
                    if cfg.token_format.quantized and sets[0]["xq"] is None:
                        continue     # hidden not a multiple of 128: no per-128 scales to feed DeepEP
                    self.normal_shape(sets, n, want, cfg, t, sms)
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()      # this shape's received rows and handles are gone now
            self.status["normal"] = {"status": "ok", "sms": budgets}
        finally:
            self.peer.close()

    def normal_shape(self, sets, n, want, cfg, t, sms) -> None:
        torch, peer = self.torch, self.peer
        quantized = cfg.token_format.quantized        # DeepEP is fed the fp8 copy, its combine the bf16 rows
        xin = [s["xq"] if quantized else s["x"] for s in sets]
        first_cfg = peer.candidates("dispatch", sms)[0][1]
        # one dispatch per input set (untimed): its handle for the cached calls, its rows for the combine
        outs = [peer.dispatch(xin[i], sets[i]["ids64"], sets[i]["w"], first_cfg) for i in range(n)]
        torch.cuda.synchronize()
        problems = self.check_dispatch(outs[0], want)
        if not problems and not quantized:
            y = peer.combine(outs[0][0], outs[0][3], outs[0][1], peer.candidates("combine", sms)[0][1])
            torch.cuda.synchronize()
            problems += self.check_normal_combine(y, sets[0]["x"], want)
        problems = self.b.verify.agree(problems)
        ops = ("dispatch",) if quantized else ("dispatch", "combine")
        if problems:
            calls = [("dispatch", "cached"), ("dispatch", "normal")] + [("combine", "normal")] * (not quantized)
            for op, mode in calls:
                self.record("ht", op, cfg if op == "dispatch" else cfg.replace(token_format="bf16"), t, mode,
                            status="wrong", error="; ".join(problems[:3]), sms=sms)
            return
        pick = lambda i: i % n  # noqa: E731
        label, best = self.fastest(peer.candidates("dispatch", sms), pick,
                                   lambda c: lambda i: peer.dispatch_cached(xin[i], outs[i][3], c))
        tm = self.time(pick, lambda i: peer.dispatch_cached(xin[i], outs[i][3], best))
        self.record("ht", "dispatch", cfg, t, "cached", timing=tm, sms=sms, config=label)
        tm = self.time(pick, lambda i: peer.dispatch(xin[i], sets[i]["ids64"], sets[i]["w"], best))
        self.record("ht", "dispatch", cfg, t, "normal", timing=tm, sms=sms, config=label)
        if "combine" in ops:
            label, best = self.fastest(peer.candidates("combine", sms), pick,
                                       lambda c: lambda i: peer.combine(outs[i][0], outs[i][3], outs[i][1], c))
            tm = self.time(pick, lambda i: peer.combine(outs[i][0], outs[i][3], outs[i][1], best))
            self.record("ht", "combine", cfg.replace(token_format="bf16"), t, "normal", timing=tm, sms=sms,
                        config=label)

    def check_dispatch(self, out, want) -> list[str]:
        recv_x, _, counts, _ = out
        x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        problems = []
        if int(x.shape[0]) != want["pairs"]:
            problems.append(f"deepep dispatch: {int(x.shape[0])} rows received, the routing sends {want['pairs']}")
        if [int(c) for c in counts] != [int(c) for c in want["per_expert"]]:
            problems.append("deepep dispatch: tokens per local expert differ from the routing's")
        return problems

    def check_normal_combine(self, y, x, want) -> list[str]:
        # identity experts, combine without weights: each token comes back once per destination rank, summed
        torch = self.torch
        ranks = torch.as_tensor(want["dest_ranks"], dtype=torch.float32, device=x.device).unsqueeze(1)
        ref = (x.float() * ranks).to(torch.bfloat16)
        if y.shape != x.shape or not torch.allclose(y.float(), ref.float(), rtol=2 ** -7, atol=0.0):
            return ["deepep combine: rows differ from x x (destination ranks of the token)"]
        return []

    # ---------------------------------------------------------------- low-latency kernels
    def run_low_latency(self) -> None:
        a, torch, peer = self.a, self.torch, self.peer
        t = a.ll_tokens
        cfg = self.cfg("fp8", t, None, mode="ll")
        sets, want = self.inputs(cfg, t)
        peer.open_low_latency(t)
        try:
            q, s, counts, handle = peer.ll_dispatch(sets[0]["x"], sets[0]["ids64"], t)
            ey = dequantize_fp8(torch, q, s)
            y = peer.ll_combine(ey, sets[0]["ids64"], sets[0]["w"], handle)
            torch.cuda.synchronize()
            problems = self.b.verify.agree(self.check_ll(counts, y, sets[0], want))
            if problems:
                for op, c in (("dispatch", cfg), ("combine", cfg.replace(token_format="bf16"))):
                    self.record("ll", op, c, t, "low_latency", status="wrong", error="; ".join(problems[:3]))
                self.status["low_latency"] = {"status": "wrong"}
                return
            note = None if self.a.no_graph else self.ll_graph(cfg, t, sets, want, ey)
            if note is not None or self.a.no_graph:
                if note:
                    self.b.records.notes.append(f"deepep ll T={t}: CUDA graph not usable, eager timings: {note}")
                    peer.ll_reset(t)
                self.ll_eager(cfg, t, sets, ey)
            self.status["low_latency"] = {"status": "ok", "graph": note is None and not self.a.no_graph}
        finally:
            peer.close()

    def check_ll(self, counts, y, s, want) -> list[str]:
        torch = self.torch
        problems = []
        if [int(c) for c in counts.tolist()] != [int(c) for c in want["per_expert"]]:
            problems.append("deepep low_latency_dispatch: tokens per local expert differ from the routing's")
        w = torch.where(s["ids64"] >= 0, s["w"], torch.zeros_like(s["w"])).sum(dim=1, keepdim=True)
        err = relative_error(torch, y, s["x"].float() * w)
        if not err < LL_COMBINE_TOL:
            problems.append(f"deepep low_latency_combine: relative error {err:.3g} (fp8 round trip allows "
                            f"{LL_COMBINE_TOL})")
        return problems

    def ll_eager(self, cfg, t, sets, ey) -> None:
        peer, n = self.peer, len(sets)
        tm = self.time(lambda i: sets[i % n], lambda s: peer.ll_dispatch(s["x"], s["ids64"], t))
        self.record("ll", "dispatch", cfg, t, "low_latency", timing=tm)

        def prep_c(i):
            s = sets[i % n]
            return s, peer.ll_dispatch(s["x"], s["ids64"], t)[3]
        tm = self.time(prep_c, lambda st: peer.ll_combine(ey, st[0]["ids64"], st[0]["w"], st[1]))
        self.record("ll", "combine", cfg.replace(token_format="bf16"), t, "low_latency", timing=tm)

    def ll_graph(self, cfg, t, sets, want, ey):
        """Capture dispatch and combine (one graph each), check a replay, time them. Replays alternate dispatch,
        combine as calls do: DeepEP switches between its two buffers on the host, which a replay does not.
        Returns None when timed, else why graphs were not usable."""
        torch, peer, n = self.torch, self.peer, len(sets)
        sx, sids, sw = (torch.empty_like(sets[0][k]) for k in ("x", "ids64", "w"))

        def load(s):
            sx.copy_(s["x"])
            sids.copy_(s["ids64"])
            sw.copy_(s["w"])
        try:
            load(sets[0])
            torch.cuda.synchronize()
            self.b.comm.Barrier()
            g_d, g_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_d):
                g_q, g_s, g_counts, g_handle = peer.ll_dispatch(sx, sids, t)
            with torch.cuda.graph(g_c):
                g_y = peer.ll_combine(ey, sids, sw, g_handle)
            torch.cuda.synchronize()
            self.b.comm.Barrier()
            g_d.replay()
            ey.copy_(dequantize_fp8(torch, g_q, g_s))     # identity experts of this replay's rows
            g_c.replay()
            torch.cuda.synchronize()
            problems = self.check_ll(g_counts, g_y, sets[0], want)
        except Exception as e:  # noqa: BLE001
            problems = capture_failed(torch, e)
        problems = self.b.verify.agree(problems)
        if problems:
            return "; ".join(problems[:3])
        pending = [False]      # a dispatch replay whose combine replay has not run yet

        def prep_d(i):
            if pending[0]:
                g_c.replay()
            load(sets[i % n])

        def op_d(_):
            g_d.replay()
            pending[0] = True

        def prep_c(i):
            if pending[0]:
                g_c.replay()
            load(sets[i % n])
            g_d.replay()
            pending[0] = False

        tm_d = self.time(prep_d, op_d)
        tm_c = self.time(prep_c, lambda _: g_c.replay())
        load(sets[1 % n])       # replays stay right on another input set
        g_d.replay()
        ey.copy_(dequantize_fp8(torch, g_q, g_s))
        g_c.replay()
        torch.cuda.synchronize()
        w1 = expected_counts(self.b.verify.world_sets(cfg, t)[1 % n].topk_ids, self.b.rank, peer.n_local,
                             self.b.world)
        post = self.b.verify.agree(self.check_ll(g_counts, g_y, sets[1 % n], w1))
        for op, c, tm in (("dispatch", cfg, tm_d), ("combine", cfg.replace(token_format="bf16"), tm_c)):
            if post:
                self.record("ll", op, c, t, "low_latency", graph=True, status="wrong",
                            error="graph replay on input set 1: " + "; ".join(post[:3]))
            else:
                self.record("ll", op, c, t, "low_latency", graph=True, timing=tm)
        return None


def run_case(bench) -> None:
    """The bench's deepep case: DeepEP's rows, or why there are none (doc["peers"]["deepep"] and a note). Never raises:
    the peer failing is not epcomm failing."""
    a = bench.args
    status = bench.records.doc["peers"].setdefault(PEER, {})

    def skip(why: str, state: str = "n/a") -> None:
        status.update({"status": state, "reason": why})
        bench.records.notes.append(f"deepep: {why}")
        bench.log(f"deepep: {why}")
    if getattr(a, "peer_json", None):
        return skip(f"rows imported from --peer-json {a.peer_json} (not run in this process)", "imported")
    if not bench.gpu:
        return skip("host backend: DeepEP needs GPUs")
    if bench.records.shared:
        return skip("ranks share a GPU: DeepEP needs one GPU per rank")
    topo = bench.ctx.topology
    if topo.num_nodes > 1:
        return skip(f"topology {topo.name} has {topo.num_nodes} nodes: DeepEP would run its one-node kernels, "
                    "not a like-for-like peer of epcomm's inter-node path")
    mod, why = load()
    whys = bench.comm.allgather(why)
    if any(whys):
        return skip(next(w for w in whys if w))
    status.update({"status": "ok", "module": getattr(mod, "__file__", None),
                   "version": getattr(mod, "__version__", None)})
    case = DeepEPCase(bench, mod)
    parts = [("normal", case.run_normal)]
    ll_blockers = [c for c in CASES_STARTING_NVSHMEM if c in a.cases]
    if ll_blockers:
        status["low_latency"] = {"status": "n/a", "reason": f"cases {','.join(ll_blockers)} start epcomm's NVSHMEM in "
                                 "this process; run `--case deepep` alone and pass its JSON with --peer-json"}
        bench.records.notes.append(f"deepep low latency: {status['low_latency']['reason']}")
    else:
        parts.append(("low_latency", case.run_low_latency))
    for name, fn in parts:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            status[name] = {"status": "error", "reason": msg}
            status["status"] = "partial"
            bench.records.notes.append(f"deepep {name}: {msg}")
            bench.log(f"deepep {name}: {msg}", everyone=True)


# ------------------------------------------------------------------------------------------------ --peer-json
SAME_FOR_PEER_ROWS = ("hidden", "topk", "num_experts", "routing", "seed", "input_sets", "tokens_ht", "tokens_ll")


def check_peer_doc(peer_doc: dict, doc: dict) -> list[str]:
    """Why the peer rows of another run cannot stand beside this one's (empty when they can)."""
    problems = []
    if peer_doc.get("world_size") != doc.get("world_size"):
        problems.append(f"world_size {peer_doc.get('world_size')} != {doc.get('world_size')}")
    sp, sn = peer_doc.get("settings") or {}, doc.get("settings") or {}
    problems += [f"settings.{k} {sp.get(k)!r} != {sn.get(k)!r}" for k in SAME_FOR_PEER_ROWS if sp.get(k) != sn.get(k)]
    return problems


def read_peer_doc(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    if not str(d.get("schema", "")).startswith("epcomm.bench/"):
        raise ValueError(f"{path}: not an epcomm.bench document")
    return d


def import_rows(doc: dict, path: str, log=None) -> int:
    """Copy the peer rows of the run in `path` into `doc` (same inputs and shapes, else a note and nothing), marked
    with `imported_from`; their floors are recomputed in doc's refresh from their bytes. Returns the rows copied."""
    status = doc["peers"].setdefault(PEER, {})
    try:
        peer_doc = read_peer_doc(path)
        problems = check_peer_doc(peer_doc, doc)
    except (OSError, ValueError) as e:
        problems = [str(e)]
        peer_doc = {}
    if problems:
        msg = f"--peer-json {path} not imported: " + "; ".join(problems)
        status.update({"status": "error", "reason": msg})
        doc["notes"].append(msg)
        if log:
            log(msg)
        return 0
    rows = [dict(r, imported_from=path) for r in peer_doc.get("results", []) if r.get("impl") == PEER]
    doc["results"].extend(rows)
    status.update((peer_doc.get("peers") or {}).get(PEER) or {})
    status["imported_from"] = path
    status["imported_rows"] = len(rows)
    if log:
        log(f"--peer-json {path}: {len(rows)} DeepEP rows imported")
    return len(rows)
