"""Run an mpirun command: propagate its exit code, stop every rank on SIGINT/SIGTERM, enforce --timeout."""

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


def run_job(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
            grace: float = 5.0) -> int:
    """Run `argv` in its own process group; returns the exit status the launcher should exit with.

    - normal end: mpirun's exit code (non-zero when any rank failed); death by signal N gives 128+N
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
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
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
    if rc < 0:
        return 128 - rc
    return rc
