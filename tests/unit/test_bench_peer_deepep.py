"""epcomm.bench.peer_deepep on the CPU: the DeepEP wrapper against a fake `deep_ep` (the legacy Buffer API, one rank,
torch CPU tensors), the checks that make a wrong call "wrong", the rows and their ratios, --peer-json."""
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm.arrays import to_torch  # noqa: E402
from epcomm.bench import driver, peer_deepep as P, report  # noqa: E402
from epcomm.bench.records import Records  # noqa: E402
from epcomm.bench.timing import HostTimer  # noqa: E402
from epcomm.bench.verify import Verifier  # noqa: E402
from epcomm.topology import Topology  # noqa: E402


# ------------------------------------------------------------------------------------------------ a fake DeepEP
class FakeConfig:
    def __init__(self, num_sms=20, send=6, recv=256, rsend=6, rrecv=256):
        assert send < recv
        self.num_sms, self.send = num_sms, send

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return self.num_sms * num_ranks * 256 * hidden_bytes


class DoubleBuffer:
    """DeepEP's two low-latency buffers as its kernels use them: a call runs on the buffer the host picked (then the
    host switches), needs that buffer clean, leaves it dirty and cleans the other one for the next call. A CUDA graph
    keeps the buffer of its capture: replays must alternate dispatch, combine, as the captures did."""
    def __init__(self):
        self.host, self.clean = 0, [True, True]

    def pick(self):
        i, self.host = self.host, self.host ^ 1
        return i

    def run(self, i, what):
        if not self.clean[i]:
            raise RuntimeError(f"{what} on buffer {i} with the signals of an earlier call (a DeepEP kernel would hang)")
        self.clean[i], self.clean[i ^ 1] = False, True


