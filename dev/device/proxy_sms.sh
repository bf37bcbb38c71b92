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
# steps (comma list, this order; default build,bench,stamps): build (every variant's kernels), bench (`launch bench
# --case ht --sms S` per variant and S), stamps (tests/gpu/bench_quick.py --steady-only --only ht-bf16,ht-fp8 with
# EPCOMM_BLOCKS=S, variant probe added). Logs and JSON under $OUT (default /tmp/out); proxy.txt is the digest.
set -o pipefail
STEPS=",${1:-build,bench,stamps},"
SMS=${SMS:-24 66}
MPS_PCT=${MPS_PCT:-100}
VARIANTS=${VARIANTS:--}
TOPO=${TOPO:-configs/one-gpu-2.yaml}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/proxy"
source "$(dirname "$0")/device_env.sh"   # the wheel, PYTHONPATH, kernel cache, multicast off
has() { [[ "$STEPS" == *",$1,"* ]]; }
step() { echo "=== $1 ($(date -u +%T))"; }
var() { [ "$1" = "-" ] && echo "" || echo "$1"; }
tag() { [ "$1" = "-" ] && echo baseline || echo "${1//,/_}"; }
pv() { local x; x=$(var "$1"); echo "${x:+$x,}probe"; }   # the variant with the probe added (stamps)
export CUDA_MPS_PIPE_DIRECTORY=/tmp/epcomm-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/epcomm-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
MPSCTL=$(command -v nvidia-cuda-mps-control || echo /usr/local/nvidia/bin/nvidia-cuda-mps-control)
stop_mps() { echo quit | timeout 20 "$MPSCTL" >/dev/null 2>&1; sleep 1; }
trap stop_mps EXIT
stop_mps
"$MPSCTL" -d || { echo "MPS daemon did not start"; exit 1; }
export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$MPS_PCT
{ date -u; nvidia-smi -L; echo "proxy: SM budgets $SMS, variants $VARIANTS, MPS $MPS_PCT %, $TOPO"; } | tee "$OUT/proxy-info.log"

if has build; then
  step build
  for v in $VARIANTS; do
    EPCOMM_VARIANT=$(var "$v") python3 dev/device/x2_prebuild.py --jobs 8 --case ht >/dev/null 2>&1 &
    EPCOMM_VARIANT=$(pv "$v") python3 -c "from epcomm.backends.gpu import specs; specs.build_all([c for c in \
      specs.bench_configs(2) if c.mode == 'ht' and c.max_tokens_per_rank > 128], jobs=8)" >/dev/null 2>&1 &
  done
  wait
fi
if has bench; then
  for sms in $SMS; do
    for v in $VARIANTS; do
      step "bench ht --sms $sms $(tag "$v")"
      EPCOMM_VARIANT=$(var "$v") timeout ${T_BENCH:-90} python3 -m launch bench -t "$TOPO" --timeout ${T_BENCH:-90} -- \
        --case ht --sms "$sms" --json "$OUT/proxy/ht-$sms-$(tag "$v").json" > "$OUT/proxy/ht-$sms-$(tag "$v").log" 2>&1
      grep -E "^ +ht +epcomm|result:|rror|wrong|blocks asked" "$OUT/proxy/ht-$sms-$(tag "$v").log" | sort -u | head -10 \
        | tee -a "$OUT/proxy.txt"
    done
  done
fi
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
