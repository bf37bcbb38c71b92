#!/bin/bash
# Fill the git-ignored .whl/ folder that device calls carry: the nvshmem4py wheel the device image lacks, and the
# kernels of every specialisation (and of the bench's shapes, and its latency probe) prebuilt here (CPU only), so no
# call compiles on the device.
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
from epcomm.bench import driver, latency
args = driver.parse(["--ht-sms", "24,66"])      # the bench's own shapes (x2_session.sh), batched ll rows included
driver.resolve_shapes(args, "gpu", None)
bench = driver.Bench.__new__(driver.Bench)
bench.args, bench.world = args, 2
built = specs.build_all(specs.all_configs(2) + bench.kernel_configs(), jobs=4)
for b in built:
    shutil.copy(b.cubin, ".whl/epcomm-cache/")
shutil.copy(latency.build(), ".whl/epcomm-cache/")   # the bench's latency probe (no defines: one cubin)
print(f"{len(built)} kernels + the latency probe in .whl/epcomm-cache ({sum(not b.cached for b in built)} built now)")
PY
du -sh .whl
