"""The spec of the server-facing options (issue 13), checked from first principles, not against epcomm.layouts'
own placement (the reference and the host backend share that module, so comparing them cannot catch its bugs):
batched layout, expert_alignment, ue8m0 / column-major scales, partial scale blocks, caller-quantised input,
int64 ids."""
import numpy as np
import pytest

from epcomm import reference
from epcomm.config import EPConfig
from epcomm.errors import EPError, EPInputError
from epcomm.formats import BF16, FP8_MAX, dequantize_fp8, quantize_fp8
from epcomm.layouts import tma_aligned
from epcomm.workload import ROUTINGS, distinct_experts, make_world


def cfg_of(**kw):
    base = dict(hidden=256, topk=4, num_experts=16, max_tokens_per_rank=12, world_size=4)
    base.update(kw)
    return EPConfig(**base)


def spec_rows(cfg, world, dest):
    """(local expert, source rank, token, slot) of every row `dest` must receive, in the spec's order."""
    out = []
    for local in range(cfg.n_local_experts):
        e = dest * cfg.n_local_experts + local
        for s, ids in enumerate(world.topk_ids):
            for t, k in zip(*np.nonzero(np.asarray(ids) == e)):
                out.append((local, s, int(t), int(k)))
    return out


@pytest.mark.parametrize("routing", ["uniform", "hot", "empty_rank", "minus1", "skewed"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_batched_layout_puts_row_i_of_expert_g_at_slab_g_row_i(routing, fmt):
    cfg = cfg_of(layout="batched", token_format=fmt)
    world = make_world(cfg, seed=3, routing_kind=routing, num_tokens="ragged")
    cap = cfg.batched_capacity
    assert cap == cfg.world_size * cfg.max_tokens_per_rank
    for dest, o in enumerate(reference.dispatch(cfg, world.xs, world.topk_ids)):
        assert o.expert_x.shape == (cfg.n_local_experts, cap, cfg.hidden)
        assert o.src_info.shape == (cfg.n_local_experts, cap, 3)
        assert o.row_offsets.tolist() == [g * cap for g in range(cfg.n_local_experts + 1)]
        seen = np.zeros(cfg.n_local_experts, int)
        for local, s, t, k in spec_rows(cfg, world, dest):
            i = seen[local]
            seen[local] += 1
            assert o.src_info[local, i].tolist() == [s, t, k]
            q, sc = cfg.token_format.quantize(world.xs[s][t:t + 1])
            assert o.expert_x[local, i].view(np.uint8).tolist() == q[0].view(np.uint8).tolist()
            if fmt == "fp8":
                assert o.expert_scales[local, i].tolist() == sc[0].tolist()
        assert o.tokens_per_expert.tolist() == seen.tolist()
        for g in range(cfg.n_local_experts):
            assert (o.src_info[g, seen[g]:] == -1).all(), "rows past the mask must say 'no token'"


@pytest.mark.parametrize("align", [1, 4, 128])
@pytest.mark.parametrize("fused", [False, True])
def test_alignment_pads_every_group_to_a_multiple(align, fused):
    cfg = cfg_of(expert_alignment=align, fused_shared_expert=fused)
    world = make_world(cfg, seed=4, routing_kind="skewed", num_tokens="ragged")
    for dest, o in enumerate(reference.dispatch(cfg, world.xs, world.topk_ids)):
        ro = o.row_offsets.astype(int)
        assert (ro % align == 0).all()
        assert ro[-1] <= cfg.max_recv_rows and o.expert_x.shape[0] == cfg.max_recv_rows
        counts = ([len(list(cfg.shared_share(dest, len(world.xs[dest]))))] if fused else []) + \
            o.tokens_per_expert.tolist()
        for g, n in enumerate(counts):
            assert ro[g + 1] - ro[g] == -(-n // align) * align
            assert (o.src_info[ro[g]:ro[g] + n, 0] >= 0).all()
            assert (o.src_info[ro[g] + n:ro[g + 1]] == -1).all(), "pad rows are marked -1"
        assert (o.src_info[ro[-1]:] == -1).all()


def test_max_recv_rows_covers_the_worst_alignment_padding():
    cfg = cfg_of(expert_alignment=128, fused_shared_expert=True)
    assert cfg.max_recv_rows == 4 * 12 * 4 + 12 + cfg.num_groups * 127


def test_ue8m0_scales_are_powers_of_two_rounded_up_and_nothing_saturates():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 512)) * np.exp2(rng.integers(-20, 20, (64, 1)))).astype(BF16)
    q, s = quantize_fp8(x, pow2=True)
    _, s_plain = quantize_fp8(x)
    m, _ = np.frexp(s)
    assert (m == 0.5).all(), "ue8m0 scales must be powers of two"
    assert (s >= s_plain).all() and (s < 2 * s_plain).all(), "the smallest power of two >= amax / 448"
    assert (np.abs(q.astype(np.float32)) <= FP8_MAX).all()
    assert (np.abs(x.astype(np.float32)).reshape(64, 4, 128).max(-1) / s <= FP8_MAX).all()
    back = dequantize_fp8(q, s)
    assert np.allclose(back, x.astype(np.float32), rtol=2 ** -3, atol=1e-30 + 2 ** -9 * s.max())


