// Combine: send the expert outputs back (combine_send; ht: reduced per token and rank on the expert side), sum them
// with the router weights on the source (combine_recv). Protocol: README.md, "Protocol (one round)".
#pragma once
#include "common.cuh"
#include "fence.cuh"
#include "results.cuh"

namespace ep {

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

// ht combine, expert side (reduce_compacted, below): dst[v0, v1) (16-byte chunks of a bf16 row) = sum over k ascending
// of w[k] * row[k] of expert_y (invalid slots dropped), accumulated in fp32 from 0 with fmaf (the spec's order).
// Why compacted: the former loop issued 2 warp steps x all K row slots per round trip (only ~K / 2 of them valid at 2
// ranks), so a 3-step slice took two dependent round trips with ~64 KB of loads in flight per SM; at 24 SMs the
// combine was bound by that (470 MB of expert rows read at ~39 GB/s per SM). With the valid rows compacted first, up
// to 4 of them x 3 steps are in flight together: a slice with <= 4 valid rows is one round trip with ~96 KB in flight
// per SM. Measured on 2 x H200 (dev/GPU-LOG.md, sixth session, outcome): combine -12..-14 % at 24 / 66 SMs, level
// at 132.
constexpr int CF_STEPS = SLICE_STEPS < 3 ? SLICE_STEPS : 3;   // warp steps per pass
constexpr int CF_GROUP = 4;                                    // valid rows whose loads are in flight together

// ht combine, expert side: the metadata of a batch of received messages (a chunk item's, up to
// CM_MSGS), read and compacted once per message by one thread into shared memory, before the block's warps take the
// batch's (message, slice) units. Why: each unit otherwise reads its message's hinfo row, then its weights (dependent
// on the token), then compacts the K slots (~130 select instructions per unit, once per slice: 10 times per message)
// before its row loads can issue: one dependent global round trip and ~40 % of the unit's instructions that move no
// row byte. At 24 SMs the expert side is bound by that per-warp chain (measured as variant cmeta on 2 x H200: combine
// at 24 SMs 727.5 -> 659.1 us, level at 132; dev/GPU-LOG.md, ninth session).
constexpr int CM_MSGS = MAX_ITEM_TOKENS;   // messages per batch: a chunk item's at most (more: several batches)
static_assert(CM_MSGS <= THREADS, "one staging thread per message");
struct CombineMeta {
  int t[CM_MSGS];        // the message's token on its source, -1: a bad message (reported; no rows written)
  int di[CM_MSGS];       // index of this rank among the token's ranks (its row's slot on the source)
  int nv[CM_MSGS];       // valid rows
  int row[CM_MSGS][K];   // valid rows of expert_y in ascending k, then -1
  float w[CM_MSGS][K];   // their router weights, then 0
};

// The reduction on rows compacted by stage_message_meta: rows cr[0, nv) (ascending k) with weights cw, chunks [v0, v1).
__device__ __forceinline__ void reduce_compacted(char* dst, const char* ey, const int (&cr)[K], const float (&cw)[K],
                                                 int nv, int v0, int v1) {
  for (int c0 = v0 + lane_id(); c0 < v1; c0 += 32 * CF_STEPS) {
    float a[CF_STEPS][8];
#pragma unroll
    for (int u = 0; u < CF_STEPS; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) a[u][e] = 0.f;
#pragma unroll
    for (int g = 0; g < K; g += CF_GROUP) {
      if (g >= nv) break;
      uint4 v[CF_STEPS][CF_GROUP];
#pragma unroll
      for (int u = 0; u < CF_STEPS; ++u)
#pragma unroll
        for (int j = 0; j < CF_GROUP; ++j) {
          const int q = g + j < K ? g + j : K - 1, cc = c0 + 32 * u;
          v[u][j] = (g + j < K && g + j < nv && cc < v1)
                        ? __ldg(reinterpret_cast<const uint4*>(ey + (size_t)cr[q] * COMBINE_ROW_BYTES) + cc)
                        : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < CF_STEPS; ++u)
#pragma unroll
        for (int j = 0; j < CF_GROUP; ++j)
          if (g + j < K && g + j < nv) acc8(a[u], v[u][j], cw[g + j < K ? g + j : K - 1]);
    }
#pragma unroll
    for (int u = 0; u < CF_STEPS; ++u)
      if (c0 + 32 * u < v1) reinterpret_cast<uint4*>(dst)[c0 + 32 * u] = pack8(a[u]);
  }
}

// Message i of source s (mpref: messages of the sources before s) into slot q of cm, by one thread: the checks and
// the report of the former per-unit loop (once per message here), rows >= maxr dropped as there, and the valid rows
// compacted in ascending k (the spec's order).
__device__ __forceinline__ void stage_message_meta(const Params& p, int s, int i, int mpref, const float* wr,
                                                   unsigned round, CombineMeta& cm, int q) {
  int t = -1, di = -1, nv = 0;
  if (mpref + i < p.recv_tokens) {   // hinfo and the staged rows hold recv_tokens messages
    const int* hi = p.hinfo + ((size_t)mpref + i) * (2 + K);
    t = hi[0];
    di = hi[1];
    if (t < 0 || t >= M || di < 0 || di >= MAX_DEST_RANKS) t = -1;
    int rows[K];
#pragma unroll
    for (int k = 0; k < K; ++k) rows[k] = hi[2 + k];
    if (t >= 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (rows[k] < 0 || rows[k] >= p.maxr) continue;
        cm.row[q][nv] = rows[k];
        cm.w[q][nv] = wr[(size_t)s * WEIGHT_STRIDE + t * K + k];
        ++nv;
      }
    }
  }
  if (t < 0) report(p, ERR_BAD_SOURCE, s, i, (int)round, PHASE_COMBINE);
  for (int j = nv; j < K; ++j) { cm.row[q][j] = -1; cm.w[q][j] = 0.f; }
  cm.t[q] = t;
  cm.di[q] = di;
  cm.nv[q] = nv;
}

