// epcomm expert-parallel dispatch / combine kernels.
//
// One source, specialised at compile time by -D defines (see epcomm/backends/gpu/jit.py):
//   EP_H hidden, EP_K topk, EP_E experts, EP_R ranks, EP_M max tokens per rank, EP_FP8 (0/1), EP_HT (0 = "ll", 1 = "ht"),
//   EP_FUSED (fused shared expert), EP_SKIP (skip_a2a), EP_ARW (allreduce world size), EP_THREADS (block size).
//
// Protocol: every phase is a persistent grid. Rows are placed at deterministic slots computed with warp match/ballot
// scans (no data-dependent atomics). ll: work items are grid-strided; when a block has issued all its writes, one
// thread fences (system scope; nvshmem_quiet for puts) and bumps a per-phase done counter; the last block sends one
// signal per peer. ht: work items come from counters; each (destination, token chunk) raises its own ready flag, so
// receivers work on what has landed (see README.md). Flags and signals hold the round number (monotonic, kept in
// device memory, so CUDA graph replays and 1000s of back-to-back rounds need no reset). Symmetric buffers are double
// buffered by round parity. Same-node peers get plain 16-byte stores through peer pointers + st.release.sys;
// other-node peers get nvshmem put(+signal). Every wait has a %globaltimer deadline: on expiry an error record goes to
// host-mapped pinned memory and the block exits.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#ifndef EP_H
#error "EP_H (hidden) must be defined"
#endif
#ifndef EP_THREADS
#define EP_THREADS 512
#endif

namespace ep {

constexpr int H = EP_H;
constexpr int K = EP_K;
constexpr int E = EP_E;
constexpr int R = EP_R;
constexpr int M = EP_M;
constexpr bool FP8 = EP_FP8 != 0;
constexpr bool HT = EP_HT != 0;
constexpr bool FUSED = EP_FUSED != 0;
constexpr bool SKIP = EP_SKIP != 0;
constexpr int ARW = EP_ARW;
constexpr int THREADS = EP_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int NL = E / R;                   // local experts
constexpr int NG = NL + (FUSED ? 1 : 0);    // output groups
constexpr int SC = H / 128;                 // fp8 scale columns
constexpr int DB = FP8 ? H : 2 * H;         // data bytes of one row
constexpr int SB = FP8 ? 4 * SC : 0;        // scale bytes
constexpr int al16(int x) { return (x + 15) / 16 * 16; }
constexpr int META = HT ? al16(8 + 8 * K) : 16;
constexpr int MSG = al16(DB + SB + META);   // one message in the dispatch receive buffer
constexpr int HROW = (NL + 1 + 3) / 4 * 4;  // ints per (src -> dst) histogram row: [NL] per-expert counts, [NL] tokens
constexpr int CH = 64;                      // most tokens per send work item (the host picks p.ch <= CH)
// ht: a source's tokens are cut into at most CHMAX chunks (send work items), each with its own ready flag on the
// destination, so the receiver expands the chunks that have landed while later ones are still on the link.
// The count message of ht: [NL] per-expert counts, tokens, chunks, token prefix by chunk [chunks + 1].
constexpr int CHMAX = HT ? ((M + CH - 1) / CH > (R <= 32 ? 256 : 128) ? (M + CH - 1) / CH : (R <= 32 ? 256 : 128)) : 1;
constexpr int CROW = HT ? (NL + 2 + CHMAX + 1 + 3) / 4 * 4 : HROW;
constexpr int RB = 2 * H;                   // bf16 row bytes (combine)
// ht combine: floats of one source's [M, K] weights in wrecv / cstage, padded to 16 bytes: the weights are copied
// with uint4 stores and M * K need not be a multiple of 4 (unpadded, such a stride misaligns those stores)
constexpr int WST = (M * K + 3) / 4 * 4;

// Rows are cut into slices so that several warps share one row (latency hiding when there are few rows).
constexpr int NCH = H / 8;                          // 16-byte chunks of a bf16 row
constexpr int NSTEP = (NCH + 31) / 32;              // warp steps (32 chunks) per bf16 row
constexpr int SSTEP = NSTEP >= 8 ? NSTEP / 8 : 1;   // warp steps per slice
constexpr int NSL = (NSTEP + SSTEP - 1) / SSTEP;    // slices per row
constexpr int CPS = SSTEP * 32;                     // bf16 chunks per slice

static_assert(H % 128 == 0, "hidden must be a multiple of 128");
static_assert(E % R == 0, "experts must divide by ranks");
static_assert(CH * K <= 4096, "chunk too large");
static_assert(K <= 32, "topk must be <= 32");
static_assert(THREADS % 32 == 0 && THREADS >= 64, "threads");
static_assert(R * (CHMAX + 1) * 4 <= 36 * 1024, "ht: too many ranks x chunks for the receiver's shared chunk table");
static_assert(!HT || R <= 64, "ht: at most 64 ranks (destination masks are 64-bit)");

// State words in device memory (uint32).
// Rounds per phase, S_DONE + phase: blocks done, S_RCTR / S_SCTR / S_CSCTR / S_CRCTR: ht work counters of dispatch
// receive / send and combine send / receive (reset by the last block of the phase).
enum { S_DSEND = 0, S_DRECV = 1, S_CSEND = 2, S_CRECV = 3, S_DONE = 8, S_RCTR = 16, S_SCTR = 17, S_CSCTR = 18,
       S_CRCTR = 19, S_FAIL = 20 };  // S_FAIL: set once any wait of this buffer failed (never reset: buffer is dead)

struct ErrRec {  // lives in host-mapped pinned memory
  int flag;      // 0 = none, else code
  int code;
  int peer;      // rank that did not arrive (or source rank of a bad row)
  int what;      // group / expert / row involved
  int waiter;    // rank that recorded it
  int round;
  int phase;     // 0 dispatch, 1 combine, 2 combine weights
  int pad;
};
enum { ERR_TIMEOUT = 1, ERR_OVERFLOW = 2, ERR_BAD_SRC = 3, ERR_ABORT = 4 };

struct Params {
  const void* x;            // [T, H] bf16
  const int* ids;           // [T, K] int32
  const float* weights;     // [T, K] fp32 (combine)
  const void* expert_y;     // [MAXR, H] bf16 (combine)
  void* y;                  // [T, H] bf16 (combine output)
  void* ex;                 // expert_x [MAXR, H]
  float* escale;            // [MAXR, SC]
  unsigned* row_offsets;    // [NG + 1]
  int* expert_ids;          // [NG]
  int* src_info;            // [MAXR, 3]
  int* tpe;                 // [NL]
  int* hids;                // handle: copy of topk ids [M, K]
  int* hinfo;               // handle (HT): [R][M][2 + K]  (t, unused, row of each k or -1)
  int* hcount;              // handle (HT): [R] received tokens per source
  char* sym;                // local base of the symmetric region
  unsigned* state;          // device state words
  int* hist_acc;            // [R][HROW] accumulators (device memory, zeroed)
  ErrRec* err;              // host-mapped
  int* hchunk;              // handle (HT): chunk table of every source [R][CHMAX + 1] (token prefix), then [R] chunks
  unsigned long long timeout_ns;
  unsigned long long off_drecv, off_dhist, off_dsig, off_stage, off_hstage;
  unsigned long long off_crecv, off_csig, off_wrecv, off_wsig, off_cstage, off_abort, off_dflag, off_cflag;
  int T;
  int me;
  int maxr;                 // rows of expert_x
  int ch;                   // tokens per send work item (1..CH)
  int crb;                  // HT fused combine: blocks that receive from the start (0: all send, then receive)
  char* peer[R];            // same-node peers' symmetric base (nullptr: use nvshmem)
};

// ------------------------------------------------------------------------------------------------ small helpers
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long ld_acq(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_rlx(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_rel(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << lane_id()) - 1u; }

__device__ void report(const Params& p, int code, int peer, int what, int round, int phase) {
  ErrRec* e = p.err;
  atomicExch(&p.state[S_FAIL], 1u);
  if (atomicCAS(&e->flag, 0, code) == 0) {
    e->code = code;
    e->peer = peer;
    e->what = what;
    e->waiter = p.me;
    e->round = round;
    e->phase = phase;
    __threadfence_system();
  }
}

// Wait (every thread s < nsrc of the block) until sig[s] >= round. Returns false (for the whole block) on timeout.
__device__ bool block_wait(const Params& p, const unsigned long long* sig, unsigned round, int phase, int what,
                           unsigned long long t0) {
  bool bad = false;
  for (int s = threadIdx.x; s < R; s += THREADS) {
    if (SKIP && s != p.me) continue;
    const unsigned long long* w = sig + s;
    const unsigned long long* ab = reinterpret_cast<const unsigned long long*>(p.sym + p.off_abort) + s;
    int spins = 0;
    unsigned nap = 32;
    while (ld_rlx(w) < (unsigned long long)round || ld_acq(w) < (unsigned long long)round) {
      __nanosleep(nap);
      if (nap < 256) nap <<= 1;
      if (++spins > 64) {
        spins = 0;
        if (ld_acq(ab) != 0ull) {  // that peer gave up (EPBuffer abort): stop now instead of at the deadline
          report(p, ERR_ABORT, s, what, (int)round, phase);
          bad = true;
          break;
        }
        if (gtime() - t0 > p.timeout_ns) {
          report(p, ERR_TIMEOUT, s, what, (int)round, phase);
          bad = true;
          break;
        }
      }
    }
  }
  return __syncthreads_or(bad) == 0;
}

// Release fence at system / device scope. One thread fences for its block after a __syncthreads(): the barrier orders
// every thread's earlier stores (peer stores included) before the fence, and fences are cumulative (the pattern of
// cooperative groups' grid sync). A fence by each of the 512 threads instead cost ~10 us per hand-over (measured: 14 us
// between the last send and the signal at 1 token), which was most of the fixed cost of a small dispatch / combine.
__device__ __forceinline__ void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Wait (one thread) until *flag >= round; false on the deadline, the peer's abort, or an error already recorded by
// another wait (so that a failed round ends at one deadline, not one per chunk).
__device__ bool thread_wait(const Params& p, const unsigned long long* flag, unsigned round, int phase, int peer,
                            int what, unsigned long long t0) {
  const unsigned long long* ab = reinterpret_cast<const unsigned long long*>(p.sym + p.off_abort) + peer;
  int spins = 0;
  unsigned nap = 32;
  // Poll relaxed, acquire once the value is there, and back off: hundreds of warps polling flat out (worse: with an
  // acquire per poll) slowed the copying warps of the whole GPU up to 10x (measured).
  while (ld_rlx(flag) < (unsigned long long)round || ld_acq(flag) < (unsigned long long)round) {
    __nanosleep(nap);
    if (nap < 1024) nap <<= 1;
    if (++spins > 16) {
      spins = 0;
      if (ld_rlx(ab) != 0ull) { report(p, ERR_ABORT, peer, what, (int)round, phase); return false; }
      if (gtime() - t0 > p.timeout_ns) { report(p, ERR_TIMEOUT, peer, what, (int)round, phase); return false; }
      if (*((volatile unsigned*)&p.state[S_FAIL]) != 0u) return false;   // another wait failed: one deadline
    }
  }
  return true;
}

// All writes of this block are issued: make them visible, count the block; true in the last block to finish.
// Receive phases write only local memory that later work reads in stream order: a device-scope fence is enough there.
__device__ bool block_done(const Params& p, int phase_slot, bool used_nvshmem, bool sys = true) {
  __shared__ int last;
  const int any_shmem = __syncthreads_or(used_nvshmem);
  if (threadIdx.x == 0) {
    if (any_shmem) nvshmem_quiet();
    if (sys) fence_sys(); else fence_gpu();
    unsigned old = atomicAdd(&p.state[S_DONE + phase_slot], 1u);
    last = (old == gridDim.x - 1);
    if (last) {
      fence_sys();  // acquire: every block's writes (ordered before its count) before the hand-over that follows
      p.state[S_DONE + phase_slot] = 0;
    }
  }
  __syncthreads();
  return last != 0;
}

__device__ __forceinline__ bool same_node(const Params& p, int d) { return p.peer[d] != nullptr; }

// One thread, after a __syncthreads that ordered the block's writes: set the flag word at symmetric offset `off` on
// rank `peer` to the round (same node: release store through the peer pointer; other node: quiet, then signal).
__device__ __forceinline__ void raise_flag(const Params& p, size_t off, int peer, unsigned round) {
  if (same_node(p, peer)) {
    st_rel(reinterpret_cast<unsigned long long*>(p.peer[peer] + off), round);
  } else {
    nvshmem_quiet();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + off), round, NVSHMEM_SIGNAL_SET, peer);
  }
}

