"""Persistent-grid sizing for shared SMs (epcomm/backends/gpu/occupancy.py): the arithmetic and the messages, no GPU."""
from __future__ import annotations

import pytest

from epcomm.backends.gpu.occupancy import SELF_WAIT_CAUSE, SHARED_HEADROOM, grid_size, self_wait_message
from epcomm.errors import EPError

H200 = 132


def test_unshared_gpu_keeps_one_block_per_sm():
    c = grid_size(None, H200, H200, 2)
    assert (c.grid, c.limit, c.clamped) == (132, 132, False)
    c = grid_size(None, H200, None, 1)   # the driver could not say: the device's SMs
    assert c.grid == 132 and c.context_sms == 132
    assert grid_size(24, H200, H200, 1).grid == 24          # a smaller request is honoured as is


def test_ranks_sharing_a_gpu_split_its_sms_with_headroom():
    # 2 ranks, no MPS limit: half the SMs each, 60 % of it (2 x 60 blocks under MPS 50 % hung on one H200; 2 x 40 ran)
    c = grid_size(None, H200, H200, 1, ranks_per_gpu=2)
    assert c.grid == int(66 * SHARED_HEADROOM) == 39
    assert 2 * c.grid <= H200
    # MPS at 50 %: the context may use 66 SMs -> same share
    assert grid_size(None, H200, 66, 1, ranks_per_gpu=2).grid == 39
    # MPS at 12 % with 8 ranks: the context limit (16 SMs) and the share (132 // 8) agree
    assert grid_size(None, H200, 16, 1, ranks_per_gpu=8).grid == 9
    # 16 ranks, no MPS: 8 SMs each
    c = grid_size(None, H200, H200, 1, ranks_per_gpu=16)
    assert c.grid == 4 and 16 * c.grid <= H200
    # one rank under MPS at 50 %
    assert grid_size(None, H200, 66, 1).grid == 39


def test_grid_never_exceeds_what_is_resident_and_is_at_least_one():
    for ranks in (1, 2, 3, 8, 16, 64, 200):
        for ctx in (1, 7, 16, 66, 132, None):
            for occ in (1, 2, 4):
                c = grid_size(None, H200, ctx, occ, ranks_per_gpu=ranks)
                assert 1 <= c.grid <= c.limit
                assert c.grid <= max(1, min(ctx or H200, H200 // ranks if ranks > 1 else H200))
                if ranks > 1 and H200 // ranks >= 2:
                    assert ranks * c.grid <= H200     # all the sharing ranks' grids fit together


def test_a_request_above_the_limit_is_clamped():
    c = grid_size(132, H200, 66, 1, ranks_per_gpu=2)
    assert c.clamped and c.grid == c.limit == 39
    assert "context limited to 66 SMs" in c.describe() and "2 ranks on this GPU" in c.describe()
    assert not grid_size(39, H200, 66, 1, ranks_per_gpu=2).clamped


def test_a_kernel_that_cannot_run_at_its_block_size_is_refused():
    with pytest.raises(EPError, match="occupancy 0 blocks per SM"):
        grid_size(None, H200, H200, 0)


def test_waiting_for_itself_names_the_grid_not_a_peer():
    msg = self_wait_message(0, 5.0, "dispatch", 662)
    assert SELF_WAIT_CAUSE in msg and "rank 0 waited 5 s in dispatch round 662" in msg
    assert "for rank 0" not in msg
    assert "MPS / shared GPU / num_sms" in msg
    from epcomm.errors import EPTimeoutError
    msg = str(EPTimeoutError.peer_missing(waiter=0, waiter_node=0, peer=1, node=1, experts=range(4, 8),
                                          what="combine", round=3, timeout_s=5.0))
    assert "waiting for combine (round 3) from rank 1 (node 1)" in msg and "experts 4..7" in msg
    assert SELF_WAIT_CAUSE not in msg


def test_headroom_knob():
    from epcomm.backends.gpu.occupancy import headroom_from_env
    assert headroom_from_env({}) == SHARED_HEADROOM
    assert headroom_from_env({"EPCOMM_GRID_HEADROOM": "0.9"}) == 0.9
    for bad in ("0", "1.5", "x", "-1"):
        assert headroom_from_env({"EPCOMM_GRID_HEADROOM": bad}) == SHARED_HEADROOM
    assert grid_size(None, H200, 66, 1, ranks_per_gpu=2, headroom=0.9).grid == 59
