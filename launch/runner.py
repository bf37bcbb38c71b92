"""Run an mpirun command: propagate its exit code, stop every rank on SIGINT/SIGTERM, enforce --timeout, and end the
whole job as soon as one rank ends badly (exit records in the job directory, epcomm/exitrecord.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

TIMEOUT_EXIT = 124


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def session_members(sid: int) -> list[int]:
    """Pids whose session id is `sid` (mpirun runs in a new session; Open MPI gives each rank its own
    process group but keeps it in that session). Linux /proc only; elsewhere an empty list."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        # fields: state ppid pgrp session ...
        if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            pids.append(int(e))
    return pids


def _kill_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_session(sid: int, grace: float) -> None:
    """Wait up to `grace` s for what is left of the job's session to exit, then SIGKILL it."""
    end = time.monotonic() + grace
    while session_members(sid):
        if time.monotonic() >= end:
            _kill_session(sid, signal.SIGKILL)
            time.sleep(0.05)
            if not session_members(sid):
                return
            end = time.monotonic() + 1.0  # one more try, then give up
            _kill_session(sid, signal.SIGKILL)
            return
        time.sleep(0.05)


# After the first failed rank, mpirun gets this long to end the job by itself (its own message is the more useful
# one) before the launcher stops it.
MPI_OWN_ABORT_S = 2.0
# A rank that finished (exit 0) while others still run is reported once after this long (they may be waiting for it).
FINISHED_NOTICE_S = 10.0


class _Watch:
    """The job directory's exit records, as the launcher acts on them."""

    def __init__(self, job_dir: str | None, exit_wait: float | None, keep_going: bool = False):
        self.job_dir, self.exit_wait, self.keep_going = job_dir, exit_wait, keep_going
        self.lost: set[int] = set()    # keep_going: failed ranks already reported
        self.failure = None            # the first failed rank's ExitRecord
        self.first_done = None         # (record, monotonic time seen) of the first rank that ended with 0
        self.noticed = False
        self.next_scan = 0.0

    def scan(self, now: float, world: int | None):
        """Returns "failed" (a rank ended badly), "stranded" (--exit-wait passed since a rank finished) or None."""
        if self.job_dir is None or self.failure is not None or now < self.next_scan:
            return None
        self.next_scan = now + 0.1
        from epcomm import exitrecord
        recs = exitrecord.read_all(self.job_dir)
        bad = exitrecord.first_failure(recs)
        if bad is not None and self.keep_going:
            return self._survivors_go_on(recs, world)
        if bad is not None:
            if world is not None and len(exitrecord.ranks_ending(recs)) >= world:
                return None   # every rank is ending, some with a non-zero code: mpirun ends the job by itself
            if bad.reason.startswith("SystemExit(") and time.time() - bad.time < exitrecord.COLLECTIVE_EXIT_WAIT_S:
                return None   # an exit the other ranks may be taking too: they get as long as the rank waits
            self.failure = bad
            return "failed"
        done = {r.rank for r in recs}
        if done and self.first_done is None:
            self.first_done = (recs[0], now)
        if self.first_done is None or (world is not None and len(done) >= world):
            return None
        rec, since = self.first_done
        if not self.noticed and now - since >= FINISHED_NOTICE_S:
            self.noticed = True
            left = "" if world is None else f" ({world - len(done)} of {world} ranks still running)"
            print(f"launch: {rec.describe()} finished (exit 0) {now - since:.0f} s ago{left}; if the others wait "
                  f"for it, the job hangs: --exit-wait S stops them", file=sys.stderr, flush=True)
        if self.exit_wait is not None and now - since >= self.exit_wait:
            return "stranded"
        return None

    def _survivors_go_on(self, recs, world: int | None):
        """--keep-going: a failed rank is reported, not acted on (the survivors fence it off and go on); once every
        rank has ended, the job is over: "failed" with the first failure's code (mpirun, or a survivor in
        MPI_Finalize waiting for the dead rank, gets MPI_OWN_ABORT_S to end by itself)."""
        for rec in recs:
            if rec.code != 0 and rec.rank not in self.lost:
                self.lost.add(rec.rank)
                print(f"launch: {rec.describe()} ended: {rec.reason} (exit {rec.code}); the others go on "
                      f"(--keep-going)", file=sys.stderr, flush=True)
        if world is not None and len({r.rank for r in recs}) >= world:
            from epcomm import exitrecord
            self.failure = exitrecord.first_failure(recs)
            return "failed"
        return None

    def last_failure(self, world: int | None):
        """After the job: (the first failed rank or None, whether every rank was ending by then)."""
        if self.job_dir is None:
            return self.failure, False
        from epcomm import exitrecord
        recs = exitrecord.read_all(self.job_dir)
        if self.failure is None:
            self.failure = exitrecord.first_failure(recs)
        return self.failure, world is not None and len(exitrecord.ranks_ending(recs)) >= world


