#!/bin/bash
# Issue 16 on 2 GPUs in one device call (kind nvidia-h200-x2, 32 cores, <= 9.5 min): epcomm beside DeepEP, the NCCL
# baseline and the floor (with its measured latency term), --compare against the recorded run first.
# Carry `.whl/` (dev/device/prepare_whl.sh: the nvshmem4py wheel + prebuilt kernels) and
# `.peers/deepep-9249c25.tar.gz` (cp /work/shared/peers/deepep-9249c25.tar.gz .peers/), both git-ignored:
#
#   bash dev/device/x2_session.sh [steps]      summary, JSON and a tarball of the logs under $OUT (default /tmp/out)
#
# steps (comma list, run in this order; default build,peer,bench):
#   build      epcomm's kernels for the bench's shapes + the latency probe (dev/device/x2_prebuild.py, also under
#              AB_VARIANT when set), and, at the same time, DeepEP from .peers/ (setup.py build_ext --inplace in
#              /tmp/deepep-src; kept on a warm machine; TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$(nproc))
#   peer       DeepEP alone in its own bench run (`--case deepep`: its normal kernels at --peer-sms 24,66,132, fp8
#              fed pre-quantised; its low-latency kernels at 128 tokens under CUDA graphs; checked, then timed like
#              epcomm's rows) -> bench-deepep.json. Its own process: DeepEP's low-latency buffer starts NVSHMEM itself
#   bench      the main run on configs/local-2gpu.yaml: links, NCCL baseline, ht (+ --ht-sms 24,66), ll, sweep,
#              latency; --peer-json bench-deepep.json (DeepEP's rows beside epcomm's: the "x deepep" column) and
#              --compare docs/perf/bench-local-2gpu.json -> bench-local-2gpu.json / .png
#   bench_sim  configs/sim-2node.yaml (links, ht, ll, latency: the NVSHMEM path), --compare docs/perf/bench-sim-2node.json
#   ab         A/B of a kernel variant on the same machine: `--case ht,ll` without EPCOMM_VARIANT, then with
#              EPCOMM_VARIANT=$AB_VARIANT, compared (epcomm.bench.compare) -> in the logs tarball, ab.log
# Knobs: EPCOMM_VARIANT (and every EPCOMM_* variable) passes through to the ranks and is recorded in each JSON's
# `env`; BENCH_ARGS / PEER_ARGS / SIM_ARGS / AB_ARGS add bench options; per-step deadlines T_BUILD T_PEER T_BENCH
# T_BENCH_SIM T_AB (seconds), all within X2_BUDGET (default 540 s after the install): a step that would not fit gets
# what is left, or is skipped ("no time") under 30 s, so the summary is always written inside one 600 s call.
# Two calls if one does not suffice: `build,peer,bench`, then `build,bench_sim,ab` (build is cheap when cached).
set -o pipefail
STEPS=",${1:-build,peer,bench},"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
X2_BUDGET=${X2_BUDGET:-540}
DEEPEP_TGZ=${DEEPEP_TGZ:-.peers/deepep-9249c25.tar.gz}
DEEPEP_DIR=/tmp/deepep-src/deepep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EPCOMM_CACHE=/tmp/epcomm-cache
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_REMOTE_TRANSPORT=none
[ -n "$EPCOMM_VARIANT" ] && export EPCOMM_VARIANT
mkdir -p /tmp/epcomm-cache ~/.cache && ln -sfn /tmp/epcomm-cache ~/.cache/epcomm
# kernels prebuilt on the CPU machine (same nvcc 13.0 + NVSHMEM 3.4.5, so the same cache keys) travel in .whl/
[ -d .whl/epcomm-cache ] && cp -n .whl/epcomm-cache/*.cubin /tmp/epcomm-cache/ 2>/dev/null
X2_T0=$SECONDS
TSV="$OUT/x2-steps.tsv"; : > "$TSV"
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader
  nvidia-smi topo -m 2>&1 | head -4
  echo "commit ${EPCOMM_COMMIT:-$(git log -1 --format=%H 2>/dev/null)} (EPCOMM_COMMIT: the tree's commit where the copy's .git is stale)"
  echo "steps $STEPS; EPCOMM_* knobs: $(env | grep '^EPCOMM_' | grep -v '^EPCOMM_CACHE=' | sort | tr '\n' ' ')"
  echo "DeepEP source: $(ls -l "$DEEPEP_TGZ" 2>&1)"; } | tee "$OUT/info.log"
has() { [[ "$STEPS" == *",$1,"* ]]; }
# limit DEFAULT: a step's deadline within what is left of the budget (0: no time left)
limit() {
  local want=$1 left=$((X2_BUDGET - (SECONDS - X2_T0) - 10))
  (( left < 30 )) && { echo 0; return; }
  (( want > left )) && want=$left
  echo "$want"
}
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$TSV"; }    # step rc seconds log
# bench STEP LIMIT LOG ARGS...: the bench through the launcher, with the launcher's and an outer deadline
bench() {
  local step=$1 lim=$2 log=$3; shift 3
  if (( lim == 0 )); then echo "=== $step: no time left in X2_BUDGET=$X2_BUDGET"; record "$step" skip 0 "$log"; return; fi
  echo "=== $step (limit ${lim} s, $(date -u +%T))"; local t0=$SECONDS
  timeout $((lim + 20)) python3 -m launch bench -t configs/local-2gpu.yaml --timeout "$lim" -- "$@" > "$log" 2>&1
  local rc=$?
  record "$step" "$rc" $((SECONDS - t0)) "$log"
  grep -E "^compare:|^result:|^floor latency|^peer |^note: (deepep|latency)|--compare|Traceback|timed out" "$log" | head -12
}

if has build; then
  l=$(limit "${T_BUILD:-200}"); (( l > 0 )) || l=30
  echo "=== build: epcomm kernels + latency probe, DeepEP (limit ${l} s, $(date -u +%T))"; t0=$SECONDS
  ( timeout "$l" python3 dev/device/x2_prebuild.py --jobs "$(nproc)" --ht-sms 24,66 ${BENCH_ARGS} || exit
    if [ -n "$AB_VARIANT" ]; then
      EPCOMM_VARIANT=$AB_VARIANT timeout "$l" python3 dev/device/x2_prebuild.py --jobs "$(nproc)" --case ht,ll ${AB_ARGS}
    fi ) > "$OUT/build-epcomm.log" 2>&1 &
  epcomm_pid=$!
  if [ -f "$DEEPEP_DIR/deep_ep/buffer.py" ] && ls "$DEEPEP_DIR"/deep_ep_cpp*.so >/dev/null 2>&1; then
    echo "DeepEP already built in $DEEPEP_DIR (warm machine)" > "$OUT/build-deepep.log"
  elif [ -f "$DEEPEP_TGZ" ]; then
    rm -rf /tmp/deepep-src && mkdir -p /tmp/deepep-src && tar xzf "$DEEPEP_TGZ" -C /tmp/deepep-src &&
      ( cd "$DEEPEP_DIR" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) timeout "$l" python3 setup.py build_ext --inplace ) \
      > "$OUT/build-deepep.log" 2>&1
  else
    echo "no $DEEPEP_TGZ: DeepEP not built (copy /work/shared/peers/deepep-9249c25.tar.gz into .peers/ and carry it)" \
      | tee "$OUT/build-deepep.log"
  fi
  PYTHONPATH=$DEEPEP_DIR:$PYTHONPATH python3 -c "import deep_ep, deep_ep_cpp; print('deep_ep imports:', deep_ep.__file__)" \
    >> "$OUT/build-deepep.log" 2>&1
  deepep_rc=$?
  wait "$epcomm_pid"; rc=$?
  tail -2 "$OUT/build-epcomm.log"; tail -1 "$OUT/build-deepep.log"
  record build-epcomm "$rc" $((SECONDS - t0)) "$OUT/build-epcomm.log"
  record build-deepep "$deepep_rc" $((SECONDS - t0)) "$OUT/build-deepep.log"
fi
if has peer; then
  rm -f "$OUT/bench-deepep.json"
  ( export PYTHONPATH=$DEEPEP_DIR:$PYTHONPATH
    bench peer "$(limit "${T_PEER:-150}")" "$OUT/peer.log" --case deepep --json "$OUT/bench-deepep.json" ${PEER_ARGS} )
fi
if has bench; then
  peer=(); [ -s "$OUT/bench-deepep.json" ] && peer=(--peer-json "$OUT/bench-deepep.json")
  bench bench "$(limit "${T_BENCH:-300}")" "$OUT/bench-local.log" --ht-sms 24,66 "${peer[@]}" \
    --json "$OUT/bench-local-2gpu.json" --png "$OUT/bench-local-2gpu.png" \
    --compare docs/perf/bench-local-2gpu.json ${BENCH_ARGS}
fi
if has bench_sim; then
  l=$(limit "${T_BENCH_SIM:-200}")
  if (( l == 0 )); then record bench_sim skip 0 "$OUT/bench-sim.log"; else
    echo "=== bench_sim (limit ${l} s, $(date -u +%T))"; t0=$SECONDS
    timeout $((l + 20)) python3 -m launch bench -t configs/sim-2node.yaml --timeout "$l" -- --case links,ht,ll,latency \
      --json "$OUT/bench-sim-2node.json" --compare docs/perf/bench-sim-2node.json ${SIM_ARGS} > "$OUT/bench-sim.log" 2>&1
    rc=$?; record bench_sim "$rc" $((SECONDS - t0)) "$OUT/bench-sim.log"
    grep -E "^compare:|^result:|^floor latency|Traceback|timed out" "$OUT/bench-sim.log" | head -6
  fi
fi
if has ab; then
  if [ -z "$AB_VARIANT" ]; then echo "=== ab: set AB_VARIANT=<EPCOMM_VARIANT value> to run it"; record ab skip 0 -; else
    half=$(( $(limit "${T_AB:-200}") / 2 ))
    ( unset EPCOMM_VARIANT
      bench ab-base "$half" "$OUT/ab-base.log" --case ht,ll --iters "${AB_ITERS:-30}" --json "$OUT/bench-ab-base.json" ${AB_ARGS} )
    ( export EPCOMM_VARIANT=$AB_VARIANT
      bench "ab-$AB_VARIANT" "$half" "$OUT/ab-variant.log" --case ht,ll --iters "${AB_ITERS:-30}" \
        --json "$OUT/bench-ab-variant.json" ${AB_ARGS} )
    python3 -m epcomm.bench.compare "$OUT/bench-ab-base.json" "$OUT/bench-ab-variant.json" > "$OUT/ab.log" 2>&1
    echo "=== ab: EPCOMM_VARIANT=$AB_VARIANT against none (rc $?)"; tail -4 "$OUT/ab.log"
  fi
fi
{ echo "x2 session: steps $STEPS, $(( SECONDS - X2_T0 )) s of X2_BUDGET=$X2_BUDGET"
  printf 'step\trc\tseconds\tlog\n'; cat "$TSV"
  for j in bench-local-2gpu bench-deepep bench-sim-2node; do
    [ -s "$OUT/$j.json" ] && { echo; echo "--- $j.json"; python3 -m epcomm.bench.report "$OUT/$j.json" 2>&1 | grep -vE "^ +\^ "; }
  done
  for log in bench-local bench-sim; do
    [ -s "$OUT/$log.log" ] && { echo; echo "--- $log.log: rows that moved (--compare)"; sed -n '/^ *case  *impl  *op .*verdict/,/^compare:/p' "$OUT/$log.log"; }
  done
  [ -s "$OUT/ab.log" ] && { echo; echo "--- ab (EPCOMM_VARIANT=$AB_VARIANT against none)"; cat "$OUT/ab.log"; }
} > "$OUT/x2-summary.txt" 2>&1
tail -40 "$OUT/x2-summary.txt"
# The device tool brings back at most ~8 files from $OUT: the summary, info and the main JSON / PNG at the top, the
# logs (and the A/B JSON) in one tarball.
( cd "$OUT" && tar czf x2-logs.tgz --remove-files $(ls | grep -vE '^(x2-summary\.txt|info\.log|x2-logs\.tgz|bench-(local-2gpu|deepep|sim-2node)\.(json|png))$') 2>/dev/null )
ls "$OUT"
