"""python -m launch {run,plan,smoke,bench}: run a command on every rank of a topology YAML."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile

from epcomm import exitrecord
from epcomm.errors import EPInputError
from epcomm.topology import Topology
from launch.mpicmd import JobSpec, build_command, resolve_config
from launch.rank_env import rank_environment
from launch.runner import run_job

DESCRIPTION = """\
Run a command on every rank of an epcomm topology (configs/*.yaml, schema in docs/TOPOLOGY.md).
Builds the mpirun command for Open MPI or MPICH (detected from `mpirun --version`, or the YAML's `mpi:`),
one rank per GPU (or ranks_per_node on host-only configs), ranks laid out node by node. Each rank runs
through `python -m launch.rank_env`, which exports EPCOMM_RANK / EPCOMM_NODE / EPCOMM_LOCAL_RANK /
EPCOMM_DEVICE / EPCOMM_TOPOLOGY (and NVSHMEM settings) and runs the command as its child: the first rank
that ends badly (an exception, a non-zero exit, a signal) ends the whole job, named (docs/FAILURES.md);
with --keep-going it is only reported and the others go on (fencing off a dead rank)."""

EPILOG = """\
examples:
  python -m launch plan -t configs/h100-2x8.yaml
  python -m launch run -t cpu-2x4 -- python -m epcomm.demo
  python -m launch run -n 4 --timeout 60 -- python my_script.py
  python -m launch smoke -t sim-2node
  python -m launch bench -t local-8gpu -- --hidden 7168"""


def _common(p: argparse.ArgumentParser, *, needs_cmd: bool) -> None:
    p.add_argument("-t", "--topology", metavar="CONFIG",
                   help="topology YAML: a path, or a name under configs/ (e.g. cpu-2x4)")
    p.add_argument("-n", "--np", type=int, metavar="N",
                   help="without -t: N ranks on this host, host backend (Topology.single_node)")
    p.add_argument("--mpi", choices=("auto", "openmpi", "mpich"),
                   help="override the YAML's mpi: choice (auto = detect from `mpirun --version`)")
    p.add_argument("--mpirun", metavar="PATH",
                   help="mpirun / mpiexec to use (default: $EPCOMM_MPIRUN, the venv's, then PATH)")
    p.add_argument("-x", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable for every rank (repeatable)")
    p.add_argument("--mpi-arg", action="append", default=[], metavar="ARG",
                   help="extra argument passed to mpirun as is (repeatable; use --mpi-arg=--foo)")
    if needs_cmd:
        p.add_argument("--dry-run", action="store_true", help="print the mpirun command and exit")
        p.add_argument("--timeout", type=float, metavar="S",
                       help="kill every rank after S seconds and exit 124")
        p.add_argument("--grace", type=float, default=5.0, metavar="S",
                       help="seconds between SIGTERM and SIGKILL when stopping the job (default 5)")
        p.add_argument("--keep-going", action="store_true",
                       help="a rank that ends badly does not end the job: it is reported and the others go on "
                            "(Open MPI's recovery mode: mpirun --with-ft ulfm on 5.x, --enable-recovery on 4.x; "
                            "an EPBuffer made with fence_dead_ranks=True fences the rank off); exit code: the first "
                            "failed rank's")
        p.add_argument("--exit-wait", type=float, metavar="S",
                       help="stop the job (exit 1) when ranks still run S seconds after one finished with exit 0 "
                            "(default: wait; a rank that ends badly always ends the job at once)")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="{run,plan,smoke,bench}")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("run", help="run CMD on every rank", formatter_class=fmt,
                       description="Run CMD (after --) on every rank. The first rank that ends badly (an "
                                   "exception, a non-zero exit, a signal) ends the whole job at once; the "
                                   "launcher names it (rank, node, host) and exits with its code. Otherwise: 0, "
                                   "124 on --timeout, 128+N when stopped by signal N. `python` as CMD means "
                                   "this interpreter.",
                       epilog="example: python -m launch run -t cpu-4rank --timeout 60 -- python -m epcomm.demo")
    _common(p, needs_cmd=True)
    p = sub.add_parser("plan", help="print the rank table and the mpirun command", formatter_class=fmt,
                       description="Print every rank (host, node, local rank, GPU, NIC) and the mpirun command "
                                   "that `run` would execute. Nothing is started.",
                       epilog="example: python -m launch plan -t configs/h100-2x8.yaml --json")
    _common(p, needs_cmd=False)
    p.add_argument("--json", action="store_true", help="machine-readable output (ranks with their env, command)")
    for name in ("smoke", "bench"):
        p = sub.add_parser(name, help=f"run `python -m epcomm.{name}` on every rank", formatter_class=fmt,
                           description=f"Run `python -m epcomm.{name} ARGS` under the launcher; ARGS after -- "
                                       "are passed through.",
                           epilog=f"example: python -m launch {name} -t sim-2node -- --help")
        _common(p, needs_cmd=True)
    return ap


def _topology(args) -> Topology:
    if args.topology and args.np is not None:
        raise EPInputError("give either -t CONFIG or -n N, not both (the topology fixes the rank count)")
    if args.topology:
        return Topology.load(resolve_config(args.topology))
    if args.np is not None:
        return Topology.single_node(args.np)
    raise EPInputError("no topology: give -t CONFIG (see configs/) or -n N")


def _extra_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise EPInputError(f"-x {p!r}: expected NAME=VALUE")
        out[k] = v
    return out


def _spec(args, cmd: list[str], job_dir: str | None = None) -> JobSpec:
    topo = _topology(args)
    extra = _extra_env(args.env)
    if job_dir is not None:
        extra[exitrecord.ENV] = job_dir   # where every rank leaves its exit record (epcomm/exitrecord.py)
    return build_command(topo, cmd, mpi=args.mpi, mpirun=args.mpirun, extra_env=extra, mpi_args=args.mpi_arg,
                         keep_going=getattr(args, "keep_going", False))


def _plan(spec: JobSpec, as_json: bool) -> None:
    topo = spec.topology
    if as_json:
        ranks = []
        for row in topo.rank_table():
            row = dict(row)
            row["env"] = rank_environment(topo, row["rank"])
            ranks.append(row)
        print(json.dumps({"topology": topo.to_dict(), "source": topo.source, "world_size": topo.world_size,
                          "shared_gpus": topo.sharing_lines(), "mpi": spec.flavor, "ranks": ranks,
                          "command": spec.command, "notes": spec.notes},
                         indent=2))
        return
    print(f"topology {topo.name} ({topo.source or 'no file'}): {topo.world_size} ranks on "
          f"{len(set(topo.hostnames))} host(s), {topo.num_nodes} node(s) x {topo.ranks_per_node}, "
          f"backend {topo.backend}, mpi {spec.flavor}")
    shared = topo.shares_gpus
    print(f"{'rank':>4}  {'host':<20} {'node':>4} {'local':>5} {'device':>6}  "
          + ("shared  " if shared else "") + "nic")
    for row in topo.rank_table():
        dev = "-" if row["device"] is None else str(row["device"])
        share = f"{'x' + str(row['gpu_shared_by']):<8}" if shared else ""
        print(f"{row['rank']:>4}  {row['host']:<20} {row['node']:>4} {row['local_rank']:>5} {dev:>6}  "
              f"{share}{row['nic'] or '-'}")
    for line in topo.sharing_lines():
        print(f"shared: {line} (share_gpus: true): checks, not link timings")
    for n in spec.notes:
        print(f"note: {n}")
    print("command:")
    print("  " + shlex.join(spec.command))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    args = make_parser().parse_args(argv)
    try:
        if args.cmd == "plan":
            spec = _spec(args, cmd or ["<command>"])
            _plan(spec, args.json)
            return 0
        if args.cmd in ("smoke", "bench"):
            mod = f"epcomm.{args.cmd}"
            if importlib.util.find_spec(mod) is None:
                print(f"launch {args.cmd}: module {mod} is not available in this checkout", file=sys.stderr)
                return 2
            cmd = [sys.executable, "-m", mod, *cmd]
        elif not cmd:
            print("launch run: no command; put it after --, e.g. `python -m launch run -t cpu-4rank -- "
                  "python -m epcomm.demo`", file=sys.stderr)
            return 2
        job_dir = None if args.dry_run else tempfile.mkdtemp(prefix="epcomm-job-")
        try:
            spec = _spec(args, cmd, job_dir)
        except BaseException:
            if job_dir is not None:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise
    except EPInputError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    for n in spec.notes:
        print(f"launch: note: {n}", file=sys.stderr)
    if args.dry_run:
        print(shlex.join(spec.command))
        return 0
    env = dict(os.environ)
    env.update(spec.env)
    sys.stdout.flush()
    try:
        return run_job(spec.command, env=env, timeout=args.timeout, grace=args.grace, job_dir=job_dir,
                       world=spec.topology.world_size, exit_wait=args.exit_wait,
                       keep_going=args.keep_going)
    finally:
        if job_dir is not None:
            shutil.rmtree(job_dir, ignore_errors=True)
        for path in spec.temp_files:  # the ranks are gone: nothing reads the -n topology file any more
            try:
                os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
