# Sourced by the device scripts that run ranks side by side on one GPU (one_gpu_rig.sh's MPS steps, small_ab.sh
# and proxy_sms.sh with MPS_PCT): without MPS the ranks' processes time-slice the GPU; under MPS their kernels run
# at the same time, each on CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the SMs (set it per process, after mps_start).
# mps_start: a daemon of this call's own (pipe and log under /tmp), stopped when the script exits; a daemon an
# earlier call left on the same pipe directory (a warm machine) is stopped first. Returns non-zero if it won't start.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/epcomm-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/epcomm-mps-log
MPSCTL=$(command -v nvidia-cuda-mps-control || echo /usr/local/nvidia/bin/nvidia-cuda-mps-control)
mps_stop() { echo quit | timeout 20 "$MPSCTL" >/dev/null 2>&1; sleep 1; }
mps_start() {
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  mps_stop
  "$MPSCTL" -d || return 1
  trap mps_stop EXIT
  sleep 1; echo "=== MPS daemon started ($MPSCTL)"
}
