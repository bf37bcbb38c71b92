"""The topology YAML schema (docs/TOPOLOGY.md): which keys exist, what each one accepts, how they combine.

parse() turns a loaded YAML mapping into plain values (epcomm.topology builds its Topology from them) or raises one
EPInputError naming the file and the key: `configs/x.yaml: key 'nodes[1].gpus': duplicate GPU 3 (...)`.
Keys are checked by the tables below (key -> checker); what spans several keys (GPU and rank counts, nodes of one
host, the experts / world size ratio) is checked after them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from epcomm.errors import EPInputError

MPI_CHOICES = ("auto", "openmpi", "mpich")
BACKEND_CHOICES = ("auto", "host", "gpu")
REMOTE_TRANSPORTS = ("ibrc", "ucx", "ibgda", "ibdevx", "libfabric", "none")

# NVSHMEM settings a YAML may give under `nvshmem:` (name -> default).
NVSHMEM_DEFAULTS: dict[str, Any] = {
    "disable_nvls": True,  # NVSHMEM_DISABLE_NVLS=1 (no NVLink multicast), also NCCL / torch multicast off
    "symmetric_size": None,  # NVSHMEM_SYMMETRIC_SIZE, e.g. "2G" or a byte count
    "remote_transport": None,  # NVSHMEM_REMOTE_TRANSPORT: ibrc | ucx | ibgda | libfabric | none
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BYTES = re.compile(r"^\d+[KkMmGgTt]?$")


def _tname(v: Any) -> str:
    return type(v).__name__


class _Checks:
    """The checkers of one file: each takes (key, value) and returns the value to keep, or raises."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, msg: str) -> EPInputError:
        return EPInputError(f"{self.source}: key '{key}': {msg}")

    def int_at_least(self, minimum: int) -> Callable[[str, Any], int]:
        def check(key: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, f"expected an integer, got {_tname(v)} {v!r}")
            if v < minimum:
                raise self.fail(key, f"must be >= {minimum}, got {v}")
            return v
        return check

    def string(self, key: str, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"expected a non-empty string, got {_tname(v)} {v!r}")
        return v

    def boolean(self, key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true/false, got {_tname(v)} {v!r}")
        return v

    def one_of(self, choices: tuple[str, ...]) -> Callable[[str, Any], str]:
        def check(key: str, v: Any) -> str:
            if v not in choices:
                raise self.fail(key, f"must be one of {', '.join(choices)}, got {v!r}")
            return v
        return check

    def mapping(self, key: str, v: Any, what: str = "a mapping") -> dict:
        v = v or {}
        if not isinstance(v, dict):
            raise self.fail(key, f"expected {what}, got {_tname(v)}")
        return v

    def known_keys(self, prefix: str, d: dict, allowed) -> None:
        for k in d:
            if k not in allowed:
                raise self.fail(f"{prefix}{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def byte_count(self, key: str, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v <= 0) \
                or (isinstance(v, str) and not _BYTES.match(v)):
            raise self.fail(key, f"expected a byte count like 1073741824 or '2G', got {v!r}")
        return str(v)

    def env(self, key: str, v: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, val in self.mapping(key, v, "a mapping of environment variables").items():
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise self.fail(f"env.{k}", "not a valid environment variable name")
            if isinstance(val, bool):
                val = "1" if val else "0"
            elif isinstance(val, (int, float, str)):
                val = str(val)
            else:
                raise self.fail(f"env.{k}", f"expected a string or number, got {_tname(val)}")
            out[k] = val
        return out

    def nvshmem(self, key: str, v: Any) -> dict[str, Any]:
        table = {"disable_nvls": self.boolean, "symmetric_size": self.byte_count,
                 "remote_transport": self.one_of(REMOTE_TRANSPORTS)}
        out = dict(NVSHMEM_DEFAULTS)
        for k, val in self.mapping(key, v).items():
            self.known_keys("nvshmem.", {k: val}, table)
            out[k] = table[k](f"nvshmem.{k}", val)
        return out

    def ep(self, key: str, v: Any) -> dict[str, Any]:
        table = {"num_experts": self.int_at_least(1)}
        raw = self.mapping(key, v)
        self.known_keys("ep.", raw, table)
        return {k: table[k](f"ep.{k}", val) for k, val in raw.items()}


def parse(d: Any, source: str) -> dict[str, Any]:
    """The validated content of one topology mapping: name, backend, mpi, nodes [{hostname, gpus, nics, share_gpus}]
    (gpus: the GPU of each local rank, in order), ranks_per_node, env, nvshmem, num_experts."""
    c = _Checks(source)
    top: dict[str, Callable[[str, Any], Any]] = {
        "name": c.string, "backend": c.one_of(BACKEND_CHOICES), "mpi": c.one_of(MPI_CHOICES),
        "gpus_per_node": c.int_at_least(1), "ranks_per_node": c.int_at_least(1), "nodes": lambda k, v: v,
        "env": c.env, "nvshmem": c.nvshmem, "ep": c.ep,
    }
    if not isinstance(d, dict):
        raise EPInputError(f"{source}: key '<top>': expected a mapping, got {_tname(d)}")
    c.known_keys("", d, top)
    v = {k: top[k](k, d[k]) for k in ("name", "backend", "mpi") if k in d}
    if "gpus_per_node" in d and "ranks_per_node" in d:
        raise c.fail("ranks_per_node", "give either gpus_per_node (GPU nodes) or ranks_per_node (host-only nodes), "
                     "not both")
    v.update({k: top[k](k, d[k]) for k in ("gpus_per_node", "ranks_per_node") if k in d})
    default_name = Path(source).stem if source and not source.startswith("<") else "topology"
    nodes, rpn = _nodes(c, d, v.get("gpus_per_node"), v.get("ranks_per_node"))
    backend = v.get("backend", "auto")
    if not nodes[0]["gpus"] and backend == "gpu":
        raise c.fail("backend", "backend 'gpu' needs GPUs (give gpus / gpus_per_node, not ranks_per_node)")
    env = c.env("env", d.get("env"))
    nvshmem = c.nvshmem("nvshmem", d.get("nvshmem"))
    ep = c.ep("ep", d.get("ep"))
    num_experts = ep.get("num_experts")
    world = rpn * len(nodes)
    if num_experts is not None and num_experts % world:
        raise c.fail("ep.num_experts", f"{num_experts} experts not divisible by {world} ranks")
    return {"name": v.get("name", default_name), "backend": backend, "mpi": v.get("mpi", "auto"), "nodes": nodes,
            "ranks_per_node": rpn, "env": env, "nvshmem": nvshmem, "num_experts": num_experts}


NODE_KEYS = ("hostname", "gpus", "nics", "ranks", "share_gpus")


def _nodes(c: _Checks, d: dict, gpus_per_node: int | None, rpn_given: int | None) -> tuple[list[dict], int]:
    """Every node checked on its own, then together: equal rank counts, GPUs on all or none, GPUs of one host."""
    if "nodes" not in d:
        raise c.fail("nodes", "missing (a list of nodes)")
    raw_nodes = d["nodes"]
    if not isinstance(raw_nodes, list):
        raise c.fail("nodes", f"expected a list of nodes, got {_tname(raw_nodes)}")
    if not raw_nodes:
        raise c.fail("nodes", "empty node list (need at least one node)")
    nodes: list[dict] = []
    counts: list[int] = []
    for i, rn in enumerate(raw_nodes):
        node, nranks = _node(c, f"nodes[{i}]", rn, gpus_per_node, rpn_given, nodes)
        nodes.append(node)
        counts.append(nranks)
    has_gpus = [bool(n["gpus"]) for n in nodes]
    if any(has_gpus) and not all(has_gpus):
        raise c.fail(f"nodes[{has_gpus.index(False)}].gpus", "missing: some nodes list GPUs and this one does not")
    for i, nr in enumerate(counts):
        if nr != counts[0]:
            what = "GPUs" if has_gpus[0] else "ranks"
            raise c.fail(f"nodes[{i}].gpus" if has_gpus[0] else f"nodes[{i}].ranks",
                         f"{nr} {what} but nodes[0] has {counts[0]} (every node needs the same count)")
    return nodes, counts[0]


def _node(c: _Checks, key: str, rn: Any, gpus_per_node: int | None, rpn_given: int | None,
          earlier: list[dict]) -> tuple[dict, int]:
    if isinstance(rn, str):
        rn = {"hostname": rn}
    if not isinstance(rn, dict):
        raise c.fail(key, f"expected a mapping or a hostname string, got {_tname(rn)}")
    c.known_keys(f"{key}.", rn, NODE_KEYS)
    if "hostname" not in rn:
        raise c.fail(f"{key}.hostname", "missing")
    host = c.string(f"{key}.hostname", rn["hostname"])
    seen = [n["hostname"] for n in earlier]
    if seen and host in seen and seen[-1] != host:
        raise c.fail(f"{key}.hostname", f"host {host!r} appears again after other hosts; "
                     "nodes on one host must be listed consecutively (ranks are mapped node by node)")
    share = c.boolean(f"{key}.share_gpus", rn.get("share_gpus", False))

    gpus: list[int] = []
    if "gpus" in rn:
        if rpn_given is not None:
            raise c.fail(f"{key}.gpus", "GPUs listed in a host-only topology (ranks_per_node given)")
        raw_gpus = rn["gpus"]
        if not isinstance(raw_gpus, list) or not raw_gpus:
            raise c.fail(f"{key}.gpus", f"expected a non-empty list of GPU indices, got {raw_gpus!r}")
        for j, g in enumerate(raw_gpus):
            c.int_at_least(0)(f"{key}.gpus[{j}]", g)
            if g in gpus and not share:
                raise c.fail(f"{key}.gpus", f"duplicate GPU {g} (each GPU runs exactly one rank; "
                             "`share_gpus: true` on the node puts several ranks on one GPU)")
            gpus.append(g)
    elif gpus_per_node is not None:
        gpus = list(range(gpus_per_node))
    elif share:
        raise c.fail(f"{key}.share_gpus", "this node has no GPUs to share")
    if gpus_per_node is not None and len(gpus) != gpus_per_node:
        raise c.fail(f"{key}.gpus", f"{len(gpus)} GPUs listed but gpus_per_node is {gpus_per_node}")

    if "ranks" in rn:
        r = c.int_at_least(1)(f"{key}.ranks", rn["ranks"])
        if gpus and share:
            if r % len(gpus):
                raise c.fail(f"{key}.ranks", f"{r} ranks cannot be spread evenly over {len(gpus)} GPUs")
            # ranks in blocks over the listed GPUs: ranks 8, gpus [0, 1] -> local ranks 0-3 on GPU 0, 4-7 on 1
            gpus = [g for g in gpus for _ in range(r // len(gpus))]
        elif gpus and r != len(gpus):
            raise c.fail(f"{key}.ranks", f"{r} ranks but {len(gpus)} GPUs (one rank per GPU; "
                         "`share_gpus: true` puts several ranks on one GPU)")
        if rpn_given is not None and r != rpn_given:
            raise c.fail(f"{key}.ranks", f"{r} ranks but ranks_per_node is {rpn_given}")
        nranks = r
    elif gpus:
        nranks = len(gpus)
    elif rpn_given is not None:
        nranks = rpn_given
    else:
        raise c.fail(key, "no GPUs and no rank count (give gpus / gpus_per_node, or ranks_per_node)")

    nics = None
    if "nics" in rn:
        raw_nics = rn["nics"]
        if not gpus:
            raise c.fail(f"{key}.nics", "NICs are given per GPU; this node has no GPUs")
        if not isinstance(raw_nics, list):
            raise c.fail(f"{key}.nics", f"expected a list of NIC names (one per GPU), got {_tname(raw_nics)}")
        if len(raw_nics) != len(gpus):
            raise c.fail(f"{key}.nics", f"{len(raw_nics)} NICs for {len(gpus)} GPUs (need one per GPU)")
        nics = [c.string(f"{key}.nics[{j}]", n) for j, n in enumerate(raw_nics)]
    # a GPU of this host already used by an earlier (simulated) node: only when both nodes allow sharing
    for j, prev in enumerate(earlier):
        if prev["hostname"] != host or not gpus:
            continue
        common = sorted(set(prev["gpus"]) & set(gpus))
        if common and not (share and prev["share_gpus"]):
            raise c.fail(f"{key}.gpus", f"GPU {common[0]} of host {host!r} is also used by nodes[{j}] (each GPU "
                         "runs exactly one rank; `share_gpus: true` on both nodes puts several ranks on one GPU)")
    return {"hostname": host, "gpus": gpus, "nics": nics, "share_gpus": share}, nranks
