#!/bin/bash
# The lead's device-machine call: demo, smoke and bench on the 2 x H100 machine, logs and JSON/PNG under $OUT.
# Usage (device machine, repo root, .whl carried): bash dev/device/lead_run.sh [steps]; steps: comma list of
# build,bench_local,worker_local,worker_sim,demo,smoke_local,smoke_sim,bench_sim,bench_sms (run in this order).
# The bench steps compare with the recorded run in docs/perf/ (--compare): rows that moved by more than 15 % are listed.
set -o pipefail
STEPS=${1:-build,bench_local,worker_local,worker_sim,demo,smoke_local}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EPCOMM_CACHE=/tmp/epcomm-cache
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /tmp/epcomm-cache ~/.cache && ln -sfn /tmp/epcomm-cache ~/.cache/epcomm
# kernels prebuilt on the CPU machine (same nvcc 13.0 + NVSHMEM 3.4.5, so the same cache keys) travel in .whl/
[ -d .whl/epcomm-cache ] && cp -n .whl/epcomm-cache/*.cubin /tmp/epcomm-cache/ 2>/dev/null
has() { [[ ",$STEPS," == *",$1,"* ]]; }
step() { echo "=== $1 ($(date -u +%T))"; }
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv; } | tee "$OUT/info.log"
if has build; then step build; ( time timeout 120 python3 -m epcomm.backends.gpu.specs ) 2>&1 | tail -3; fi
if has bench_local; then
  step bench_local
  timeout ${T_BENCH:-230} python3 -m launch bench -t configs/local-2gpu.yaml --timeout ${T_BENCH:-230} -- \
    --json "$OUT/bench-local-2gpu.json" --png "$OUT/bench-local-2gpu.png" --compare docs/perf/bench-local-2gpu.json \
    2>&1 | tee "$OUT/bench-local.log" | tail -60
fi
for cfg in local sim; do
  if has worker_$cfg; then
    name=$([ $cfg = local ] && echo local-2gpu || echo sim-2node)
    step "worker $name"
    timeout ${T_WORKER:-80} python3 -m launch run -t configs/$name.yaml --timeout ${T_WORKER:-80} -- \
      python3 tests/gpu/worker.py 2>&1 | tee "$OUT/worker-$cfg.log" | grep -E "FAIL|SUMMARY|rror|timed out" | head -20
  fi
done
if has demo; then
  step demo
  timeout 60 make demo SYSTEM_PYTHON=1 TIMEOUT=55 ARGS="--json $OUT/demo.json" 2>&1 | tee "$OUT/demo.log" | tail -8
fi
if has bench_sms; then
  step bench_sms
  timeout 120 python3 -m launch bench -t configs/local-2gpu.yaml --timeout 120 -- --case ht --sms 24 \
    --json "$OUT/bench-local-24sm.json" --compare docs/perf/bench-local-24sm.json 2>&1 | tee "$OUT/bench-sms.log" | tail -24
fi
if has smoke_local; then
  step smoke_local
  timeout 150 python3 -m launch smoke -t configs/local-2gpu.yaml --timeout 150 -- --quick \
    --json "$OUT/smoke-local-2gpu.json" --png "$OUT/smoke-local-2gpu.png" 2>&1 | tee "$OUT/smoke-local.log" | tail -25
fi
if has smoke_sim; then
  step smoke_sim
  timeout 150 python3 -m launch smoke -t configs/sim-2node.yaml --timeout 150 -- --quick \
    --json "$OUT/smoke-sim-2node.json" 2>&1 | tee "$OUT/smoke-sim.log" | tail -12
fi
if has bench_sim; then
  step bench_sim
  timeout 200 python3 -m launch bench -t configs/sim-2node.yaml --timeout 200 -- --case links,ht,ll \
    --json "$OUT/bench-sim-2node.json" --compare docs/perf/bench-sim-2node.json 2>&1 | tee "$OUT/bench-sim.log" | tail -40
fi
if has pytest; then step pytest; timeout 400 python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5; fi
date -u
