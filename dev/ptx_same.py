"""Is a kernel change a pure refactor? Compare the PTX of every kernel specialisation between the kernel sources of a
git revision and the working tree's (no GPU needed; nvcc and the NVSHMEM headers as for the JIT).

The sources are every file of epcomm/backends/gpu/kernels/ (ep.cu, the translation unit, and the .cuh parts it
includes), taken at the revision with `git ls-tree` / `git show`, so a single ep.cu of an older revision compares
with today's split files. Both sides get today's defines (jit.defines_for): an older source ignores the derived-size
defines it does not use.

    python dev/ptx_same.py aafa508            # every spec of epcomm.backends.gpu.specs.all_configs(2)
    python dev/ptx_same.py aafa508 --only ht  # modes containing "ht"
    python dev/ptx_same.py 135bc43 --rev-defines EP_V_CMETA=1   # a promoted variant: its old build vs today's default

Lines that only name the source (.file, .loc, comments) and nvcc's per-file hash in internal symbol names are
ignored, so a comment or a renamed local that compiles to the same instructions reports SAME. Exit 0 when every
spec is the same, 1 otherwise (the first differing lines are printed), 2 on a build error.

--up-to-register-names is the weaker check for a change that moves code into a function: the front end then numbers
its virtual registers (and block labels) in another order, which is all that differs. Each function's registers and
labels are renamed in order of first appearance and the .reg declarations dropped; SAME then means the same
instructions in the same order on consistently renamed registers (ptxas allocates the physical registers).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from epcomm.backends.gpu import jit, specs

ROOT = Path(__file__).resolve().parents[1]

KERNELS = "epcomm/backends/gpu/kernels"
FILE_HASH = re.compile(r"(?<=_)[0-9a-f]{8}(?=_\d+_ep_cu)")   # nvcc's hash of the file in internal names


def checkout_kernels(rev: str, dest: Path) -> list[str]:
    """Write every file of the kernel folder at `rev` into dest; returns their names (RuntimeError if none)."""
    ls = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{KERNELS}"], cwd=ROOT, capture_output=True, text=True)
    if ls.returncode != 0:
        raise RuntimeError(f"cannot list {KERNELS} at {rev}: {ls.stderr.strip()}")
    names = [n for n in ls.stdout.split() if n.endswith((".cu", ".cuh", ".h"))]
    if jit.MAIN_SOURCE not in names:
        raise RuntimeError(f"no {jit.MAIN_SOURCE} in {KERNELS} at {rev}")
    for n in names:
        blob = subprocess.run(["git", "show", f"{rev}:{KERNELS}/{n}"], cwd=ROOT, capture_output=True)
        if blob.returncode != 0:
            raise RuntimeError(f"cannot read {KERNELS}/{n} at {rev}: {blob.stderr.decode().strip()}")
        (dest / n).write_bytes(blob.stdout)
    return names


def ptx_lines(src: Path, defines: dict, arch: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="epcomm-ptx-") as tmp:
        out = Path(tmp) / "ep.ptx"
        cmd = [jit.find_nvcc(), "-rdc=true", f"-arch={arch}", "-O3", "-std=c++17", "-diag-suppress=177",
               f"-I{jit.nvshmem_home() / 'include'}", *[f"-D{k}={int(v)}" for k, v in sorted(defines.items())],
               "-ptx", str(src), "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{src}: nvcc failed:\n{r.stderr[-2000:]}")
        keep = [ln for ln in out.read_text().splitlines() if not ln.strip().startswith((".file", ".loc", "//"))]
    return [FILE_HASH.sub("<file>", ln) for ln in keep]


REGISTER = re.compile(r"%(?:rd|r|rs|p|f|fd|h|hh|b)\d+|\$L__BB\d+_\d+")


def canonical_registers(lines: list[str]) -> list[str]:
    """Rename virtual registers and labels per function in order of first appearance; drop .reg declarations."""
    out, names, counts = [], {}, {}

    def rename(m):
        tok = m.group(0)
        if tok not in names:
            kind = "$L" if tok.startswith("$") else re.match(r"%[a-z]+", tok).group(0)
            counts[kind] = counts.get(kind, 0) + 1
            names[tok] = f"{kind}#{counts[kind]}"
        return names[tok]
    for ln in lines:
        if re.match(r"\s*(\.visible\s+|\.weak\s+)?\.(entry|func)\b", ln):
            names, counts = {}, {}
        if ln.strip().startswith(".reg "):
            continue
        out.append(REGISTER.sub(rename, ln))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="git revision whose kernel sources are the baseline")
    ap.add_argument("--only", default="", help="only specs whose '<mode>-<format>' contains this")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--up-to-register-names", action="store_true",
                    help="compare after renaming virtual registers / labels by first appearance (see above)")
    ap.add_argument("--rev-defines", default="", metavar="NAME=V,...",
                    help="extra -D defines for the revision's side only: a variant promoted to the default code "
                         "compares with its own earlier build (e.g. EP_V_CMETA=1)")
    a = ap.parse_args(argv)
    try:
        rev_extra = {k.strip(): int(v) for k, v in (kv.split("=") for kv in a.rev_defines.split(",") if kv.strip())}
    except ValueError:
        print(f"ptx_same: --rev-defines {a.rev_defines!r}: expected NAME=integer[,NAME=integer...]", file=sys.stderr)
        return 2
    seen = {}
    for c in specs.all_configs(2):
        if a.only in f"{c.mode}-{c.token_format}":
            seen.setdefault(tuple(sorted(jit.defines_for(c).items())), c)
    with tempfile.TemporaryDirectory(prefix="epcomm-ptx-old-") as tmp:
        try:
            old_names = checkout_kernels(a.rev, Path(tmp))
        except RuntimeError as e:
            print(f"ptx_same: {e}", file=sys.stderr)
            return 2
        new_names = [p.name for p in jit.sources()]
        extra = f" with {a.rev_defines}" if rev_extra else ""
        print(f"baseline {a.rev}{extra}: {' '.join(old_names)}; working tree: {' '.join(new_names)}")
        old_src, new_src = Path(tmp) / jit.MAIN_SOURCE, jit.KERNEL_DIR / jit.MAIN_SOURCE

        def one(item):
            d, c = dict(item[0]), item[1]
            return c, ptx_lines(old_src, {**d, **rev_extra}, a.arch), ptx_lines(new_src, d, a.arch)
        try:
            with ThreadPoolExecutor(a.jobs) as ex:
                results = list(ex.map(one, seen.items()))
        except RuntimeError as e:
            print(f"ptx_same: {e}", file=sys.stderr)
            return 2
    differ = 0
    if a.up_to_register_names:
        results = [(c, canonical_registers(x), canonical_registers(y)) for c, x, y in results]
    for c, x, y in results:
        name = (f"{c.mode}-{c.token_format} M={c.max_tokens_per_rank} K={c.topk} fused={int(c.fused_shared_expert)} "
                f"skip={int(c.skip_a2a)}")
        if x == y:
            print(f"SAME    {name}")
            continue
        differ += 1
        first = next(i for i, (p, q) in enumerate(zip(x + [""], y + [""])) if p != q)
        print(f"DIFFERS {name}: {len(x)} vs {len(y)} lines, first at line {first}:"
              f"\n  - {x[first] if first < len(x) else ''}\n  + {y[first] if first < len(y) else ''}")
    how = " up to virtual register names" if a.up_to_register_names else ""
    print(f"{len(results) - differ} of {len(results)} specialisations compile to the same PTX as {a.rev}{how}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
