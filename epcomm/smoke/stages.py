"""One rank's side of a smoke stage: what a stage function gets (StageEnv), and running it under the stage deadline
(run_local), so that a stage that hangs is reported as a timeout naming the peer it was talking to."""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

from .comm import Deadline, Messenger, StageTimeout, guarded


@dataclass
class StageEnv:
    """What a stage function of one rank gets."""
    comm: Any
    msgr: Messenger
    rank: int
    world: int
    topo: Any
    opts: Any                       # cli.Options
    faults: Any
    gpu: bool
    device: int | None
    stage_index: int = 0
    payload: dict | None = None
    deadline: Deadline | None = None
    # the peer a stage is exchanging data with now: if the stage hangs, it is the suspect
    talking_to: int | None = None


def stage_function(name: str):
    """The function a rank runs for stage `name`. Imported when the stage runs: a rank whose numpy or backend does
    not import still reports its inventory, and the import error becomes that stage's error."""
    if name == "inventory":
        from .inventory import probe

        def inv(env: StageEnv):
            node, local = env.topo.rank_to_node(env.rank)
            return probe(env.rank, node, local, env.device, env.topo.has_gpus)
        return inv
    if name == "links":
        from . import links
        return links.run
    from . import ep
    return ep.run_correctness if name == "ep" else ep.run_speed


def run_local(name: str, env: StageEnv, threaded: bool) -> dict[str, Any]:
    """This rank's part of a stage under the stage deadline: {status, value, error, duration_s}."""
    t0 = time.monotonic()
    env.deadline = Deadline(max(0.5, env.opts.stage_timeout - 1.0))
    env.talking_to = None
    out: dict[str, Any] = {"rank": env.rank, "status": "ok", "value": None, "error": None}

    def body():
        if env.gpu and env.device is not None and name != "inventory":
            try:
                import torch
                torch.cuda.set_device(env.device)   # the current device is per thread
            except Exception:
                pass
            try:
                from cuda.core import Device
                Device(env.device).set_current()    # same primary context, for cuda.core / driver calls
            except Exception:
                pass
        return stage_function(name)(env)
    try:
        out["value"] = guarded(body, env.opts.stage_timeout, name, threaded)
    except StageTimeout as e:
        peer = e.waited_on if e.waited_on is not None else env.talking_to
        why = str(e) if peer is None or e.waited_on is not None else f"{e} (stuck talking to rank {peer})"
        out.update(status="timeout", error=why, waited_on=peer)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        out.update(status="error", error=f"{type(e).__name__}: {e}", traceback=tb[-6:])
    out["duration_s"] = round(time.monotonic() - t0, 3)
    return out