def make_fake(calls, *, count_offset=0, combine_scale=1.0, cuda=None):
    """One rank: every expert is local. count_offset / combine_scale != 0 / 1 make a wrong DeepEP. cuda: the fake
    torch.cuda whose graph captures the low-latency calls record (replayed later), if any."""
    dbuf = DoubleBuffer()

    def launch(what, body):
        """Run body now, or record it in the graph being captured (on the buffer picked at capture)."""
        i = dbuf.pick()
        g = getattr(cuda, "capturing", None)
        if g is None:
            dbuf.run(i, what)
            body()
        else:
            g.ops.append(lambda: (dbuf.run(i, what), body()))

    class FakeBuffer:
        num_sms = 20

        def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                     explicitly_destroy=False, comm=None, **kw):
            assert group is None and comm is not None and explicitly_destroy
            self.ll = low_latency_mode
            calls.append(("Buffer", num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank))

        @staticmethod
        def set_num_sms(n):
            assert n % 2 == 0
            FakeBuffer.num_sms = n

        @staticmethod
        def get_dispatch_config(num_ranks):
            return FakeConfig(FakeBuffer.num_sms, 24)

        @staticmethod
        def get_combine_config(num_ranks):
            return FakeConfig(FakeBuffer.num_sms, 10)

        @staticmethod
        def get_low_latency_rdma_size_hint(t, h, r, e):
            return t * h * r * e

        def get_dispatch_layout(self, ids, num_experts):
            valid = ids >= 0
            per_expert = torch.bincount(ids[valid], minlength=num_experts).int()
            in_rank = valid.any(dim=1, keepdim=True)
            return in_rank.sum(0).int(), None, per_expert, in_rank, None

        def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                     is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                     expert_alignment=1, num_worst_tokens=0, config=None, **kw):
            assert isinstance(config, FakeConfig) and not self.ll
            calls.append(("dispatch", "cached" if handle is not None else "normal", config.num_sms, config.send))
            rows = handle[1] if handle is not None else torch.nonzero(is_token_in_rank[:, 0]).flatten()
            recv = tuple(v[rows] for v in x) if isinstance(x, tuple) else x[rows]
            if handle is not None:
                return recv, None, None, None, None, None
            counts = [int(c) + count_offset for c in num_tokens_per_expert]
            return recv, topk_idx[rows], topk_weights[rows], counts, ("handle", rows, x.shape[0] if not
                                                                     isinstance(x, tuple) else x[0].shape[0]), None

        def combine(self, x, handle, topk_weights=None, config=None, **kw):
            calls.append(("combine", config.num_sms, config.send))
            y = torch.zeros((handle[2], x.shape[1]), dtype=torch.float32)
            y[handle[1]] = x.float() * combine_scale
            return y.to(torch.bfloat16), topk_weights, None

        def low_latency_dispatch(self, x, ids, max_tokens, num_experts, use_fp8=True, async_finish=False,
                                 return_recv_hook=False, **kw):
            assert self.ll and use_fp8 and not return_recv_hook
            calls.append(("ll_dispatch",))
            qx = torch.zeros((num_experts, max_tokens, x.shape[1]), dtype=torch.float8_e4m3fn)
            sx = torch.zeros((num_experts, max_tokens, x.shape[1] // 128), dtype=torch.float32)
            counts = torch.zeros(num_experts, dtype=torch.int32)
            slot = {}

            def body():        # reads x and ids when it runs (a replay sees the static inputs' new contents)
                q, s = P.quantize_fp8(torch, x)
                counts.zero_()
                slot.clear()
                for t in range(ids.shape[0]):
                    for e in ids[t].tolist():
                        if e < 0:
                            continue
                        j = int(counts[e])
                        qx[e, j], sx[e, j] = q[t], s[t]
                        slot[(t, e)] = j
                        counts[e] += 1
                counts.add_(count_offset)
            launch("dispatch", body)
            return (qx, sx), counts, (slot,), None, None

        def low_latency_combine(self, y, ids, w, handle, async_finish=False, return_recv_hook=False, out=None,
                                **kw):
            calls.append(("ll_combine",))
            slot = handle[0]
            res = torch.zeros((ids.shape[0], y.shape[-1]), dtype=torch.bfloat16)

            def body():
                outp = torch.zeros((ids.shape[0], y.shape[-1]), dtype=torch.float32)
                for t in range(ids.shape[0]):
                    for k, e in enumerate(ids[t].tolist()):
                        if e >= 0:
                            outp[t] += w[t, k] * y[e, slot[(t, e)]].float() * combine_scale
                res.copy_(outp)
            launch("combine", body)
            return res, None, None

        def clean_low_latency_buffer(self, t, h, e):
            assert self.ll
            calls.append(("clean",))
            dbuf.clean = [True, True]

        def destroy(self):
            calls.append(("destroy",))

    mod = types.ModuleType("deep_ep")
    mod.Buffer, mod.Config = FakeBuffer, FakeConfig
    return mod


class FakeCuda:
    """torch.cuda stand-in for the CPU: synchronisation is a no-op; graphs cannot be captured (graphs=False), or
    record the fake DeepEP's calls and replay them (graphs=True)."""
    def __init__(self, graphs=False):
        self.graphs, self.capturing = graphs, None

    def synchronize(self, *a):
        pass

    def empty_cache(self):
        pass

    def CUDAGraph(self):
        if not self.graphs:
            raise RuntimeError("no CUDA graphs on the CPU")
        g = SimpleNamespace(ops=[])
        g.replay = lambda: [op() for op in g.ops]
        return g

    def graph(self, g):
        import contextlib

        @contextlib.contextmanager
        def capture():
            self.capturing = g
            try:
                yield
            finally:
                self.capturing = None
        return capture()


class TorchOnCpu:
    def __init__(self, cuda=None):
        self.cuda = cuda or FakeCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


class OneRankComm:
    def Barrier(self):
        pass

    def allgather(self, v):
        return [v]

    def bcast(self, v, root=0):
        return v


def make_bench(argv, hidden=256, experts=8, tokens=16, cuda=None):
    a = driver.parse(argv + ["--hidden", str(hidden), "--experts", str(experts), "--tokens", str(tokens),
                             "--ll-tokens", "8", "--iters", "3", "--warmup", "1"])
    driver.resolve_shapes(a, "gpu", None)
    comm = OneRankComm()
    ctx = SimpleNamespace(rank=0, world_size=1, device=0, backend="gpu",
                          topology=Topology.single_node(1, backend="gpu", gpus=[0]))
    arrays = SimpleNamespace(put=lambda x: to_torch(x, "cpu"))
    verify = Verifier(a, 0, comm, arrays, TorchOnCpu(cuda), None)
    logs = []
    b = SimpleNamespace(args=a, ctx=ctx, comm=comm, torch=TorchOnCpu(cuda), world=1, rank=0, gpu=True, verify=verify,
                        timer=HostTimer(comm), log=lambda m, everyone=False: logs.append(m), logs=logs)
    b.records = Records(a, ctx, comm, b.log, verify.world_sets, "perf_counter", None, None)
    return b


def rows(b, impl="deepep"):
    return [(r["case"], r["op"], r["mode"], r["format"], r["sms_budget"], r["status"])
            for r in b.records.results if r["impl"] == impl]


# ------------------------------------------------------------------------------------------------ tests
def test_expected_counts_two_ranks():
    ids = [np.array([[0, 3], [2, -1], [-1, -1]]), np.array([[1, 2], [3, 2]])]
    w = P.expected_counts(ids, rank=1, n_local=2, world=2)        # experts 2, 3 on rank 1
    assert w["per_expert"].tolist() == [3, 2] and w["pairs"] == 4
    assert w["dest_ranks"].tolist() == [2, 1]                      # rank 1's own tokens: 2 ranks, 1 rank
    w0 = P.expected_counts(ids, rank=0, n_local=2, world=2)
    assert w0["per_expert"].tolist() == [1, 1] and w0["pairs"] == 2
    assert w0["dest_ranks"].tolist() == [2, 1, 0]                  # a token without experts goes nowhere


def test_fp8_quantise_round_trip():
    x = torch.randn(4, 256).to(torch.bfloat16) * 3
    q, s = P.quantize_fp8(torch, x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 2)
    assert P.relative_error(torch, P.dequantize_fp8(torch, q, s), x) < 0.05


def test_load_says_why_not():
    mod, why = P.load("epcomm_no_such_module_here")
    assert mod is None and "not importable" in why


def test_normal_and_low_latency_rows_checked_timed_and_tuned(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake(calls))
    b = make_bench(["--case", "deepep", "--peer-sms", "24,66", "--no-graph"])
    P.run_case(b)
    st = b.records.doc["peers"]["deepep"]
    assert st["status"] == "ok" and st["normal"]["status"] == "ok" and st["low_latency"]["status"] == "ok", st
    want = [("ht", op, mode, fmt, sms, "ok") for sms in (24, 66)
            for op, mode, fmt in (("dispatch", "cached", "bf16"), ("dispatch", "normal", "bf16"),
                                  ("combine", "normal", "bf16"), ("dispatch", "cached", "fp8"),
                                  ("dispatch", "normal", "fp8"))]
    want += [("ll", "dispatch", "low_latency", "fp8", None, "ok"), ("ll", "combine", "low_latency", "bf16", None, "ok")]
    assert rows(b) == want
    recs = [r for r in b.records.results if r["impl"] == "deepep"]
    assert all(r["verified"] and r["time_us"]["n"] == 3 for r in recs)
    assert {r["peer_config"] for r in recs if r["case"] == "ht"} <= {"default", "chunk 4", "chunk 8", "chunk 16",
                                                                     "chunk 32"}
    # the timed calls ran at each budget, with the Config of that budget; buffers were destroyed
    assert {c[2] for c in calls if c[0] == "dispatch"} == {24, 66}
    assert {c[1] for c in calls if c[0] == "combine"} == {24, 66}
    assert [c for c in calls if c[0] == "Buffer"][0][3] is False and [c for c in calls if c[0] == "Buffer"][1][3]
    assert calls.count(("destroy",)) == 2
    # the floor is that of the bytes the peer moves, like epcomm's
    assert all(r["bytes"]["link_send"] == [0] for r in recs)


def test_a_wrong_peer_is_wrong_not_timed_and_the_run_stays_ok(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake(calls, count_offset=1))
    b = make_bench(["--case", "deepep", "--peer-sms", "24", "--no-graph"])
    P.run_case(b)
    recs = [r for r in b.records.results if r["impl"] == "deepep"]
    assert recs and all(r["status"] == "wrong" and r["time_us"] is None for r in recs)
    assert any("tokens per local expert" in r["error"] for r in recs)
    assert b.records.refresh()["ok"]                      # the peer's failure is not epcomm's
    calls.clear()
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake(calls, combine_scale=1.5))
    b = make_bench(["--case", "deepep", "--peer-sms", "24", "--no-graph"])
    P.run_case(b)
    bad = {(r["case"], r["op"], r["format"]) for r in b.records.results if r["status"] == "wrong"}
    assert ("ht", "combine", "bf16") in bad and ("ll", "combine", "bf16") in bad


def test_graph_capture_failure_falls_back_to_eager_with_a_note(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake(calls))
    b = make_bench(["--case", "deepep", "--peer-sms", "24"])
    P.run_case(b)
    ll = [r for r in b.records.results if r["case"] == "ll"]
    assert [(r["op"], r["graph"], r["status"]) for r in ll] == [("dispatch", False, "ok"), ("combine", False, "ok")]
    assert any("CUDA graph not usable" in n for n in b.records.notes)
    assert ("clean",) in calls            # both buffers zeroed before the eager calls


def test_low_latency_not_beside_epcomm_nvshmem_and_skips_say_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake([]))
    b = make_bench(["--case", "deepep,ht", "--peer-sms", "24", "--no-graph"])
    P.run_case(b)
    assert {r["case"] for r in b.records.results} == {"ht"}
    assert "--peer-json" in b.records.doc["peers"]["deepep"]["low_latency"]["reason"]
    monkeypatch.setitem(sys.modules, "deep_ep", None)        # import fails
    b = make_bench(["--case", "deepep"])
    P.run_case(b)
    assert b.records.doc["peers"]["deepep"]["status"] == "n/a" and not b.records.results
    assert any("not importable" in n for n in b.records.notes)
    b = make_bench(["--case", "deepep"])
    b.gpu = False
    P.run_case(b)
    assert "host backend" in b.records.doc["peers"]["deepep"]["reason"]