// Bulk L2 prefetches of the rows a warp reads next (measured as variant cload: combine at 24 blocks -8.7 % on the
// one-GPU proxy, dev/GPU-LOG.md ninth session). At small grids
// the ht combine waits on HBM with at most the 12 loads per lane of reduce_compacted (96 KB per SM) in flight, and
// registers / static shared memory cannot hold more; a cp.async.bulk.prefetch.L2 returns nothing to the SM (no
// register, no shared memory, one instruction per row slice), so the later unit's rows travel while the current one
// computes and its loads then hit L2. Only addresses the kernel reads next (in bounds), so results are bit-identical.
// The prefetched bytes not yet read are kept under CL_L2_BYTES (a quarter of the L2): on a large grid (132 SMs,
// HBM-bound) nothing is prefetched.
constexpr long long CL_L2_BYTES = 12ll << 20;
constexpr long long CL_UNIT_BYTES = 4ll * SLICE_VECS * 16;   // an expert-side unit: ~4 valid rows x a slice
__device__ __forceinline__ void cl_l2_prefetch(const void* a, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(a)), "r"(bytes));
#endif
}
// Expert side: units of the batch ahead of the current one (D per warp, each WARPS units on) prefetched.
// (From gridDim against constants each time, not a register held across the unit loop. ptxas, ep_combine_send of
// the ht bf16 bench spec: 128 registers as before, 20 B spilled / 72 B reloaded, all at the item's barriers, none
// in the unit loop; the prefetch of varying per-lane addresses is a uniform-register instruction in a loop over
// the lanes, ~8 instructions per valid row.)
constexpr unsigned CL_GRID_D1 = (unsigned)(CL_L2_BYTES / (WARPS * CL_UNIT_BYTES));       // largest grid with D >= 1
constexpr unsigned CL_GRID_D2 = (unsigned)(CL_L2_BYTES / (2ll * WARPS * CL_UNIT_BYTES));  // ... with D = 2
__device__ __forceinline__ int cl_send_depth() {
  return gridDim.x <= CL_GRID_D2 ? 2 : gridDim.x <= CL_GRID_D1 ? 1 : 0;
}
// Unit w of a staged batch of n messages (as the loop of combine_send takes it): lane j < nv prefetches the slice
// of valid row j.
__device__ __forceinline__ void cl_prefetch_unit(const char* ey, const CombineMeta& cm, int w, int n) {
  if (w >= n * ROW_SLICES) return;
  const int q = w / ROW_SLICES, sl = w % ROW_SLICES, lane = lane_id();
  if (cm.t[q] < 0 || lane >= cm.nv[q]) return;
  const int v0 = sl * SLICE_VECS, v1 = min(ROW_VECS, (sl + 1) * SLICE_VECS);
  cl_l2_prefetch(ey + (size_t)cm.row[q][lane] * COMBINE_ROW_BYTES + (size_t)v0 * 16, (unsigned)(v1 - v0) * 16u);
}

