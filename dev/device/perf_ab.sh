#!/bin/bash
# A/B of the kernel variants under measurement (epcomm/backends/gpu/variants.py, EPCOMM_VARIANT) against the baseline
# in ONE device call on 2 GPUs: correctness of the variant first, then the bench's ht case at each SM budget and its
# ll case (128 tokens, graph replay), baseline and variant back to back per row so that drift hits both alike.
# Usage (device machine, repo root, .whl carried as for dev/device/lead_run.sh):
#   VARIANT=name[,name...] SMS="24 66 132" bash dev/device/perf_ab.sh [steps]
# (VARIANT is required: variants.py lists the ones under measurement; dev/GPU-LOG.md has each one's prediction and
# the commands to run.)
# BASE: the variants of the "before" side (default none: the default build), e.g. BASE=a VARIANT=a,b to measure b on
# top of a (VARIANT is the "after" side's whole set).
# steps (comma list, in this order): build,check,ht,ll,stamps,compare (default all but stamps). Logs / JSON under $OUT
# (default /tmp/out). stamps: tests/gpu/bench_quick.py's phase stamps at 1 and 128 tokens with variant probe, for
# BASE, then each name of STAMPS_EACH on top of BASE (e.g. STAMPS_EACH="a b"), then VARIANT (~40 s each).
# BENCH_ARGS: more bench options (e.g. "--iters 30"); TOPO: the topology (default configs/local-2gpu.yaml).
# Budget on 2 x H200 (estimate): build ~60 s cold (kernels prebuilt into .whl/epcomm-cache: ~0), check ~60 s,
# ht ~35 s per (SM budget, variant), ll ~40 s per variant: ~6-7 min for the defaults.
set -o pipefail
STEPS=",${1:-build,check,ht,ll,compare},"
VARIANT=${VARIANT:?set VARIANT=<EPCOMM_VARIANT value> (epcomm/backends/gpu/variants.py lists the known ones)}
SMS=${SMS:-24 66 132}
BASE=${BASE:-}
TOPO=${TOPO:-configs/local-2gpu.yaml}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"   # the wheel, PYTHONPATH, kernel cache, multicast off
has() { [[ "$STEPS" == *",$1,"* ]]; }
step() { echo "=== $1 ($(date -u +%T))"; }
tag() { [ -z "$1" ] && echo baseline || echo "${1//,/_}"; }   # no "+": the device tool returns plain names only
{ date -u; nvidia-smi -L; echo "variant: $VARIANT against ${BASE:-the baseline}; SM budgets: $SMS"; } | tee "$OUT/ab-info.log"

if has build; then   # every kernel the steps use, baseline and variant, in parallel (cached ones cost nothing)
  step build
  ( time ( EPCOMM_VARIANT=$BASE python3 -m epcomm.backends.gpu.specs & EPCOMM_VARIANT=$VARIANT python3 -m epcomm.backends.gpu.specs & wait ) ) \
    2>&1 | tail -4
fi
if has check; then   # the variant's results: the worker at test sizes; on a 3-block grid its receive takes whole
  # messages (at test sizes a full grid takes (message, slice) units instead): both receive paths
  step "check ($VARIANT)"
  for blocks in 3 0; do
    EPCOMM_VARIANT=$VARIANT EPCOMM_BLOCKS=$blocks timeout ${T_CHECK:-90} python3 -m launch run -t "$TOPO" \
      --timeout ${T_CHECK:-90} -- python3 tests/gpu/worker.py --quick --no-extras 2>&1 \
      | tee "$OUT/ab-check-blocks$blocks.log" | grep -E "FAIL|SUMMARY|rror|timed out" | head -12
  done
fi
if has ht; then      # 4096 tokens: dispatch bf16 / fp8, combine, round trip (each checked against the spec first)
  for sms in $SMS; do
    for v in "$BASE" "$VARIANT"; do
      step "ht --sms $sms $(tag "$v")"
      EPCOMM_VARIANT=$v timeout ${T_HT:-120} python3 -m launch bench -t "$TOPO" --timeout ${T_HT:-120} -- --case ht \
        --sms "$sms" ${BENCH_ARGS} --json "$OUT/ab-ht-$sms-$(tag "$v").json" 2>&1 | tee "$OUT/ab-ht-$sms-$(tag "$v").log" \
        | grep -E " epcomm |result:|rror|wrong" | head -12
    done
  done
fi
if has ll; then      # 128 tokens, modes ll and ht, graph replay (small batches)
  for v in "$BASE" "$VARIANT"; do
    step "ll $(tag "$v")"
    EPCOMM_VARIANT=$v timeout ${T_LL:-150} python3 -m launch bench -t "$TOPO" --timeout ${T_LL:-150} -- --case ll \
      --no-batched ${BENCH_ARGS} --json "$OUT/ab-ll-$(tag "$v").json" 2>&1 | tee "$OUT/ab-ll-$(tag "$v").log" \
      | grep -E " epcomm |result:|rror|wrong" | head -16
  done
fi
if has stamps; then   # where the time goes inside the phases (dev/GPU-LOG.md, eighth session: probe)
  sets=("$BASE"); for e in ${STAMPS_EACH:-}; do sets+=("${BASE:+$BASE,}$e"); done; sets+=("$VARIANT")
  step "stamps: prebuild"
  for v in "${sets[@]}"; do
    EPCOMM_VARIANT="${v:+$v,}probe" python3 -c "from epcomm.backends.gpu import specs; specs.build_all(specs.bench_configs(2))" &
  done; wait
  for v in "${sets[@]}"; do
    pv="${v:+$v,}probe"
    step "stamps $(tag "$pv")"
    EPCOMM_VARIANT=$pv timeout ${T_STAMPS:-150} python3 -m launch run -t "$TOPO" --timeout ${T_STAMPS:-150} -- \
      python3 tests/gpu/bench_quick.py --topology "$TOPO" --steady-only --tokens 1,128 --only ${STAMPS_ONLY:-ht-bf16,ll-fp8} \
      2>&1 | tee "$OUT/ab-stamps-$(tag "$pv").log" | grep -E "T=1:|T=128:|rror|FAIL" | head -24
  done
fi
if has compare; then # every row that moved by more than 5 % (variant against baseline)
  step compare
  for f in "$OUT"/ab-*-"$(tag "$BASE")".json; do
    g=${f/-$(tag "$BASE").json/-$(tag "$VARIANT").json}
    [ -f "$g" ] || continue
    echo "--- $(basename "$f") -> $(basename "$g")"
    python3 -m epcomm.bench.compare "$f" "$g" --changes --tolerance 0.05 2>&1 | tail -20
  done | tee "$OUT/ab-compare.log"
fi