// Phase timestamps (%globaltimer, ns) of the latest round in state words 32..49 (u64 [9]): 0 dispatch send start,
// 1 block 0's send work issued, 2 last send block signalled, 3 receive wait over (block 0), 4 receive done (last block),
// 5 combine send start, 6 combine send signalled, 7 combine receive wait over (block 0), 8 combine receive done.
// One store by one thread per phase: off the data path. Read by tests/gpu/bench_quick.py.
__device__ __forceinline__ void stamp(const Params& p, int i) {
  reinterpret_cast<unsigned long long*>(p.state + 32)[i] = gtime();
}

// Warp copy of n bytes (multiple of 16), 4 x 16 B in flight per lane.
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int n) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  int nv = n / 16;
  int i = lane_id();
  for (; i + 96 < nv; i += 128) {
    uint4 a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
    d[i] = a; d[i + 32] = b; d[i + 64] = c; d[i + 96] = e;
  }
  for (; i < nv; i += 32) d[i] = s[i];
}

// fp8 blockwise quantisation of one bf16 row by a warp: lane owns 8 channels (16 B) per step; 16 lanes = one block.
__device__ __forceinline__ void warp_quant_row(const __nv_bfloat16* xrow, uint8_t* qdst, float* sdst) {
  constexpr int NCH = H / 8;  // 16-byte chunks of bf16
  for (int base = 0; base < NCH; base += 32) {
    int c = base + lane_id();
    bool act = c < NCH;
    uint4 v = act ? reinterpret_cast<const uint4*>(xrow)[c] : make_uint4(0, 0, 0, 0);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
    float f[8];
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      f[j] = __bfloat162float(h[j]);
      amax = fmaxf(amax, fabsf(f[j]));
    }
#pragma unroll
    for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float scale = fmaxf(amax, 1e-4f) / 448.0f;
    if (act) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float r = __fdiv_rn(f[j], scale);
        uint32_t b = (uint32_t)__nv_cvt_float_to_fp8(r, __NV_SATFINITE, __NV_E4M3);
        if (j < 4) lo |= b << (8 * j); else hi |= b << (8 * (j - 4));
      }
      reinterpret_cast<uint2*>(qdst)[c] = make_uint2(lo, hi);
      if ((lane_id() & 15) == 0) sdst[c / 16] = scale;
    }
  }
}

// Write token t's payload (data [+ scales]) to dst (a message or an output row).
__device__ __forceinline__ void warp_put_token(const Params& p, int t, char* dst_data, float* dst_scales) {
  const char* xrow = reinterpret_cast<const char*>(p.x) + (size_t)t * 2 * H;
  if constexpr (FP8) {
    warp_quant_row(reinterpret_cast<const __nv_bfloat16*>(xrow), reinterpret_cast<uint8_t*>(dst_data), dst_scales);
  } else {
    warp_copy(dst_data, xrow, 2 * H);
  }
}

