import pytest

from epcomm.config import EPConfig
from epcomm.errors import EPInputError


def test_derived_sizes():
    cfg = EPConfig(hidden=7168, topk=8, num_experts=256, max_tokens_per_rank=128, world_size=2,
                   token_format="fp8", fused_shared_expert=True)
    assert cfg.n_local_experts == 128 and cfg.num_groups == 129 and cfg.scale_cols == 56
    assert cfg.max_recv_rows == 2 * 128 * 8 + 128
    assert cfg.token_bytes() == 7168 + 56 * 4


@pytest.mark.parametrize("bad, field", [
    (dict(hidden=100), "hidden"), (dict(num_experts=255), "num_experts"), (dict(topk=0), "topk"),
    (dict(token_format="fp4"), "token_format"), (dict(mode="fast"), "mode"),
    (dict(max_tokens_per_rank=0), "max_tokens"),
    (dict(allreduce_world_size=2), "allreduce_world_size"), (dict(timeout_s=0), "timeout_s"), (dict(topk=2.0), "topk"),
    (dict(num_sms=0), "num_sms"),
])
def test_bad_config_names_the_field(bad, field):
    args = dict(hidden=256, topk=4, num_experts=16, max_tokens_per_rank=8, world_size=4)
    args.update(bad)
    with pytest.raises(EPInputError, match=field):
        EPConfig(**args)


def test_shared_share_splits_evenly():
    cfg = EPConfig(hidden=128, topk=1, num_experts=4, max_tokens_per_rank=8, world_size=4, skip_a2a=True,
                   allreduce_world_size=3)
    shares = [cfg.shared_share(r, 10) for r in range(3)]
    assert [len(s) for s in shares] == [4, 3, 3] and shares[0].start == 0 and shares[2].stop == 10
    assert cfg.shared_share(3, 10) == shares[0]


def test_experts_of_a_rank_name_its_group():
    cfg = EPConfig(hidden=256, topk=2, num_experts=16, max_tokens_per_rank=4, world_size=4)
    assert list(cfg.experts_of(2)) == [8, 9, 10, 11] and cfg.holds(2) == "experts 8..11"
    assert [cfg.expert_rank(e) for e in cfg.experts_of(3)] == [3] * 4


def test_receive_capacity():
    base = dict(hidden=256, topk=8, num_experts=16, max_tokens_per_rank=100, world_size=4)
    c = EPConfig(**base)                                   # 4 local experts < topk: min(K, local) per token
    assert c.worst_case_recv_rows == c.recv_rows == 4 * 100 * 4 == c.max_recv_rows
    assert EPConfig(**base, recv_capacity=1000).max_recv_rows == 1000
    assert EPConfig(**base, recv_capacity=10 ** 9).recv_rows == c.worst_case_recv_rows      # capped
    assert EPConfig(**base, recv_capacity_factor=1.5).recv_rows == 1200                    # 1.5 x M x K
    assert EPConfig(**base, recv_capacity=7, fused_shared_expert=True).max_recv_rows == 107
    assert EPConfig(**base, skip_a2a=True).worst_case_recv_rows == 100 * 4
    for bad, why in ((dict(recv_capacity=0), "int >= 1"), (dict(recv_capacity=2.5), "int >= 1"),
                     (dict(recv_capacity_factor=0), "> 0"),
                     (dict(recv_capacity=5, recv_capacity_factor=2), "not both")):
        with pytest.raises(EPInputError, match=why):
            EPConfig(**base, **bad)
