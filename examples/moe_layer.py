"""A torch MoE layer on top of epcomm, the way an inference server runs it, checked against a dense single-GPU
computation of the same layer.

    python -m launch run -t configs/local-2gpu.yaml -- python examples/moe_layer.py [--mode ht|ll] [--format bf16|fp8]

Two EPBuffers share the layer's weights, as a server's prefill and decode paths would:
* prefill (--tokens per rank): layout "grouped" with expert_alignment=128, so every expert's rows start at a multiple
  of 128 (a contiguous grouped GEMM's tiles); one matmul per local expert over rows row_offsets[g]:row_offsets[g+1]
  (pad rows included: combine never reads them); the fused shared expert with --shared.
* decode (--decode-tokens per rank): layout "batched", expert_x [local experts, capacity, H] and tokens_per_expert as
  the mask (a masked / batched GEMM: here one bmm over every slab); int64 router ids as torch.topk makes them;
  combine writes into a preallocated y (out=); per-expert load accumulated on the device (stats_out=); the shared
  expert, with --shared, computed densely on the rank's own tokens.
Each rank: router (top-k of softmax(x @ Wr)) -> dispatch -> expert matmuls -> combine. The reference: the same layer
computed densely for this rank's tokens with every expert's weights (all ranks build all weights from one seed).
Exits 1 when the relative error is above what bf16 allows.
"""
from __future__ import annotations

import argparse
import sys

import epcomm


def dequantized(cfg, out):
    """expert_x as fp32 numbers (fp8: times its block scales; the last block of a row may be partial)."""
    xs = out.expert_x.float()
    if not cfg.token_format.quantized:
        return xs
    scales = out.expert_scales.repeat_interleave(128, dim=-1)[..., :cfg.hidden]
    return xs * scales


def grouped_experts(cfg, out, rank, w_experts, w_shared):
    """Prefill: one matmul per group over its (aligned) rows."""
    import torch
    xs = dequantized(cfg, out)
    offs = out.row_offsets.to(torch.int64).cpu().tolist()    # host copy of G+1 numbers (example only)
    expert_y = torch.zeros(cfg.max_recv_rows, cfg.hidden, dtype=torch.bfloat16, device=xs.device)
    first = int(cfg.fused_shared_expert)
    weights = ([w_shared] if first else []) + [w_experts[rank * cfg.n_local_experts + le]
                                               for le in range(cfg.n_local_experts)]
    for g, w in enumerate(weights):
        a, b = offs[g], offs[g + 1]
        if b > a:
            expert_y[a:b] = (xs[a:b] @ w.float()).to(torch.bfloat16)
    return expert_y


def batched_experts(cfg, out, rank, w_experts):
    """Decode: one bmm over the [local experts, capacity, H] slabs (a masked GEMM would stop at tokens_per_expert)."""
    import torch
    n = cfg.n_local_experts
    w_local = w_experts[rank * n:(rank + 1) * n].float()
    return torch.bmm(dequantized(cfg, out), w_local).to(torch.bfloat16)