@pytest.mark.parametrize("hidden", [2880, 208, 16])
def test_partial_last_scale_block(hidden):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, hidden)).astype(BF16)
    x[:, -1] = 300.0    # the partial block's amax comes from the channels it has
    q, s = quantize_fp8(x)
    assert s.shape == (5, -(-hidden // 128))
    tail = hidden - 128 * (s.shape[1] - 1)
    want = np.abs(x[:, -tail:].astype(np.float32)).max(-1) / np.float32(FP8_MAX)
    assert np.array_equal(s[:, -1], want.astype(np.float32))
    assert q.shape == (5, hidden)


def test_hidden_multiples_per_format():
    assert cfg_of(hidden=2880).hidden == 2880
    assert cfg_of(hidden=2880, token_format="fp8").scale_cols == 23
    cfg_of(hidden=8)
    with pytest.raises(EPInputError, match="multiple of 16 for fp8"):
        cfg_of(hidden=8, token_format="fp8")
    with pytest.raises(EPInputError, match="multiple of 8 for bf16"):
        cfg_of(hidden=12)


def test_column_major_scales_are_tma_aligned_views():
    for layout in ("grouped", "batched"):
        cfg = cfg_of(token_format="fp8", scale_layout="col", scale_format="ue8m0", layout=layout, hidden=2880)
        row = cfg.replace(scale_layout="row")
        world = make_world(cfg, seed=7, routing_kind="hot")
        for o, r in zip(reference.dispatch(cfg, world.xs, world.topk_ids),
                        reference.dispatch(row, world.xs, world.topk_ids)):
            s = o.expert_scales
            assert s.shape == r.expert_scales.shape
            assert s.strides[-2] == 4, "column-major: consecutive rows of one column are adjacent"
            assert s.strides[-1] == 4 * tma_aligned(s.shape[-2]), "each column padded to 16 bytes"
            assert np.array_equal(s, r.expert_scales)
            assert reference.compare_dispatch(cfg, o, o) == []
            assert reference.compare_dispatch(cfg, r, o) == ["expert_scales are not column-major (scale_layout='col')"]


def test_caller_quantised_input_is_delivered_unchanged():
    cfg = cfg_of(token_format="fp8")
    world = make_world(cfg, seed=8)
    pairs = []
    for x in world.xs:
        q, s = quantize_fp8(x)
        pairs.append((q, s * np.float32(4)))     # scales epcomm would never compute from x
    for dest, o in enumerate(reference.dispatch(cfg, pairs, world.topk_ids)):
        n = int(o.row_offsets[-1])
        for i in range(n):
            src, t, _ = o.src_info[i]
            assert o.expert_scales[i].tolist() == pairs[src][1][t].tolist()
            assert o.expert_x[i].view(np.uint8).tolist() == pairs[src][0][t].view(np.uint8).tolist()


def test_int64_ids_give_the_int32_answer():
    cfg = cfg_of()
    world = make_world(cfg, seed=9, routing_kind="minus1")
    a = reference.dispatch(cfg, world.xs, world.topk_ids)
    b = reference.dispatch(cfg, world.xs, [i.astype(np.int64) for i in world.topk_ids])
    for x, y in zip(a, b):
        assert reference.compare_dispatch(cfg, x, y) == []


@pytest.mark.parametrize("layout", [dict(layout="batched"), dict(expert_alignment=16)])
def test_combine_reads_only_rows_with_a_token(layout):
    """Combine in any layout equals the grouped layout's; NaN in rows without a token changes nothing."""
    cfg = cfg_of(token_format="fp8", **layout)
    plain = cfg_of(token_format="fp8")
    world = make_world(cfg, seed=10, routing_kind="skewed", num_tokens="ragged")
    outs = reference.dispatch(cfg, world.xs, world.topk_ids)
    eys = []
    for o in outs:
        y = distinct_experts(cfg, o).astype(np.float32)
        y[o.src_info[..., 0] < 0] = np.nan
        eys.append(y.astype(BF16))
    got = reference.combine(cfg, eys, outs, world.topk_weights)
    pouts = reference.dispatch(plain, world.xs, world.topk_ids)
    want = reference.combine(plain, [distinct_experts(plain, o) for o in pouts], pouts, world.topk_weights)
    for g, w in zip(got, want):
        assert np.array_equal(g.view(np.uint16), w.view(np.uint16))


def test_batched_capacity_overflow_is_an_error():
    cfg = cfg_of(layout="batched", expert_capacity=3)
    world = make_world(cfg, seed=11, routing_kind="hot")
    with pytest.raises(EPError, match="expert_capacity=3"):
        reference.dispatch(cfg, world.xs, world.topk_ids)


@pytest.mark.parametrize("bad, match", [
    (dict(layout="paged"), "layout"),
    (dict(expert_alignment=0), "expert_alignment"),
    (dict(layout="batched", expert_alignment=4), "expert_alignment"),
    (dict(expert_capacity=8), "expert_capacity"),
    (dict(layout="batched", fused_shared_expert=True), "shared expert"),
    (dict(scale_format="ue8m0"), "scale_format"),
    (dict(token_format="fp8", scale_layout="diag"), "scale_layout"),
])
def test_bad_layout_options_are_refused(bad, match):
    with pytest.raises(EPInputError, match=match):
        cfg_of(**bad)


def test_routings_all_work_in_the_batched_layout():
    cfg = cfg_of(layout="batched")
    for r in ROUTINGS:
        world = make_world(cfg, seed=12, routing_kind=r, num_tokens="ragged")
        outs = reference.dispatch(cfg, world.xs, world.topk_ids)
        assert sum(int(o.tokens_per_expert.sum()) for o in outs) == sum(int((i >= 0).sum()) for i in world.topk_ids)