__device__ __forceinline__ int shared_rows(const Params& p, int* s0) {
  int a = 0, n = p.T;
  if (SKIP && ALLREDUCE_RANKS > 1) {
    int i = p.me % ALLREDUCE_RANKS, base = p.T / ALLREDUCE_RANKS, extra = p.T % ALLREDUCE_RANKS;
    a = i * base + min(i, extra);
    n = base + (i < extra ? 1 : 0);
  }
  *s0 = a;
  return n;
}

// The round of a combine is its dispatch's (the handle's status words), not a count of combines: a round that some
// ranks never combine (released everywhere, or refused by one rank: its combine went out marked and empty while
// the peers may drop the round) cannot shift the parities and signal rounds of the others. Its regions are reused
// two dispatch rounds later, after every rank has finished with them (the argument of the host backend).
__device__ __forceinline__ unsigned combine_round(const Params& p) { return (unsigned)p.hstatus[ST_ROUND]; }

// ht, a rank that will not combine this round (EPBuffer: it refused its dispatch input, so its experts do not run,
// or its combine input): the weight signal of step 1 and the ready flag of every (source, chunk) that brought rows
// here are raised marked, without weights or rows; a source whose tokens went here sees the mark instead of waiting
// (its combine reports the refusal). Nothing is awaited. Returns whether NVSHMEM was used.
__device__ bool refuse_combine_ht(const Params& p, unsigned round) {
  const int par = round & 1;
  const unsigned long long v = round | SIG_REJECTED;
  bool used_shmem = false;
  if (blockIdx.x == 0) {
    const size_t soff = p.off_wsig + ((size_t)par * R + p.me) * 8;
    signal_every_destination(p, soff, v, [&](int d) {
      if (threadIdx.x == 0) nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + soff), v, NVSHMEM_SIGNAL_SET, d);
    });
  }
  for (int q = blockIdx.x * THREADS + threadIdx.x; q < R * MAX_CHUNKS; q += gridDim.x * THREADS) {
    const int s = q / MAX_CHUNKS, c = q % MAX_CHUNKS;
    if (SKIP && s != p.me) continue;
    const int* cp = p.hchunk + s * (MAX_CHUNKS + 1);
    if (c >= max(0, min(p.hchunk[R * (MAX_CHUNKS + 1) + s], MAX_CHUNKS)) || min(cp[c + 1], p.hcount[s]) <= cp[c])
      continue;   // nothing of s's chunk c came here: s does not wait for it
    const size_t off = p.off_cflag + (((size_t)par * R + p.me) * MAX_CHUNKS + c) * 8;
    if (same_node(p, s)) {
      st_rel(reinterpret_cast<unsigned long long*>(p.peer[s] + off), v);
    } else {
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + off), v, NVSHMEM_SIGNAL_SET, s);
      used_shmem = true;
    }
  }
  return used_shmem;
}

