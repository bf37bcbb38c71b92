"""Which code produced a result: the "code" entry of the bench and smoke JSON documents."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def code_identity() -> dict:
    """git commit and dirty flag where the tree is a checkout (else None), and the hash of the kernel sources, which
    names the kernels with or without git (the device machines get a copy of the tree), and the kernel variant."""
    from .backends.gpu import jit
    # EPCOMM_COMMIT: a copy of the tree whose .git is not the source's (the device machines) names its commit here.
    commit = os.environ.get("EPCOMM_COMMIT") or _git("rev-parse", "HEAD")
    # dirty only from git's own HEAD: under EPCOMM_COMMIT this .git's status says nothing about the named commit
    from_git = commit and "EPCOMM_COMMIT" not in os.environ
    status = _git("status", "--porcelain", "--untracked-files=no") if from_git else None
    return {"commit": commit, "dirty": None if status is None else bool(status), "kernel_source": jit.source_hash(),
            "kernel_variant": _variant()}


def _variant() -> str:
    """The kernel variant under measurement (EPCOMM_VARIANT, backends/gpu/variants.py): "baseline" when unset."""
    from .backends.gpu import variants
    from .errors import EPInputError
    try:
        return variants.label()
    except EPInputError:   # an unknown name: the run itself fails on it; the record says what was asked
        return os.environ.get(variants.ENV, "")
