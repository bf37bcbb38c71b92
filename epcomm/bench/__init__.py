"""epcomm.bench: dispatch / combine latency and bandwidth against the link's floor and an NCCL all_to_all baseline.

    python -m launch bench -t configs/local-2gpu.yaml --timeout 600 -- --json bench.json --png bench.png

Modules: driver (the command line and the run), cases (links, baseline, ht, ll, sweep), verify (inputs and the
check against the spec), timing (CUDA event and host timers), graphs (CUDA-graph timing), records (the document),
floor (bytes a routing must move and the floor they imply), gpu (copy-engine link figures and the NCCL baseline;
torch only), report (table, JSON, PNG), compare (against a recorded run); medians: epcomm.stats. See docs/PERF.md
for the method.
"""
import os as _os

# Second line of defence (the launcher sets these too): never let NVSHMEM / NCCL / torch use NVLink multicast.
for _k, _v in (("NVSHMEM_DISABLE_NVLS", "1"), ("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    _os.environ.setdefault(_k, _v)
del _k, _v