def test_a_peer_exception_is_a_note(monkeypatch):
    mod = make_fake([])

    def boom(*a, **k):
        raise RuntimeError("DeepEP error: CPU recv timeout")
    mod.Buffer.get_dispatch_layout = boom
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    b = make_bench(["--case", "deepep", "--peer-sms", "24", "--no-graph"])
    P.run_case(b)
    st = b.records.doc["peers"]["deepep"]
    assert st["status"] == "partial" and "CPU recv timeout" in st["normal"]["reason"]
    assert st["low_latency"]["status"] == "ok" and not b.records.errors


def test_ratio_to_deepep_pairs_op_format_tokens_and_budget():
    def r(impl, median, case="ht", op="dispatch", fmt="bf16", tokens=4096, budget=None, sms=132, mode="ht"):
        return {"case": case, "impl": impl, "op": op, "mode": mode, "format": fmt, "tokens": tokens,
                "status": "ok", "time_us": {"median": median}, "floor": None, "sms": sms, "sms_budget": budget}
    rs = [r("epcomm", 300.0), r("epcomm", 600.0, budget=24, sms=24), r("epcomm", 240.0, fmt="fp8"),
          r("epcomm", 30.0, case="ll", tokens=128, fmt="fp8"), r("epcomm", 250.0, op="combine"),
          r("deepep", 200.0, budget=132, mode="cached"), r("deepep", 260.0, budget=132, mode="normal"),
          r("deepep", 320.0, budget=24, mode="cached"), r("deepep", 30.0, case="ll", tokens=128, fmt="fp8",
                                                          budget=None, mode="low_latency")]
    report.link_ratios(rs)
    got = [x["ratio_to_deepep"] for x in rs]
    assert got[0] == pytest.approx(1.5)          # the fastest DeepEP call at the same budget (cached, not normal)
    assert got[1] == pytest.approx(600 / 320)    # 24 SMs against 24 SMs
    assert got[2] is None and got[4] is None     # no DeepEP fp8 / combine row here
    assert got[3] == pytest.approx(1.0)          # low latency: DeepEP picks its own grid
    assert all(v is None for v in got[5:])
    doc = {"results": rs, "links": {}, "floor_bandwidth": {}, "notes": [], "errors": [], "ok": True}
    line = [ln for ln in report.table(doc).splitlines() if ln.split()[:2] == ["ht", "epcomm"]][0]
    assert "1.50" in line.split()


