"""CUDA-graph timing (the ll case on GPUs): capture dispatch and combine once, check a replay against the spec,
time replays, and check a replay on other inputs after the timing."""
from __future__ import annotations


def time_graph(bench, case, buf, cfg, t, ops, sets, ey_buf, sms):
    """Capture dispatch and combine in two CUDA graphs, verify the first replay, time replays (inputs copied
    into the static tensors before each, untimed). Returns None when done, else why graphs were not usable."""
    torch = bench.torch
    a = bench.args
    if ey_buf is None:
        ey_buf = torch.empty((*cfg.rows_shape, cfg.hidden), dtype=torch.bfloat16, device=bench.device)
        ey_buf.normal_()
    sx = torch.empty_like(sets[0]["x"])
    sids = torch.empty_like(sets[0]["ids"])
    sw = torch.empty_like(sets[0]["w"])

    def load(s):
        sx.copy_(s["x"])
        sids.copy_(s["ids"])
        sw.copy_(s["w"])
    bench.log(f"{case} mode {cfg.mode}: capturing CUDA graphs (dispatch, combine)")
    try:
        load(sets[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                r = buf.dispatch(sx, sids)
                buf.combine(ey_buf, r.handle, sw)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        bench.comm.Barrier()
        g_d, g_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_d):
            gres = buf.dispatch(sx, sids)
        with torch.cuda.graph(g_c):
            gy = buf.combine(ey_buf, gres.handle, sw)
        torch.cuda.synchronize()
        bench.comm.Barrier()
        # first replay, checked
        load(sets[0])
        g_d.replay()
        bench.verify.identity_y(cfg, gres, ey_buf) if cfg.token_format.quantized else ey_buf.copy_(gres.expert_x)
        g_c.replay()
        torch.cuda.synchronize()
        problems = bench.verify.check_dispatch(cfg, gres, t, 0) + bench.verify.check_combine(cfg, gy, t, 0)
    except Exception as e:  # noqa: BLE001
        problems = capture_failed(torch, e)
    problems = bench.verify.agree(problems)
    if problems:
        return "; ".join(problems[:3])
    n_sets = len(sets)
    w, it = a.warmup, a.iters

    def prep_d(i):
        load(sets[i % n_sets])

    def prep_c(i):
        load(sets[i % n_sets])
        g_d.replay()

    timings = {}
    if "dispatch" in ops:
        timings["dispatch"] = bench.timer.run(w, it, prep_d, lambda _: g_d.replay())
    if "combine" in ops:
        timings["combine"] = bench.timer.run(w, it, prep_c, lambda _: g_c.replay())
    if "roundtrip" in ops:
        timings["roundtrip"] = bench.timer.run(w, it, prep_d, lambda _: (g_d.replay(), g_c.replay()))
    # replays must stay right on other inputs: check the dispatch of input set 1 after all the timing
    load(sets[1 % n_sets])
    g_d.replay()
    torch.cuda.synchronize()
    post = bench.verify.agree(bench.verify.check_dispatch(cfg, gres, t, 1 % n_sets))
    # the last replay's result is not combined: free its output set for the eager calls that may follow on buf
    # (the device refuses a dispatch over a live result, kernels/results.cuh)
    buf.release(gres.handle)
    for op, tm in timings.items():
        if post:
            bench.records.record(case, "epcomm", op, cfg, t, graph=True, status="wrong",
                                 error="graph replay on input set 1: " + "; ".join(post[:3]), sms=sms)
        else:
            bench.records.record(case, "epcomm", op, cfg, t, graph=True, verified=True, timing=tm, sms=sms)
    if post:
        return "replays went wrong on another input set: " + "; ".join(post[:2])
    return None


def capture_failed(torch, e: Exception) -> list[str]:
    """The problem list of a failed capture or replay, after waiting (best effort) for what the device still runs,
    so that the caller's fallback starts from an idle GPU."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 (the device may be what failed)
        pass
    return [f"capture/replay failed: {type(e).__name__}: {e}"]