// Write token t's payload to up to K destinations (nullptr = skip): x is read (and quantised) once.
__device__ __forceinline__ void warp_put_token_multi(const Params& p, int t, char* const (&dst)[K], int step0,
                                                     int step1) {
  const char* xrow = reinterpret_cast<const char*>(p.x) + (size_t)t * 2 * H;
  if constexpr (FP8) {
    // the slice's SSTEP x 16-B loads of x are issued together, then quantised and stored step by step
    for (int st0 = step0; st0 < step1; st0 += SSTEP) {
      uint4 vv[SSTEP];
#pragma unroll
      for (int u = 0; u < SSTEP; ++u) {
        int c = (st0 + u) * 32 + lane_id();
        vv[u] = (st0 + u < step1 && c < NCH) ? __ldg(reinterpret_cast<const uint4*>(xrow) + c) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < SSTEP; ++u) {
        if (st0 + u >= step1) break;
        int c = (st0 + u) * 32 + lane_id();
        bool act = c < NCH;
        const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&vv[u]);
        float f[8];
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) { f[j] = __bfloat162float(h[j]); amax = fmaxf(amax, fabsf(f[j])); }
#pragma unroll
        for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        float scale = fmaxf(amax, 1e-4f) / 448.0f;
        if (act) {
          uint32_t lo = 0, hi = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            uint32_t b = (uint32_t)__nv_cvt_float_to_fp8(__fdiv_rn(f[j], scale), __NV_SATFINITE, __NV_E4M3);
            if (j < 4) lo |= b << (8 * j); else hi |= b << (8 * (j - 4));
          }
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (!dst[k]) continue;
            reinterpret_cast<uint2*>(dst[k])[c] = make_uint2(lo, hi);
            if ((lane_id() & 15) == 0) reinterpret_cast<float*>(dst[k] + DB)[c / 16] = scale;
          }
        }
      }
    }
  } else {
    const uint4* src = reinterpret_cast<const uint4*>(xrow);
    for (int st0 = step0; st0 < step1; st0 += SSTEP) {
      uint4 v[SSTEP];
#pragma unroll
      for (int u = 0; u < SSTEP; ++u) {
        int c = (st0 + u) * 32 + lane_id();
        if (st0 + u < step1 && c < NCH) v[u] = src[c];
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (!dst[k]) continue;
#pragma unroll
        for (int u = 0; u < SSTEP; ++u) {
          int c = (st0 + u) * 32 + lane_id();
          if (st0 + u < step1 && c < NCH) reinterpret_cast<uint4*>(dst[k])[c] = v[u];
        }
      }
    }
  }
}

// Copy 16-byte chunks [v0, v1) of a row by a warp.
__device__ __forceinline__ void warp_copy_range(char* dst, const char* src, int v0, int v1) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  int i = v0 + lane_id();
  for (; i + 32 < v1; i += 64) { uint4 a = s[i], b = s[i + 32]; d[i] = a; d[i + 32] = b; }
  for (; i < v1; i += 32) d[i] = s[i];
}

// Copy 16-byte chunks [v0, v1) of src to every non-null dst[k] by a warp: U x 16 B loads per lane are issued before
// the first store (one dependent load -> store round per U x 32 chunks instead of one per 32).
template <int NK, int U = 3>
__device__ __forceinline__ void warp_copy_multi(char* const (&dst)[NK], const char* src, int v0, int v1) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  for (int b = v0 + lane_id(); b < v1; b += 32 * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (b + 32 * u < v1) v[u] = s[b + 32 * u];
#pragma unroll
    for (int k = 0; k < NK; ++k) {
      if (!dst[k]) continue;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (b + 32 * u < v1) reinterpret_cast<uint4*>(dst[k])[b + 32 * u] = v[u];
    }
  }
}

// Tokens per send work item: the host's choice, clamped so that ht has at most CHMAX chunks per source.
__device__ __forceinline__ int chunk_tokens(const Params& p) {
  const int ch = max(1, min(CH, p.ch));
  return HT ? max(ch, (p.T + CHMAX - 1) / CHMAX) : ch;
}

// A warp takes the next unit of a dynamic work list (counter in p.state).
__device__ __forceinline__ int warp_grab(const Params& p, int slot) {
  int u = 0;
  if (lane_id() == 0) u = (int)atomicAdd(&p.state[slot], 1u);
  return __shfl_sync(0xffffffffu, u, 0);
}

__device__ __forceinline__ unsigned cur_round(const Params& p, int slot) {
  return *((volatile unsigned*)&p.state[slot]) + 1u;
}

// out[0..n] = exclusive prefix sums of in[0..n) (out[n] = total); every thread of the block calls it.
__device__ void block_exclusive_scan(const int* in, int* out, int n) {
  __shared__ int s_warp[WARPS];
  const int per = (n + THREADS - 1) / THREADS;
  const int b = threadIdx.x * per, e = min(n, b + per);
  int sum = 0;
  for (int i = b; i < e; ++i) sum += in[i];
  // inclusive scan of per-thread sums across the block
  int v = sum;
  const int lane = lane_id(), warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) { int u = __shfl_up_sync(0xffffffffu, v, o); if (lane >= o) v += u; }
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < WARPS ? s_warp[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) { int u = __shfl_up_sync(0xffffffffu, w, o); if (lane >= o) w += u; }
    if (lane < WARPS) s_warp[lane] = w;
  }
  __syncthreads();
  int acc = v - sum + (warp ? s_warp[warp - 1] : 0);
  for (int i = b; i < e; ++i) { out[i] = acc; acc += in[i]; }
  if (threadIdx.x == THREADS - 1) out[n] = acc;
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------ dispatch, send
// Work item (destination d, token chunk c). Per-entry rank inside its expert (and HT: per-token slot for d) from a
// prefix count over earlier tokens plus a warp match_any scan of the chunk.
// fused: send and receive run in one kernel (ep_dispatch). Then, in ht bf16, the messages to this rank itself carry
// only their metadata and the receiver reads the row from x (one write + one read of every own row less in HBM; the
// split kernels cannot: the caller may reuse x between dispatch_async and dispatch_wait).
__device__ __forceinline__ bool own_rows_from_x(bool fused) { return HT && !FP8 && fused; }

