"""Fencing off a dead rank: the spec (epcomm.reference with masked_ranks), EPBuffer's fencing API on a recording fake
backend, and the launcher's --keep-going command line. The real protocol under mpirun: tests/mpi/test_fencing.py."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import epcomm.backends
from epcomm import EPBuffer, EPConfig, EPInputError, EPRankLostError, reference
from epcomm.formats import BF16
from epcomm.workload import identity_experts, make_world

CFG = EPConfig(hidden=128, topk=3, num_experts=8, max_tokens_per_rank=6, world_size=4)


@pytest.mark.parametrize("routing", ["uniform", "hot", "minus1", "skewed"])
def test_masked_rank_takes_no_part_and_its_experts_slots_are_dropped(routing):
    w = make_world(CFG, 7, routing)
    masked = (2,)
    res = reference.dispatch(CFG, w.xs, w.topk_ids, masked_ranks=masked)
    assert res[2] is None
    for r, d in enumerate(res):
        if d is None:
            continue
        n = int(d.row_offsets[-1])
        assert 2 not in d.src_info[:n, 0]                     # nothing from the masked rank
        drop = reference.masked_slots(CFG, w.topk_ids[r], masked)
        assert np.array_equal(drop, (w.topk_ids[r] >= 0) & (w.topk_ids[r] // CFG.n_local_experts == 2))
    # combine with identity experts: the weighted sum over the live slots only
    eys = [None if d is None else identity_experts(CFG, d.expert_x) for d in res]
    ys = reference.combine(CFG, eys, res, w.topk_weights)
    assert ys[2] is None
    for r in (0, 1, 3):
        ids, wt = w.topk_ids[r], w.topk_weights[r]
        live = (ids >= 0) & ~reference.masked_slots(CFG, ids, masked)
        want = (np.asarray(w.xs[r], np.float32)[:, None, :] * np.where(live, wt, 0)[:, :, None]).sum(axis=1)
        assert np.allclose(np.asarray(ys[r], np.float32), want, rtol=2 ** -6, atol=1e-3)


def test_no_masked_ranks_is_the_plain_spec():
    w = make_world(CFG, 3)
    a = reference.dispatch(CFG, w.xs, w.topk_ids)
    b = reference.dispatch(CFG, w.xs, w.topk_ids, masked_ranks=())
    for x, y in zip(a, b):
        assert reference.compare_dispatch(CFG, x, y) == []


class Fencer:
    """A fake backend that can fence: records fence calls; its combine raises EPRankLostError once."""
    broken = None
    sms_used = None

    def __init__(self):
        self.masked: set[int] = set()
        self.fenced: list = []
        self.fencing = False
        self.lose_next = False

    def enable_fencing(self):
        self.fencing = True

    def fence(self, ranks):
        self.fenced.append(list(ranks))
        self.masked.update(ranks)

    @property
    def masked_ranks(self):
        return tuple(sorted(self.masked))

    def dispatch(self, x, ids):
        return types.SimpleNamespace(handle=object(), rejected_ranks=())

    def combine(self, ey, h, w):
        if self.lose_next:
            self.lose_next = False
            raise EPRankLostError("rank 1 (node 0) was lost", rank=1, node=0, experts=range(2, 4), round=0)
        return np.zeros((len(w), 128), BF16)

    def synchronize(self):
        pass

    def raise_pending(self):
        pass

    def abort(self, reason):
        self.aborted = reason

    def close(self):
        pass


def _buffer(monkeypatch, backend, **kw):
    monkeypatch.setattr(epcomm.backends, "make_backend", lambda cfg, ctx: backend)
    ctx = types.SimpleNamespace(world_size=4, rank=0, backend="host", _buffers=set(), node_of=lambda r: 0)
    ctx._buffers = types.SimpleNamespace(add=lambda b: None)
    return EPBuffer(CFG, ctx, **kw)


def test_fence_masks_and_active_ranks_follow(monkeypatch):
    be = Fencer()
    buf = _buffer(monkeypatch, be, fence_dead_ranks=True)
    assert be.fencing and buf.active_ranks == (0, 1, 2, 3)
    buf.fence([3, 1, 3])
    assert be.fenced == [[1, 3]] and buf.active_ranks == (0, 2)


def test_fence_refuses_bad_ranks_and_a_buffer_made_without_fencing(monkeypatch):
    buf = _buffer(monkeypatch, Fencer(), fence_dead_ranks=True)
    for bad in ([0], [4], [-1]):
        with pytest.raises(EPInputError, match="fence: ranks must be peers"):
            buf.fence(bad)
    plain = _buffer(monkeypatch, Fencer())
    with pytest.raises(EPInputError, match="fence_dead_ranks=True"):
        plain.fence([1])


def test_a_backend_that_cannot_fence_is_refused(monkeypatch):
    be = Fencer()
    be.enable_fencing = None
    with pytest.raises(EPInputError, match="cannot yet"):
        _buffer(monkeypatch, be, fence_dead_ranks=True)


def test_a_lost_round_leaves_the_buffer_usable(monkeypatch):
    """EPRankLostError is a round's error, like a peer's refusal: no abort, the next round runs."""
    be = Fencer()
    buf = _buffer(monkeypatch, be, fence_dead_ranks=True)
    x, ids = np.zeros((2, 128), BF16), np.zeros((2, 3), np.int32)
    ey, w = np.zeros((CFG.max_recv_rows, 128), BF16), np.zeros((2, 3), np.float32)
    out = buf.dispatch(x, ids)
    be.lose_next = True
    with pytest.raises(EPRankLostError) as e:
        buf.combine(ey, out.handle, w)
    assert (e.value.rank, e.value.experts, e.value.ranks) == (1, range(2, 4), (1,))
    assert not hasattr(be, "aborted")
    out = buf.dispatch(x, ids)
    assert buf.combine(ey, out.handle, w).shape == (2, 128)


def test_keep_going_asks_open_mpi_for_ulfm_and_mpich_is_refused():
    from launch.mpicmd import build_command
    from epcomm.topology import Topology
    topo = Topology.single_node(4)
    argv = build_command(topo, ["prog"], mpi="openmpi", mpirun=sys.executable, keep_going=True).command
    i = argv.index("--with-ft")
    assert argv[i + 1] == "ulfm" and argv.index("launch.rank_env") > i
    assert "--with-ft" not in build_command(topo, ["prog"], mpi="openmpi", mpirun=sys.executable).command
    with pytest.raises(EPInputError, match="--keep-going needs Open MPI"):
        build_command(topo, ["prog"], mpi="mpich", mpirun=sys.executable, keep_going=True)


def test_keep_going_on_open_mpi_4_asks_for_recovery_not_ulfm(tmp_path):
    """Open MPI 4.x's mpirun (the GPU machines' 4.1.6) refuses --with-ft ("unknown option"): the launcher asks it for
    --enable-recovery instead, read from `mpirun --version`; 5.x gets ULFM."""
    from launch.mpicmd import build_command, open_mpi_major
    from epcomm.topology import Topology
    topo = Topology.single_node(4)
    for version, want, other in (("4.1.6", "--enable-recovery", "--with-ft"),
                                 ("5.0.11", "--with-ft", "--enable-recovery")):
        fake = tmp_path / f"mpirun{version}"
        fake.write_text(f"#!/bin/sh\necho 'mpirun (Open MPI) {version}'\n")
        fake.chmod(0o755)
        assert open_mpi_major(str(fake)) == int(version[0])
        argv = build_command(topo, ["prog"], mpi="openmpi", mpirun=str(fake), keep_going=True).command
        assert want in argv and other not in argv and argv.index("launch.rank_env") > argv.index(want)


def _fake_job(tmp_path, body: str) -> list[str]:
    """A stand-in for mpirun running `body` (`write` = exitrecord.write into tmp_path), as in test_exit_records."""
    from launched import REPO_ROOT
    code = (f"import sys, time; sys.path.insert(0, {str(REPO_ROOT)!r}); from epcomm import exitrecord; "
            f"write = lambda *a, **k: exitrecord.write(*a, job_dir={str(tmp_path)!r}, **k); {body}")
    return [sys.executable, "-c", code]


def test_keep_going_reports_a_dead_rank_and_ends_the_job_when_every_rank_has(tmp_path, capsys, monkeypatch):
    """The launcher's side without MPI: a stand-in for mpirun where rank 1 dies, the others finish later and then
    hang (a survivor's MPI_Finalize waiting for the dead rank): reported, not ended early, then stopped."""
    import time

    from launch import runner
    monkeypatch.setattr(runner, "MPI_OWN_ABORT_S", 0.2)
    body = ("write(1, 137, 'killed by SIGKILL', by='wrapper'); time.sleep(1.5); "
            "write(0, 0, 'finished', by='rank'); write(2, 0, 'finished', by='rank'); time.sleep(60)")
    t0 = time.monotonic()
    rc = runner.run_job(_fake_job(tmp_path, body), timeout=60, grace=1, job_dir=str(tmp_path), world=3,
                        keep_going=True)
    dt = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 137 and 1.5 <= dt < 20, (rc, dt, err)
    assert "ended: killed by SIGKILL (exit 137); the others go on (--keep-going)" in err and "ended first" not in err