def dense_reference(cfg, x, topk_ids, topk_w, w_experts, w_shared, shared: bool):
    import torch
    H = cfg.hidden
    xr = x.float()
    if cfg.token_format.quantized:   # the layer sees fp8-quantised tokens; do the same in the reference
        blocks = xr.view(-1, H // 128, 128)
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
        if cfg.scale_format == "ue8m0":
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        xr = ((blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).view(-1, H)
    per_expert = torch.einsum("th,ehd->ted", xr, w_experts.float())          # [T, E, H]
    ref = (per_expert.gather(1, topk_ids.long()[:, :, None].expand(-1, -1, H)) * topk_w[:, :, None]).sum(1)
    if shared:
        ref = ref + xr @ w_shared.float()
    return ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=None, help="YAML (default: from the launcher's EPCOMM_TOPOLOGY)")
    ap.add_argument("--mode", default="ht", choices=("ht", "ll"))
    ap.add_argument("--format", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--shared", action="store_true", help="a shared expert (fused into prefill's group 0)")
    ap.add_argument("--tokens", type=int, default=96, help="prefill tokens per rank")
    ap.add_argument("--decode-tokens", type=int, default=8, help="decode tokens per rank")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch
    ctx = epcomm.init(topology=args.topology, backend="gpu")
    torch.cuda.set_device(ctx.device)
    dev = torch.device(f"cuda:{ctx.device}")
    H, K, E, M, M_DECODE = 256, 2, 8, 128, 16
    prefill_cfg = epcomm.EPConfig(hidden=H, topk=K, num_experts=E, max_tokens_per_rank=M, world_size=ctx.world_size,
                                  mode=args.mode, token_format=args.format, fused_shared_expert=args.shared,
                                  expert_alignment=128)
    decode_cfg = prefill_cfg.replace(max_tokens_per_rank=M_DECODE, fused_shared_expert=False, expert_alignment=1,
                                     layout="batched")

    # weights: identical on every rank (one seed); each rank uses its local experts for the real layer
    g = torch.Generator(device="cpu").manual_seed(1234)
    w_router = (torch.randn(H, E, generator=g) / H ** 0.5).to(dev)
    w_experts = (torch.randn(E, H, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(dev)
    w_shared = (torch.randn(H, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(dev)

    prefill, decode = epcomm.EPBuffer(prefill_cfg, ctx), epcomm.EPBuffer(decode_cfg, ctx)
    load = torch.zeros(decode_cfg.n_local_experts, dtype=torch.int64, device=dev)   # decode rows per local expert
    y_decode = torch.empty(args.decode_tokens, H, dtype=torch.bfloat16, device=dev)  # the server's own output
    worst = 0.0
    sent_to = [0] * ctx.world_size     # decode (token, expert) entries this rank sent to each rank
    for step in range(args.steps):
        for phase, cfg, buf, t in (("prefill", prefill_cfg, prefill, args.tokens),
                                   ("decode", decode_cfg, decode, args.decode_tokens)):
            gx = torch.Generator(device="cpu").manual_seed(100 * step + 10 * (phase == "decode") + ctx.rank)
            x = torch.randn(t, H, generator=gx).to(torch.bfloat16).to(dev)
            probs = torch.softmax(x.float() @ w_router, dim=-1)                 # router
            topk_w, topk_ids = torch.topk(probs, K, dim=-1)                     # int64 ids, as routers make them
            topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float().contiguous()
            topk_ids = topk_ids.contiguous()
            if phase == "prefill":
                out = buf.dispatch(x, topk_ids)
                y = buf.combine(grouped_experts(cfg, out, ctx.rank, w_experts, w_shared), out.handle, topk_w)
            else:
                out = buf.dispatch(x, topk_ids, stats_out=load)
                y = buf.combine(batched_experts(cfg, out, ctx.rank, w_experts), out.handle, topk_w, out=y_decode)
                dest = (topk_ids // cfg.n_local_experts).flatten().tolist()
                for d in dest:
                    sent_to[d] += 1
                if args.shared:
                    y = y + (x.float() @ w_shared.float()).to(torch.bfloat16)
            buf.synchronize()
            ref = dense_reference(cfg, x, topk_ids, topk_w, w_experts, w_shared, args.shared)
            err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item() if len(ref) else 0.0
            worst = max(worst, err)
            print(f"[rank {ctx.rank}] step {step} {phase}: {t} tokens, relative error vs dense {err:.2e}", flush=True)
    # stats_out counted the decode rows this rank's experts received: every rank's entries sent here
    received = int(load.sum().item())
    expected = sum(row[ctx.rank] for row in ctx.comm.allgather(sent_to))
    prefill.close()
    decode.close()
    ok = worst < 2e-2 and received == expected
    print(f"[rank {ctx.rank}] moe_layer {args.mode}/{args.format}{'/shared' if args.shared else ''}: "
          f"{'OK' if ok else 'FAILED'} (worst relative error {worst:.2e}; decode rows received here {received}, "
          f"sent here {expected})",
          flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