__device__ void dispatch_send(const Params& p, bool fused) {
  __shared__ int s_cnt[NL];        // running per-expert count (experts of d)
  __shared__ int s_rank[CH * K];   // rank of entry within its expert, -1 if not on d
  __shared__ int s_tslot[CH];      // HT: slot of token for d, -1 if not sent to d
  __shared__ int s_ctok[CHMAX + 1];      // HT, last chunk: tokens of each chunk that go to d, then their prefix
  __shared__ int s_ctpref[CHMAX + 1];
  __shared__ int s_chunk_n;              // HT: tokens of this chunk that go to d
  __shared__ int s_item;
  const unsigned round = cur_round(p, S_DSEND);
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 0);
  const int par = round & 1;
  const int T = p.T;
  const int ch = chunk_tokens(p);
  const int nchunks = max(1, (T + ch - 1) / ch);   // T = 0: one empty item per destination (counts, flag)
  const int ndest = SKIP ? 1 : R;
  const int nitems = ndest * nchunks;
  bool used_shmem = false;
  const int warp = threadIdx.x >> 5, lane = lane_id();

  // handle copy of the ids (combine needs them) + the fused shared expert rows
  for (int i = blockIdx.x * THREADS + threadIdx.x; i < T * K; i += gridDim.x * THREADS) p.hids[i] = p.ids[i];

  // ht: items taken in order from a counter, so blocks whose items went to this rank (fast) take more of them and
  // the chunks reach each destination in the order of the list (and so of its receive)
  auto next_item = [&](int prev) {
    if (!HT) return prev + (int)gridDim.x;
    if (threadIdx.x == 0) s_item = (int)atomicAdd(&p.state[S_SCTR], 1u);
    __syncthreads();
    const int v = s_item;
    __syncthreads();
    return v;
  };
  for (int item = HT ? next_item(0) : blockIdx.x; item < nitems; item = next_item(item)) {
    // ht: destinations interleaved and the last chunk first: the item of a destination's last chunk knows (from
    // its prefix pass) the complete counts, and ships them first thing, so every receiver can place rows early
    const int d = SKIP ? p.me : (HT ? item % ndest : item / nchunks);
    const int c = HT ? nchunks - 1 - item / ndest : item % nchunks;
    const bool last = HT && c == nchunks - 1;
    const int t0 = c * ch, t1 = min(T, t0 + ch);
    const int lo = d * NL, hi = lo + NL;
    for (int l = threadIdx.x; l < NL; l += THREADS) s_cnt[l] = 0;
    if (last) for (int q = threadIdx.x; q <= nchunks; q += THREADS) s_ctok[q] = 0;
    __syncthreads();
    // prefix over tokens [0, t0)
    int tok_before = 0;
    for (int tb = 0; tb < t0; tb += THREADS) {
      int t = tb + threadIdx.x;
      bool goes = false;
      if (t < t0) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          int id = p.ids[t * K + k];
          if (id >= lo && id < hi) { atomicAdd(&s_cnt[id - lo], 1); goes = true; }
        }
        if (last && goes) atomicAdd(&s_ctok[t / ch], 1);
      }
      tok_before += __syncthreads_count(goes);
    }
    __syncthreads();
    // warp 0: ranks inside the chunk
    if (warp == 0) {
      int tslot = tok_before;
      const int n = (t1 - t0) * K;
      for (int j0 = 0; j0 < n; j0 += 32) {
        int j = j0 + lane;
        int id = j < n ? p.ids[t0 * K + j] : -1;
        bool on = id >= lo && id < hi;
        int key = on ? id : -1 - lane;
        unsigned m = __match_any_sync(0xffffffffu, key);
        int r = -1;
        if (on) {
          r = s_cnt[id - lo] + __popc(m & lanemask_lt());
        }
        __syncwarp();
        if (on && (m >> lane) == 1u) {  // highest lane of its group
          s_cnt[id - lo] += __popc(m);
          if (!HT) atomicAdd(&p.hist_acc[d * HROW + (id - lo)], __popc(m));
        }
        if (j < n) s_rank[j] = r;
        __syncwarp();
      }
      if constexpr (HT) {
        for (int tt = 0; tt < t1 - t0; tt += 32) {
          int t = t0 + tt + lane;
          bool goes = false;
          if (t < t1) {
            for (int k = 0; k < K; ++k) { int id = p.ids[t * K + k]; goes |= (id >= lo && id < hi); }
          }
          unsigned b = __ballot_sync(0xffffffffu, goes);
          if (t < t1) s_tslot[tt + lane] = goes ? tslot + __popc(b & lanemask_lt()) : -1;
          tslot += __popc(b);
        }
        if (lane == 0) s_chunk_n = tslot - tok_before;
      }
    }
    __syncthreads();
    if constexpr (HT) {
      if (last) {  // ship the count message to d (s_cnt now counts tokens [0, T))
        if (threadIdx.x == 0) s_ctok[c] = s_chunk_n;
        __syncthreads();
        block_exclusive_scan(s_ctok, s_ctpref, nchunks);
        const size_t coff = p.off_dhist + ((size_t)par * R + p.me) * CROW * 4;
        const bool loc = same_node(p, d);
        int* cm = loc ? reinterpret_cast<int*>(p.peer[d] + coff)
                      : reinterpret_cast<int*>(p.sym + p.off_hstage + (size_t)d * CROW * 4);
        for (int l = threadIdx.x; l < NL; l += THREADS) cm[l] = s_cnt[l];
        for (int q = threadIdx.x; q <= nchunks; q += THREADS) cm[NL + 2 + q] = s_ctpref[q];
        if (threadIdx.x == 0) { cm[NL] = s_ctpref[nchunks]; cm[NL + 1] = nchunks; }
        __syncthreads();
        const size_t soff = p.off_dsig + ((size_t)par * R + p.me) * 8;
        if (loc) {
          if (threadIdx.x == 0) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + soff), round);
        } else {
          nvshmemx_putmem_signal_nbi_block(p.sym + coff, cm, CROW * 4, reinterpret_cast<uint64_t*>(p.sym + soff),
                                           round, NVSHMEM_SIGNAL_SET, d);
          used_shmem = true;
        }
      }
    }
    // copy
    const bool local = same_node(p, d);
    char* dbase = (local ? p.peer[d] : p.sym);
    if constexpr (!HT) {
      // (token, slice) per warp: x[t] is read (and quantised) once per slice and written to every slot on d
      const int nt = t1 - t0;
      for (int w = warp; w < nt * NSL; w += WARPS) {
        const int tt = w / NSL, sl = w % NSL;
        const int t = t0 + tt;
        char* dst[K];
        size_t offs[K];
        bool any = false;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          int r = s_rank[tt * K + k];
          dst[k] = nullptr;
          offs[k] = 0;
          if (r < 0) continue;
          int l = p.ids[t * K + k] - lo;
          if (r >= M) {  // more rows for one expert than slots (duplicate expert ids in a token)
            if (lane == 0 && sl == 0) report(p, ERR_OVERFLOW, d, l, (int)round, 0);
            continue;
          }
          offs[k] = p.off_drecv + ((((size_t)par * NL + l) * R + p.me) * M + r) * MSG;
          dst[k] = local ? dbase + offs[k] : p.sym + p.off_stage + ((size_t)t * K + k) * MSG;
          any = true;
        }
        if (!any) continue;
        warp_put_token_multi(p, t, dst, sl * SSTEP, min(NSTEP, (sl + 1) * SSTEP));
        if (lane == 0 && sl == 0) {
#pragma unroll
          for (int k = 0; k < K; ++k)
            if (dst[k]) { int* meta = reinterpret_cast<int*>(dst[k] + DB + SB); meta[0] = t; meta[1] = k; }
        }
      }
      if (!local) {  // other node: the staged messages are complete once every slice is written
        __syncthreads();
        for (int j = warp; j < nt * K; j += WARPS) {
          int r = s_rank[j];
          if (r < 0 || r >= M) continue;
          int t = t0 + j / K, k = j % K;
          int l = p.ids[t * K + k] - lo;
          size_t off = p.off_drecv + ((((size_t)par * NL + l) * R + p.me) * M + r) * MSG;
          nvshmemx_putmem_nbi_warp(p.sym + off, p.sym + p.off_stage + ((size_t)t * K + k) * MSG, MSG, d);
        }
        used_shmem = true;
      }
    } else {
      // (token, slice) per warp: every warp of the block is busy even with a few tokens per item, and each lane has
      // a slice's SSTEP loads of x in flight (one warp per whole row was a chain of NSTEP dependent load -> store
      // rounds: the small-T latency)
      const int nt = t1 - t0;
      const bool meta_only = own_rows_from_x(fused) && d == p.me;
      for (int w = warp; w < nt * NSL; w += WARPS) {
        const int tt = w / NSL, sl = w % NSL;
        const int slot = s_tslot[tt];
        if (slot < 0 || (meta_only && sl != 0)) continue;
        const int t = t0 + tt;
        const size_t off = p.off_drecv + (((size_t)par * R + p.me) * M + slot) * MSG;
        char* dst[K];
#pragma unroll
        for (int k = 0; k < K; ++k) dst[k] = nullptr;
        dst[0] = local ? dbase + off : p.sym + p.off_stage + ((size_t)t * R + d) * MSG;
        if (!meta_only) warp_put_token_multi(p, t, dst, sl * SSTEP, min(NSTEP, (sl + 1) * SSTEP));
        if (sl == 0) {
          int* meta = reinterpret_cast<int*>(dst[0] + DB + SB);
          if (lane == 0) { meta[0] = t; meta[1] = 0; }
          if (lane < K) { meta[2 + lane] = p.ids[t * K + lane]; meta[2 + K + lane] = s_rank[tt * K + lane]; }
        }
      }
      if (!local) {  // other node: each staged message is complete once all its slices are written
        __syncthreads();
        for (int tt = warp; tt < nt; tt += WARPS) {
          const int slot = s_tslot[tt];
          if (slot < 0) continue;
          const int t = t0 + tt;
          const size_t off = p.off_drecv + (((size_t)par * R + p.me) * M + slot) * MSG;
          nvshmemx_putmem_nbi_warp(p.sym + off, p.sym + p.off_stage + ((size_t)t * R + d) * MSG, MSG, d);
        }
        used_shmem = true;
      }
      // this chunk's messages are written: raise its ready flag on d
      __syncthreads();
      if (threadIdx.x == 0) raise_flag(p, p.off_dflag + (((size_t)par * R + p.me) * CHMAX + c) * 8, d, round);
    }
    __syncthreads();
  }

  // fused shared expert: this rank's own share of tokens -> group 0, rows 0..
  if constexpr (FUSED) {
    int s0 = 0, s1 = T;
    if (SKIP && ARW > 1) {
      int i = p.me % ARW, base = T / ARW, extra = T % ARW;
      s0 = i * base + min(i, extra);
      s1 = s0 + base + (i < extra ? 1 : 0);
    }
    const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
    for (int t = s0 + gw; t < s1; t += nw) {
      int row = t - s0;
      char* dst = reinterpret_cast<char*>(p.ex) + (size_t)row * DB;
      warp_put_token(p, t, dst, p.escale + (size_t)row * SC);
      if (lane == 0) { p.src_info[row * 3] = p.me; p.src_info[row * 3 + 1] = t; p.src_info[row * 3 + 2] = -1; }
    }
  }

  // hand over: the last block ships the per-expert histogram rows and the signals
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 1);
  const bool last_block = block_done(p, S_DSEND, used_shmem);
  if (!HT && last_block) {
    // ll: the whole block moves the R x HROW counts at once (independent atomics in flight, not HROW / 32 dependent
    // rounds per warp), each writer fences its own stores, then one thread per destination signals
    const size_t hoff = p.off_dhist + (((size_t)par * R + p.me) * HROW) * 4;
    for (int q = threadIdx.x; q < R * HROW; q += THREADS) {
      const int d = q / HROW, l = q % HROW;
      if (SKIP && d != p.me) continue;
      int* dst = same_node(p, d) ? reinterpret_cast<int*>(p.peer[d] + hoff)
                                 : reinterpret_cast<int*>(p.sym + p.off_hstage + (size_t)d * HROW * 4);
      dst[l] = atomicExch(&p.hist_acc[d * HROW + l], 0);
    }
    __syncthreads();  // the counts of every thread before each signalling thread's release (st.release.sys)
    const size_t soff = p.off_dsig + ((size_t)par * R + p.me) * 8;
    for (int d = threadIdx.x; d < R; d += THREADS) {
      if (SKIP && d != p.me) continue;
      if (same_node(p, d)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + soff), round);
    }
    // other-node destinations: block-scope put + signal of the HROW counts (was one thread: HROW / 4 serial steps
    // each), one quiet for all of them
    bool any_remote = false;
    for (int d = 0; d < R; ++d) {  // block-uniform conditions
      if ((SKIP && d != p.me) || same_node(p, d)) continue;
      nvshmemx_putmem_signal_nbi_block(p.sym + hoff, p.sym + p.off_hstage + (size_t)d * HROW * 4, HROW * 4,
                                       reinterpret_cast<uint64_t*>(p.sym + soff), round, NVSHMEM_SIGNAL_SET, d);
      any_remote = true;
    }
    if (any_remote && threadIdx.x == 0) nvshmem_quiet();
    __syncthreads();
  }
  // the round of this phase is over for this rank (ht: every chunk flag and count message is out)
  if (last_block && threadIdx.x == 0) { stamp(p, 2); p.state[S_SCTR] = 0; __threadfence(); p.state[S_DSEND] = round; }
}

