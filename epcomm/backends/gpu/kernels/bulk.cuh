// Variant "tma" (EPCOMM_VARIANT; epcomm/backends/gpu/variants.py): bulk asynchronous copies (TMA, sm_90) for the ht
// dispatch receive of large batches. A warp's lane 0 loads a message's data into the warp's shared-memory slot with
// one cp.async.bulk (completion on an mbarrier), then stores it to each of the token's local expert rows with one
// cp.async.bulk per row. Why: at 24 SMs the receive expansion (one read, ~4 writes of every 14 KB row) was bound by
// what 16 warps of 16-byte loads / stores keep in flight per SM (7 x 16 B per lane, ~57 KB); a warp's bulk load has
// a whole piece (up to 8 KB) in flight, and the row stores leave the load / store units to the copy engine of the SM.
// The host gives the kernels BULK_SMEM_BYTES of dynamic shared memory (GpuBackend); a launch with less (or the
// baseline build) copies with warp_copy_multi as before.
#pragma once
#include "common.cuh"

#ifndef EP_V_TMA
#define EP_V_TMA 0
#endif

namespace ep {

constexpr int BULK_PIECE_MAX = 8192;                                    // bytes of a warp's slot (one piece)
constexpr int BULK_PIECES = (DATA_BYTES + BULK_PIECE_MAX - 1) / BULK_PIECE_MAX;
constexpr int BULK_PIECE = (DATA_BYTES / 16 + BULK_PIECES - 1) / BULK_PIECES * 16;   // equal 16-byte pieces
constexpr int BULK_SLOT = BULK_PIECE + 16;                              // the piece, then the warp's mbarrier
constexpr int BULK_SMEM_BYTES = WARPS * BULK_SLOT;
static_assert(DATA_BYTES % 16 == 0 && BULK_PIECE % 16 == 0 && BULK_PIECE * BULK_PIECES >= DATA_BYTES, "bulk pieces");
#ifdef EP_BULK_SMEM_BYTES
static_assert(BULK_SMEM_BYTES == EP_BULK_SMEM_BYTES, "EP_BULK_SMEM_BYTES (host variants.bulk_smem_bytes) != kernel");
#endif

#if EP_V_TMA
extern __shared__ __align__(16) unsigned char ep_dyn_smem[];
#endif

__device__ __forceinline__ unsigned dyn_smem_bytes() {
  unsigned n;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}

// One warp's bulk-copy state (used by lane 0 only): its slot, its mbarrier, the barrier's current phase.
struct WarpBulk {
  uint32_t buf;
  uint32_t bar;
  uint32_t phase;
};

__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Wait for the barrier's phase; false past the deadline (a local copy that never completes: not expected, but never
// a silent hang).
__device__ __forceinline__ bool mbar_wait(uint32_t bar, uint32_t phase, unsigned long long deadline) {
  uint32_t done;
  for (int spins = 0;; ++spins) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
    if (done) return true;
    if ((spins & 1023) == 1023 && gtime() > deadline) return false;
  }
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Generic-proxy writes (a peer's stores, seen through an acquire) before this thread's async-proxy reads of them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// Whether this launch may use bulk copies (the variant is built in and the host gave the shared memory), and the
// calling warp's state; lane 0 initialises the warp's mbarrier. Every lane of the warp calls it.
__device__ __forceinline__ bool warp_bulk_begin(WarpBulk& wb) {
#if EP_V_TMA
  if (dyn_smem_bytes() < (unsigned)BULK_SMEM_BYTES) return false;
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(ep_dyn_smem);
  wb.buf = base + (threadIdx.x >> 5) * BULK_SLOT;
  wb.bar = wb.buf + BULK_PIECE;
  wb.phase = 0;
  if (lane_id() == 0) mbar_init(wb.bar);
  __syncwarp();
  return true;
#else
  (void)wb;
  return false;
#endif
}

// The DATA_BYTES of src to every non-null dst[k], piece by piece through the warp's slot (lane 0 issues; the warp
// waits for it). The stores of a piece are only waited for (to have read the slot) before the next piece reuses it.
// False (for the whole warp) when a load missed the deadline: recorded as this rank's own timeout (the host names
// the grid / this context, not a peer), and the warp stops.
template <int NK>
__device__ __forceinline__ bool warp_bulk_copy_multi(const Params& p, char* const (&dst)[NK], const char* src,
                                                     WarpBulk& wb, unsigned round, unsigned long long t0) {
  bool ok = true;
  if (lane_id() == 0) {
    for (int off = 0; off < DATA_BYTES && ok; off += BULK_PIECE) {
      const uint32_t n = (uint32_t)min(BULK_PIECE, DATA_BYTES - off);
      bulk_wait_read();
      mbar_expect_tx(wb.bar, n);
      bulk_load(wb.buf, src + off, n, wb.bar);
      ok = mbar_wait(wb.bar, wb.phase, t0 + p.timeout_ns);
      wb.phase ^= 1u;
      if (!ok) { report(p, ERR_TIMEOUT, p.me, -1, (int)round, PHASE_DISPATCH); break; }
#pragma unroll
      for (int k = 0; k < NK; ++k)
        if (dst[k]) bulk_store(dst[k] + off, wb.buf, n);
      bulk_commit();
    }
  }
  return __shfl_sync(0xffffffffu, ok, 0);
}

// Lane 0: every bulk store of this warp complete (before the block counts itself done).
__device__ __forceinline__ void warp_bulk_end() {
  if (lane_id() == 0) bulk_wait_all();
  __syncwarp();
}

}  // namespace ep
