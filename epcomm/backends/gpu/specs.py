"""The kernel specialisations that tests, examples and the benchmark use (compiled by the CPU test
tests/unit/test_kernels_compile.py, prebuilt before GPU runs by `python -m epcomm.backends.gpu.specs --build`)."""
from __future__ import annotations

from ...config import EPConfig

# small shapes: hidden 384 = 3 fp8 blocks (a partial warp step in the quantiser), 8 experts, top-4
TEST_BASE = dict(hidden=384, topk=4, num_experts=8, max_tokens_per_rank=64, timeout_s=5.0)
EXAMPLE_BASE = dict(hidden=256, topk=2, num_experts=8, max_tokens_per_rank=128)  # examples/moe_layer.py


def experts_for(world_size: int, base: int = 8) -> int:
    """`base` experts when the world size divides it (2, 4, 8 ranks: the same kernels as always), else the smallest
    multiple of the world size >= base (16 ranks: 16 experts, one per rank)."""
    if base % world_size == 0:
        return base
    return world_size * -(-base // world_size)


def test_configs(world_size: int = 2) -> list[EPConfig]:
    out = []
    base = dict(TEST_BASE, num_experts=experts_for(world_size, TEST_BASE["num_experts"]))
    for mode in ("ll", "ht"):
        for fmt in ("bf16", "fp8"):
            b = dict(base, world_size=world_size, mode=mode, token_format=fmt)
            out.append(EPConfig(**b))
            out.append(EPConfig(**b, fused_shared_expert=True))
            out.append(EPConfig(**b, fused_shared_expert=True, skip_a2a=True, allreduce_world_size=2))
    # M * K not a multiple of 4: the ht combine's per-source weight stride must still be 16-byte aligned
    out.append(EPConfig(**dict(base, max_tokens_per_rank=61, topk=3), world_size=world_size, mode="ht",
                        token_format="bf16"))
    out += server_configs(world_size)
    return out


def server_configs(world_size: int = 2) -> list[EPConfig]:
    """Issue 13 shapes: hidden not a multiple of 128 (gpt-oss 2880 = 22.5 fp8 blocks; 48 = one partial block, fewer
    16-byte chunks than a warp has lanes), power-of-two (ue8m0) fp8 scales, the batched layout (default capacity),
    expert_alignment (one with the shared expert) and column-major scales (in both layouts)."""
    base = dict(TEST_BASE, num_experts=experts_for(world_size, TEST_BASE["num_experts"]), world_size=world_size)
    return [EPConfig(**dict(base, hidden=2880), mode="ll", token_format="fp8", scale_format="ue8m0"),
            EPConfig(**dict(base, hidden=2880), mode="ht", token_format="bf16"),
            EPConfig(**dict(base, hidden=48), mode="ht", token_format="fp8", scale_format="ue8m0"),
            EPConfig(**dict(base, hidden=40), mode="ll", token_format="bf16"),
            EPConfig(**base, mode="ll", token_format="fp8", layout="batched", scale_format="ue8m0", scale_layout="col"),
            EPConfig(**base, mode="ht", token_format="bf16", layout="batched"),
            EPConfig(**base, mode="ht", token_format="fp8", expert_alignment=128, fused_shared_expert=True,
                     scale_layout="col"),
            EPConfig(**base, mode="ll", token_format="bf16", expert_alignment=16)]


def bench_configs(world_size: int = 2) -> list[EPConfig]:
    out = []
    for fmt in ("bf16", "fp8"):
        out.append(EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=128, world_size=world_size,
                            token_format=fmt, mode="ll"))
        out.append(EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=4096, world_size=world_size,
                            token_format=fmt, mode="ht"))
    # the bench's low-latency shape also runs with the ht design (one message per token and rank)
    out.append(EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=128, world_size=world_size,
                        token_format="fp8", mode="ht"))
    return out


def example_configs(world_size: int = 2) -> list[EPConfig]:
    """examples/moe_layer.py: a prefill buffer (grouped, rows aligned to 128), a decode buffer (batched, 16 tokens)."""
    base = dict(EXAMPLE_BASE, num_experts=experts_for(world_size, EXAMPLE_BASE["num_experts"]))
    out = []
    for m in ("ll", "ht"):
        for f, s in (("bf16", False), ("fp8", True)):
            prefill = EPConfig(**base, world_size=world_size, mode=m, token_format=f, fused_shared_expert=s,
                               expert_alignment=128)
            out += [prefill, prefill.replace(max_tokens_per_rank=16, fused_shared_expert=False, expert_alignment=1,
                                             layout="batched")]
    return out


def fence_kill_config(world_size: int, mode: str) -> EPConfig:
    """tests/gpu/fence_one_rank.py (a rank SIGKILLed mid-dispatch): the deadline is the death detector, short."""
    return EPConfig(hidden=256, topk=2, num_experts=2 * world_size, max_tokens_per_rank=16, world_size=world_size,
                    mode=mode, timeout_s=5.0)


def fence_live_configs(world_size: int) -> list[EPConfig]:
    """tests/gpu/fence_live.py (an explicit fence of a live rank): ll / ht x bf16 / fp8, top-3 (ids on 3 ranks)."""
    return [EPConfig(hidden=512, topk=3, num_experts=2 * world_size, max_tokens_per_rank=24, world_size=world_size,
                     mode=m, token_format=f, timeout_s=20.0) for m in ("ll", "ht") for f in ("bf16", "fp8")]


def fence_configs(world_size: int = 4) -> list[EPConfig]:
    """Every buffer of the GPU fencing checks (issue 15 item 4), for the rig's prebuild."""
    return [fence_kill_config(world_size, m) for m in ("ll", "ht")] + fence_live_configs(world_size)


def all_configs(world_size: int = 2) -> list[EPConfig]:
    return test_configs(world_size) + bench_configs(world_size) + example_configs(world_size)


def build_all(configs, arch: str = "sm_90", jobs: int = 8):
    from concurrent.futures import ThreadPoolExecutor
    from . import jit
    seen = {}
    for c in configs:
        d = jit.defines_for(c)
        seen[tuple(sorted(d.items()))] = d
    with ThreadPoolExecutor(jobs) as ex:
        return list(ex.map(lambda d: jit.build(d, arch), seen.values()))


if __name__ == "__main__":
    import sys
    import time
    t0 = time.time()
    ws = int(sys.argv[sys.argv.index("--world") + 1]) if "--world" in sys.argv else 2
    res = build_all(all_configs(ws), jobs=16)
    print(f"built {len(res)} specialisations ({sum(not r.cached for r in res)} cold) in {time.time() - t0:.1f} s")
