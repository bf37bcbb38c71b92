"""Properties of the executable spec. If these fail, every backend check built on the reference is meaningless."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from epcomm import reference
from epcomm.config import EPConfig
from epcomm.formats import BF16, dequantize_fp8, quantize_fp8
from epcomm.workload import ROUTINGS, distinct_experts, identity_experts, make_world


def small_cfg(**kw):
    base = dict(hidden=256, topk=4, num_experts=16, max_tokens_per_rank=12, world_size=4)
    base.update(kw)
    return EPConfig(**base)


def round_trip(cfg, world):
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    eys = [identity_experts(cfg, o.expert_x, o.expert_scales) for o in outs]
    return outs, reference.combine(cfg, eys, outs, world.topk_weights), eys


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("fused", [False, True])
def test_counts_conserved_and_order(routing, fused):
    cfg = small_cfg(fused_shared_expert=fused)
    world = make_world(cfg, seed=1, routing_kind=routing, num_tokens="ragged")
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    sent = sum(int((ids >= 0).sum()) for ids in world.topk_ids)
    received = sum(int(o.tokens_per_expert.sum()) for o in outs)
    assert sent == received
    for dest, o in enumerate(outs):
        assert o.row_offsets.dtype == np.uint32 and o.expert_ids.dtype == np.int32
        assert len(o.row_offsets) == cfg.num_groups + 1
        for g in range(cfg.num_groups):
            rows = o.src_info[o.row_offsets[g]:o.row_offsets[g + 1]]
            keys = [tuple(r) for r in rows]
            assert keys == sorted(keys), "rows not ordered by (source rank, token, slot)"
            e = o.expert_ids[g]
            for s, t, k in rows:
                if e < 0:
                    assert s == dest and k == -1
                else:
                    assert world.topk_ids[s][t, k] == e and e // cfg.n_local_experts == dest


def test_bf16_rows_are_the_tokens():
    cfg = small_cfg()
    world = make_world(cfg, seed=2)
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    for o in outs:
        n = int(o.row_offsets[-1])
        for i in range(n):
            s, t, _ = o.src_info[i]
            assert o.expert_x[i].view(np.uint16).tolist() == world.xs[s][t].view(np.uint16).tolist()
        assert (o.src_info[n:] == -1).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("routing", ["uniform", "minus1", "hot", "empty_rank"])
def test_identity_round_trip_gives_weighted_sum(fmt, routing):
    cfg = small_cfg(token_format=fmt)
    world = make_world(cfg, seed=3, routing_kind=routing, num_tokens="ragged")
    _, ys, _ = round_trip(cfg, world)
    for x, ids, w, y in zip(world.xs, world.topk_ids, world.topk_weights, ys):
        wsum = np.where(ids >= 0, w, 0).sum(axis=1, keepdims=True)
        expect = x.astype(np.float32) * wsum
        # fp8 error is relative to the block's amax (3 mantissa bits); bf16 only rounds the final sum.
        row_max = np.abs(x.astype(np.float32)).max(axis=1, keepdims=True, initial=0.0)
        tol = (2.0 ** -4 * row_max * wsum) if fmt == "fp8" else (2.0 ** -7 * np.abs(expect))
        assert (np.abs(y.astype(np.float32) - expect) <= tol + 1e-6).all()


def test_fused_shared_adds_the_token_once():
    cfg = small_cfg(fused_shared_expert=True)
    world = make_world(cfg, seed=4, routing_kind="all_minus1")
    _, ys, _ = round_trip(cfg, world)
    for x, y in zip(world.xs, ys):
        assert np.array_equal(y.view(np.uint16), x.view(np.uint16))


def test_skip_a2a_partial_sums_and_shared_split():
    cfg = small_cfg(skip_a2a=True, fused_shared_expert=True, allreduce_world_size=4)
    world = make_world(cfg, seed=5, num_tokens=[10] * 4)
    # skip_a2a: all ranks hold the same tokens (replicated); the sum of partial results is the full layer.
    world.xs = [world.xs[0]] * 4
    world.topk_ids = [world.topk_ids[0]] * 4
    world.topk_weights = [world.topk_weights[0]] * 4
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    shared_rows = [o.row_offsets[1] - o.row_offsets[0] for o in outs]
    assert sorted(shared_rows) == [2, 2, 3, 3] and sum(shared_rows) == 10
    for dest, o in enumerate(outs):
        assert (o.src_info[:int(o.row_offsets[-1]), 0] == dest).all(), "skip_a2a must not cross ranks"
    eys = [identity_experts(cfg, o.expert_x) for o in outs]
    ys, _ = reference.combine_exact(cfg, eys, outs, world.topk_weights)
    total = ys[0] + ys[1] + ys[2] + ys[3]
    ids, w, x = world.topk_ids[0], world.topk_weights[0], world.xs[0].astype(np.float64)
    expect = x * (np.where(ids >= 0, w, 0).sum(axis=1, keepdims=True) + 1.0)
    assert np.allclose(total, expect, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1e-6, 1.0, 1e3]))
def test_fp8_round_trip_error_bound(seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 256)).astype(np.float32) * scale).astype(BF16)
    q, s = quantize_fp8(x)
    assert s.shape == (3, 2) and s.dtype == np.float32
    back = dequantize_fp8(q, s)
    xf = x.astype(np.float32).reshape(3, 2, 128)
    amax = np.abs(xf).max(axis=-1, keepdims=True)
    # e4m3 has 3 mantissa bits: relative step 2^-3, half of it on rounding; tiny blocks are bounded by the scale floor.
    bound = np.maximum(amax, 1e-4) / 448 * 448 * 2.0 ** -4 + 1e-30
    assert (np.abs(back.reshape(3, 2, 128) - xf) <= bound).all()
    assert np.isfinite(back).all()


def test_fp8_quantiser_known_values():
    x = np.zeros((1, 128), np.float32)
    x[0, 0], x[0, 1] = 448.0, -1.0
    q, s = quantize_fp8(x.astype(BF16))
    assert s[0, 0] == np.float32(1.0)
    assert q.astype(np.float32)[0, 0] == 448.0 and q.astype(np.float32)[0, 1] == -1.0
    zero_q, zero_s = quantize_fp8(np.zeros((1, 128), BF16))
    assert zero_s[0, 0] == np.float32(1e-4) / np.float32(448) and (zero_q.astype(np.float32) == 0).all()


def test_compare_helpers_catch_errors():
    cfg = small_cfg(token_format="fp8")
    world = make_world(cfg, seed=6)
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    good = outs[1]
    assert reference.compare_dispatch(cfg, good, good) == []
    bad = reference.dispatch(cfg, world.xs, world.topk_ids)[1]
    bad.expert_x = bad.expert_x.copy()
    bad.expert_x[0] = bad.expert_x[1] if int(good.row_offsets[-1]) > 1 else bad.expert_x[0]
    bad.expert_scales = bad.expert_scales.copy()
    bad.expert_scales[0, 0] += 1
    assert reference.compare_dispatch(cfg, bad, good)
    eys = [distinct_experts(cfg, o) for o in outs]
    exact, mag = reference.combine_exact(cfg, eys, outs, world.topk_weights)
    y = reference.combine(cfg, eys, outs, world.topk_weights)
    assert reference.compare_combine(y[0], exact[0], mag[0]) == []
    wrong = y[0].astype(np.float32)
    wrong[0, 0] += 1.0
    assert reference.compare_combine(wrong.astype(BF16), exact[0], mag[0])


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_combine_check_sees_weights_on_the_wrong_slots(fmt):
    """With experts that differ (distinct_experts), a combine that uses a token's weights in another slot order, or
    sends a row back to another slot, fails the check; identity experts could not tell."""
    cfg = small_cfg(token_format=fmt)
    world = make_world(cfg, seed=11)
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    eys = [distinct_experts(cfg, o) for o in outs]
    exact, mag = reference.combine_exact(cfg, eys, outs, world.topk_weights)
    swapped = [w[:, ::-1].copy() for w in world.topk_weights]
    y = reference.combine(cfg, eys, outs, swapped)
    assert reference.compare_combine(y[0], exact[0], mag[0])
    ids = [identity_experts(cfg, o.expert_x, o.expert_scales) for o in outs]
    ex_i, mag_i = reference.combine_exact(cfg, ids, outs, world.topk_weights)
    assert reference.compare_combine(reference.combine(cfg, ids, outs, swapped)[0], ex_i[0], mag_i[0]) == []


def test_dispatch_check_wants_full_shapes_and_element_sizes():
    """Outputs are [max_recv_rows, ...] whatever the routing, in the format's element size: a backend that returns
    only the received rows, or widened integers / floats, fails the check (the bench copies the received rows only
    and says so)."""
    cfg = small_cfg(token_format="fp8")
    world = make_world(cfg, seed=12)
    good = reference.dispatch(cfg, world.xs, world.topk_ids)[0]
    n = int(good.row_offsets[-1])
    cut = dataclasses.replace(good, expert_x=good.expert_x[:n], expert_scales=good.expert_scales[:n])
    assert any("expert_x has shape" in p for p in reference.compare_dispatch(cfg, cut, good))
    assert reference.compare_dispatch(cfg, cut, good, rows_trimmed=True) == []
    short_info = dataclasses.replace(good, src_info=good.src_info[:n])
    assert reference.compare_dispatch(cfg, short_info, good, rows_trimmed=True)
    wide = dataclasses.replace(good, src_info=good.src_info.astype(np.int64))
    assert any("8-byte elements" in p for p in reference.compare_dispatch(cfg, wide, good))
    assert reference.compare_dispatch(cfg, dataclasses.replace(good, expert_scales=None), good) == [
        "expert_scales missing (fp8 needs them)"]


def test_combine_check_refuses_a_non_finite_expectation():
    y = np.ones((1, 256), BF16)
    e = np.array([[np.nan] + [1.0] * 255], np.float32)
    assert reference.compare_combine(y, e, np.nan_to_num(e))
