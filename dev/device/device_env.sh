# Sourced by the device-call scripts (perf_ab.sh, small_ab.sh): what every run on a lent GPU machine needs first.
# The image lacks nvshmem4py: the wheel carried in the git-ignored .whl/ goes into /tmp/site (a --target folder on
# PYTHONPATH: a venv of the image's python would not see its packages, ../shared/GPU-NOTES.md); kernels prebuilt on
# the CPU machine (.whl/epcomm-cache, same nvcc and NVSHMEM, so the same cache keys) seed the kernel cache; NVLink
# multicast stays off for NVSHMEM, NCCL and torch (the workplace's rule).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EPCOMM_CACHE=${EPCOMM_CACHE:-/tmp/epcomm-cache}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p "$EPCOMM_CACHE"
[ -d .whl/epcomm-cache ] && cp -n .whl/epcomm-cache/*.cubin "$EPCOMM_CACHE"/ 2>/dev/null
true
