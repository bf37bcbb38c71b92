"""epcomm.compat.deep_ep on the GPU backend: the same checks as tests/compat (DeepEP's documented semantics against a
torch reference), with CUDA tensors and a gloo group, so several ranks may share one GPU.

    mpirun --allow-run-as-root -n 2 python3 tests/gpu/compat_worker.py            # both ranks on GPU 0
    torchrun --nproc_per_node 2 tests/gpu/compat_worker.py --spread               # rank r on GPU r

Rank and world size come from torchrun (RANK / WORLD_SIZE) or Open MPI (OMPI_COMM_WORLD_RANK / _SIZE); the gloo
group meets on 127.0.0.1:$MASTER_PORT (default 29533). Prints one summary line per rank and "ok in" on rank 0 when
every rank passed; exit 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

for _k, _v in (("NVSHMEM_DISABLE_NVLS", "1"), ("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ[_k] = _v     # never NVLink multicast

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.compat.deepep_checks import print_summary, run_all  # noqa: E402


def rank_and_world() -> tuple[int, int]:
    for r, w in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"))
    ap.add_argument("--spread", action="store_true", help="rank r on GPU r (default: every rank on GPU 0)")
    ap.add_argument("--suite", action="append", help="static, normal, ll (default: all)")
    ap.add_argument("--cpu", action="store_true", help="CPU tensors, host backend (checks this script off the GPU "
                    "machine; under the launcher: "
                    "python -m launch run -t cpu-4rank -- python tests/gpu/compat_worker.py --cpu)")
    args = ap.parse_args()
    rank, world = rank_and_world()
    if not args.cpu:
        torch.cuda.set_device(rank % torch.cuda.device_count() if args.spread else 0)
        if not args.spread:
            # ranks share GPU 0, which the context made from the group does not know: give each rank its share of
            # the SMs so every persistent grid stays resident
            from epcomm.compat import deep_ep
            sms = torch.cuda.get_device_properties(0).multi_processor_count // world
            deep_ep.Buffer.set_num_sms(max(2, sms // 2 * 2))
    port = os.environ.get("MASTER_PORT", "29533")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seed = [args.seed]
    dist.broadcast_object_list(seed, src=0)
    c = run_all(rank, world, "cpu" if args.cpu else "cuda", seed[0], tuple(args.suite or ("static", "normal", "ll")))
    results = [None] * world
    dist.all_gather_object(results, (c.passed, c.failures))
    if rank == 0:
        device = "cpu" if args.cpu else torch.cuda.get_device_name()
        print_summary(results, f"ok in {c.elapsed:.1f}s ({world} ranks, seed {seed[0]}, device {device})")
    bad = any(f for _, f in results)
    dist.barrier()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
