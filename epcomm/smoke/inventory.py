"""What one rank reports about itself: host, CPU, versions, and on GPU topologies its GPU.

Every probe is defensive: a missing tool or package gives None (or an "error" entry), never an exception.
"""
from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from typing import Any


def _pkg_version(*names: str) -> str | None:
    from importlib import metadata
    for n in names:
        try:
            return metadata.version(n)
        except Exception:  # PackageNotFoundError or a broken dist
            continue
    return None


def _mpi_versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import mpi4py
        from mpi4py import MPI
        out["mpi4py"] = mpi4py.__version__
        lib = MPI.Get_library_version().strip().splitlines()[0]
        out["mpi_library"] = lib.split(",")[0].strip()
        out["mpi_standard"] = "%d.%d" % MPI.Get_version()
    except Exception as e:  # pragma: no cover
        out["mpi_error"] = repr(e)
    return out


def nvidia_smi() -> tuple[list[dict[str, str]] | None, str | None]:
    """GPUs as nvidia-smi lists them (index, name, uuid, driver, pci, memory MiB), or (None, why)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, "nvidia-smi not found"
    fields = ("index", "name", "uuid", "driver_version", "pci.bus_id", "memory.total")
    try:
        p = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed: {e}"
    if p.returncode != 0:
        return None, f"nvidia-smi exit {p.returncode}: {(p.stderr or p.stdout).strip()[:200]}"
    gpus = []
    for line in p.stdout.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) >= len(fields):
            gpus.append(dict(zip(("index", "name", "uuid", "driver", "pci", "memory_mib"), cols)))
    return gpus, None


def norm_uuid(u: Any) -> str | None:
    if u is None:
        return None
    s = str(u).strip().lower()
    return s[4:] if s.startswith("gpu-") else s


def gpu_probe(device: int | None) -> dict[str, Any]:
    """The rank's GPU: name, UUID, driver, CUDA, count; present=False with an error when it is not there."""
    g: dict[str, Any] = {"present": False, "device": device}
    smi, smi_err = nvidia_smi()
    if smi is not None:
        g["device_count"] = len(smi)
        g["smi"] = smi
        if smi:
            g["driver"] = smi[0].get("driver")
    else:
        g["smi_error"] = smi_err
    try:
        import torch
        g["torch"] = torch.__version__
        g["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            g["torch_device_count"] = n
            g.setdefault("device_count", n)
            if device is not None and 0 <= device < n:
                p = torch.cuda.get_device_properties(device)
                g.update(present=True, name=p.name, capability=f"{p.major}.{p.minor}",
                         memory_gib=round(p.total_memory / 2**30, 1))
                u = getattr(p, "uuid", None)
                if u is not None:
                    g["uuid"] = norm_uuid(u)
        else:
            g["error"] = "torch.cuda.is_available() is False"
    except Exception as e:
        g["torch_error"] = f"{type(e).__name__}: {e}"
    if not g["present"] and smi and device is not None and 0 <= device < len(smi):
        # no usable torch: take nvidia-smi's view (its numbering is PCI order)
        s = smi[device]
        g.update(present=True, name=s.get("name"), uuid=norm_uuid(s.get("uuid")), source="nvidia-smi")
    if g["present"] and smi and g.get("uuid"):
        match = [s for s in smi if norm_uuid(s.get("uuid")) == g["uuid"]]
        if match:
            g["smi_index"] = match[0].get("index")
            g["pci"] = match[0].get("pci")
    if g["present"] and "error" in g:
        g.pop("error")
    if not g["present"] and "error" not in g:
        g["error"] = g.get("torch_error") or g.get("smi_error") or f"device {device} not among " \
                                                                     f"{g.get('device_count', 0)} GPU(s)"
    try:  # driver CUDA version through cuda-bindings (optional)
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            from cuda import cuda as cu  # older cuda-python
        cu.cuInit(0)
        err, v = cu.cuDriverGetVersion()
        if int(err) == 0:
            g["driver_cuda"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        pass
    g["nvshmem"] = _pkg_version("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12")
    g["nvshmem4py"] = _pkg_version("nvshmem4py-cu13", "nvshmem4py-cu12", "nvshmem4py")
    if g["nvshmem4py"] is None:
        try:
            import nvshmem  # noqa: F401
            g["nvshmem4py"] = getattr(nvshmem, "__version__", "present")
        except Exception:
            pass
    return g


def probe(rank: int, node: int, local_rank: int, device: int | None, want_gpu: bool) -> dict[str, Any]:
    """This rank's inventory record (see docs/SMOKE.md, stages.inventory.per_rank)."""
    import numpy
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    info: dict[str, Any] = {
        "rank": rank, "node": node, "local_rank": local_rank, "device": device,
        "hostname": socket.gethostname(), "pid": os.getpid(), "cores": cores,
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
    versions: dict[str, Any] = {"python": platform.python_version(), "numpy": numpy.__version__}
    versions.update({k: v for k, v in _mpi_versions().items() if k in ("mpi4py", "mpi_library")})
    info["executable"] = sys.executable
    if want_gpu:
        g = gpu_probe(device)
        info["gpu"] = g
        for k in ("torch", "cuda", "driver", "nvshmem", "nvshmem4py"):
            if g.get(k) is not None:
                versions[k] = g[k]
        if g.get("name"):
            versions["gpu_name"] = g["name"]
    info["versions"] = versions
    return info
