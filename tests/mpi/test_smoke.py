"""The smoke test under the launcher on host configs: healthy runs, and injected faults that it must name.

Each job is bounded by --stage-timeout (the smoke test's own deadlines) and by the launcher's --timeout (last
line of defence); a run that needs the latter is a failure of the smoke test.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launched import REPO_ROOT, _resolve

pytestmark = pytest.mark.mpi

LAUNCH_TIMEOUT = 90


def smoke(config, tmp_path, *args, env=None, stages="inventory,links,ep,speed", stage_timeout=20):
    js, png = tmp_path / "report.json", tmp_path / "links.png"
    cmd = [sys.executable, "-m", "launch", "smoke", "-t", _resolve(config), "--timeout", str(LAUNCH_TIMEOUT),
           "--grace", "3", "--", "--quick", "--json", str(js), "--png", str(png),
           "--stage-timeout", str(stage_timeout), "--stages", stages, *args]
    import os
    full = dict(os.environ)
    full.pop("EPCOMM_FAULT", None)
    full.pop("EPCOMM_SMOKE_FAULT", None)
    full.update(env or {})
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=full, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT + 30)
    report = json.loads(js.read_text()) if js.exists() else None
    return p, report, png


def _show(p):
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}"


@pytest.mark.parametrize("config", ["cpu-4rank", "cpu-2x4"])
def test_healthy(config, tmp_path):
    from epcomm.smoke.report import validate
    p, report, png = smoke(config, tmp_path)
    assert p.returncode == 0, _show(p)
    assert report is not None and report["ok"], _show(p)
    assert validate(report) == []
    from epcomm.backends.gpu import jit
    assert report["code"]["kernel_source"] == jit.source_hash()   # which epcomm ran
    assert set(report["stages"]) == {"inventory", "links", "ep", "speed"}
    assert all(st["status"] == "ok" for st in report["stages"].values()), report["stages"]
    n = report["topology"]["world_size"]
    bw = report["stages"]["links"]["bandwidth_gbps"]
    assert all(bw[s][d] > 0 for s in range(n) for d in range(n) if s != d)
    if config == "cpu-2x4":
        assert set(report["stages"]["links"]["medians"]) == {"same_node", "other_node"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert p.stdout.strip().splitlines()[-1].startswith("OK")


def test_hung_rank_is_named(tmp_path):
    p, report, _ = smoke("cpu-2x4", tmp_path, stages="inventory,links,ep", stage_timeout=6,
                         env={"EPCOMM_SMOKE_FAULT": "hang:rank=5,stage=links"})
    assert p.returncode not in (0, 124), _show(p)   # 124 = the launcher had to kill it: smoke itself hung
    assert report is not None and not report["ok"]
    assert report["verdict"].startswith("FAIL links:") and "rank 5 node1" in report["verdict"], report["verdict"]
    assert report["stages"]["links"]["status"] == "timeout"
    assert any(f["what"] == "timeout" and f["rank"] == 5 and f["node"] == 1 for f in report["failures"])


def test_rank_hung_inside_links_is_named(tmp_path):
    p, report, _ = smoke("cpu-4rank", tmp_path, stages="inventory,links", stage_timeout=6,
                         env={"EPCOMM_SMOKE_FAULT": "hang:rank=2,stage=links-mid"})
    assert p.returncode not in (0, 124), _show(p)
    assert report is not None and "rank 2" in report["verdict"], report and report["verdict"]


def test_corrupting_rank_is_named(tmp_path):
    p, report, _ = smoke("cpu-4rank", tmp_path, stages="inventory,links,ep",
                         env={"EPCOMM_SMOKE_FAULT": "corrupt:rank=1"})
    assert p.returncode == 1, _show(p)
    assert report["verdict"].startswith("FAIL links: rank 1 "), report["verdict"]
    whats = {(f["stage"], f["what"], f["rank"]) for f in report["failures"]}
    assert ("links", "link_data", 1) in whats
    assert ("ep", "ep_mismatch", 1) in whats   # receivers' rows from rank 1 differ from the reference


def test_backend_corruption_in_ep_is_named(tmp_path):
    """The host backend's own fault hook (EPCOMM_FAULT) corrupts EP traffic of rank 2."""
    p, report, _ = smoke("cpu-4rank", tmp_path, stages="ep", env={"EPCOMM_FAULT": "corrupt:rank=2"})
    assert p.returncode == 1, _show(p)
    assert report["verdict"].startswith("FAIL ep:") and "rank 2" in report["verdict"], report["verdict"]


def test_slow_link_is_flagged(tmp_path):
    p, report, png = smoke("cpu-2x4", tmp_path, stages="inventory,links",
                           env={"EPCOMM_SMOKE_FAULT": "slow_link:src=1,dst=6,ms=3"})
    assert p.returncode == 1, _show(p)
    fails = [f for f in report["failures"] if f["what"].startswith("link_slow")]
    assert (fails[0]["src"], fails[0]["dst"]) == (1, 6), report["failures"]   # the worst pair comes first
    assert "rank 1 node0" in report["verdict"] and "rank 6 node1" in report["verdict"], report["verdict"]
    assert png.exists()