def run_job(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
            grace: float = 5.0, job_dir: str | None = None, world: int | None = None,
            exit_wait: float | None = None, keep_going: bool = False) -> int:
    """Run `argv` in its own process group; returns the exit status the launcher should exit with.

    - normal end: mpirun's exit code (non-zero when any rank failed); death by signal N gives 128+N
    - a rank ends badly (job_dir gets an exit record with a non-zero code: an uncaught exception, sys.exit(n != 0),
      a signal such as kill -9): a line naming the first such rank, its node and host; mpirun gets
      MPI_OWN_ABORT_S to end the job itself, then the stop sequence below; exits with that rank's code
    - keep_going (Open MPI's recovery mode: `--with-ft ulfm` on 5.x, `--enable-recovery` on 4.x): a rank that ends
      badly is reported, the others go on (an EPBuffer with fence_dead_ranks=True fences it off); the job ends when
      every rank has, with the first failed rank's code
    - exit_wait: S seconds after the first rank finished with exit 0, ranks still running are stopped (exit 1)
    - SIGINT / SIGTERM / SIGHUP to the launcher: SIGTERM to mpirun's process group (mpirun forwards it to
      every rank), SIGKILL after `grace` seconds; a second signal kills at once; exits 128+signal
    - timeout: same stop sequence, a message on stderr, exit 124
    """
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    state: dict[str, float | int | None] = {"signal": None, "kill_at": None}

    def stop(signum: int, _frame) -> None:
        if state["signal"] is not None:  # second signal: no more grace
            _signal_group(proc, signal.SIGKILL)
            _kill_session(proc.pid, signal.SIGKILL)
            return
        state["signal"] = signum
        state["kill_at"] = time.monotonic() + grace
        _signal_group(proc, signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {}
    for s in handled:
        try:
            old[s] = signal.signal(s, stop)
        except ValueError:  # not the main thread
            pass
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    watch = _Watch(job_dir, exit_wait, keep_going)
    ended: str | None = None           # "failed" | "stranded": the launcher is ending the job for a rank
    stop_at = None                     # when to start the stop sequence after a failed rank
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if ended is None and not timed_out and state["signal"] is None:
                ended = watch.scan(now, world)
                if ended == "failed" and keep_going:
                    stop_at = now + MPI_OWN_ABORT_S   # every rank has ended: what is left is MPI_Finalize
                elif ended == "failed":
                    f = watch.failure
                    print(f"launch: {f.describe()} ended first: {f.reason} (exit {f.code}); ending the job",
                          file=sys.stderr, flush=True)
                    stop_at = now + MPI_OWN_ABORT_S
                elif ended == "stranded":
                    rec = watch.first_done[0]
                    print(f"launch: {rec.describe()} finished {exit_wait:g} s ago (--exit-wait) and other ranks "
                          f"still run; stopping every rank", file=sys.stderr, flush=True)
                    stop_at = now
            if stop_at is not None and now >= stop_at:
                stop_at = None
                state["kill_at"] = now + grace
                _signal_group(proc, signal.SIGTERM)
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                print(f"launch: job still running after --timeout {timeout:g}s; stopping every rank",
                      file=sys.stderr, flush=True)
                state["kill_at"] = now + grace
                _signal_group(proc, signal.SIGTERM)
            if state["kill_at"] is not None and now >= state["kill_at"]:
                _signal_group(proc, signal.SIGKILL)
                _kill_session(proc.pid, signal.SIGKILL)
                state["kill_at"] = None
        # mpirun is gone; no rank of its session may outlive it
        _reap_session(proc.pid, grace if (timed_out or state["signal"] is not None) else min(grace, 2.0))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if timed_out:
        print(f"launch: killed after --timeout {timeout:g}s (exit {TIMEOUT_EXIT})", file=sys.stderr, flush=True)
        return TIMEOUT_EXIT
    if state["signal"] is not None:
        return 128 + int(state["signal"])
    if ended is None and not timed_out:
        f, everyone = watch.last_failure(world)
        if f is not None:   # mpirun ended the job by itself: still use the rank's code, and name it if it was alone
            ended = "failed"
            if not everyone:
                print(f"launch: {f.describe()} ended first: {f.reason} (exit {f.code})", file=sys.stderr, flush=True)
    if ended == "failed":
        return watch.failure.code
    if ended == "stranded":
        return 1
    if rc < 0:
        return 128 - rc
    return rc
