#!/bin/bash
# Is the ht path at a small SM budget bound by the link or by the SMs' own work? On ONE GPU, two ranks side by side
# under MPS (their "peer" memory is the same HBM: no link in the way), the bench's ht case at each SM budget and the
# in-kernel phase stamps of a 4096-token dispatch+combine pair on a grid of that many blocks. If a 24-SM row here is
# as slow as on 2 x H200, the SMs' work (send loop, quantiser, receive expansion, combine reduce) bounds it, and a
# change to that work can be measured on one GPU. Shared-GPU proxy: not link figures.
# Usage (device machine, repo root, .whl carried):
#   [SMS="24 66"] [MPS_PCT=100] [VARIANTS="- name"] bash dev/device/proxy_sms.sh [steps]
# The grid is what occupancy.py lets each rank keep resident beside the other (its log line "N blocks asked ...
# M used"): under MPS 50 % that was 19 blocks whatever SMS asked (2026-12-01), so ask MPS_PCT=100 for 24 or more.
# steps (comma list, this order; default build,bench,stamps):
#   build   every variant's kernels (the bench's ht and ll shapes; with stamps, also under variant probe)
#   check   the GPU worker (--quick --no-extras) under EPCOMM_VARIANT=$CHECK, 2 ranks, default grid
#   bench   REPS rounds (default 1), in each every variant's `launch bench --case ht --sms S` per S (interleaved, so
#           drift hits every variant alike)
#   ll      REPS rounds, in each every variant's `launch bench --case ll` (128 tokens, grouped and batched, graphs)
#   stamps  tests/gpu/bench_quick.py --steady-only --only ht-bf16,ht-fp8 with EPCOMM_BLOCKS=S, variant probe added
# Logs and JSON under $OUT (default /tmp/out); proxy.txt is the digest.
set -o pipefail
STEPS=",${1:-build,bench,stamps},"
SMS=${SMS:-24 66}
MPS_PCT=${MPS_PCT:-100}
VARIANTS=${VARIANTS:--}
REPS=${REPS:-1}
TOPO=${TOPO:-configs/one-gpu-2.yaml}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/proxy"
source "$(dirname "$0")/device_env.sh"   # the wheel, PYTHONPATH, kernel cache, multicast off
has() { [[ "$STEPS" == *",$1,"* ]]; }
step() { echo "=== $1 ($(date -u +%T))"; }
var() { [ "$1" = "-" ] && echo "" || echo "$1"; }
tag() { [ "$1" = "-" ] && echo baseline || echo "${1//,/_}"; }
pv() { local x; x=$(var "$1"); echo "${x:+$x,}probe"; }   # the variant with the probe added (stamps)
source "$(dirname "$0")/mps.sh"
mps_start || { echo "MPS daemon did not start"; exit 1; }
export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$MPS_PCT
{ date -u; nvidia-smi -L; echo "proxy: SM budgets $SMS, variants $VARIANTS, MPS $MPS_PCT %, $TOPO"; } | tee "$OUT/proxy-info.log"

if has build; then
  step build
  for v in $VARIANTS; do
    EPCOMM_VARIANT=$(var "$v") python3 dev/device/x2_prebuild.py --jobs 8 --case ht,ll >/dev/null 2>&1 &
    has stamps && EPCOMM_VARIANT=$(pv "$v") python3 -c "from epcomm.backends.gpu import specs; specs.build_all([c for c \
      in specs.bench_configs(2) if c.mode == 'ht' and c.max_tokens_per_rank > 128], jobs=8)" >/dev/null 2>&1 &
  done
  [ -n "$CHECK" ] && EPCOMM_VARIANT=$CHECK python3 -m epcomm.backends.gpu.specs >/dev/null 2>&1 &
  wait
fi
if has check && [ -n "$CHECK" ]; then
  step "check ($CHECK)"
  EPCOMM_VARIANT=$CHECK timeout ${T_CHECK:-90} python3 -m launch run -t "$TOPO" --timeout ${T_CHECK:-90} -- \
    python3 tests/gpu/worker.py --quick --no-extras > "$OUT/proxy/check.log" 2>&1
  echo "check $CHECK: rc $?, $(grep -c PASS "$OUT/proxy/check.log") PASS, $(grep -c FAIL "$OUT/proxy/check.log") FAIL" \
    | tee -a "$OUT/proxy.txt"
  grep -E "FAIL|Traceback|rror" "$OUT/proxy/check.log" | head -5
fi
# one bench run: bench_run NAME VARIANT [bench args]
bench_run() {
  local name=$1 v=$2; shift 2
  step "$name $(tag "$v")"
  EPCOMM_VARIANT=$(var "$v") timeout ${T_BENCH:-90} python3 -m launch bench -t "$TOPO" --timeout ${T_BENCH:-90} -- \
    "$@" --json "$OUT/proxy/$name-$(tag "$v").json" > "$OUT/proxy/$name-$(tag "$v").log" 2>&1
  echo "--- $name $(tag "$v")" >> "$OUT/proxy.txt"
  grep -E "^ +(ht|ll) +epcomm|result:|rror|wrong|blocks asked" "$OUT/proxy/$name-$(tag "$v").log" | sort -u | head -16 \
    | tee -a "$OUT/proxy.txt"
}
for r in $(seq 1 "$REPS"); do
  if has bench; then
    for sms in $SMS; do for v in $VARIANTS; do bench_run "ht$sms-rep$r" "$v" --case ht --sms "$sms"; done; done
  fi
  if has ll; then
    for v in $VARIANTS; do bench_run "ll-rep$r" "$v" --case ll; done
  fi
done
if has stamps; then
  for sms in $SMS; do
    for v in $VARIANTS; do
      step "stamps 4096 tokens, $sms blocks, $(tag "$v")"
      echo "--- stamps $sms blocks $(tag "$v")" >> "$OUT/proxy.txt"
      EPCOMM_BLOCKS=$sms EPCOMM_VARIANT=$(pv "$v") timeout ${T_STAMPS:-60} \
        python3 -m launch run -t "$TOPO" --timeout ${T_STAMPS:-60} -- python3 tests/gpu/bench_quick.py --topology "$TOPO" \
        --steady-only --only ht-bf16,ht-fp8 > "$OUT/proxy/stamps-$sms-$(tag "$v").log" 2>&1
      grep -E "^\[rank [01]\]" "$OUT/proxy/stamps-$sms-$(tag "$v").log" | grep -vE "setup|launch floor" | head -12 \
        | tee -a "$OUT/proxy.txt"
    done
  done
fi
tar czf "$OUT/proxy-logs.tgz" -C "$OUT" proxy && rm -rf "$OUT/proxy"
