"""Exit records and the launcher's watch of them, without MPI: a fake job that leaves a record and then hangs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from epcomm import exitrecord
from launch import runner
from launch.rank_env import describe_status, exit_status

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_records_round_trip_and_the_rank_own_record_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_NODE", "1")
    assert exitrecord.write(0, 0, "finished", by="rank", job_dir=str(tmp_path))
    time.sleep(0.01)
    exitrecord.write(5, 137, "killed by SIGKILL", by="wrapper", job_dir=str(tmp_path))
    exitrecord.write(5, 3, "SystemExit(3)", by="rank", job_dir=str(tmp_path))   # written later, says why
    time.sleep(0.01)
    exitrecord.write(2, 143, "killed by SIGTERM", by="wrapper", job_dir=str(tmp_path))
    (tmp_path / "junk.json").write_text("{not json")
    recs = exitrecord.read_all(str(tmp_path))
    assert [r.rank for r in recs][:1] == [0] and len(recs) == 4
    first = exitrecord.first_failure(recs)
    assert (first.rank, first.code, first.reason, first.node) == (5, 3, "SystemExit(3)", 1)
    assert first.describe().startswith("rank 5 (node 1, host ")
    assert exitrecord.first_failure([r for r in recs if r.code == 0]) is None


def test_no_job_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(exitrecord.ENV, raising=False)
    assert exitrecord.write(0, 1, "x", by="rank") is None
    assert exitrecord.write(0, 1, "x", by="rank", job_dir=str(tmp_path / "absent")) is None


def test_wrapper_statuses():
    assert exit_status(-9) == 137 and exit_status(3) == 3
    assert describe_status(-9) == "killed by SIGKILL" and describe_status(0) == "exit 0"


def _fake_job(tmp_path, body: str) -> list[str]:
    """A stand-in for mpirun: a Python process that runs `body` (with `write` = exitrecord.write into tmp_path)."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO_ROOT)!r}); from epcomm import exitrecord; "
            f"write = lambda *a, **k: exitrecord.write(*a, job_dir={str(tmp_path)!r}, **k); {body}")
    return [sys.executable, "-c", code]


def test_first_failed_rank_ends_a_hanging_job_with_its_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "MPI_OWN_ABORT_S", 0.2)
    t0 = time.monotonic()
    rc = runner.run_job(_fake_job(tmp_path, "write(2, 5, 'SystemExit(5)', by='rank'); time.sleep(60)"),
                        timeout=60, grace=1, job_dir=str(tmp_path), world=4)
    assert rc == 5 and time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert "launch: rank 2 (host " in err and "ended first: SystemExit(5) (exit 5); ending the job" in err


def test_a_failure_that_mpirun_ended_itself_is_still_named(tmp_path, capsys):
    rc = runner.run_job(_fake_job(tmp_path, "write(1, 7, 'boom', by='rank'); sys.exit(1)"),
                        timeout=60, grace=1, job_dir=str(tmp_path), world=2)
    assert rc == 7
    assert "ended first: boom (exit 7)" in capsys.readouterr().err


def test_a_non_zero_exit_every_rank_takes_is_left_to_mpirun(tmp_path, capsys):
    body = ("write(0, 1, 'SystemExit(1)', by='rank'); write(1, 1, 'SystemExit(1)', by='rank'); "
            "time.sleep(3); sys.exit(1)")
    rc = runner.run_job(_fake_job(tmp_path, body), timeout=60, grace=1, job_dir=str(tmp_path), world=2)
    assert rc == 1 and "launch:" not in capsys.readouterr().err   # not stopped after MPI_OWN_ABORT_S, not named


def test_exit_wait_stops_ranks_left_running_after_one_finished(tmp_path, capsys):
    rc = runner.run_job(_fake_job(tmp_path, "write(1, 0, 'finished', by='rank'); time.sleep(60)"),
                        timeout=60, grace=1, job_dir=str(tmp_path), world=2, exit_wait=0.5)
    assert rc == 1
    assert "finished 0.5 s ago (--exit-wait)" in capsys.readouterr().err


def test_every_rank_finished_is_a_normal_end(tmp_path, capsys):
    rc = runner.run_job(_fake_job(tmp_path, "write(0, 0, 'finished', by='rank'); write(1, 0, 'finished', by='rank')"),
                        timeout=60, grace=1, job_dir=str(tmp_path), world=2, exit_wait=0.1)
    assert rc == 0 and "launch:" not in capsys.readouterr().err


@pytest.mark.parametrize("code, want", [(None, 0), (0, 0), (3, 3), (256, 0), ("bye", 1)])
def test_exit_guard_records_the_code_as_the_shell_sees_it(code, want, monkeypatch):
    from epcomm import context
    monkeypatch.setitem(context._EXIT, "code", None)
    context._record_exit_code(code)
    assert context._EXIT["code"] == want
