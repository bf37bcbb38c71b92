#!/bin/bash
# Small-batch A/B on 2 GPUs in one device call: several variant arms of the bench's `--case ll` rows (128 tokens,
# modes ll and ht, graph replay), the arms interleaved and repeated, so that the machine's drift and the run-to-run
# noise of the 128-token rows (~±3 µs, dev/GPU-LOG.md eighth session) hit every arm alike and show in the spread;
# then each arm's in-kernel phase stamps (tests/gpu/bench_quick.py). One perf_ab run per arm cannot resolve 1-2 µs.
# Usage (device machine, repo root, .whl carried):
#   ARMS="- oneshot" [REPS=3] [CHECK=variants] bash dev/device/small_ab.sh [steps]
# steps (comma list, this order; default build,check,reps,stamps,summary):
#   build    every arm's kernels (epcomm.backends.gpu.specs under each EPCOMM_VARIANT), in parallel
#   check    the worker (--quick --no-extras) under EPCOMM_VARIANT=$CHECK on a 3-block and the full grid
#   reps     REPS rounds; in each, every arm's `launch bench -- --case ll --no-batched` (each row checked first;
#            BATCHED=1: the batched-layout rows too, without --no-batched)
#   stamps   every arm's bench_quick --steady-only --tokens 1,128 --only ht-bf16,ll-fp8, with $STAMP_EXTRA added
#            to the arm's variants (e.g. STAMP_EXTRA=probe: the probe's inner times, in every arm alike)
#   summary  dev/device/small_ab_summary.py: per row and arm the median of the reps' medians, its spread, and the
#            change against the first arm -> small-ab.txt / small-ab.json
# Everything else under $OUT goes into small-ab-logs.tgz (the device tool returns at most 8 plain-named files).
# One GPU only: TOPO=configs/one-gpu-2.yaml MPS_PCT=50 runs the two ranks side by side under MPS (each a grid of
# what its share keeps resident). Such figures are shared-GPU proxies: no link, the peer's memory is local; they
# show the fixed in-kernel chain (fences, atomics, flag waits, hand-overs), not link time.
set -o pipefail
STEPS=",${1:-build,check,reps,stamps,summary},"
ARMS=${ARMS:?set ARMS="<variant set> <variant set> ..." (the first arm is the reference; "-" = no variant)}
REPS=${REPS:-3}
TOPO=${TOPO:-configs/local-2gpu.yaml}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
source "$(dirname "$0")/device_env.sh"   # the wheel, PYTHONPATH, kernel cache, multicast off
has() { [[ "$STEPS" == *",$1,"* ]]; }
if [ -n "$MPS_PCT" ]; then
  source "$(dirname "$0")/mps.sh"
  mps_start || { echo "MPS daemon did not start"; exit 1; }
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$MPS_PCT
  echo "=== ${MPS_PCT} % of the SMs per process"
fi
step() { echo "=== $1 ($(date -u +%T))"; }
var() { [ "$1" = "-" ] && echo "" || echo "$1"; }
tag() { [ "$1" = "-" ] && echo baseline || echo "${1//,/_}"; }
sv() { local v; v=$(var "$1"); echo "${v:+$v,}$STAMP_EXTRA" | sed 's/,$//'; }   # the arm's variants for its stamps
{ date -u; nvidia-smi -L; echo "arms: $ARMS; reps: $REPS; topology: $TOPO${MPS_PCT:+; MPS $MPS_PCT %}"; } | tee "$OUT/small-ab-info.log"

if has build; then
  step build
  for a in $ARMS; do
    EPCOMM_VARIANT=$(var "$a") python3 -m epcomm.backends.gpu.specs >/dev/null 2>&1 &
    [ -n "$STAMP_EXTRA" ] && EPCOMM_VARIANT=$(sv "$a") python3 -m epcomm.backends.gpu.specs >/dev/null 2>&1 &
  done
  [ -n "$CHECK" ] && EPCOMM_VARIANT=$CHECK python3 -m epcomm.backends.gpu.specs >/dev/null 2>&1 &
  wait
fi
if has check && [ -n "$CHECK" ]; then
  step "check ($CHECK)"
  for blocks in 3 0; do
    EPCOMM_VARIANT=$CHECK EPCOMM_BLOCKS=$blocks timeout ${T_CHECK:-90} python3 -m launch run -t "$TOPO" \
      --timeout ${T_CHECK:-90} -- python3 tests/gpu/worker.py --quick --no-extras > "$OUT/ab/check-blocks$blocks.log" 2>&1
    grep -E "FAIL|SUMMARY|rror|timed out" "$OUT/ab/check-blocks$blocks.log" | head -8
  done
fi
if has reps; then
  for r in $(seq 1 "$REPS"); do
    for a in $ARMS; do
      step "rep $r: $(tag "$a")"
      EPCOMM_VARIANT=$(var "$a") timeout ${T_LL:-90} python3 -m launch bench -t "$TOPO" --timeout ${T_LL:-90} -- \
        --case ll $([ -n "$BATCHED" ] || echo --no-batched) ${BENCH_ARGS} --json "$OUT/ab/ll-$(tag "$a")-rep$r.json" > "$OUT/ab/ll-$(tag "$a")-rep$r.log" 2>&1
      grep -E "result:|rror|wrong" "$OUT/ab/ll-$(tag "$a")-rep$r.log" | head -3
    done
  done
fi
if has stamps; then
  for a in $ARMS; do
    step "stamps $(tag "$a")"
    EPCOMM_VARIANT=$(sv "$a") timeout ${T_STAMPS:-60} python3 -m launch run -t "$TOPO" --timeout ${T_STAMPS:-60} -- \
      python3 tests/gpu/bench_quick.py --topology "$TOPO" --steady-only --tokens 1,128 --only ht-bf16,ll-fp8 \
      > "$OUT/ab/stamps-$(tag "$a").log" 2>&1
    grep -E "^\[rank 0\].*(T=1:|T=128|T=4096)" "$OUT/ab/stamps-$(tag "$a").log" | head -12
  done
fi
if has summary; then
  step summary
  python3 dev/device/small_ab_summary.py "$OUT/ab" $ARMS --out "$OUT/small-ab" | tee "$OUT/small-ab.txt"
fi
tar czf "$OUT/small-ab-logs.tgz" -C "$OUT" ab && rm -rf "$OUT/ab"
