"""Switch a DeepEP MoE layer to epcomm by changing one import.

    python -m launch run -t configs/cpu-4rank.yaml -- python examples/deepep_switch.py     # CPU, host backend
    torchrun --nproc_per_node 2 examples/deepep_switch.py                                  # GPUs (gloo or NCCL)

The layer below is written against DeepEP's Buffer API: a prefill step in normal mode (token-major receive) and a
decode step in low-latency mode (batched receive). Its "experts" scale tokens by a per-expert factor, so each rank
checks the result against a dense computation of its own tokens.
"""
import os

import torch
import torch.distributed as dist

from epcomm.compat import deep_ep          # was: import deep_ep  -- the only line that changes

HIDDEN, TOPK, EXPERTS_PER_RANK, TOKENS = 256, 4, 4, 32


def init_group():
    """torchrun sets RANK / WORLD_SIZE; under mpirun take the MPI ranks and meet on a port rank 0 picked."""
    if "RANK" in os.environ:
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if on_gpu and torch.cuda.device_count() > 1 else "gloo")
        return
    from mpi4py import MPI
    import socket
    comm = MPI.COMM_WORLD
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = comm.bcast(s.getsockname()[1] if comm.Get_rank() == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size())


def expert_scale(expert_ids: torch.Tensor) -> torch.Tensor:
    return 1.0 + expert_ids.float() / 64


def main():
    init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    num_experts = EXPERTS_PER_RANK * world
    torch.manual_seed(rank)
    x = torch.randn(TOKENS, HIDDEN, device=dev).to(torch.bfloat16)
    scores = torch.randn(TOKENS, num_experts, device=dev)
    weights, topk_idx = scores.softmax(-1).topk(TOPK, dim=-1)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    dense = (weights[..., None] * (x.float()[:, None, :] * expert_scale(topk_idx)[..., None])).sum(1)

    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=int(1e9), num_rdma_bytes=0, low_latency_mode=True)

    # prefill: normal mode, token-major rows, local expert ids (-1 = expert elsewhere)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)
    local_scale = torch.where(recv_idx >= 0, expert_scale(recv_idx + rank * EXPERTS_PER_RANK), 0.0)
    out = (recv_x.float() * (recv_w * local_scale).sum(1, keepdim=True)).to(torch.bfloat16)
    y_prefill, _, _ = buffer.combine(out, handle)

    # decode: low-latency mode, [local experts, max tokens * ranks, hidden] with per-expert counts
    recv, recv_count, ll_handle, _, hook = buffer.low_latency_dispatch(x, topk_idx, TOKENS, num_experts,
                                                                      use_fp8=False, return_recv_hook=True)
    hook()                                               # receive (overlap other work before this call)
    local_ids = torch.arange(EXPERTS_PER_RANK, device=dev) + rank * EXPERTS_PER_RANK
    out = (recv.float() * expert_scale(local_ids)[:, None, None]).to(torch.bfloat16)
    y_decode, _, _ = buffer.low_latency_combine(out, topk_idx, weights, ll_handle)

    for name, y in (("prefill", y_prefill), ("decode", y_decode)):
        err = ((y.float() - dense).abs().max() / dense.abs().max()).item()
        print(f"rank {rank}: {name} max rel error {err:.2e} (received {sum(counts)} expert rows in prefill)")
        assert err < 2e-2, f"{name} differs from the dense layer"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