def test_peer_json_import_checks_shapes_and_refloors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake([]))
    peer = make_bench(["--case", "deepep", "--peer-sms", "24", "--no-graph"])
    P.run_case(peer)
    path = tmp_path / "peer.json"
    report.write_json(peer.records.refresh(), str(path))
    main = make_bench(["--case", "ht", "--peer-json", str(path), "--link-gbps", "100", "--local-gbps", "1000"])
    P.run_case(main)                                      # in-process DeepEP is skipped: rows come from the file
    assert main.records.doc["peers"]["deepep"]["status"] == "imported" and not main.records.results
    n = P.import_rows(main.records.doc, str(path))
    assert n == len(peer.records.results) and n > 0
    doc = main.records.refresh()
    assert all(r["imported_from"] == str(path) and r["floor"]["floor_us"] is not None
               for r in doc["results"])               # this run's bandwidths, not the peer run's (none)
    assert doc["peers"]["deepep"]["imported_rows"] == n
    other = make_bench(["--case", "ht", "--hidden", "512"], hidden=512)
    assert P.import_rows(other.records.doc, str(path)) == 0
    assert any("not imported" in x and "hidden" in x for x in other.records.doc["notes"])
    assert P.import_rows(other.records.doc, str(tmp_path / "nope.json")) == 0


