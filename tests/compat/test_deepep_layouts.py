"""The torch layout helpers of epcomm.compat.deep_ep, in one process (no MPI)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm.compat.deep_ep import layouts as L  # noqa: E402
from tests.compat import stopgap_reference as S  # noqa: E402


def test_rank_routes_lists_ranks_in_order():
    mask = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, False]])
    assert L.rank_routes(mask, 3).tolist() == [[0, 2, 3], [-1, -1, -1], [1, -1, -1]]
    assert L.rank_routes(torch.zeros(0, 4, dtype=torch.bool), 2).shape == (0, 2)


def test_fp32_split_is_exact():
    w = torch.from_numpy(np.random.default_rng(1).standard_normal(10000).astype(np.float32)) * 3
    assert torch.equal(L.join_fp32(*L.split_fp32(w)), w)


def test_carrier_round_trip_bf16_and_fp8():
    rng = np.random.default_rng(2)
    t, h, k = 5, 256, 3
    c = L.Carrier(h, k)
    x = torch.from_numpy(rng.standard_normal((t, h)).astype(np.float32)).to(torch.bfloat16)
    w = torch.rand(t, k)
    ids = torch.randint(-1, 40, (t, k), dtype=torch.int32)
    rows = c.pack(x, None, w, ids)
    assert rows.shape == (t, c.width) and rows.dtype == torch.bfloat16 and c.width % 128 == 0
    x2, s2, w2, i2 = c.unpack(rows, fp8=False)
    assert torch.equal(x2.view(torch.int16), x.view(torch.int16)) and s2 is None
    assert torch.equal(w2, w) and torch.equal(i2, ids)
    q = x.float().clamp(-400, 400).to(torch.float8_e4m3fn)
    s = torch.rand(t, h // 128)
    q2, s3, _, _ = c.unpack(c.pack(q, s, None, None), fp8=True)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s3, s)


def test_stopgap_batched_and_grouped_indices_are_inverse():
    ro = torch.tensor([0, 3, 3, 7])          # groups of 3, 0, 4 rows; 10 rows in the buffer
    idx = S.batched_from_grouped(ro, 5, 10).view(3, 5)
    back = S.grouped_from_batched(ro, 5, 10)
    for g, count in enumerate([3, 0, 4]):
        for p in range(count):
            assert int(idx[g, p]) == int(ro[g]) + p
            assert int(back[int(ro[g]) + p]) == g * 5 + p


def test_stopgap_pow2_scales_cover_amax():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((4, 512)).astype(np.float32) * 10).to(torch.bfloat16)
    x[0, :128] = 0
    x[1, :128] = 448.0 * 2 ** -3       # amax / 448 an exact power of two: that power is the scale
    q, s = S.quantize_pow2(x, ue8m0=False)
    amax = x.float().view(4, 4, 128).abs().amax(-1).clamp(min=1e-4)
    assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()
    assert float(s[1, 0]) == 2 ** -3
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    deq = q.float().view(4, 4, 128) * s[..., None]
    assert torch.allclose(deq.view(4, 512), x.float(), rtol=0.07, atol=1e-6)


def test_pack_ue8m0_matches_deepep_packing():
    """Power-of-two scales [G, C, H/128] (column-major, as EPBuffer's scale_layout "col") -> int32 [G, C, H/512],
    column-major, byte j of word i the biased exponent of block 4i + j: what the old path packed on receipt."""
    rng = np.random.default_rng(4)
    g, c, h = 3, 8, 1024
    x = torch.from_numpy(rng.standard_normal((g, c, h)).astype(np.float32)
                         * np.exp2(rng.integers(-20, 20, (g, c, 1)))).to(torch.bfloat16)
    _, s = S.quantize_pow2(x, ue8m0=False)                          # [g, c, 8] fp32 powers of two
    _, expected = S.quantize_pow2(x, ue8m0=True)                    # [g, c, 2] int32, row-major
    col = torch.empty(g, h // 128, c).transpose(1, 2)
    col.copy_(s)
    packed = L.pack_ue8m0(col)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (g, c, h // 512)
    assert packed.stride(1) == 1 and packed.stride(2) == c
    assert torch.equal(packed, expected)
    unpacked = (packed.contiguous().view(torch.uint8).to(torch.int32) << 23).view(torch.float32).view(g, c, -1)
    assert torch.equal(unpacked, s)


def test_layout_ranges_from_source_ranks():
    src = torch.tensor([[0, 0, 1, 3, -1, -1], [2, 2, 2, -1, -1, -1], [-1] * 6], dtype=torch.int32)
    lr = L.layout_ranges(src, 4)
    assert lr.dtype == torch.int64
    assert (lr & 0xFFFFFFFF).tolist() == [[2, 1, 0, 1], [0, 0, 3, 0], [0, 0, 0, 0]]
    assert (lr >> 32).tolist() == [[0, 2, 3, 3], [0, 0, 0, 3], [0, 0, 0, 0]]