// expert side: send expert_y rows back to their source ranks
__device__ void combine_send(const Params& p, bool fused) {
  const unsigned round = combine_round(p);
  // a refusing rank's (p.rejected) signals carry the mark and no rows: its sources report the refusal
  const unsigned long long sigv = round | (p.rejected ? SIG_REJECTED : 0ull);
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 5);
  if (p.hstatus[0] != 0) {   // the handle's round was void (over capacity) on every rank: nothing to send or wait for
    if (block_done(p, S_CSEND, false) && threadIdx.x == 0) {
      p.state[S_CSCTR] = 0; __threadfence(); p.state[S_CSEND] = round;
    }
    return;
  }
  const int par = round & 1;
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  bool used_shmem = false;
  const char* ey = reinterpret_cast<const char*>(p.expert_y);
  if (HT && p.rejected) {
    used_shmem = refuse_combine_ht(p, round);
  } else if constexpr (!HT) {
    const int begin = FUSED ? (int)p.row_offsets[1] : 0;
    const int end = (int)p.row_offsets[GROUPS];
    const int nrow = p.rejected ? 0 : max(0, end - begin);   // a refusing rank sends no rows, only marked signals
    // batched layout (measured as variant bscan, ninth session): the slabs span GROUPS x CAP rows (32768 at 128 tokens, 2 ranks, 256
    // experts) of which ~1024 hold a token; a warp per (row, slice) over all of them reads src_info for nothing ~30
    // times per warp. So walk only the rows each slab holds: min(count, CAP) from the handle's tokens_per_expert.
    __shared__ int s_bcnt[BATCHED ? GROUPS : 1], s_bpref[BATCHED ? GROUPS + 1 : 1];
    int nlive = nrow;
    if constexpr (BATCHED) {
      for (int g = threadIdx.x; g < GROUPS; g += THREADS) s_bcnt[g] = min(max(p.tpe[g], 0), CAP);
      __syncthreads();
      block_exclusive_scan(s_bcnt, s_bpref, GROUPS);
      if (p.rejected || nrow == 0) nlive = 0;   // (a void round: every group empty, tpe 0 too)
      else nlive = s_bpref[GROUPS];
    }
    for (int it = gw; it < nlive * ROW_SLICES; it += nw) {
      int j = begin + it / ROW_SLICES;
      if constexpr (BATCHED) {   // the it-th held row: slab g (last g with s_bpref[g] <= r), its row r - s_bpref[g]
        const int r = it / ROW_SLICES;
        int lo = 0, hi = GROUPS;   // invariant: s_bpref[lo] <= r < s_bpref[hi]
        while (hi - lo > 1) { const int mid = (lo + hi) >> 1; if (s_bpref[mid] <= r) lo = mid; else hi = mid; }
        j = lo * CAP + (r - s_bpref[lo]);
      }
      const int sl = it % ROW_SLICES;
      int s = p.src_info[j * 3], t = p.src_info[j * 3 + 1], k = p.src_info[j * 3 + 2];
      if (PLACED && s == -1 && t == -1 && k == -1) continue;   // a row without a token (padding, unused slab row)
      if (s < 0 || s >= R || t < 0 || t >= M || k < 0 || k >= K || (SKIP && s != p.me) || j >= p.maxr) {
        if (lane == 0 && sl == 0) report(p, ERR_BAD_SOURCE, s, j, (int)round, PHASE_COMBINE);
        continue;
      }
      size_t off = p.off_crecv + (((size_t)par * M + t) * K + k) * COMBINE_ROW_BYTES;
      const int v0 = sl * SLICE_VECS, v1 = min(ROW_VECS, (sl + 1) * SLICE_VECS);
      if (same_node(p, s)) {
        warp_copy_range(p.peer[s] + off, ey + (size_t)j * COMBINE_ROW_BYTES, v0, v1);
      } else {
        nvshmemx_putmem_nbi_warp(p.sym + off + (size_t)v0 * 16, ey + (size_t)j * COMBINE_ROW_BYTES + (size_t)v0 * 16,
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
      bool staged = false;   // other-node destinations: one staged copy, put to each of them
      for (int d = 0; d < R; ++d) {
        if ((SKIP && d != p.me) || fenced_off(p, d)) continue;
        if (!same_node(p, d)) {
          if (staged) continue;
          staged = true;
        }
        size_t off = p.off_wrecv + (((size_t)par * R + p.me) * WEIGHT_STRIDE) * 4;
        float* dst = same_node(p, d) ? reinterpret_cast<float*>(p.peer[d] + off)
                                     : reinterpret_cast<float*>(p.sym + p.off_cstage);
        if (wal) {
          for (int i = threadIdx.x; i < nv; i += THREADS) reinterpret_cast<uint4*>(dst)[i] = wsrc[i];
          for (int i = nv * 4 + threadIdx.x; i < nw; i += THREADS) dst[i] = p.weights[i];
        } else {
          for (int i = threadIdx.x; i < nw; i += THREADS) dst[i] = p.weights[i];
        }
      }
      __syncthreads();  // every thread's weight stores before each signalling thread's release (st.release.sys)
      const size_t off = p.off_wrecv + (((size_t)par * R + p.me) * WEIGHT_STRIDE) * 4;
      const size_t soff = p.off_wsig + ((size_t)par * R + p.me) * 8;
      // other-node destinations: the whole block puts the staged [T, K] weights (+ signal after the data): one
      // thread's T*K*4 / 16 serial load -> store steps took ~0.8 ms at T 4096, gating step 2 on every rank
      signal_every_destination(p, soff, round, [&](int d) {
        float* stg = reinterpret_cast<float*>(p.sym + p.off_cstage);
        nvshmemx_putmem_signal_nbi_block(p.sym + off, stg, (size_t)nw * 4, reinterpret_cast<uint64_t*>(p.sym + soff),
                                         round, NVSHMEM_SIGNAL_SET, d);
      });
    }
    // step 2 (expert side): reduce each received token's local rows (fp32, weighted) and send one row back.
    // In the fused kernel the last p.crb blocks skip this and receive from the start (combine_recv), so the
    // source's sums overlap the sends: every (source, token chunk) raises a ready flag on the source when its last
    // unit is written.
    __shared__ int s_cp[R * (MAX_CHUNKS + 1)];   // chunk tables of the sources (message i of s is in s's chunk c)
    __shared__ int s_cn[R];
    __shared__ int s_mpref[R];                   // messages received from sources before s: s's staged rows start
    for (int q = threadIdx.x; q < R * (MAX_CHUNKS + 1); q += THREADS) s_cp[q] = p.hchunk[q];
    for (int q = threadIdx.x; q < R; q += THREADS) s_cn[q] = max(0, min(p.hchunk[R * (MAX_CHUNKS + 1) + q], MAX_CHUNKS));
    if (threadIdx.x == 0) {
      int n = 0;
      for (int q = 0; q < R; ++q) { s_mpref[q] = n; n += max(0, p.hcount[q]); }
    }
    __syncthreads();
    const int sb = fused ? (int)gridDim.x - max(0, min(p.crb, (int)gridDim.x - 1)) : (int)gridDim.x;
    if ((int)blockIdx.x < sb) {
      const unsigned long long t0 = gtime();
      const unsigned long long* wsig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_wsig) + (size_t)par * R;
      __shared__ int s_lost[R];   // fencing: sources lost in the round (fence.cuh)
      if (!block_wait(p, wsig, round, PHASE_COMBINE_WEIGHTS, -1, t0, p.fence ? s_lost : nullptr)) return;
#if EP_V_PROBE
      if (threadIdx.x == 0) probe_at(p, 13);
#endif
      if (p.fence) fence_settle(p, PHASE_COMBINE_WEIGHTS, round, s_lost);
      // sources that will not combine this round (marked weight signal; fencing: lost): no weights came, they wait
      // for no rows
      __shared__ unsigned long long s_wrej;
      if (threadIdx.x == 0) s_wrej = 0ull;
      __syncthreads();
      for (int q = threadIdx.x; q < R; q += THREADS)
        if (sig_rejected(ld_rlx(wsig + q)) || (p.fence && s_lost[q])) atomicOr(&s_wrej, 1ull << q);
      __syncthreads();
      const float* wr = reinterpret_cast<const float*>(p.sym + p.off_wrecv) + (size_t)par * R * WEIGHT_STRIDE;
      __shared__ CombineMeta cm;
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
        if (c >= s_cn[s] || ((s_wrej >> s) & 1ull)) continue;
        const int* cp = s_cp + s * (MAX_CHUNKS + 1);
        const int i0 = cp[c], i1 = min(cp[c + 1], p.hcount[s]);
        if (i1 <= i0) continue;   // nothing of s's chunk c came here: s does not wait for it
        const bool local = same_node(p, s);
        for (int m0 = i0; m0 < i1; m0 += CM_MSGS) {
          const int n = min(CM_MSGS, i1 - m0);
          if (m0 > i0) __syncthreads();   // every warp is done with the previous batch's table
          if (threadIdx.x < n) stage_message_meta(p, s, m0 + threadIdx.x, s_mpref[s], wr, round, cm, threadIdx.x);
          __syncthreads();
          for (int j = 1; j < cl_send_depth(); ++j) cl_prefetch_unit(ey, cm, warp + j * WARPS, n);   // first lookahead
          for (int w = warp; w < n * ROW_SLICES; w += WARPS) {
            const int q = w / ROW_SLICES, sl = w % ROW_SLICES;
            if (cl_send_depth() > 0) cl_prefetch_unit(ey, cm, w + cl_send_depth() * WARPS, n);
            const int t = cm.t[q];
            if (t < 0) continue;   // a bad message, reported by the staging thread
            int cr[K];
            float cw[K];
#pragma unroll
            for (int j = 0; j < K; ++j) { cr[j] = cm.row[q][j]; cw[j] = cm.w[q][j]; }
            const int i = m0 + q, di = cm.di[q];
            size_t off = p.off_crecv + (((size_t)par * M + t) * MAX_DEST_RANKS + di) * COMBINE_ROW_BYTES;
            char* dst = local ? p.peer[s] + off
                              : p.sym + p.off_cstage + CSTAGE_WEIGHT_BYTES
                                    + ((size_t)s_mpref[s] + i) * COMBINE_ROW_BYTES;
            const int v0 = sl * SLICE_VECS, v1 = min(ROW_VECS, (sl + 1) * SLICE_VECS);
            reduce_compacted(dst, ey, cr, cw, cm.nv[q], v0, v1);
            __syncwarp();
            if (!local) {
              nvshmemx_putmem_nbi_warp(p.sym + off + (size_t)v0 * 16, dst + (size_t)v0 * 16, (size_t)(v1 - v0) * 16, s);
              used_shmem = true;
            }
          }
        }
        // every row of the chunk is written (or put): raise its flag on s
        __syncthreads();
        if (threadIdx.x == 0) raise_flag(p, p.off_cflag + (((size_t)par * R + p.me) * MAX_CHUNKS + c) * 8, s, round);
#if EP_V_PROBE
        if (threadIdx.x == 0) probe_at(p, 14);
#endif
      }
    }
  }
  if (block_done(p, S_CSEND, used_shmem)) {
    for (int s = threadIdx.x; s < R; s += THREADS) {
      if (HT || (SKIP && s != p.me) || fenced_off(p, s)) continue;   // ht: chunk flags instead
      size_t soff = p.off_csig + ((size_t)par * R + p.me) * 8;
      if (same_node(p, s)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[s] + soff), sigv);
      else {
        nvshmem_fence();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + soff), sigv, NVSHMEM_SIGNAL_SET, s);
      }
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

