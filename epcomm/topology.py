"""Cluster topology: which ranks run on which node, and which GPU / NIC each rank uses.

A topology comes from a YAML file (schema in docs/TOPOLOGY.md) or from ``Topology.single_node``.
Ranks are laid out node by node: ``rank = node * ranks_per_node + local_rank``.

The launcher (``python -m launch``) exports ``EPCOMM_TOPOLOGY=<absolute yaml path>`` plus per-rank
``EPCOMM_NODE`` / ``EPCOMM_LOCAL_RANK``; ``Topology.from_env()`` reads the topology back inside a rank.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epcomm.errors import EPInputError

MPI_CHOICES = ("auto", "openmpi", "mpich")
BACKEND_CHOICES = ("auto", "host", "gpu")

# NVSHMEM settings a YAML may give under `nvshmem:` (name -> (type, default)).
NVSHMEM_DEFAULTS: dict[str, Any] = {
    "disable_nvls": True,  # NVSHMEM_DISABLE_NVLS=1 (no NVLink multicast), also NCCL / torch multicast off
    "symmetric_size": None,  # NVSHMEM_SYMMETRIC_SIZE, e.g. "2G" or a byte count
    "remote_transport": None,  # NVSHMEM_REMOTE_TRANSPORT: ibrc | ucx | ibgda | libfabric | none
}

_TOP_KEYS = {"name", "backend", "mpi", "nodes", "gpus_per_node", "ranks_per_node", "env", "nvshmem", "ep"}
_NODE_KEYS = {"hostname", "gpus", "nics", "ranks", "share_gpus"}
_EP_KEYS = {"num_experts"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Node:
    hostname: str
    gpus: list[int] = field(default_factory=list)  # GPU of each local rank, in order; empty for host-only nodes
    nics: list[str] | None = None  # one NIC per rank (same order), or None
    share_gpus: bool = False  # the YAML allowed several ranks on one GPU (a GPU index may repeat in `gpus`)

    @property
    def is_local(self) -> bool:
        return is_local_host(self.hostname)


def is_local_host(hostname: str) -> bool:
    import socket

    return hostname in _LOCAL_NAMES or hostname in (socket.gethostname(), socket.getfqdn())


@dataclass
class Topology:
    name: str
    nodes: list[Node]
    ranks_per_node: int
    mpi: str = "auto"
    backend: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    nvshmem: dict[str, Any] = field(default_factory=lambda: dict(NVSHMEM_DEFAULTS))
    num_experts: int | None = None
    source: str | None = None  # absolute path of the YAML it came from, if any

    # ---- queries -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.ranks_per_node

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def has_gpus(self) -> bool:
        return bool(self.nodes[0].gpus)

    @property
    def hostnames(self) -> list[str]:
        """Hostname of every node, in node order (a host may repeat: simulated nodes)."""
        return [n.hostname for n in self.nodes]

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise EPInputError(f"{self.name}: rank {rank!r} out of range [0, {self.world_size})")

    def rank_to_node(self, rank: int) -> tuple[int, int]:
        """(node index, local rank) of a global rank."""
        self._check_rank(rank)
        return divmod(rank, self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return self.rank_to_node(rank)[0]

    def local_rank(self, rank: int) -> int:
        return self.rank_to_node(rank)[1]

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def node_ranks(self, node: int) -> list[int]:
        if not 0 <= node < len(self.nodes):
            raise EPInputError(f"{self.name}: node {node!r} out of range [0, {len(self.nodes)})")
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def host_of(self, rank: int) -> str:
        return self.nodes[self.node_of(rank)].hostname

    def device(self, rank: int) -> int | None:
        """GPU index (as the node's driver numbers it, all GPUs visible) of a rank; None on host-only nodes."""
        node, local = self.rank_to_node(rank)
        gpus = self.nodes[node].gpus
        return gpus[local] if gpus else None

    def nic(self, rank: int) -> str | None:
        node, local = self.rank_to_node(rank)
        nics = self.nodes[node].nics
        return nics[local] if nics else None

    def host_slots(self) -> list[tuple[str, int]]:
        """Consecutive nodes on one host merged: [(hostname, ranks on it)], in rank order."""
        out: list[tuple[str, int]] = []
        for n in self.nodes:
            if out and out[-1][0] == n.hostname:
                out[-1] = (n.hostname, out[-1][1] + self.ranks_per_node)
            else:
                out.append((n.hostname, self.ranks_per_node))
        return out

    def rank_table(self) -> list[dict[str, Any]]:
        rows = []
        for r in range(self.world_size):
            node, local = self.rank_to_node(r)
            rows.append({"rank": r, "host": self.nodes[node].hostname, "node": node, "local_rank": local,
                         "device": self.device(r), "nic": self.nic(r), "gpu_shared_by": self.ranks_per_gpu(r)})
        return rows

    # ---- GPU sharing (several ranks on one GPU: `share_gpus: true`) ------------------------------------------
    def gpu_peers(self, rank: int) -> list[int]:
        """Ranks that run on the same GPU as `rank` (itself included): same host, same device index. [rank] on
        host-only topologies and whenever every rank has its own GPU."""
        dev = self.device(rank)
        if dev is None:
            return [rank]
        host = self.host_of(rank)
        return [r for r in range(self.world_size) if self.device(r) == dev and self.host_of(r) == host]

    def ranks_per_gpu(self, rank: int) -> int:
        """How many ranks (processes) share `rank`'s GPU: they run concurrently (MPS) or time-slice it, so each
        one's persistent kernels may count on 1/n of the GPU's SMs at most."""
        return len(self.gpu_peers(rank))

    def shared_gpus(self) -> list[tuple[str, int, list[int]]]:
        """[(host, GPU index, ranks on it)] for every GPU that carries more than one rank, in rank order."""
        out: list[tuple[str, int, list[int]]] = []
        seen: set[tuple[str, int]] = set()
        for r in range(self.world_size):
            dev = self.device(r)
            if dev is None or (self.host_of(r), dev) in seen:
                continue
            seen.add((self.host_of(r), dev))
            peers = self.gpu_peers(r)
            if len(peers) > 1:
                out.append((self.host_of(r), dev, peers))
        return out

    @property
    def shares_gpus(self) -> bool:
        """True when some GPU carries several ranks: timings there are not link figures (docs/TOPOLOGY.md)."""
        return bool(self.shared_gpus())

    def sharing_lines(self) -> list[str]:
        """One line per shared GPU, e.g. 'GPU 0 on localhost shared by ranks 0-3 (4 ranks)'."""
        return [f"GPU {dev} on {host} shared by ranks {rank_ranges(ranks)} ({len(ranks)} ranks)"
                for host, dev, ranks in self.shared_gpus()]

    def resolved_backend(self, gpus_available: bool | None = None) -> str:
        """'host' or 'gpu'. 'auto' picks gpu when the topology names GPUs and GPUs are available."""
        if self.backend != "auto":
            return self.backend
        if not self.has_gpus:
            return "host"
        if gpus_available is None:
            gpus_available = bool(os.environ.get("EPCOMM_FORCE_GPU")) or count_local_gpus() >= 1
        return "gpu" if gpus_available else "host"

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def single_node(cls, nranks: int, *, backend: str = "host", gpus: list[int] | None = None,
                    name: str | None = None) -> "Topology":
        """One node on localhost with `nranks` ranks (used when no YAML is given)."""
        if not isinstance(nranks, int) or isinstance(nranks, bool) or nranks < 1:
            raise EPInputError(f"single_node: nranks must be a positive int, got {nranks!r}")
        if gpus is not None and len(gpus) != nranks:
            raise EPInputError(f"single_node: {len(gpus)} GPUs given for {nranks} ranks")
        d: dict[str, Any] = {"name": name or f"single-{nranks}", "backend": backend,
                             "nodes": [{"hostname": "localhost"}]}
        if gpus is None:
            d["ranks_per_node"] = nranks
        else:
            d["nodes"][0]["gpus"] = list(gpus)
        return cls.from_dict(d, source="<single_node>")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Topology":
        import yaml

        p = Path(path)
        label = str(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise EPInputError(f"{label}: cannot read topology file ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise EPInputError(f"{label}:{where} invalid YAML ({problem})") from None
        topo = cls.from_dict(data, source=label)
        topo.source = str(p.resolve())
        return topo

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> "Topology":
        return _parse(d, source)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Topology | None":
        """The topology the launcher set (EPCOMM_TOPOLOGY: YAML path or inline JSON), or None."""
        env = os.environ if environ is None else environ
        val = env.get("EPCOMM_TOPOLOGY")
        if not val:
            return None
        if val.lstrip().startswith("{"):
            return cls.from_json(val)
        return cls.load(val)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "backend": self.backend, "mpi": self.mpi}
        if self.has_gpus:
            d["nodes"] = [{"hostname": n.hostname, "gpus": list(n.gpus),
                           **({"nics": list(n.nics)} if n.nics else {}),
                           **({"share_gpus": True} if n.share_gpus else {})} for n in self.nodes]
        else:
            d["ranks_per_node"] = self.ranks_per_node
            d["nodes"] = [{"hostname": n.hostname} for n in self.nodes]
        if self.env:
            d["env"] = dict(self.env)
        d["nvshmem"] = {k: v for k, v in self.nvshmem.items() if v is not None}
        if self.num_experts is not None:
            d["ep"] = {"num_experts": self.num_experts}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """16 hex digits of the topology's content (not of its file's layout or comments): the launcher's copy and a
        rank's copy on another host must agree, or the ranks would disagree on GPUs, NICs and nodes."""
        import hashlib
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, s: str) -> "Topology":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise EPInputError(f"<json>: invalid topology JSON ({e.msg})") from None
        return cls.from_dict(d, source="<json>")


def count_local_gpus() -> int:
    """GPUs listed by `nvidia-smi -L` (0 when it is missing or fails)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> '0-3, 6'."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- parsing / validation --------------------------------------------------------------------------
def _tname(v: Any) -> str:
    return type(v).__name__


def _parse(d: Any, source: str) -> Topology:
    def fail(key: str, msg: str) -> EPInputError:
        return EPInputError(f"{source}: key '{key}': {msg}")

    def want_int(key: str, v: Any, minimum: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise fail(key, f"expected an integer, got {_tname(v)} {v!r}")
        if v < minimum:
            raise fail(key, f"must be >= {minimum}, got {v}")
        return v

    def want_str(key: str, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise fail(key, f"expected a non-empty string, got {_tname(v)} {v!r}")
        return v

    if not isinstance(d, dict):
        raise EPInputError(f"{source}: key '<top>': expected a mapping, got {_tname(d)}")
    for k in d:
        if k not in _TOP_KEYS:
            raise fail(str(k), f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")

    default_name = Path(source).stem if source and not source.startswith("<") else "topology"
    name = want_str("name", d["name"]) if "name" in d else default_name

    backend = d.get("backend", "auto")
    if backend not in BACKEND_CHOICES:
        raise fail("backend", f"must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    mpi = d.get("mpi", "auto")
    if mpi not in MPI_CHOICES:
        raise fail("mpi", f"must be one of {', '.join(MPI_CHOICES)}, got {mpi!r}")

    if "gpus_per_node" in d and "ranks_per_node" in d:
        raise fail("ranks_per_node", "give either gpus_per_node (GPU nodes) or ranks_per_node (host-only nodes), not both")
    gpus_per_node = want_int("gpus_per_node", d["gpus_per_node"], 1) if "gpus_per_node" in d else None
    rpn_given = want_int("ranks_per_node", d["ranks_per_node"], 1) if "ranks_per_node" in d else None

    if "nodes" not in d:
        raise fail("nodes", "missing (a list of nodes)")
    raw_nodes = d["nodes"]
    if not isinstance(raw_nodes, list):
        raise fail("nodes", f"expected a list of nodes, got {_tname(raw_nodes)}")
    if not raw_nodes:
        raise fail("nodes", "empty node list (need at least one node)")

    nodes: list[Node] = []
    node_ranks: list[int] = []
    seen_hosts: list[str] = []
    for i, rn in enumerate(raw_nodes):
        key = f"nodes[{i}]"
        if isinstance(rn, str):
            rn = {"hostname": rn}
        if not isinstance(rn, dict):
            raise fail(key, f"expected a mapping or a hostname string, got {_tname(rn)}")
        for k in rn:
            if k not in _NODE_KEYS:
                raise fail(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(_NODE_KEYS))})")
        if "hostname" not in rn:
            raise fail(f"{key}.hostname", "missing")
        host = want_str(f"{key}.hostname", rn["hostname"])
        if seen_hosts and host in seen_hosts and seen_hosts[-1] != host:
            raise fail(f"{key}.hostname", f"host {host!r} appears again after other hosts; "
                       "nodes on one host must be listed consecutively (ranks are mapped node by node)")
        seen_hosts.append(host)

        share = rn.get("share_gpus", False)
        if not isinstance(share, bool):
            raise fail(f"{key}.share_gpus", f"expected true/false, got {_tname(share)} {share!r}")
        gpus: list[int] = []
        if "gpus" in rn:
            if rpn_given is not None:
                raise fail(f"{key}.gpus", "GPUs listed in a host-only topology (ranks_per_node given)")
            raw_gpus = rn["gpus"]
            if not isinstance(raw_gpus, list) or not raw_gpus:
                raise fail(f"{key}.gpus", f"expected a non-empty list of GPU indices, got {raw_gpus!r}")
            for j, g in enumerate(raw_gpus):
                want_int(f"{key}.gpus[{j}]", g, 0)
                if g in gpus and not share:
                    raise fail(f"{key}.gpus", f"duplicate GPU {g} (each GPU runs exactly one rank; "
                               "`share_gpus: true` on the node puts several ranks on one GPU)")
                gpus.append(g)
        elif gpus_per_node is not None:
            gpus = list(range(gpus_per_node))
        elif share:
            raise fail(f"{key}.share_gpus", "this node has no GPUs to share")
        if gpus_per_node is not None and len(gpus) != gpus_per_node:
            raise fail(f"{key}.gpus", f"{len(gpus)} GPUs listed but gpus_per_node is {gpus_per_node}")

        if "ranks" in rn:
            r = want_int(f"{key}.ranks", rn["ranks"], 1)
            if gpus and share:
                if r % len(gpus):
                    raise fail(f"{key}.ranks", f"{r} ranks cannot be spread evenly over {len(gpus)} GPUs")
                # ranks in blocks over the listed GPUs: ranks 8, gpus [0, 1] -> local ranks 0-3 on GPU 0, 4-7 on 1
                gpus = [g for g in gpus for _ in range(r // len(gpus))]
            elif gpus and r != len(gpus):
                raise fail(f"{key}.ranks", f"{r} ranks but {len(gpus)} GPUs (one rank per GPU; "
                           "`share_gpus: true` puts several ranks on one GPU)")
            if rpn_given is not None and r != rpn_given:
                raise fail(f"{key}.ranks", f"{r} ranks but ranks_per_node is {rpn_given}")
            nranks = r
        elif gpus:
            nranks = len(gpus)
        elif rpn_given is not None:
            nranks = rpn_given
        else:
            raise fail(key, "no GPUs and no rank count (give gpus / gpus_per_node, or ranks_per_node)")

        nics = None
        if "nics" in rn:
            raw_nics = rn["nics"]
            if not gpus:
                raise fail(f"{key}.nics", "NICs are given per GPU; this node has no GPUs")
            if not isinstance(raw_nics, list):
                raise fail(f"{key}.nics", f"expected a list of NIC names (one per GPU), got {_tname(raw_nics)}")
            if len(raw_nics) != len(gpus):
                raise fail(f"{key}.nics", f"{len(raw_nics)} NICs for {len(gpus)} GPUs (need one per GPU)")
            nics = [want_str(f"{key}.nics[{j}]", n) for j, n in enumerate(raw_nics)]
        # a GPU of this host already used by an earlier (simulated) node: only when both nodes allow sharing
        for j, prev in enumerate(nodes):
            if prev.hostname != host or not gpus:
                continue
            common = sorted(set(prev.gpus) & set(gpus))
            if common and not (share and prev.share_gpus):
                raise fail(f"{key}.gpus", f"GPU {common[0]} of host {host!r} is also used by nodes[{j}] (each GPU "
                           "runs exactly one rank; `share_gpus: true` on both nodes puts several ranks on one GPU)")
        nodes.append(Node(hostname=host, gpus=gpus, nics=nics, share_gpus=share))
        node_ranks.append(nranks)

    has_gpus = [bool(n.gpus) for n in nodes]
    if any(has_gpus) and not all(has_gpus):
        i = has_gpus.index(False)
        raise fail(f"nodes[{i}].gpus", "missing: some nodes list GPUs and this one does not")
    for i, nr in enumerate(node_ranks):
        if nr != node_ranks[0]:
            what = "GPUs" if has_gpus[0] else "ranks"
            raise fail(f"nodes[{i}].gpus" if has_gpus[0] else f"nodes[{i}].ranks",
                       f"{nr} {what} but nodes[0] has {node_ranks[0]} (every node needs the same count)")
    rpn = node_ranks[0]
    if not has_gpus[0] and backend == "gpu":
        raise fail("backend", "backend 'gpu' needs GPUs (give gpus / gpus_per_node, not ranks_per_node)")

    env_raw = d.get("env", {}) or {}
    if not isinstance(env_raw, dict):
        raise fail("env", f"expected a mapping of environment variables, got {_tname(env_raw)}")
    env: dict[str, str] = {}
    for k, v in env_raw.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise fail(f"env.{k}", "not a valid environment variable name")
        if isinstance(v, bool):
            v = "1" if v else "0"
        elif isinstance(v, (int, float, str)):
            v = str(v)
        else:
            raise fail(f"env.{k}", f"expected a string or number, got {_tname(v)}")
        env[k] = v

    nv_raw = d.get("nvshmem", {}) or {}
    if not isinstance(nv_raw, dict):
        raise fail("nvshmem", f"expected a mapping, got {_tname(nv_raw)}")
    nvshmem = dict(NVSHMEM_DEFAULTS)
    for k, v in nv_raw.items():
        if k not in NVSHMEM_DEFAULTS:
            raise fail(f"nvshmem.{k}", f"unknown key (allowed: {', '.join(sorted(NVSHMEM_DEFAULTS))})")
        if k == "disable_nvls":
            if not isinstance(v, bool):
                raise fail(f"nvshmem.{k}", f"expected true/false, got {_tname(v)} {v!r}")
        elif k == "symmetric_size":
            if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v <= 0) \
                    or (isinstance(v, str) and not re.match(r"^\d+[KkMmGgTt]?$", v)):
                raise fail(f"nvshmem.{k}", f"expected a byte count like 1073741824 or '2G', got {v!r}")
            v = str(v)
        elif k == "remote_transport":
            choices = ("ibrc", "ucx", "ibgda", "ibdevx", "libfabric", "none")
            if v not in choices:
                raise fail(f"nvshmem.{k}", f"must be one of {', '.join(choices)}, got {v!r}")
        nvshmem[k] = v

    ep_raw = d.get("ep", {}) or {}
    if not isinstance(ep_raw, dict):
        raise fail("ep", f"expected a mapping, got {_tname(ep_raw)}")
    for k in ep_raw:
        if k not in _EP_KEYS:
            raise fail(f"ep.{k}", f"unknown key (allowed: {', '.join(sorted(_EP_KEYS))})")
    num_experts = None
    if "num_experts" in ep_raw:
        num_experts = want_int("ep.num_experts", ep_raw["num_experts"], 1)
        world = rpn * len(nodes)
        if num_experts % world:
            raise fail("ep.num_experts", f"{num_experts} experts not divisible by {world} ranks")

    return Topology(name=name, nodes=nodes, ranks_per_node=rpn, mpi=mpi, backend=backend, env=env,
                    nvshmem=nvshmem, num_experts=num_experts, source=None if source.startswith("<") else source)
