#!/bin/bash
# Fill the git-ignored .whl/ folder that device calls carry: the nvshmem4py wheel the device image lacks, and the
# kernels of every specialisation prebuilt here (CPU only), so no call compiles on the device.
# Usage (repo root, after `make venv`): bash dev/device/prepare_whl.sh      (~2 min when the kernels are not cached)
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .whl/epcomm-cache
ls .whl/nvshmem4py_cu13-0.4.1-*.whl >/dev/null 2>&1 || \
  $PY -m pip download -q nvshmem4py-cu13==0.4.1 --no-deps --only-binary=:all: --python-version 3.12 -d .whl
rm -f .whl/epcomm-cache/*.cubin   # only the current source's kernels: the carry limit is 64 MiB
$PY - <<'PY'
import shutil
from epcomm.backends.gpu import jit, specs
built = specs.build_all(specs.all_configs(2), jobs=4)
for b in built:
    shutil.copy(b.cubin, ".whl/epcomm-cache/")
print(f"{len(built)} kernels in .whl/epcomm-cache ({sum(not b.cached for b in built)} built now)")
PY
du -sh .whl