// source side: wait for every rank's rows, then y[t] = sum (fp32) + shared row. A token with a top-k slot on a rank
// whose rows come marked (it refused its input this round) is counted (count_refusal): the host raises
// EPPeerRejectedError for this combine instead of handing out its partial sum.
__device__ void combine_recv(const Params& p) {
  const unsigned round = combine_round(p);
  // a void round (see combine_send): y is left as it is; a refusing rank (p.rejected) waits for nothing. Either way
  // the result's life ends here, as after any combine (results.cuh)
  if (p.hstatus[0] != 0 || p.rejected) {
    if (block_done(p, S_CRECV, false, false) && threadIdx.x == 0) {
      p.state[S_CRCTR] = 0; p.state[S_CRECV] = round; result_combined(p);
    }
    return;
  }
  const int par = round & 1;
  const unsigned long long t0 = gtime();
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
#if EP_V_PROBE
  unsigned long long pr_wait = 0;   // this thread's latest flag wait over (lane 0 of a warp)
#endif
  int s0 = 0, ns = 0;
  if (FUSED) ns = shared_rows(p, &s0);
  const char* ey = reinterpret_cast<const char*>(p.expert_y);
  const char* crecv = p.sym + p.off_crecv;
  constexpr int NS = (ROW_VECS + 31) / 32;        // slices of 32 chunks (one per lane)
  if constexpr (!HT) {
    // ll: one signal per rank when all its rows are here
    const unsigned long long* sig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_csig) + (size_t)par * R;
    __shared__ int s_lost[R];   // fencing: ranks masked or lost in the round (fence.cuh): their rows never come
    if (!block_wait(p, sig, round, PHASE_COMBINE, -1, t0, p.fence ? s_lost : nullptr)) return;
    if (p.fence) fence_settle(p, PHASE_COMBINE, round, s_lost);
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 7);
    __shared__ bool s_rej[R];   // ranks whose combine signal came marked: they refused their input this round
    __shared__ int s_anyrej;
    if (threadIdx.x == 0) s_anyrej = 0;
    __syncthreads();
    for (int q = threadIdx.x; q < R; q += THREADS) {
      s_rej[q] = !(p.fence && s_lost[q]) && sig_rejected(ld_rlx(sig + q));   // (a lost rank's word is stale)
      if (s_rej[q] || (p.fence && s_lost[q])) s_anyrej = 1;
    }
    __syncthreads();
    const int nitems = p.T * NS;
    for (int it = gw; it < nitems; it += nw) {
      const int t = it / NS;
      if (s_anyrej && lane == 0 && it % NS == 0) {   // once per token
        int lowest = R, lowest_lost = R;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int id = p.hids[t * K + k];
          if (id < 0 || id >= E) continue;
          if (s_rej[id / LOCAL_EXPERTS]) lowest = min(lowest, id / LOCAL_EXPERTS);
          if (p.fence && s_lost[id / LOCAL_EXPERTS]) lowest_lost = min(lowest_lost, id / LOCAL_EXPERTS);
        }
        if (lowest < R) count_refusal(p, lowest);
        if (lowest_lost < R) count_lost(p, lowest_lost);   // (a masked rank's slots are -1 in hids: never here)
      }
      const int c = (it % NS) * 32 + lane;
      if (c >= ROW_VECS) continue;
      float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int id = p.hids[t * K + k];
        if (id < 0 || id >= E || (SKIP && id / LOCAL_EXPERTS != p.me)) continue;
        acc8(a, reinterpret_cast<const uint4*>(crecv + (((size_t)par * M + t) * K + k) * COMBINE_ROW_BYTES)[c],
             p.weights[t * K + k]);
      }
      if (FUSED && t >= s0 && t < s0 + ns)
        acc8(a, reinterpret_cast<const uint4*>(ey + (size_t)(t - s0) * COMBINE_ROW_BYTES)[c], 1.0f);
      reinterpret_cast<uint4*>(reinterpret_cast<char*>(p.y) + (size_t)t * COMBINE_ROW_BYTES)[c] = pack8(a);
    }
  } else {
    // ht: a token's rows are summed as soon as every rank it went to has flagged the token's chunk. Up to 4 rounds
    // of (token, 32-chunk slice) units over all warps; more: whole tokens from a counter, in order.
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 7);
    const int ch = chunk_tokens(p);
    const bool dyn = p.T * NS > 4 * nw;
    const int nunits = dyn ? p.T : p.T * NS;
    const unsigned long long* flags =
        reinterpret_cast<const unsigned long long*>(p.sym + p.off_cflag) + (size_t)par * R * MAX_CHUNKS;
    int ready_c = -1;
    unsigned long long ready = 0;   // ranks whose rows of chunk ready_c are known to be here
    unsigned long long refused = 0; // ... of which those whose flag came marked (no rows: they refused their input)
    unsigned long long gone = 0;    // ... and those lost in the round (fencing: their rows never come)
    for (int u = dyn ? warp_grab(p, S_CRCTR) : gw; u < nunits; u = dyn ? warp_grab(p, S_CRCTR) : u + nw) {
      const int t = dyn ? u : u / NS;
      unsigned long long dmask = 0;   // destination ranks of this token
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int id = p.hids[t * K + k];
        if (id >= 0 && id < E) { const int d = id / LOCAL_EXPERTS; if (!SKIP || d == p.me) dmask |= 1ull << d; }
      }
      const int c = t / ch;
      if (c != ready_c) { ready_c = c; ready = 0; refused = 0; gone = 0; }
      const unsigned long long need = dmask & ~ready;
      if (need) {
        bool ok = true;
        unsigned long long marked = 0, lost = 0;
        if (lane == 0) {
          for (int d = 0; d < R && ok; ++d)
            if ((need >> d) & 1ull) {
              bool dead = fenced_off(p, d);   // fencing: lost earlier in the round (a masked rank is not in dmask)
              if (!dead) ok = thread_wait(p, flags + (size_t)d * MAX_CHUNKS + c, round, PHASE_COMBINE, d, c, t0, &dead);
#if EP_V_PROBE
              if (ok && !dead) pr_wait = gtime();
#endif
              if (dead) lost |= 1ull << d;
              else if (ok && sig_rejected(ld_rlx(flags + (size_t)d * MAX_CHUNKS + c))) marked |= 1ull << d;
            }
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        refused |= __shfl_sync(0xffffffffu, marked, 0);
        gone |= __shfl_sync(0xffffffffu, lost, 0);
        __syncwarp();  // lane 0's acquires before every lane's reads of the rows
        if (!ok) break;
        ready |= need;
      }
      if ((dmask & refused) && lane == 0 && (dyn || u % NS == 0))   // once per token
        count_refusal(p, __ffsll((long long)(dmask & refused)) - 1);
      if ((dmask & gone) && lane == 0 && (dyn || u % NS == 0))
        count_lost(p, __ffsll((long long)(dmask & gone)) - 1);
      const bool sh = FUSED && t >= s0 && t < s0 + ns;
      // a whole token (dyn): its rows (lane d: rank d's row; lane R: the shared expert row) into L2 before the
      // passes, when every warp's token fits under CL_L2_BYTES; passes 2.. then hit L2
      if (dyn && (long long)nw * (__popcll(dmask) + (sh ? 1 : 0)) * (ROW_VECS * 16) <= CL_L2_BYTES) {
        for (int d = lane; d <= R; d += 32) {
          if (d < R && ((dmask >> d) & 1ull))
            cl_l2_prefetch(crecv + (((size_t)par * M + t) * MAX_DEST_RANKS
                                    + (SKIP ? 0 : __popcll(dmask & ((1ull << d) - 1)))) * COMBINE_ROW_BYTES,
                           ROW_VECS * 16u);
          else if (d == R && sh)
            cl_l2_prefetch(ey + (size_t)(t - s0) * COMBINE_ROW_BYTES, ROW_VECS * 16u);
        }
      }
      const int c0 = dyn ? lane : (u % NS) * 32 + lane, c1 = dyn ? ROW_VECS : min(ROW_VECS, c0 - lane + 32);
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
            row = crecv + (((size_t)par * M + t) * MAX_DEST_RANKS + (SKIP ? 0 : __popcll(dmask & ((1ull << d) - 1))))
                              * COMBINE_ROW_BYTES;
          } else {
            if (!sh) continue;
            row = ey + (size_t)(t - s0) * COMBINE_ROW_BYTES;
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
          if (cb + 32 * q < c1)
            reinterpret_cast<uint4*>(reinterpret_cast<char*>(p.y) + (size_t)t * COMBINE_ROW_BYTES)[cb + 32 * q] =
                pack8(a[q]);
      }
    }
  }
#if EP_V_PROBE
  probe_max(p, 15, pr_wait);
#endif
  if (block_done(p, S_CRECV, false, false)) {
    if (threadIdx.x == 0) {
      publish_refusal(p, round); stamp(p, 8); p.state[S_CRCTR] = 0; p.state[S_CRECV] = round; result_combined(p);
    }
  }
}

}  // namespace ep