def test_low_latency_graph_replays_alternate_as_deepeps_double_buffer_needs(monkeypatch):
    """Dispatch and combine captured once each; replays checked on set 0 and, after the timing, on set 1; the fake
    refuses a replay on a buffer an earlier call left dirty, as DeepEP's kernels would hang on it."""
    cuda = FakeCuda(graphs=True)
    calls = []
    monkeypatch.setitem(sys.modules, "deep_ep", make_fake(calls, cuda=cuda))
    b = make_bench(["--case", "deepep", "--peer-sms", "24"], cuda=cuda)
    P.run_case(b)
    ll = [r for r in b.records.results if r["case"] == "ll"]
    assert [(r["op"], r["graph"], r["status"]) for r in ll] == [("dispatch", True, "ok"), ("combine", True, "ok")], \
        (ll, b.records.notes)
    assert not any("CUDA graph" in n for n in b.records.notes) and ("clean",) not in calls
    assert b.records.doc["peers"]["deepep"]["low_latency"] == {"status": "ok", "graph": True}
    # the same fake catches a caller that replays dispatches back to back
    dbuf_calls = []
    mod = make_fake(dbuf_calls, cuda=cuda)
    buf = mod.Buffer(None, 0, 1, low_latency_mode=True, explicitly_destroy=True, comm=OneRankComm())
    x, ids = torch.zeros(2, 256).to(torch.bfloat16), torch.tensor([[0, 1], [1, 2]])
    g = cuda.CUDAGraph()
    with cuda.graph(g):
        buf.low_latency_dispatch(x, ids, 2, 8)
    g.replay()
    with pytest.raises(RuntimeError, match="signals of an earlier call"):
        g.replay()
