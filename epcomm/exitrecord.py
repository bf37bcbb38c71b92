"""Exit records: how a rank tells the launcher "I ended, with this code, for this reason".

`python -m launch run` makes a job directory on the launching host and exports it to every rank as EPCOMM_JOB_DIR.
Two writers put a small JSON file there when a rank ends:

* the rank itself (epcomm.init's exit guard, epcomm/context.py): before it aborts on an uncaught exception or a
  non-zero sys.exit, with the reason in words;
* the rank's wrapper process (launch/rank_env.py), which starts the rank as its child and sees every end of it, a
  kill -9 included.

The launcher (launch/runner.py) watches the directory: the first record with a non-zero code ends the job at once,
named (rank, node, host, reason), with that code. A rank whose host does not have the directory (another host
without a shared file system) writes nothing; MPI's own handling of a failed rank and the wrapper's one-line
message on stderr remain there.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

ENV = "EPCOMM_JOB_DIR"
# A non-zero exit that every rank takes together (a check that failed everywhere, a benchmark verdict) is a normal end,
# not a failure to spread: a rank that exits non-zero waits this long for every rank's record before it aborts the
# job, and the launcher acts on a failure record only once it is this old (a loaded machine: ranks leave a barrier
# up to a second or two apart).
COLLECTIVE_EXIT_WAIT_S = 3.0


@dataclass(frozen=True)
class ExitRecord:
    rank: int
    code: int                 # the rank's exit status as a shell sees it (128+N for death by signal N)
    reason: str               # "SystemExit(3)", "RuntimeError: boom", "killed by SIGKILL", "exit 0"
    host: str
    node: int | None
    by: str                   # "rank" (the process itself) | "wrapper" (launch.rank_env saw it end)
    time: float               # time.time() when written

    def describe(self) -> str:
        where = f"node {self.node}, " if self.node is not None else ""
        return f"rank {self.rank} ({where}host {self.host})"


def write(rank: int, code: int, reason: str, by: str, job_dir: str | None = None) -> str | None:
    """Write this rank's record into the job directory (atomic rename); None where there is none. Never raises."""
    job_dir = job_dir if job_dir is not None else os.environ.get(ENV)
    if not job_dir or not os.path.isdir(job_dir):
        return None
    node = os.environ.get("EPCOMM_NODE", "")
    rec = {"rank": int(rank), "code": int(code), "reason": str(reason)[:500], "host": socket.gethostname(),
           "node": int(node) if node.isdigit() else None, "by": by, "time": time.time()}
    path = os.path.join(job_dir, f"rank{int(rank)}.{by}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def read_all(job_dir: str) -> list[ExitRecord]:
    """Every complete record in the directory, earliest first."""
    out = []
    try:
        names = os.listdir(job_dir)
    except OSError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        try:
            with open(os.path.join(job_dir, n)) as f:
                d = json.load(f)
            out.append(ExitRecord(rank=int(d["rank"]), code=int(d["code"]), reason=str(d.get("reason", "")),
                                  host=str(d.get("host", "?")), node=d.get("node"), by=str(d.get("by", "?")),
                                  time=float(d.get("time", 0.0))))
        except (OSError, ValueError, KeyError, TypeError):
            continue   # half-written by a writer without rename, or not ours
    out.sort(key=lambda r: (r.time, r.by != "rank"))
    return out


def ranks_ending(records: list[ExitRecord]) -> set[int]:
    """Ranks that said themselves that they are ending (epcomm's exit guard, any code); a wrapper's record may come
    from a rank that mpirun killed after another rank failed, so it does not count."""
    return {r.rank for r in records if r.by == "rank"}


def first_failure(records: list[ExitRecord]) -> ExitRecord | None:
    """The earliest record with a non-zero code; the rank's own record (it says why) wins over its wrapper's."""
    bad = [r for r in records if r.code != 0]
    if not bad:
        return None
    first = bad[0]
    own = [r for r in bad if r.rank == first.rank and r.by == "rank"]
    return own[0] if own else first
