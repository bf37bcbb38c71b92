"""A torch MoE layer on top of epcomm, checked against a dense single-GPU computation of the same layer.

    python -m launch run -t configs/local-2gpu.yaml -- python examples/moe_layer.py [--mode ht|ll] [--format bf16|fp8]

Each rank: router (top-k of softmax(x @ Wr)) -> epcomm dispatch -> one matmul per local expert over the rows
row_offsets[g]:row_offsets[g+1] of expert_x -> epcomm combine (weighted sum back on the token's rank) (+ the shared
expert when --shared). The reference: the same layer computed densely for this rank's tokens with every expert's
weights (all ranks build all weights from one seed). Exits 1 when the relative error is above what bf16 allows.
"""
from __future__ import annotations

import argparse
import sys

import epcomm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=None, help="YAML (default: from the launcher's EPCOMM_TOPOLOGY)")
    ap.add_argument("--mode", default="ht", choices=("ht", "ll"))
    ap.add_argument("--format", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--shared", action="store_true", help="fused shared expert (group 0)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch
    ctx = epcomm.init(topology=args.topology, backend="gpu")
    torch.cuda.set_device(ctx.device)
    dev = torch.device(f"cuda:{ctx.device}")
    H, K, E, M = 256, 2, 8, 128
    cfg = epcomm.EPConfig(hidden=H, topk=K, num_experts=E, max_tokens_per_rank=M, world_size=ctx.world_size,
                          mode=args.mode, token_format=args.format, fused_shared_expert=args.shared)
    n_local = cfg.n_local_experts

    # weights: identical on every rank (one seed); each rank uses its local experts for the real layer
    g = torch.Generator(device="cpu").manual_seed(1234)
    w_router = (torch.randn(H, E, generator=g) / H ** 0.5).to(dev)
    w_experts = (torch.randn(E, H, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(dev)
    w_shared = (torch.randn(H, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(dev)

    buf = epcomm.EPBuffer(cfg, ctx)
    worst = 0.0
    for step in range(args.steps):
        gx = torch.Generator(device="cpu").manual_seed(100 * step + ctx.rank)
        x = torch.randn(args.tokens, H, generator=gx).to(torch.bfloat16).to(dev)

        # router
        probs = torch.softmax(x.float() @ w_router, dim=-1)
        topk_w, topk_ids = torch.topk(probs, K, dim=-1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float().contiguous()
        topk_ids = topk_ids.to(torch.int32).contiguous()

        # dispatch -> grouped expert matmul -> combine
        out = buf.dispatch(x, topk_ids)
        if cfg.token_format.quantized:
            xs = out.expert_x.float() * out.expert_scales.repeat_interleave(128, dim=1)
        else:
            xs = out.expert_x.float()
        offs = out.row_offsets.to(torch.int64).cpu().tolist()    # host copy of G+1 numbers (example only)
        expert_y = torch.zeros(cfg.max_recv_rows, H, dtype=torch.bfloat16, device=dev)
        first = int(cfg.fused_shared_expert)
        if first:
            a, b = offs[0], offs[1]
            expert_y[a:b] = (xs[a:b] @ w_shared.float()).to(torch.bfloat16)
        for l in range(n_local):
            a, b = offs[first + l], offs[first + l + 1]
            if b > a:
                e = ctx.rank * n_local + l
                expert_y[a:b] = (xs[a:b] @ w_experts[e].float()).to(torch.bfloat16)
        y = buf.combine(expert_y, out.handle, topk_w)
        buf.synchronize()

        # dense reference for this rank's tokens
        xr = x.float()
        if cfg.token_format.quantized:   # the layer sees fp8-quantised tokens; do the same in the reference
            blocks = xr.view(-1, H // 128, 128)
            scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
            xr = ((blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).view(-1, H)
        per_expert = torch.einsum("th,ehd->ted", xr, w_experts.float())          # [T, E, H]
        ref = (per_expert.gather(1, topk_ids.long()[:, :, None].expand(-1, -1, H))
               * topk_w[:, :, None]).sum(1)
        if args.shared:
            ref = ref + xr @ w_shared.float()
        err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item() if len(ref) else 0.0
        worst = max(worst, err)
        print(f"[rank {ctx.rank}] step {step}: {args.tokens} tokens, rows here {offs[-1]}, "
              f"relative error vs dense {err:.2e}", flush=True)
    buf.close()
    ok = worst < 2e-2
    print(f"[rank {ctx.rank}] moe_layer {args.mode}/{args.format}{'/shared' if args.shared else ''}: "
          f"{'OK' if ok else 'FAILED'} (worst relative error {worst:.2e})", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