// ------------------------------------------------------------------------------------------------ dispatch, receive
__device__ void dispatch_recv(const Params& p, bool fused) {
  __shared__ int s_c[NL * R];      // rows of expert l from source s (LL / HT alike)
  __shared__ int s_pref[NL * R + 1];
  __shared__ int s_ntok[R];
  __shared__ int s_tpref[R + 1];
  __shared__ int s_chpref[HT ? R * (CHMAX + 1) : 1];   // HT: per source, token prefix by chunk
  __shared__ int s_nch[R];
  const unsigned round = cur_round(p, S_DRECV);
  const int par = round & 1;
  const unsigned long long t0 = gtime();
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int nshare_begin = 0;
  int nshare = 0;
  if constexpr (FUSED) {
    nshare = p.T;
    if (SKIP && ARW > 1) {
      int i = p.me % ARW, base = p.T / ARW, extra = p.T % ARW;
      nshare = base + (i < extra ? 1 : 0);
    }
  }
  (void)nshare_begin;
  const unsigned long long* sig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_dsig) + (size_t)par * R;
  if (!block_wait(p, sig, round, 0, -1, t0)) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 3);
  // ll: the per-expert counts of every source; ht: every source's count message (counts, tokens, chunk table)
  const int* hist = reinterpret_cast<const int*>(p.sym + p.off_dhist) + (size_t)par * R * CROW;
  for (int q = threadIdx.x; q < NL * R; q += THREADS) {
    int l = q / R, s = q % R;
    s_c[q] = (SKIP && s != p.me) ? 0 : min(hist[s * CROW + l], HT ? M * K : M);
  }
  for (int s = threadIdx.x; s < R; s += THREADS) {
    s_ntok[s] = (SKIP && s != p.me) ? 0 : min(hist[s * CROW + NL], M);
    if (HT) s_nch[s] = (SKIP && s != p.me) ? 0 : max(0, min(hist[s * CROW + NL + 1], CHMAX));
  }
  __syncthreads();
  if constexpr (HT) {
    for (int q = threadIdx.x; q < R * (CHMAX + 1); q += THREADS) {
      const int s = q / (CHMAX + 1), c = q % (CHMAX + 1);
      s_chpref[q] = c <= s_nch[s] ? hist[s * CROW + NL + 2 + c] : 0x7fffffff;
    }
  }
  block_exclusive_scan(s_c, s_pref, NL * R);
  if (threadIdx.x == 0) {
    int ta = 0;
    // ht receives sources in the order me, me + 1, ... (its own messages land first)
    for (int q = 0; q < R; ++q) { s_tpref[q] = ta; ta += s_ntok[HT ? (p.me + q) % R : q]; }
    s_tpref[R] = ta;
  }
  __syncthreads();
  const int total = nshare + s_pref[NL * R];
  if (blockIdx.x == 0) {
    for (int g = threadIdx.x; g <= NG; g += THREADS) {
      unsigned v;
      if (FUSED && g == 0) v = 0;
      else v = nshare + s_pref[(g - (FUSED ? 1 : 0)) * R];
      p.row_offsets[g] = v;
      if (g < NG) p.expert_ids[g] = (FUSED && g == 0) ? -1 : p.me * NL + (g - (FUSED ? 1 : 0));
    }
    for (int l = threadIdx.x; l < NL; l += THREADS) {
      int c = 0;
      for (int s = 0; s < R; ++s) c += s_c[l * R + s];
      p.tpe[l] = c;
    }
    if constexpr (HT) {
      for (int s = threadIdx.x; s < R; s += THREADS) { p.hcount[s] = s_ntok[s]; p.hchunk[R * (CHMAX + 1) + s] = s_nch[s]; }
      for (int q = threadIdx.x; q < R * (CHMAX + 1); q += THREADS) p.hchunk[q] = s_chpref[q];
    }
  }
  // rows past the end: src_info = -1
  for (int i = total * 3 + blockIdx.x * THREADS + threadIdx.x; i < p.maxr * 3; i += gridDim.x * THREADS) p.src_info[i] = -1;

  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  const char* rbuf = p.sym + p.off_drecv;
  if constexpr (!HT) {
    const int nr = s_pref[NL * R];
    constexpr int NV = DB / 16;                       // 16-byte chunks of the data part
    constexpr int VPS = (NV + NSL - 1) / NSL;
    for (int it = gw; it < nr * NSL; it += nw) {
      const int j = it / NSL, sl = it % NSL;
      // find q with s_pref[q] <= j < s_pref[q+1]
      int lo = 0, hi = NL * R;  // invariant: s_pref[lo] <= j < s_pref[hi]
      while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (s_pref[mid] <= j) lo = mid; else hi = mid; }
      int l = lo / R, s = lo % R, i = j - s_pref[lo];
      const char* msg = rbuf + ((((size_t)par * NL + l) * R + s) * M + i) * MSG;
      int row = nshare + j;
      char* const dst[1] = {reinterpret_cast<char*>(p.ex) + (size_t)row * DB};
      warp_copy_multi<1, (VPS + 31) / 32>(dst, msg, sl * VPS, min(NV, (sl + 1) * VPS));
      if (sl != 0) continue;
      if (FP8) for (int c = lane; c < SC; c += 32) p.escale[(size_t)row * SC + c] = reinterpret_cast<const float*>(msg + DB)[c];
      if (lane == 0) {
        const int* meta = reinterpret_cast<const int*>(msg + DB + SB);
        p.src_info[row * 3] = s; p.src_info[row * 3 + 1] = meta[0]; p.src_info[row * 3 + 2] = meta[1];
      }
    }
  } else {
    const int ntot = s_tpref[R];
    constexpr int NV = DB / 16;                       // 16-byte chunks of the data part
    constexpr int VPS = (NV + NSL - 1) / NSL;
    // Up to 4 rounds: (message, slice) units, spread statically over all warps. More: whole messages, taken in
    // order (atomic counter), sources from this rank on, so the blocks that are free early (their send items went
    // to this rank) expand what has landed while other blocks still send to the peers. (Whole messages pay only
    // when every warp has several: at 128 tokens one warp per message took 26 us.)
    const bool dyn = ntot * NSL > 4 * nw;
    const int nunits = dyn ? ntot : ntot * NSL;
    int ready_s = -1, ready_c = -1;   // the chunk this warp last found landed
    for (int u = dyn ? warp_grab(p, S_RCTR) : gw; u < nunits; u = dyn ? warp_grab(p, S_RCTR) : u + nw) {
      const int j = dyn ? u : u / NSL, sl = dyn ? 0 : u % NSL;
      int q = 0;
      while (q + 1 < R && s_tpref[q + 1] <= j) ++q;
      const int s = (p.me + q) % R;
      // dynamic: last message first (the sender's chunks go out last chunk first)
      const int i = dyn ? s_ntok[s] - 1 - (j - s_tpref[q]) : j - s_tpref[q];
      // the sender's chunk that holds message i: last c with prefix[c] <= i (binary search in shared memory)
      const int* cp = s_chpref + s * (CHMAX + 1);
      int clo = 0, chi = max(1, s_nch[s]);  // invariant: cp[clo] <= i < cp[chi]
      while (chi - clo > 1) { const int mid = (clo + chi) >> 1; if (cp[mid] <= i) clo = mid; else chi = mid; }
      if (s != ready_s || clo != ready_c) {
        bool ok = true;
        if (lane == 0) {
          const unsigned long long* f =
              reinterpret_cast<const unsigned long long*>(p.sym + p.off_dflag) + ((size_t)par * R + s) * CHMAX + clo;
          ok = thread_wait(p, f, round, 0, s, clo, t0);
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        __syncwarp();  // lane 0's acquire of the flag before every lane's reads of the chunk
        if (!ok) break;
        ready_s = s;
        ready_c = clo;
      }
      const char* msg = rbuf + (((size_t)par * R + s) * M + i) * MSG;
      const int* meta = reinterpret_cast<const int*>(msg + DB + SB);
      int t = meta[0];
      int rows[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        int id = meta[2 + k];
        int l = id - p.me * NL;
        rows[k] = (l >= 0 && l < NL) ? nshare + s_pref[l * R + s] + meta[2 + K + k] : -1;
      }
      // one read of the message slice, one write per local expert slot
      char* dst[K];
#pragma unroll
      for (int k = 0; k < K; ++k) dst[k] = rows[k] >= 0 ? reinterpret_cast<char*>(p.ex) + (size_t)rows[k] * DB : nullptr;
      // own tokens (fused bf16): the row comes straight from x
      const char* src = (own_rows_from_x(fused) && s == p.me && t >= 0 && t < p.T)
                            ? reinterpret_cast<const char*>(p.x) + (size_t)t * DB : msg;
      if (dyn) warp_copy_multi<K, 7>(dst, src, 0, NV);
      else warp_copy_multi<K, (VPS + 31) / 32>(dst, src, sl * VPS, min(NV, (sl + 1) * VPS));
      if (sl == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (rows[k] < 0) continue;
          if (FP8) for (int c = lane; c < SC; c += 32) p.escale[(size_t)rows[k] * SC + c] = reinterpret_cast<const float*>(msg + DB)[c];
          if (lane == 0) { p.src_info[rows[k] * 3] = s; p.src_info[rows[k] * 3 + 1] = t; p.src_info[rows[k] * 3 + 2] = k; }
        }
        int* hi = p.hinfo + ((size_t)s * M + i) * (2 + K);
        if (lane == 0) { hi[0] = t; hi[1] = 0; }
        if (lane < K) hi[2 + lane] = rows[lane];
      }
    }
  }
  if (block_done(p, S_DRECV, false, false)) {
    if (threadIdx.x == 0) { stamp(p, 4); p.state[S_DRECV] = round; p.state[S_RCTR] = 0; }
  }
}

