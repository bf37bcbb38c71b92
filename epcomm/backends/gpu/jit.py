"""Build the CUDA kernels of epcomm for one EPConfig and load them.

Sources: epcomm/backends/gpu/kernels/ (ep.cu, the entry points, includes the *.cuh parts), specialised by -D defines
(hidden, topk, experts, ranks, max tokens, format, mode, fused shared expert, skip_a2a, allreduce world size, block
size) plus every size derived from them (layout.kernel_defines), which the kernels static_assert against their own
derivation. Build: ``nvcc -rdc=true -c`` then
``nvcc -dlink -cubin`` against ``libnvshmem_device.a`` of the nvidia-nvshmem-cu13 wheel. The cubin is cached on disk
(``$EPCOMM_CACHE`` or ``~/.cache/epcomm``) under a key made of the source hash, the defines, the arch, the nvcc version
and the NVSHMEM version (a cubin must match the NVSHMEM host library it runs with).

Compiling needs no GPU (the CPU test tests/unit/test_kernels_compile.py does it); loading needs cuda.core + a driver.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import variants
from .layout import kernel_defines

log = logging.getLogger("epcomm.jit")

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
MAIN_SOURCE = "ep.cu"                       # the translation unit; it includes the other files of KERNEL_DIR


def sources(kernel_dir: Path | None = None) -> list[Path]:
    """Every kernel source file (ep.cu and the .cuh parts it includes), in name order."""
    d = kernel_dir or KERNEL_DIR
    return sorted(p for p in d.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
DEFAULT_THREADS = 512


class BuildError(RuntimeError):
    pass


def defines_for(cfg, threads: int = DEFAULT_THREADS, variant_names=None) -> dict[str, int]:
    """The -D defines that specialise the kernels for an EPConfig: the shape, then the sizes derived from it, then
    the kernel variants under measurement (variants.py: $EPCOMM_VARIANT unless `variant_names` is given)."""
    shape = {
        "EP_H": cfg.hidden, "EP_K": cfg.topk, "EP_E": cfg.num_experts, "EP_R": cfg.world_size,
        "EP_M": cfg.max_tokens_per_rank, "EP_HT": int(cfg.mode == "ht"),
        "EP_FUSED": int(cfg.fused_shared_expert), "EP_SKIP": int(cfg.skip_a2a), "EP_ARW": cfg.allreduce_world_size,
        "EP_THREADS": threads, **cfg.token_format.kernel_define, "EP_UE8M0": int(cfg.scale_format == "ue8m0"),
        "EP_ROW_ALIGN": cfg.expert_alignment, "EP_BATCHED": int(cfg.layout == "batched"),
        "EP_CAP": cfg.batched_capacity if cfg.layout == "batched" else 0,
        "EP_COL_SCALES": int(cfg.scale_layout == "col"),
    }
    return {**shape, **kernel_defines(cfg), **variants.defines(variant_names)}


def _pkg_dir(name: str) -> Path | None:
    try:
        import importlib
        mod = importlib.import_module(name)
    except Exception:
        return None
    paths = list(getattr(mod, "__path__", []))
    return Path(paths[0]) if paths else None


def nvshmem_home() -> Path:
    """Folder with include/nvshmem.h and lib/libnvshmem_device.a (env NVSHMEM_HOME, else the nvidia-nvshmem wheel)."""
    cands = []
    if os.environ.get("NVSHMEM_HOME"):
        cands.append(Path(os.environ["NVSHMEM_HOME"]))
    d = _pkg_dir("nvidia.nvshmem")
    if d:
        cands.append(d)
    for c in cands:
        if (c / "include" / "nvshmem.h").exists() and (c / "lib" / "libnvshmem_device.a").exists():
            return c
    raise BuildError("NVSHMEM headers / libnvshmem_device.a not found: pip install nvidia-nvshmem-cu13 "
                     "(or set NVSHMEM_HOME)")


def nvshmem_version(home: Path | None = None) -> str:
    home = home or nvshmem_home()
    hdr = home / "include" / "non_abi" / "nvshmem_version.h"
    if hdr.exists():
        vals = {}
        for line in hdr.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith("NVSHMEM_VENDOR_") and \
                    parts[1].endswith("_VERSION") and parts[2].isdigit():
                vals[parts[1]] = parts[2]
        if vals:
            return ".".join(vals.get(f"NVSHMEM_VENDOR_{k}_VERSION", "0") for k in ("MAJOR", "MINOR", "PATCH"))
    return hashlib.sha256((home / "lib" / "libnvshmem_device.a").read_bytes()[:1 << 20]).hexdigest()[:12]


def find_nvcc() -> str:
    """nvcc to use: $EPCOMM_NVCC, the system toolkit (PATH, $CUDA_HOME, /usr/local/cuda), else the pip wheel
    nvidia-cuda-nvcc. The system one first because it matches the machine's driver."""
    if os.environ.get("EPCOMM_NVCC"):
        return os.environ["EPCOMM_NVCC"]
    for c in (shutil.which("nvcc"),
              os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.exists(c):
            return c
    d = _pkg_dir("nvidia.cu13")
    if d and (d / "bin" / "nvcc").exists():
        return str(d / "bin" / "nvcc")
    d = _pkg_dir("nvidia.cuda_nvcc")
    if d and (d / "bin" / "nvcc").exists():
        return str(d / "bin" / "nvcc")
    raise BuildError("nvcc not found: install the CUDA toolkit or `pip install nvidia-cuda-nvcc` (cu13)")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def cache_dir() -> Path:
    d = Path(os.environ.get("EPCOMM_CACHE", Path.home() / ".cache" / "epcomm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_hash() -> str:
    """sha256 over the names and contents of every kernel source file (the cache key's and provenance's)."""
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class Built:
    cubin: Path
    key: str
    seconds: float
    cached: bool


def build(defines: dict[str, int], arch: str = "sm_90", *, use_cache: bool = True) -> Built:
    """Compile the kernels with these defines into a relocatable-linked cubin (cached). Needs no GPU."""
    t0 = time.perf_counter()
    nvcc = find_nvcc()
    home = nvshmem_home()
    key_src = repr((source_hash(), sorted(defines.items()), arch, _nvcc_version(nvcc), nvshmem_version(home)))
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    out = cache_dir() / f"ep-{arch}-{key}.cubin"
    if use_cache and out.exists():
        dt = time.perf_counter() - t0
        log.info("epcomm jit: warm load %s (%.3f s)", out.name, dt)
        return Built(out, key, dt, True)
    dflags = [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
    with tempfile.TemporaryDirectory(prefix="epcomm-jit-") as tmp:
        obj = Path(tmp) / "ep.o"
        cub = Path(tmp) / "ep.cubin"
        env = dict(os.environ)
        cmd1 = [nvcc, "-rdc=true", f"-arch={arch}", "-O3", "-std=c++17", "-lineinfo", "-diag-suppress=177",
                f"-I{home / 'include'}", *dflags, "-c", str(KERNEL_DIR / MAIN_SOURCE), "-o", str(obj)]
        cmd2 = [nvcc, f"-arch={arch}", "-dlink", "-cubin", str(obj), f"-L{home / 'lib'}", "-lnvshmem_device",
                "-o", str(cub)]
        for cmd in (cmd1, cmd2):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise BuildError(f"kernel build failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}")
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(cub, tmp_out)
        os.replace(tmp_out, out)
    dt = time.perf_counter() - t0
    log.info("epcomm jit: cold build %s (%.1f s)", out.name, dt)
    return Built(out, key, dt, False)


class Kernels:
    """Loaded module: CUfunction handles by name, registered with NVSHMEM."""

    NAMES = ("ep_dispatch_send", "ep_dispatch_recv", "ep_dispatch", "ep_combine_send", "ep_combine_recv",
             "ep_combine", "ep_params_size", "ep_release", "ep_fence_snapshot")

    def __init__(self, cubin: Path, device_id: int):
        from cuda.core import ObjectCode
        from cuda.bindings import driver
        import nvshmem.core as nvc
        from nvshmem.core.nvshmem_types import NvshmemKernelObject

        t0 = time.perf_counter()
        self.obj = ObjectCode.from_cubin(cubin.read_bytes())
        self._kobjs = {n: self.obj.get_kernel(n) for n in self.NAMES}   # forces the load
        self._nv = NvshmemKernelObject.from_obj(self.obj)
        nvc.library_init(self._nv)
        self.functions = {}
        for n, k in self._kobjs.items():
            err, f = driver.cuKernelGetFunction(k.handle)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise BuildError(f"cuKernelGetFunction({n}) failed: {err}")
            self.functions[n] = f
        log.info("epcomm jit: module load + nvshmem library_init %.3f s", time.perf_counter() - t0)

    def close(self):
        try:
            import nvshmem.core as nvc
            nvc.library_finalize(self._nv)
        except Exception:  # teardown best effort
            pass
