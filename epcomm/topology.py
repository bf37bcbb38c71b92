"""Cluster topology: which ranks run on which node, and which GPU / NIC each rank uses.

A topology comes from a YAML file (schema in docs/TOPOLOGY.md) or from ``Topology.single_node``.
Ranks are laid out node by node: ``rank = node * ranks_per_node + local_rank``.

The launcher (``python -m launch``) exports ``EPCOMM_TOPOLOGY=<absolute yaml path>`` plus per-rank
``EPCOMM_NODE`` / ``EPCOMM_LOCAL_RANK``; ``Topology.from_env()`` reads the topology back inside a rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epcomm import topology_schema
from epcomm.errors import EPInputError
from epcomm.topology_schema import BACKEND_CHOICES, MPI_CHOICES, NVSHMEM_DEFAULTS  # noqa: F401 - re-exported

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


# ---- parsing / validation: epcomm/topology_schema.py -----------------------------------------------------------
def _parse(d: Any, source: str) -> Topology:
    v = topology_schema.parse(d, source)
    nodes = [Node(hostname=n["hostname"], gpus=n["gpus"], nics=n["nics"], share_gpus=n["share_gpus"])
             for n in v["nodes"]]
    return Topology(name=v["name"], nodes=nodes, ranks_per_node=v["ranks_per_node"], mpi=v["mpi"],
                    backend=v["backend"], env=v["env"], nvshmem=v["nvshmem"], num_experts=v["num_experts"],
                    source=None if source.startswith("<") else source)
