"""`python -m epcomm.smoke`: is this cluster fit for EP traffic, and if not, where is it broken?

Run on every rank (`python -m launch smoke -t CONFIG -- [options]`). Rank 0 coordinates: before each stage it
waits (with a deadline) for every rank to report ready, starts the stage, collects each rank's result (with a
deadline), and decides. A rank that does not arrive or does not answer is named; then rank 0 writes the report
and aborts the job (MPI_Abort), so one stuck rank cannot hang the smoke test. Stages: inventory, links, ep, speed.
This module: the options and the entry; coordinator.py runs the protocol, analysis.py decides, report.py writes.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from ..topology import Topology
from . import analysis, faults as faults_mod
from .analysis import STAGES
from .comm import Messenger
from .coordinator import Coordinator, follower
from .stages import StageEnv

EXIT_USAGE = 2


@dataclass
class Options:
    json: str | None = "smoke-report.json"
    png: str | None = "smoke-links.png"
    stage_timeout: float = 60.0       # main() raises the default to 300 on GPU configs (first-use kernel builds)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    quick: bool = False
    link_method: str = "auto"
    bw_factor: float | None = None    # None: 0.5 on GPU configs, 0.2 on host configs (see Coordinator._analyse)
    lat_factor: float = analysis.LAT_FACTOR
    lat_slack_us: float | None = None
    slow_factor: float = analysis.SLOW_FACTOR


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(prog="python -m epcomm.smoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m launch smoke -t cpu-2x4 -- --quick --json out.json")
    ap.add_argument("--json", default="smoke-report.json", metavar="PATH",
                    help="write the JSON report here (schema docs/SMOKE.md; '' = none)")
    ap.add_argument("--png", default="smoke-links.png", metavar="PATH",
                    help="write the pair-bandwidth heatmap here ('' = none)")
    ap.add_argument("--stage-timeout", type=float, default=None, metavar="S",
                    help="deadline of each stage and of each wait for a rank (default 60 on host configs, "
                         "300 on GPU configs: the EP stage builds kernels on first use)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    ap.add_argument("--quick", action="store_true", help="smaller messages, fewer repetitions and EP cases")
    ap.add_argument("--link-method", choices=("auto", "peer", "mpi"), default="auto",
                    help="GPU configs: auto/peer = CUDA peer copies for pairs on one host, MPI for others; "
                         "mpi = MPI host-memory RMA everywhere")
    ap.add_argument("--bw-factor", type=float, default=None,
                    help="flag a pair below this x the median bandwidth of its class (default 0.5 on GPU configs; "
                         "0.2 on host configs, whose CPU-timed copies swing 2x on busy cores)")
    ap.add_argument("--lat-factor", type=float, default=analysis.LAT_FACTOR,
                    help="flag a pair above this x the median latency of its class (default 3)")
    ap.add_argument("--lat-slack-us", type=float, default=None,
                    help="...and at least this many us above it (default 50 on host configs, 5 on GPU)")
    ap.add_argument("--slow-factor", type=float, default=analysis.SLOW_FACTOR,
                    help="flag a rank whose EP time is above this x the median (default 2)")
    a = ap.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
    if a.stage_timeout is not None and a.stage_timeout <= 0:
        ap.error("--stage-timeout must be > 0")
    return Options(json=a.json or None, png=a.png or None, stage_timeout=a.stage_timeout or 0.0,
                   stages=[s for s in STAGES if s in stages], quick=a.quick, link_method=a.link_method,
                   bw_factor=a.bw_factor, lat_factor=a.lat_factor, lat_slack_us=a.lat_slack_us,
                   slow_factor=a.slow_factor)


# ------------------------------------------------------------------------------------------------ entry

def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    from mpi4py import MPI   # after parsing: --help works without MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        topo = Topology.from_env() or Topology.single_node(size)
        faults = faults_mod.from_env()
    except Exception as e:
        print(f"smoke: rank {rank}: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if topo.world_size != size:
        if rank == 0:
            print(f"smoke: topology {topo.name} has {topo.world_size} ranks but MPI started {size}", file=sys.stderr)
        return EXIT_USAGE
    dev_env = os.environ.get("EPCOMM_DEVICE", "")
    device = int(dev_env) if dev_env.isdigit() else topo.device(rank)
    gpu = topo.has_gpus and topo.resolved_backend() == "gpu"
    threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
    if not opts.stage_timeout:
        opts.stage_timeout = 300.0 if topo.has_gpus else 60.0
    env = StageEnv(comm=comm, msgr=Messenger(comm), rank=rank, world=size, topo=topo, opts=opts, faults=faults,
                   gpu=gpu, device=device)
    if rank == 0:
        return Coordinator(env, threaded).run()
    return follower(env, threaded)
