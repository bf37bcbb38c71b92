#!/bin/bash
# One device-machine call of the gpu engineer: install carried wheels, prebuild kernels, run the GPU checks on
# local-2gpu and sim-2node, quick timings. Usage (device machine, repo root): bash dev/device/gpu_session.sh [steps]
# steps: comma list of smoke,local,small,sim,bench,tune,grid,benchsim,basebench,example,init,pytest,leadbench,sanitizer (default smoke,local,sim,bench)
# basebench: bench_quick of the tree in .whl/base.tar (`git archive <commit> -o .whl/base.tar`), same call, same cards
# grid: steady pairs at 1 and 128 tokens for each EPCOMM_BLOCKS in $GRID (default 8 16 33 66 132)
# per-step limits: T_BUILD T_SMOKE T_LOCAL T_SIM T_BENCH T_BENCHSIM T_PYTEST T_SAN; WORKER_ARGS, BENCH_ARGS pass through
set -o pipefail
STEPS=${1:-smoke,local,sim,bench}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export EPCOMM_CACHE=/tmp/epcomm-cache; mkdir -p ~/.cache /tmp/epcomm-cache; ln -sfn /tmp/epcomm-cache ~/.cache/epcomm
export NVSHMEM_REMOTE_TRANSPORT=none
MPI="mpirun --allow-run-as-root --oversubscribe -n 2 -x PYTHONPATH -x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x PYTHONUNBUFFERED -x EPCOMM_CACHE -x NVSHMEM_REMOTE_TRANSPORT ${EPCOMM_BLOCKS:+-x EPCOMM_BLOCKS}"
date -u | tee $OUT/info.log
nvidia-smi -L | tee -a $OUT/info.log
nvidia-smi topo -m 2>&1 | head -5 | tee -a $OUT/info.log
python3 -c "import torch, cuda.core, mpi4py, nvshmem.core as n; print(torch.__version__, cuda.core.__version__, mpi4py.__version__)" 2>&1 | tee -a $OUT/info.log
# kernels prebuilt on the CPU machine travel in .whl/epcomm-cache (same nvcc 13.0 + NVSHMEM 3.4.5 -> same cache keys)
[ -d .whl/epcomm-cache ] && cp -n .whl/epcomm-cache/*.cubin /tmp/epcomm-cache/ 2>/dev/null
( time timeout ${T_BUILD:-240} python3 -m epcomm.backends.gpu.specs ) 2>&1 | tail -5 | tee -a $OUT/info.log
has() { [[ ",$STEPS," == *",$1,"* ]]; }
if has smoke; then
  timeout ${T_SMOKE:-80} $MPI python3 tests/gpu/worker.py --topology configs/local-2gpu.yaml --quick --no-extras --only ll-bf16 2>&1 | tee $OUT/smoke.log | grep -v "^\s*$" | tail -30
fi
if has local; then
  timeout ${T_LOCAL:-150} $MPI python3 tests/gpu/worker.py --topology configs/local-2gpu.yaml ${WORKER_ARGS} 2>&1 | tee $OUT/local.log | grep -E "FAIL|SUMMARY|Error|error|timed out|us/round" | head -60
fi
if has small; then  # a 3-block grid: several send items per block and the ht receive's dynamic path at test sizes
  EPCOMM_BLOCKS=3 EPCOMM_CRECV_BLOCKS=1 timeout ${T_SMALL:-60} ${MPI} -x EPCOMM_BLOCKS -x EPCOMM_CRECV_BLOCKS python3 tests/gpu/worker.py --topology configs/local-2gpu.yaml --quick --no-extras 2>&1 | tee $OUT/small.log | grep -E "FAIL|SUMMARY|Error|error|timed out" | head -30
  EPCOMM_BLOCKS=3 EPCOMM_CRECV_BLOCKS=1 timeout ${T_SMALL:-60} ${MPI} -x EPCOMM_BLOCKS -x EPCOMM_CRECV_BLOCKS python3 tests/gpu/worker.py --topology configs/sim-2node.yaml --quick --no-extras 2>&1 | tee $OUT/small-sim.log | grep -E "FAIL|SUMMARY|Error|error|timed out" | head -30
fi
if has sim; then
  timeout ${T_SIM:-150} $MPI python3 tests/gpu/worker.py --topology configs/sim-2node.yaml ${WORKER_ARGS} 2>&1 | tee $OUT/sim.log | grep -E "FAIL|SUMMARY|Error|error|timed out|us/round" | head -60
fi
if has bench; then
  timeout ${T_BENCH:-100} $MPI python3 tests/gpu/bench_quick.py --topology configs/local-2gpu.yaml --check ${BENCH_ARGS} 2>&1 | tee $OUT/bench_local.log | grep -E "steady pair|floor|check|FAIL|Error|error" | tail -24
fi
if has benchsim; then
  timeout ${T_BENCHSIM:-100} $MPI python3 tests/gpu/bench_quick.py --topology configs/sim-2node.yaml ${BENCH_ARGS} 2>&1 | tee $OUT/bench_sim.log | grep -E "steady pair|check|FAIL|Error|error" | tail -12
fi
if has tune; then  # ht at 4096: send waves x combine receive blocks, steady pairs (TUNE="waves:crb ...")
  for v in ${TUNE:-1:0 2:0 1:33 2:33}; do
    echo "--- EPCOMM_SEND_WAVES=${v%%:*} EPCOMM_CRECV_BLOCKS=${v##*:}" | tee -a $OUT/tune.log
    EPCOMM_SEND_WAVES=${v%%:*} EPCOMM_CRECV_BLOCKS=${v##*:} timeout 60 $MPI -x EPCOMM_SEND_WAVES -x EPCOMM_CRECV_BLOCKS python3 tests/gpu/bench_quick.py --topology configs/local-2gpu.yaml --only ht-bf16,ht-fp8 --steady-only 2>&1 | tee -a $OUT/tune.log | grep -E "rank 0.*steady|Error|error" | tail -4
  done
fi
if has grid; then  # small T: is a grid sized to the work faster? steady pairs at 1 and 128 tokens per EPCOMM_BLOCKS
  for b in ${GRID:-8 16 33 66 132}; do
    echo "--- EPCOMM_BLOCKS=$b" | tee -a $OUT/grid.log
    EPCOMM_BLOCKS=$b timeout 60 $MPI -x EPCOMM_BLOCKS python3 tests/gpu/bench_quick.py --topology configs/local-2gpu.yaml --only ht-fp8,ll-fp8 --steady-only --tokens 1,128 2>&1 | tee -a $OUT/grid.log | grep -E "rank 0.*steady|Error|error" | tail -6
  done
fi
if has basebench; then
  rm -rf /tmp/base && mkdir -p /tmp/base && tar xf .whl/base.tar -C /tmp/base
  ( cd /tmp/base && export PYTHONPATH=/tmp/site:/tmp/base && timeout ${T_BASE:-100} $MPI python3 tests/gpu/bench_quick.py --topology configs/local-2gpu.yaml 2>&1 ) | tee $OUT/bench_base.log | grep -E "steady pair|Error|error" | tail -12
fi
if has example; then
  for a in "--mode ht" "--mode ll" "--mode ht --format fp8 --shared" "--mode ll --format fp8 --shared"; do
    timeout 60 python3 -m launch run -t configs/local-2gpu.yaml --timeout 55 -- python3 examples/moe_layer.py $a 2>&1 | tee -a $OUT/example.log | grep -E "moe_layer|Error|error" | head -6
  done
  timeout 60 python3 -m launch run -t configs/sim-2node.yaml --timeout 55 -- python3 examples/moe_layer.py --mode ht 2>&1 | tee -a $OUT/example.log | grep -E "moe_layer|Error|error" | head -6
fi
if has init; then
  for how in torch uid; do
    rm -f /tmp/epcomm-uid.bin
    timeout 60 $MPI python3 tests/gpu/init_variants.py $how 2>&1 | tee -a $OUT/init.log | grep -E "PASS|FAIL|Error|error|\[rank" | head -8
  done
fi
if has pytest; then
  timeout ${T_PYTEST:-420} python3 -m pytest -q -p no:cacheprovider tests/gpu -rA 2>&1 | tee $OUT/pytest.log | grep -E "PASS|FAIL|passed|failed|skipped|Error" | tail -20
  grep -h "cupy\|FAIL" $OUT/pytest.log | head -20
fi
if has leadbench; then
  timeout 130 python3 -m launch bench -t configs/local-2gpu.yaml --timeout 120 -- --quick --case ht,ll 2>&1 | tee $OUT/leadbench.log | tail -25
fi
if has sanitizer; then
  timeout ${T_SAN:-150} $MPI compute-sanitizer --tool memcheck --report-api-errors no --print-limit 50 python3 tests/gpu/worker.py --topology configs/local-2gpu.yaml --quick --no-extras --only ll-bf16 2>&1 | tee $OUT/sanitizer.log | tail -30
fi
date -u
