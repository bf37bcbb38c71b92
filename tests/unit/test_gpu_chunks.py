"""CPU-only: the host's choice of tokens per send work item (Params.ch) keeps the kernel's limits for every shape, and
the symmetric buffer layout keeps the kernel's 16-byte stores aligned."""
from __future__ import annotations

import itertools

import pytest

from epcomm.backends.gpu.layout import Layout, send_chunk_tokens
from epcomm.config import EPConfig


@pytest.mark.parametrize("M", [1, 64, 128, 4096, 16384, 65536])
def test_chunks_fit_the_receivers_table(M):
    cfg = EPConfig(hidden=256, topk=2, num_experts=8, max_tokens_per_rank=M, world_size=2, mode="ht")
    chmax = Layout(cfg, any_remote=False).max_chunks
    for T, ndest, grid, waves in itertools.product(sorted({0, 1, 2, 7, 63, 127, 128, 129, 1000, M // 2, M}),
                                                   (1, 2, 8), (1, 3, 24, 132, 148), (1, 2, 3)):
        if T > M:
            continue
        ch = send_chunk_tokens(T, ndest, grid, True, chmax, waves)
        assert 1 <= ch <= 64
        assert -(-T // ch) <= chmax, (T, ndest, grid, waves, ch, chmax)   # ceil(T / ch) chunks per source


def test_ll_takes_about_one_item_per_block():
    assert send_chunk_tokens(128, 2, 132, False, 1) == 2          # 128 items of 2 tokens on 132 blocks
    assert send_chunk_tokens(4096, 2, 132, False, 1) == 63
    assert send_chunk_tokens(1, 2, 132, False, 1) == 1
    assert send_chunk_tokens(100000, 2, 132, False, 1) == 64      # capped by the kernel's shared-memory item size


def test_ht_waves_split_large_items():
    one = send_chunk_tokens(4096, 2, 132, True, 256, waves=1)
    two = send_chunk_tokens(4096, 2, 132, True, 256, waves=2)
    assert one == 63 and two == 32
    assert send_chunk_tokens(128, 2, 132, True, 256, waves=2) == 2   # small items are not split further


@pytest.mark.parametrize("M,K", [(61, 3), (64, 4), (1001, 2), (7, 1)])
def test_ht_weight_strides_keep_uint4_stores_aligned(M, K):
    """combine.cuh copies each source's [M, K] weights with 16-byte stores at off_wrecv + s * weight_stride floats and
    stages combine rows after the weight_stride floats of cstage (one staged copy of the weights): every such address
    must be 16-byte aligned whatever M * K is."""
    R = 4
    cfg = EPConfig(hidden=256, topk=K, num_experts=8, max_tokens_per_rank=M, world_size=R, mode="ht")
    L = Layout(cfg, any_remote=True)
    W = L.weight_stride
    assert W >= M * K and W % 4 == 0 and W - M * K < 4
    assert all(off % 16 == 0 for off in L.offset.values())
    assert all((L.offset["wrecv"] + (par * R + s) * W * 4) % 16 == 0 for par in (0, 1) for s in range(R))
    assert (L.offset["cstage"] + W * 4) % 16 == 0
    assert L.region_bytes["cstage"] == W * 4 + L.recv_tokens * L.combine_row_bytes


def test_device_inputs_must_be_16_byte_aligned():
    """x and expert_y are read with 16-byte vector loads: a view starting mid-vector is refused, not a fault."""
    from epcomm.backends.gpu.arrays import aligned
    from epcomm.errors import EPInputError
    assert aligned(0x7F0000001230, "x") == 0x7F0000001230
    with pytest.raises(EPInputError, match="expert_y must start at a 16-byte aligned address"):
        aligned(0x7F0000001238, "expert_y")
