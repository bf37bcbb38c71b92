// epcomm expert-parallel dispatch / combine kernels.
//
// The entry points (extern "C" kernels). One translation unit, specialised at compile time by -D defines (see
// layout.cuh and epcomm/backends/gpu/jit.py); its parts: layout.cuh (constants, Params, error record), common.cuh
// (loads / stores, waits, fences, hand-over, error report), payload.cuh (bf16 copy / fp8 quantisation of a token),
// capacity.cuh (the receive-capacity verdict), dispatch.cuh, combine.cuh, results.cuh (live results), fence.cuh
// (fencing off dead ranks).
//
// Protocol: every phase is a persistent grid. Rows are placed at deterministic slots computed with warp match/ballot
// scans (no data-dependent atomics). ll: work items are grid-strided; when a block has issued all its writes, one
// thread fences (system scope; nvshmem_quiet for puts) and bumps a per-phase done counter; the last block sends one
// signal per peer. ht: work items come from counters; each (destination, token chunk) raises its own ready flag, so
// receivers work on what has landed (see README.md). Flags and signals hold the round number (monotonic, kept in
// device memory, so CUDA graph replays and 1000s of back-to-back rounds need no reset). Symmetric buffers are double
// buffered by round parity. Same-node peers get plain 16-byte stores through peer pointers + st.release.sys;
// other-node peers get nvshmem put(+signal). Every wait has a %globaltimer deadline: on expiry an error record goes to
// host-mapped pinned memory and the block exits. Every launch is first admitted against the live results of the
// buffer's output sets (results.cuh): a refused one does nothing.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "layout.cuh"
#include "common.cuh"
#include "payload.cuh"
#include "capacity.cuh"
#include "dispatch.cuh"
#include "combine.cuh"
#include "results.cuh"
#include "fence.cuh"

extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch_send(const __grid_constant__ ep::Params p) {
  if (ep::admitted(p, ep::OP_DISPATCH)) ep::dispatch_send(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch_recv(const __grid_constant__ ep::Params p) {
  if (ep::admitted(p, ep::OP_DISPATCH_RECV)) ep::dispatch_recv(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch(const __grid_constant__ ep::Params p) {
  if (!ep::admitted(p, ep::OP_DISPATCH)) return;
  ep::dispatch_send(p, true);
  ep::dispatch_recv(p, true);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine_send(const __grid_constant__ ep::Params p) {
  if (ep::admitted(p, ep::OP_COMBINE)) ep::combine_send(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine_recv(const __grid_constant__ ep::Params p) {
  if (ep::admitted(p, ep::OP_COMBINE_RECV)) ep::combine_recv(p);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine(const __grid_constant__ ep::Params p) {
  if (!ep::admitted(p, ep::OP_COMBINE)) return;
  ep::combine_send(p, true);
  ep::combine_recv(p);
}
// fencing (fence.cuh): the round's mask and masked ids, one block launched right before each dispatch
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_fence_snapshot(const __grid_constant__ ep::Params p) {
  ep::fence_snapshot(p);
}
// EPBuffer.release: the result of dispatch p.call will not be combined (one thread)
extern "C" __global__ void ep_release(const __grid_constant__ ep::Params p) { ep::release_result(p); }
// sizeof(Params) for the host to check its mirror of the struct
extern "C" __global__ void ep_params_size(unsigned long long* out) { *out = sizeof(ep::Params); }