// ------------------------------------------------------------------------------------------------ combine
__device__ __forceinline__ void acc8(float* a, uint4 v, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __bfloat1622float2(h[j]);
    a[2 * j] = fmaf(w, f.x, a[2 * j]);
    a[2 * j + 1] = fmaf(w, f.y, a[2 * j + 1]);
  }
}
__device__ __forceinline__ uint4 pack8(const float* a) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(a[2 * j], a[2 * j + 1]);
  return v;
}

__device__ __forceinline__ int shared_rows(const Params& p, int* s0) {
  int a = 0, n = p.T;
  if (SKIP && ARW > 1) {
    int i = p.me % ARW, base = p.T / ARW, extra = p.T % ARW;
    a = i * base + min(i, extra);
    n = base + (i < extra ? 1 : 0);
  }
  *s0 = a;
  return n;
}

// expert side: send expert_y rows back to their source ranks
__device__ void combine_send(const Params& p, bool fused) {
  const unsigned round = cur_round(p, S_CSEND);
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 5);
  const int par = round & 1;
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  bool used_shmem = false;
  const char* ey = reinterpret_cast<const char*>(p.expert_y);
  if constexpr (!HT) {
    const int begin = FUSED ? (int)p.row_offsets[1] : 0;
    const int end = (int)p.row_offsets[NG];
    const int nrow = max(0, end - begin);
    for (int it = gw; it < nrow * NSL; it += nw) {
      const int j = begin + it / NSL, sl = it % NSL;
      int s = p.src_info[j * 3], t = p.src_info[j * 3 + 1], k = p.src_info[j * 3 + 2];
      if (s < 0 || s >= R || t < 0 || t >= M || k < 0 || k >= K || (SKIP && s != p.me) || j >= p.maxr) {
        if (lane == 0 && sl == 0) report(p, ERR_BAD_SRC, s, j, (int)round, 1);
        continue;
      }
      size_t off = p.off_crecv + (((size_t)par * M + t) * K + k) * RB;
      const int v0 = sl * CPS, v1 = min(NCH, (sl + 1) * CPS);
      if (same_node(p, s)) {
        warp_copy_range(p.peer[s] + off, ey + (size_t)j * RB, v0, v1);
      } else {
        nvshmemx_putmem_nbi_warp(p.sym + off + (size_t)v0 * 16, ey + (size_t)j * RB + (size_t)v0 * 16,
                                 (size_t)(v1 - v0) * 16, s);
        used_shmem = true;
      }
    }
  } else {
    // step 1 (source side): send my weights [T, K] to every destination rank (block 0, one warp per destination)
    if (blockIdx.x == 0) {
      // the whole block copies (16-byte vectors, many loads in flight), then one thread per destination signals
      const int nw = p.T * K;                 // floats
      const int nv = nw / 4;                  // full 16-byte vectors
      const uint4* wsrc = reinterpret_cast<const uint4*>(p.weights);
      const bool wal = (reinterpret_cast<uintptr_t>(p.weights) & 15) == 0;
      for (int d = 0; d < R; ++d) {
        if (SKIP && d != p.me) continue;
        size_t off = p.off_wrecv + (((size_t)par * R + p.me) * WST) * 4;
        float* dst = same_node(p, d) ? reinterpret_cast<float*>(p.peer[d] + off)
                                     : reinterpret_cast<float*>(p.sym + p.off_cstage) + (size_t)d * WST;
        if (wal) {
          for (int i = threadIdx.x; i < nv; i += THREADS) reinterpret_cast<uint4*>(dst)[i] = wsrc[i];
          for (int i = nv * 4 + threadIdx.x; i < nw; i += THREADS) dst[i] = p.weights[i];
        } else {
          for (int i = threadIdx.x; i < nw; i += THREADS) dst[i] = p.weights[i];
        }
      }
      __syncthreads();  // every thread's weight stores before each signalling thread's release (st.release.sys)
      const size_t off = p.off_wrecv + (((size_t)par * R + p.me) * WST) * 4;
      const size_t soff = p.off_wsig + ((size_t)par * R + p.me) * 8;
      for (int d = threadIdx.x; d < R; d += THREADS) {
        if (SKIP && d != p.me) continue;
        if (same_node(p, d)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + soff), round);
      }
      // other-node destinations: the whole block puts the staged [T, K] weights (+ signal after the data), one call
      // per destination (was one thread: T*K*4 / 16 serial load -> store steps, ~0.8 ms at T 4096, gating step 2
      // on every rank); one quiet for all of them (staging is reused next round)
      bool any_remote = false;
      for (int d = 0; d < R; ++d) {  // block-uniform conditions
        if ((SKIP && d != p.me) || same_node(p, d)) continue;
        float* stg = reinterpret_cast<float*>(p.sym + p.off_cstage) + (size_t)d * WST;
        nvshmemx_putmem_signal_nbi_block(p.sym + off, stg, (size_t)nw * 4, reinterpret_cast<uint64_t*>(p.sym + soff),
                                         round, NVSHMEM_SIGNAL_SET, d);
        any_remote = true;
      }
      if (any_remote && threadIdx.x == 0) nvshmem_quiet();
    }
    // step 2 (expert side): reduce each received token's local rows (fp32, weighted) and send one row back.
    // In the fused kernel the last p.crb blocks skip this and receive from the start (combine_recv), so the
    // source's sums overlap the sends: every (source, token chunk) raises a ready flag on the source when its last
    // unit is written.
    __shared__ int s_cp[R * (CHMAX + 1)];   // chunk tables of the sources (message i of s is in s's chunk c)
    __shared__ int s_cn[R];
    for (int q = threadIdx.x; q < R * (CHMAX + 1); q += THREADS) s_cp[q] = p.hchunk[q];
    for (int q = threadIdx.x; q < R; q += THREADS) s_cn[q] = max(0, min(p.hchunk[R * (CHMAX + 1) + q], CHMAX));
    __syncthreads();
    const int sb = fused ? (int)gridDim.x - max(0, min(p.crb, (int)gridDim.x - 1)) : (int)gridDim.x;
    if ((int)blockIdx.x < sb) {
      const unsigned long long t0 = gtime();
      const unsigned long long* wsig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_wsig) + (size_t)par * R;
      if (!block_wait(p, wsig, round, 2, -1, t0)) return;
      const float* wr = reinterpret_cast<const float*>(p.sym + p.off_wrecv) + (size_t)par * R * WST;
      // Work items: (source s, token chunk c) of the source's dispatch, chunk-major with sources interleaved (so
      // that rows for the peers (link-bound) and for this rank (HBM-bound) are in flight together, and every rank
      // finishes its chunks in about the same order); taken from a counter by whole blocks. The block's warps share
      // the chunk's (message, slice) units; then one thread raises the chunk's flag on the source (one system-scope
      // release per chunk: a fence per message, from thousands of warps at once, took ~10 ms).
      const int ns = SKIP ? 1 : R;
      int maxnch = 0;
      for (int q = 0; q < ns; ++q) maxnch = max(maxnch, s_cn[SKIP ? p.me : q]);
      const int nitems = maxnch * ns;
      __shared__ int s_citem;
      auto next_citem = [&]() {
        if (threadIdx.x == 0) s_citem = (int)atomicAdd(&p.state[S_CSCTR], 1u);
        __syncthreads();
        const int v = s_citem;
        __syncthreads();
        return v;
      };
      for (int item = next_citem(); item < nitems; item = next_citem()) {
        const int s = SKIP ? p.me : item % ns, c = item / ns;
        if (c >= s_cn[s]) continue;
        const int* cp = s_cp + s * (CHMAX + 1);
        const int i0 = cp[c], i1 = min(cp[c + 1], p.hcount[s]);
        if (i1 <= i0) continue;   // nothing of s's chunk c came here: s does not wait for it
        const bool local = same_node(p, s);
        for (int w = warp; w < (i1 - i0) * NSL; w += WARPS) {
          const int i = i0 + w / NSL, sl = w % NSL;
          const int* hi = p.hinfo + ((size_t)s * M + i) * (2 + K);
          int t = hi[0];
          if (t < 0 || t >= M) { if (lane == 0 && sl == 0) report(p, ERR_BAD_SRC, s, i, (int)round, 1); continue; }
          int rows[K];
          float w8[K];
#pragma unroll
          for (int k = 0; k < K; ++k) {
            rows[k] = hi[2 + k];
            if (rows[k] >= p.maxr) rows[k] = -1;
            w8[k] = wr[(size_t)s * WST + t * K + k];
          }
          size_t off = p.off_crecv + (((size_t)par * R + p.me) * M + t) * RB;
          char* dst = local ? p.peer[s] + off : p.sym + p.off_cstage + (size_t)R * WST * 4 + ((size_t)s * M + i) * RB;
          // CU warp steps at once: all CU x K row loads (read-only path) issued before the first FMA / store
          constexpr int CU = 2;
          const int v0 = sl * CPS, v1 = min(NCH, (sl + 1) * CPS);
          for (int c0 = v0 + lane; c0 < v1; c0 += 32 * CU) {
            uint4 v[CU][K];
#pragma unroll
            for (int u = 0; u < CU; ++u)
#pragma unroll
              for (int k = 0; k < K; ++k) {
                const int cc = c0 + 32 * u;
                v[u][k] = (rows[k] >= 0 && cc < v1) ? __ldg(reinterpret_cast<const uint4*>(ey + (size_t)rows[k] * RB) + cc)
                                                    : make_uint4(0, 0, 0, 0);
              }
#pragma unroll
            for (int u = 0; u < CU; ++u) {
              float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
              for (int k = 0; k < K; ++k)
                if (rows[k] >= 0) acc8(a, v[u][k], w8[k]);
              if (c0 + 32 * u < v1) reinterpret_cast<uint4*>(dst)[c0 + 32 * u] = pack8(a);
            }
          }
          __syncwarp();
          if (!local) {
            nvshmemx_putmem_nbi_warp(p.sym + off + (size_t)v0 * 16, dst + (size_t)v0 * 16, (size_t)(v1 - v0) * 16, s);
            used_shmem = true;
          }
        }
        // every row of the chunk is written (or put): raise its flag on s
        __syncthreads();
        if (threadIdx.x == 0) raise_flag(p, p.off_cflag + (((size_t)par * R + p.me) * CHMAX + c) * 8, s, round);
      }
    }
  }
  if (block_done(p, S_CSEND, used_shmem)) {
    for (int s = threadIdx.x; s < R; s += THREADS) {
      if (HT || (SKIP && s != p.me)) continue;   // ht: chunk flags instead
      size_t soff = p.off_csig + ((size_t)par * R + p.me) * 8;
      if (same_node(p, s)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[s] + soff), round);
      else { nvshmem_fence(); nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + soff), round, NVSHMEM_SIGNAL_SET, s); }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      bool remote = false;  // quiet only when some peer was reached through nvshmem (not on the peer-pointer path)
      for (int s = 0; s < R; ++s) remote |= !(SKIP && s != p.me) && !same_node(p, s);
      if (remote) nvshmem_quiet();
      stamp(p, 6); p.state[S_CSCTR] = 0; __threadfence(); p.state[S_CSEND] = round;
    }
  }
}

// source side: wait for every rank's rows, then y[t] = sum (fp32) + shared row
__device__ void combine_recv(const Params& p) {
  const unsigned round = cur_round(p, S_CRECV);
  const int par = round & 1;
  const unsigned long long t0 = gtime();
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  int s0 = 0, ns = 0;
  if (FUSED) ns = shared_rows(p, &s0);
  const char* ey = reinterpret_cast<const char*>(p.expert_y);
  const char* crecv = p.sym + p.off_crecv;
  constexpr int NCH = H / 8;                 // 16-byte chunks per row
  constexpr int NS = (NCH + 31) / 32;        // slices of 32 chunks (one per lane)
  if constexpr (!HT) {
    // ll: one signal per rank when all its rows are here
    const unsigned long long* sig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_csig) + (size_t)par * R;
    if (!block_wait(p, sig, round, 1, -1, t0)) return;
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 7);
    const int nitems = p.T * NS;
    for (int it = gw; it < nitems; it += nw) {
      const int t = it / NS;
      const int c = (it % NS) * 32 + lane;
      if (c >= NCH) continue;
      float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int id = p.hids[t * K + k];
        if (id < 0 || id >= E || (SKIP && id / NL != p.me)) continue;
        acc8(a, reinterpret_cast<const uint4*>(crecv + (((size_t)par * M + t) * K + k) * RB)[c], p.weights[t * K + k]);
      }
      if (FUSED && t >= s0 && t < s0 + ns) acc8(a, reinterpret_cast<const uint4*>(ey + (size_t)(t - s0) * RB)[c], 1.0f);
      reinterpret_cast<uint4*>(reinterpret_cast<char*>(p.y) + (size_t)t * RB)[c] = pack8(a);
    }
  } else {
    // ht: a token's rows are summed as soon as every rank it went to has flagged the token's chunk. Up to 4 rounds
    // of (token, 32-chunk slice) units over all warps; more: whole tokens from a counter, in order.
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 7);
    const int ch = chunk_tokens(p);
    const bool dyn = p.T * NS > 4 * nw;
    const int nunits = dyn ? p.T : p.T * NS;
    const unsigned long long* flags =
        reinterpret_cast<const unsigned long long*>(p.sym + p.off_cflag) + (size_t)par * R * CHMAX;
    int ready_c = -1;
    unsigned long long ready = 0;   // ranks whose rows of chunk ready_c are known to be here
    for (int u = dyn ? warp_grab(p, S_CRCTR) : gw; u < nunits; u = dyn ? warp_grab(p, S_CRCTR) : u + nw) {
      const int t = dyn ? u : u / NS;
      unsigned long long dmask = 0;   // destination ranks of this token
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int id = p.hids[t * K + k];
        if (id >= 0 && id < E) { const int d = id / NL; if (!SKIP || d == p.me) dmask |= 1ull << d; }
      }
      const int c = t / ch;
      if (c != ready_c) { ready_c = c; ready = 0; }
      const unsigned long long need = dmask & ~ready;
      if (need) {
        bool ok = true;
        if (lane == 0) {
          for (int d = 0; d < R && ok; ++d)
            if ((need >> d) & 1ull) ok = thread_wait(p, flags + (size_t)d * CHMAX + c, round, 1, d, c, t0);
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        __syncwarp();  // lane 0's acquires before every lane's reads of the rows
        if (!ok) break;
        ready |= need;
      }
      const bool sh = FUSED && t >= s0 && t < s0 + ns;
      const int c0 = dyn ? lane : (u % NS) * 32 + lane, c1 = dyn ? NCH : min(NCH, c0 - lane + 32);
      // UR warp steps at once: each rank's UR row loads in flight together (a whole token is NS steps)
      constexpr int UR = 4;
      for (int cb = c0; cb < c1; cb += 32 * UR) {
        float a[UR][8];
#pragma unroll
        for (int q = 0; q < UR; ++q)
#pragma unroll
          for (int e = 0; e < 8; ++e) a[q][e] = 0.f;
        for (int d = 0; d <= R; ++d) {   // d == R: the shared expert row
          const char* row;
          if (d < R) {
            if (!((dmask >> d) & 1ull)) continue;
            row = crecv + (((size_t)par * R + d) * M + t) * RB;
          } else {
            if (!sh) continue;
            row = ey + (size_t)(t - s0) * RB;
          }
          uint4 v[UR];
#pragma unroll
          for (int q = 0; q < UR; ++q)
            if (cb + 32 * q < c1) v[q] = reinterpret_cast<const uint4*>(row)[cb + 32 * q];
#pragma unroll
          for (int q = 0; q < UR; ++q)
            if (cb + 32 * q < c1) acc8(a[q], v[q], 1.0f);
        }
#pragma unroll
        for (int q = 0; q < UR; ++q)
          if (cb + 32 * q < c1) reinterpret_cast<uint4*>(reinterpret_cast<char*>(p.y) + (size_t)t * RB)[cb + 32 * q] = pack8(a[q]);
      }
    }
  }
  if (block_done(p, S_CRECV, false, false)) {
    if (threadIdx.x == 0) { stamp(p, 8); p.state[S_CRCTR] = 0; p.state[S_CRECV] = round; }
  }
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch_send(const __grid_constant__ ep::Params p) {
  ep::dispatch_send(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch_recv(const __grid_constant__ ep::Params p) {
  ep::dispatch_recv(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_dispatch(const __grid_constant__ ep::Params p) {
  ep::dispatch_send(p, true);
  ep::dispatch_recv(p, true);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine_send(const __grid_constant__ ep::Params p) {
  ep::combine_send(p, false);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine_recv(const __grid_constant__ ep::Params p) {
  ep::combine_recv(p);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS, 1) ep_combine(const __grid_constant__ ep::Params p) {
  ep::combine_send(p, true);
  ep::combine_recv(p);
}
// sizeof(Params) for the host to check its mirror of the struct
extern "C" __global__ void ep_params_size(unsigned long long* out) { *out = sizeof(ep::Params); }
