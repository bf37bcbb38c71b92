// Dispatch: send every token to the ranks of its experts (dispatch_send), receive and lay the rows out by local
// expert for a grouped GEMM (dispatch_recv). Protocol: README.md, "Protocol (one round)".
#pragma once
#include "capacity.cuh"
#include "common.cuh"
#include "fence.cuh"
#include "payload.cuh"

namespace ep {

// ------------------------------------------------------------------------------------------------ dispatch, send
// Work item (destination d, token chunk c). Per-entry rank inside its expert (and HT: per-token slot for d) from a
// prefix count over earlier tokens plus a warp match_any scan of the chunk.
// fused: send and receive run in one kernel (ep_dispatch). Then, in ht bf16, the messages to this rank itself carry
// only their metadata and the receiver reads the row from x (one write + one read of every own row less in HBM; the
// split kernels cannot: the caller may reuse x between dispatch_async and dispatch_wait).
__device__ __forceinline__ bool own_rows_from_x(bool fused) { return HT && !FP8 && fused; }

// Quantise once (measured as variant qonce: fp8 dispatch at 24 SMs -16 %, dev/GPU-LOG.md eighth session): quantising
// in each send item quantised a token once per destination rank (min(K, R) times), and at 24 SMs that work bound the
// send. So a first pass of the whole grid quantises every routed token once into its first staging message (the stage region, [token][rank index]: index 0;
// layout.py gives the region to such a buffer on one node too), and the send items copy those bytes: into the
// destination's message, or (other nodes) into the token's staged message of that rank, or not at all where that is
// the first one. Small batches keep quantising per item: below QONCE_MIN_TOKENS (512; test knob qonceall: 0) the pass's
// grid-wide wait is expected to cost more than the quantisation it saves. Caller-quantised input (p.x_scales) is
// copied anyway.
__device__ __forceinline__ bool qonce_on(const Params& p) {
  return HT && FP8 && p.x_scales == nullptr && p.T >= QONCE_MIN_TOKENS;
}
__device__ __forceinline__ char* qonce_msg(const Params& p, int t) {
  return p.sym + p.off_stage + (size_t)t * MAX_DEST_RANKS * MSG_BYTES;
}
// The pass, then a grid-wide wait for every block's (S_QDONE, reset by the send's last block). True when every block
// has passed; past the deadline (a block that is not resident: the round's other waits name it) this block quantises
// per destination, as the baseline does.
__device__ bool qonce_pass(const Params& p) {
  __shared__ int s_ok;
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), nw = gridDim.x * WARPS;
  for (int u = gw; u < p.T * ROW_SLICES; u += nw) {
    const int t = u / ROW_SLICES, sl = u % ROW_SLICES;
    bool routed = false;
#pragma unroll
    for (int k = 0; k < K; ++k) { const int id = p.ids[t * K + k]; routed |= id >= 0 && id < E; }
    if (!routed) continue;
    char* dst[K];
#pragma unroll
    for (int k = 0; k < K; ++k) dst[k] = nullptr;
    dst[0] = qonce_msg(p, t);
    warp_put_token_multi(p, t, dst, sl * SLICE_STEPS, min(ROW_STEPS, (sl + 1) * SLICE_STEPS));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();   // this block's quantised rows before its count
    atomicAdd(&p.state[S_QDONE], 1u);
    const unsigned long long t0 = gtime();
    unsigned nap = 32;
    int ok = 1;
    while (*((volatile unsigned*)&p.state[S_QDONE]) < gridDim.x) {
      __nanosleep(nap);
      if (nap < 256) nap <<= 1;
      if (gtime() - t0 > p.timeout_ns) { ok = 0; break; }
    }
    __threadfence();   // every block's rows after the count (read by this block's items)
    s_ok = ok;
  }
  __syncthreads();
  return s_ok != 0;
}

// Where this rank's messages start in a destination's receive buffer, without the reservation. When
// the buffer holds every source's worst case (no receive capacity: recv_tokens = sources x M), source s's messages
// can start at s x M on every destination, so the item of a destination's last chunk needs no remote fetch-add (one
// NVLink / network round trip, ~3 us, before the count message), and the other items do not wait for that item
// (wait_base) before they write (measured as variant sbase: 128-token dispatch -2.4 us). The count message still
// carries the base; the receiver does not depend on how it was chosen. With a receive capacity the reservation
// stays (the sources' messages are packed).
__device__ __forceinline__ bool sbase_on(const Params& p) { return HT && p.recv_tokens >= (SKIP ? 1 : R) * M; }
__device__ __forceinline__ int sbase(const Params& p) { return SKIP ? 0 : p.me * M; }

#if EP_V_ONESHOT
// Variant oneshot (dev/GPU-LOG.md, ninth session): in a small round the count message to d is a send item of its own.
// Otherwise the item of d's last chunk builds the count message (a prefix over every earlier token, the chunk table's
// scan, the stores and two system-scope releases: probe 4.5 us at 1 token) before it copies that chunk's data and
// raises its flag, so the last chunk (the only one at 1 token) is that much later than the others. Here the list
// has R more items in front: item d < R ships only the count message to d, items R.. are today's list, every one a
// plain data item; the messages are the same bytes, so no receiver changes. Only with the fixed per-source base
// (sbase: no chunk item waits for a reservation; with a receive capacity the reservation path stays) and below
// ONESHOT_MAX_TOKENS (larger rounds: the baseline path, unchanged).
constexpr int ONESHOT_MAX_TOKENS = 512;
__device__ __forceinline__ bool oneshot_on(const Params& p) { return HT && sbase_on(p) && p.T < ONESHOT_MAX_TOKENS; }

// The count message to d (the whole block; the layout of the baseline's last item, base s x M): per-expert counts of
// every token, tokens, chunks, the token prefix by chunk, this rank's routed rows to every rank, the base; then the
// count signal (marked for a refusing rank). Counted in one pass over the tokens: the rows per rank and the tokens
// per chunk once per group of lanes with the same key (__match_any_sync), not one shared atomic per lane on a few
// words. The shared arrays are dispatch_send's (free between items). Returns whether NVSHMEM was used.
__device__ bool oneshot_count_item(const Params& p, int d, int par, int nchunks, int ch, unsigned long long sigv,
                                   int* s_cnt, int* s_ctok, int* s_ctpref, int* s_rows) {
  const int lo = d * LOCAL_EXPERTS, hi = lo + LOCAL_EXPERTS;
  const int lane = lane_id();
  for (int l = threadIdx.x; l < LOCAL_EXPERTS; l += THREADS) s_cnt[l] = 0;
  for (int q = threadIdx.x; q <= nchunks; q += THREADS) s_ctok[q] = 0;
  for (int q = threadIdx.x; q < R; q += THREADS) s_rows[q] = 0;
  __syncthreads();
  for (int tb = 0; tb < p.T; tb += THREADS) {   // block-uniform bound: every lane takes part in the matches
    const int t = tb + threadIdx.x;
    bool goes = false;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int id = t < p.T ? p.ids[t * K + k] : -1;
      const bool routed = id >= 0 && id < E;
      const unsigned m = __match_any_sync(0xffffffffu, routed ? id / LOCAL_EXPERTS : -1 - lane);
      if (routed && (m & lanemask_lt()) == 0u) atomicAdd(&s_rows[id / LOCAL_EXPERTS], __popc(m));
      if (id >= lo && id < hi) { atomicAdd(&s_cnt[id - lo], 1); goes = true; }
    }
    const unsigned m = __match_any_sync(0xffffffffu, goes ? t / ch : -1 - lane);
    if (goes && (m & lanemask_lt()) == 0u) atomicAdd(&s_ctok[t / ch], __popc(m));
  }
  __syncthreads();
  block_exclusive_scan(s_ctok, s_ctpref, nchunks);
  const int base = sbase(p);
  const bool loc = same_node(p, d);
  const size_t coff = p.off_dhist + ((size_t)par * R + p.me) * COUNT_ROW_INTS * 4;
  int* cm = loc ? reinterpret_cast<int*>(p.peer[d] + coff)
                : reinterpret_cast<int*>(p.sym + p.off_hstage + (size_t)d * COUNT_ROW_INTS * 4);
  for (int l = threadIdx.x; l < LOCAL_EXPERTS; l += THREADS) cm[l] = s_cnt[l];
  for (int q = threadIdx.x; q <= nchunks; q += THREADS) cm[LOCAL_EXPERTS + 2 + q] = s_ctpref[q];
  for (int q = threadIdx.x; q < R; q += THREADS) cm[COUNT_ROWS_AT + q] = s_rows[q];
  if (threadIdx.x == 0) {
    cm[LOCAL_EXPERTS] = s_ctpref[nchunks];
    cm[LOCAL_EXPERTS + 1] = nchunks;
    cm[COUNT_BASE_AT] = (s_ctpref[nchunks] <= p.recv_tokens - base) ? base : -1;   // sbase: always base
  }
  __syncthreads();   // every thread's count stores before the signal's release (st.release.sys / put after data)
  const size_t soff = p.off_dsig + ((size_t)par * R + p.me) * 8;
  if (loc) {
    if (threadIdx.x == 0) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + soff), sigv);
  } else {
    nvshmemx_putmem_signal_nbi_block(p.sym + coff, cm, COUNT_ROW_INTS * 4, reinterpret_cast<uint64_t*>(p.sym + soff),
                                     sigv, NVSHMEM_SIGNAL_SET, d);
  }
#if EP_V_PROBE
  if (threadIdx.x == 0) probe_at(p, 9);
#endif
  return !loc;
}
#endif


__device__ void dispatch_send(const Params& p, bool fused) {
  __shared__ int s_cnt[LOCAL_EXPERTS];        // running per-expert count (experts of d)
  __shared__ int s_rank[MAX_ITEM_TOKENS * K];   // rank of entry within its expert, -1 if not on d
  __shared__ int s_tslot[MAX_ITEM_TOKENS];      // HT: slot of token for d, -1 if not sent to d
  __shared__ int s_ctok[MAX_CHUNKS + 1];      // HT, last chunk: tokens of each chunk that go to d, then their prefix
  __shared__ int s_ctpref[MAX_CHUNKS + 1];
  __shared__ int s_chunk_n;              // HT: tokens of this chunk that go to d
  __shared__ int s_item;
  __shared__ int s_rows[HT ? R : 1];     // HT, last chunk: this rank's routed rows to every rank (count message)
  __shared__ int s_base;                 // HT: where this rank's messages start in d's receive buffer (-1: over)
  const unsigned round = cur_round(p, S_DSEND);
  // the count signals' value: a rank that refused its input (p.rejected, T = 0) marks them (EPBuffer: it takes part
  // in the round with nothing; the receivers note it in the output set's status words)
  const unsigned long long sigv = round | (p.rejected ? SIG_REJECTED : 0ull);
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
  // ht fp8 from QONCE_MIN_TOKENS: every token quantised once, before any item (qonce_pass)
  const bool qonce = qonce_on(p) && qonce_pass(p);

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
#if EP_V_ONESHOT
  // oneshot: items 0..ndest-1 are the count messages (oneshot_count_item), then today's list from item ndest on
  const bool oneshot = oneshot_on(p);
  const int nlist = oneshot ? ndest : 0;
  for (int oitem = HT ? next_item(0) : blockIdx.x; oitem < nitems + nlist; oitem = next_item(oitem)) {
    if (oitem < nlist) {
      const int d = SKIP ? p.me : oitem;
      if (!masked_at_snapshot(p, d))   // fencing: nothing to a masked rank (block-uniform)
        used_shmem |= oneshot_count_item(p, d, par, nchunks, ch, sigv, s_cnt, s_ctok, s_ctpref, s_rows);
      continue;   // next_item's barrier orders the message's reads of the shared arrays before the next item's writes
    }
    const int item = oitem - nlist;
#else
  for (int item = HT ? next_item(0) : blockIdx.x; item < nitems; item = next_item(item)) {
#endif
    // ht: destinations interleaved and the last chunk first: the item of a destination's last chunk knows (from
    // its prefix pass) the complete counts, and ships them first thing, so every receiver can place rows early
    const int d = SKIP ? p.me : (HT ? item % ndest : item / nchunks);
    if (masked_at_snapshot(p, d)) continue;   // fencing: nothing to a masked rank (its slots were dropped, fence.cuh)
    const int c = HT ? nchunks - 1 - item / ndest : item % nchunks;
#if EP_V_ONESHOT
    const bool last = HT && c == nchunks - 1 && !oneshot;   // oneshot: the count message went out as its own item
#else
    const bool last = HT && c == nchunks - 1;
#endif
    const int t0 = c * ch, t1 = min(T, t0 + ch);
    const int lo = d * LOCAL_EXPERTS, hi = lo + LOCAL_EXPERTS;
    for (int l = threadIdx.x; l < LOCAL_EXPERTS; l += THREADS) s_cnt[l] = 0;
    if (last) for (int q = threadIdx.x; q <= nchunks; q += THREADS) s_ctok[q] = 0;
    if (last) for (int q = threadIdx.x; q < R; q += THREADS) s_rows[q] = 0;
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
          if (last && id >= 0 && id < E) atomicAdd(&s_rows[id / LOCAL_EXPERTS], 1);
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
          if (!HT) atomicAdd(&p.hist_acc[d * HIST_ROW_INTS + (id - lo)], __popc(m));
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
        for (int j = threadIdx.x; j < (t1 - t0) * K; j += THREADS) {   // the rows of the chunk's own tokens
          const int id = p.ids[t0 * K + j];
          if (id >= 0 && id < E) atomicAdd(&s_rows[id / LOCAL_EXPERTS], 1);
        }
        __syncthreads();
        block_exclusive_scan(s_ctok, s_ctpref, nchunks);
        // Reserve this rank's messages in d's receive buffer, packed over the sources (one remote atomic; d clears
        // the word when its receive of the round is over, before it can send the count message of the next round
        // that any reservation of round + 2 comes after). Past recv_tokens: d's buffer is over capacity this round,
        // and then so is d's routed-row count: every rank will call the round void; nothing is written to d.
        if (threadIdx.x == 0) {
          const int n = s_ctpref[nchunks];
          const size_t roff = p.off_dresv + (size_t)par * 8;
          int old;
          if (sbase_on(p)) old = sbase(p); else
          if (same_node(p, d)) old = (int)atomicAdd_system(reinterpret_cast<unsigned*>(p.peer[d] + roff), (unsigned)n);
          else old = nvshmem_int_atomic_fetch_add(reinterpret_cast<int*>(p.sym + roff), n, d);
          s_base = (old >= 0 && old + n <= p.recv_tokens) ? old : -1;
          st_rel(p.dbase + d, ((unsigned long long)round << 32) | (unsigned)s_base);   // for d's other items here
        }
        __syncthreads();
        const size_t coff = p.off_dhist + ((size_t)par * R + p.me) * COUNT_ROW_INTS * 4;
        const bool loc = same_node(p, d);
        int* cm = loc ? reinterpret_cast<int*>(p.peer[d] + coff)
                      : reinterpret_cast<int*>(p.sym + p.off_hstage + (size_t)d * COUNT_ROW_INTS * 4);
        for (int l = threadIdx.x; l < LOCAL_EXPERTS; l += THREADS) cm[l] = s_cnt[l];
        for (int q = threadIdx.x; q <= nchunks; q += THREADS) cm[LOCAL_EXPERTS + 2 + q] = s_ctpref[q];
        for (int q = threadIdx.x; q < R; q += THREADS) cm[COUNT_ROWS_AT + q] = s_rows[q];
        if (threadIdx.x == 0) {
          cm[LOCAL_EXPERTS] = s_ctpref[nchunks];
          cm[LOCAL_EXPERTS + 1] = nchunks;
          cm[COUNT_BASE_AT] = s_base;
        }
        __syncthreads();
        const size_t soff = p.off_dsig + ((size_t)par * R + p.me) * 8;
        if (loc) {
          if (threadIdx.x == 0) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + soff), sigv);
        } else {
          nvshmemx_putmem_signal_nbi_block(p.sym + coff, cm, COUNT_ROW_INTS * 4, reinterpret_cast<uint64_t*>(p.sym + soff),
                                           sigv, NVSHMEM_SIGNAL_SET, d);
          used_shmem = true;
        }
#if EP_V_PROBE
        if (threadIdx.x == 0) probe_at(p, 9);
#endif
      }
    }
    // copy
    const bool local = same_node(p, d);
    char* dbase = (local ? p.peer[d] : p.sym);
    if constexpr (!HT) {
      // (token, slice) per warp: x[t] is read (and quantised) once per slice and written to every slot on d
      const int nt = t1 - t0;
      for (int w = warp; w < nt * ROW_SLICES; w += WARPS) {
        const int tt = w / ROW_SLICES, sl = w % ROW_SLICES;
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
            if (lane == 0 && sl == 0) report(p, ERR_SLOT_OVERFLOW, d, l, (int)round, PHASE_DISPATCH);
            continue;
          }
          offs[k] = p.off_drecv + ((((size_t)par * LOCAL_EXPERTS + l) * R + p.me) * M + r) * MSG_BYTES;
          dst[k] = local ? dbase + offs[k] : p.sym + p.off_stage + ((size_t)t * K + k) * MSG_BYTES;
          any = true;
        }
        if (!any) continue;
        warp_put_token_multi(p, t, dst, sl * SLICE_STEPS, min(ROW_STEPS, (sl + 1) * SLICE_STEPS));
        if (lane == 0 && sl == 0) {
#pragma unroll
          for (int k = 0; k < K; ++k)
            if (dst[k]) { int* meta = reinterpret_cast<int*>(dst[k] + DATA_BYTES + SCALE_BYTES); meta[0] = t; meta[1] = k; }
        }
      }
      if (!local) {  // other node: the staged messages are complete once every slice is written
        __syncthreads();
        for (int j = warp; j < nt * K; j += WARPS) {
          int r = s_rank[j];
          if (r < 0 || r >= M) continue;
          int t = t0 + j / K, k = j % K;
          int l = p.ids[t * K + k] - lo;
          size_t off = p.off_drecv + ((((size_t)par * LOCAL_EXPERTS + l) * R + p.me) * M + r) * MSG_BYTES;
          nvshmemx_putmem_nbi_warp(p.sym + off, p.sym + p.off_stage + ((size_t)t * K + k) * MSG_BYTES, MSG_BYTES, d);
        }
        used_shmem = true;
      }
    } else {
      // (token, slice) per warp: every warp of the block is busy even with a few tokens per item, and each lane has
      // a slice's SLICE_STEPS loads of x in flight (one warp per whole row was a chain of ROW_STEPS dependent load -> store
      // rounds: the small-T latency)
      const int nt = t1 - t0;
      const bool meta_only = own_rows_from_x(fused) && d == p.me;
      // where this rank's messages start on d: reserved by the item of d's last chunk (d's first item, taken
      // before this one by a running block)
      if (!last && threadIdx.x == 0) s_base = sbase_on(p) ? sbase(p) : wait_base(p, d, round);
      __syncthreads();
      const int base = s_base;
      // quantised once: the tokens' quantised bytes are copied, in units of G slices (whole rows when the item has a
      // row per warp or more: more bytes in flight per warp than a slice's), unless dst is where they are (the
      // token's first staged message); then the metadata, as below
      const int G = qonce ? max(1, min(ROW_SLICES, nt * ROW_SLICES / WARPS)) : 1;
      const int ngroups = (ROW_SLICES + G - 1) / G;
      for (int w = warp; qonce && w < nt * ngroups; w += WARPS) {
        const int tt = w / ngroups, g = w % ngroups;
        const int slot = s_tslot[tt];
        if (slot < 0 || base < 0) continue;
        const int t = t0 + tt;
        const size_t off = p.off_drecv + ((size_t)par * p.recv_tokens + base + slot) * MSG_BYTES;
        char* dst = local ? dbase + off
                          : p.sym + p.off_stage + ((size_t)t * MAX_DEST_RANKS + dest_index(p.ids + t * K, d)) * MSG_BYTES;
        const char* q = qonce_msg(p, t);
        if (dst != q) warp_copy_quantised_steps(q, dst, g * G * SLICE_STEPS, min(ROW_STEPS, (g + 1) * G * SLICE_STEPS));
        if (g == 0) {
          int* meta = reinterpret_cast<int*>(dst + DATA_BYTES + SCALE_BYTES);
          if (lane == 0) { meta[0] = t; meta[1] = 0; }
          if (lane < K) { meta[2 + lane] = p.ids[t * K + lane]; meta[2 + K + lane] = s_rank[tt * K + lane]; }
        }
      }
      for (int w = warp; !qonce && w < nt * ROW_SLICES; w += WARPS) {
        const int tt = w / ROW_SLICES, sl = w % ROW_SLICES;
        const int slot = s_tslot[tt];
        if (slot < 0 || base < 0 || (meta_only && sl != 0)) continue;
        const int t = t0 + tt;
        const size_t off = p.off_drecv + ((size_t)par * p.recv_tokens + base + slot) * MSG_BYTES;
        char* dst[K];
#pragma unroll
        for (int k = 0; k < K; ++k) dst[k] = nullptr;
        dst[0] = local ? dbase + off
                       : p.sym + p.off_stage + ((size_t)t * MAX_DEST_RANKS + dest_index(p.ids + t * K, d)) * MSG_BYTES;
        if (!meta_only) warp_put_token_multi(p, t, dst, sl * SLICE_STEPS, min(ROW_STEPS, (sl + 1) * SLICE_STEPS));
        if (sl == 0) {
          int* meta = reinterpret_cast<int*>(dst[0] + DATA_BYTES + SCALE_BYTES);
          if (lane == 0) { meta[0] = t; meta[1] = 0; }
          if (lane < K) { meta[2 + lane] = p.ids[t * K + lane]; meta[2 + K + lane] = s_rank[tt * K + lane]; }
        }
      }
      if (!local) {  // other node: each staged message is complete once all its slices are written
        __syncthreads();
        for (int tt = warp; tt < nt; tt += WARPS) {
          const int slot = s_tslot[tt];
          if (slot < 0 || base < 0) continue;
          const int t = t0 + tt;
          const size_t off = p.off_drecv + ((size_t)par * p.recv_tokens + base + slot) * MSG_BYTES;
          const size_t staged = ((size_t)t * MAX_DEST_RANKS + dest_index(p.ids + t * K, d)) * MSG_BYTES;
          nvshmemx_putmem_nbi_warp(p.sym + off, p.sym + p.off_stage + staged, MSG_BYTES, d);
        }
        used_shmem = true;
      }
      // this chunk's messages are written: raise its ready flag on d
      __syncthreads();
      if (threadIdx.x == 0) raise_flag(p, p.off_dflag + (((size_t)par * R + p.me) * MAX_CHUNKS + c) * 8, d, round);
    }
    __syncthreads();
  }

  // fused shared expert: this rank's own share of tokens -> group 0, rows 0..
  if constexpr (FUSED) {
    int s0 = 0, s1 = T;
    if (SKIP && ALLREDUCE_RANKS > 1) {
      int i = p.me % ALLREDUCE_RANKS, base = T / ALLREDUCE_RANKS, extra = T % ALLREDUCE_RANKS;
      s0 = i * base + min(i, extra);
      s1 = s0 + base + (i < extra ? 1 : 0);
    }
    const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
    for (int t = s0 + gw; t < s1; t += nw) {
      int row = t - s0;
      char* dst = reinterpret_cast<char*>(p.ex) + (size_t)row * DATA_BYTES;
      // the row's scales: scale_index(row, 0), then one column stride apart (1 when row-major)
      warp_put_token(p, t, dst, p.escale + scale_index(p, row, 0), scale_index(p, row, 1) - scale_index(p, row, 0));
      if (lane == 0) { p.src_info[row * 3] = p.me; p.src_info[row * 3 + 1] = t; p.src_info[row * 3 + 2] = -1; }
    }
  }

  // hand over: the last block ships the per-expert histogram rows and the signals
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 1);
  const bool last_block = block_done(p, S_DSEND, used_shmem);
  if (!HT && last_block) {
    // ll: the whole block moves the R x HIST_ROW_INTS counts at once (independent atomics in flight, not
    // HIST_ROW_INTS / 32 dependent rounds per warp), each writer fences its own stores, then one thread per
    // destination signals
    const size_t hoff = p.off_dhist + (((size_t)par * R + p.me) * HIST_ROW_INTS) * 4;
    __shared__ int s_rows_to[R];   // this rank's routed rows to every rank: the tail of every count row
    for (int d = threadIdx.x; d < R; d += THREADS) {
      int n = 0;
      for (int l = 0; l < LOCAL_EXPERTS; ++l) n += __ldcg(&p.hist_acc[d * HIST_ROW_INTS + l]);
      s_rows_to[d] = n;
    }
    __syncthreads();
    for (int q = threadIdx.x; q < R * HIST_ROW_INTS; q += THREADS) {
      const int d = q / HIST_ROW_INTS, l = q % HIST_ROW_INTS;
      if ((SKIP && d != p.me) || masked_at_snapshot(p, d)) continue;
      int* dst = same_node(p, d) ? reinterpret_cast<int*>(p.peer[d] + hoff)
                                 : reinterpret_cast<int*>(p.sym + p.off_hstage + (size_t)d * HIST_ROW_INTS * 4);
      const int v = atomicExch(&p.hist_acc[d * HIST_ROW_INTS + l], 0);
      dst[l] = (l >= COUNT_ROWS_AT && l < COUNT_ROWS_AT + R) ? s_rows_to[l - COUNT_ROWS_AT] : v;
    }
    __syncthreads();  // the counts of every thread before each signalling thread's release (st.release.sys)
    const size_t soff = p.off_dsig + ((size_t)par * R + p.me) * 8;
    // other-node destinations: block-scope put + signal of the staged counts
    signal_every_destination(p, soff, sigv, [&](int d) {
      nvshmemx_putmem_signal_nbi_block(p.sym + hoff, p.sym + p.off_hstage + (size_t)d * HIST_ROW_INTS * 4,
                                       HIST_ROW_INTS * 4, reinterpret_cast<uint64_t*>(p.sym + soff), sigv,
                                       NVSHMEM_SIGNAL_SET, d);
    });
    __syncthreads();
  }
  // the round of this phase is over for this rank (ht: every chunk flag and count message is out)
  if (last_block && threadIdx.x == 0) p.state[S_QDONE] = 0;   // every block is past qonce_pass
  if (last_block && threadIdx.x == 0) { stamp(p, 2); p.state[S_SCTR] = 0; __threadfence(); p.state[S_DSEND] = round; }
}

// ------------------------------------------------------------------------------------------------ dispatch, receive
__device__ void dispatch_recv(const Params& p, bool fused) {
  __shared__ int s_c[LOCAL_EXPERTS * R];      // rows of expert l from source s (LL / HT alike)
  __shared__ int s_pref[LOCAL_EXPERTS * R + 1];
  __shared__ int s_ntok[R];
  __shared__ int s_tpref[R + 1];
  __shared__ int s_chpref[HT ? R * (MAX_CHUNKS + 1) : 1];   // HT: per source, token prefix by chunk
  __shared__ int s_nch[R];
  __shared__ int s_mbase[HT ? R : 1];   // HT: where each source's messages start in the receive buffer
  __shared__ int s_npref[HT ? R : 1];   // HT: messages from the sources before s (rank order): s's rows of hinfo
  __shared__ int s_bad;                 // HT: a source's messages lie outside the buffer (only in a void round)
  __shared__ int s_gstart[PLACED ? GROUPS + 1 : 1];          // PLACED: first row of each group (then the end)
  __shared__ int s_gpad[PLACED && !BATCHED ? GROUPS : 1];     // aligned: each group's rows rounded up
  const unsigned round = cur_round(p, S_DRECV);
  const int par = round & 1;
  const unsigned long long t0 = gtime();
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int nshare_begin = 0;
  int nshare = 0;
  if constexpr (FUSED) {
    nshare = p.T;
    if (SKIP && ALLREDUCE_RANKS > 1) {
      int i = p.me % ALLREDUCE_RANKS, base = p.T / ALLREDUCE_RANKS, extra = p.T % ALLREDUCE_RANKS;
      nshare = base + (i < extra ? 1 : 0);
    }
  }
  (void)nshare_begin;
  const unsigned long long* sig = reinterpret_cast<const unsigned long long*>(p.sym + p.off_dsig) + (size_t)par * R;
  __shared__ int s_lost[R];   // fencing: sources that send nothing this round (masked, or lost in it: fence.cuh)
  if (!block_wait(p, sig, round, PHASE_DISPATCH, -1, t0, p.fence ? s_lost : nullptr)) return;
  if (p.fence && !fence_settle(p, PHASE_DISPATCH, round, s_lost)) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(p, 3);
  // ll: the per-expert counts of every source; ht: every source's count message (counts, tokens, chunk table)
  const int* hist = reinterpret_cast<const int*>(p.sym + p.off_dhist) + (size_t)par * R * COUNT_ROW_INTS;
  // a source that sends nothing: skip_a2a's other ranks, a masked or lost rank (fencing; its count message is stale)
  auto absent = [&](int s) { return (SKIP && s != p.me) || fenced_off(p, s); };
  for (int q = threadIdx.x; q < LOCAL_EXPERTS * R; q += THREADS) {
    int l = q / R, s = q % R;
    s_c[q] = absent(s) ? 0 : min(hist[s * COUNT_ROW_INTS + l], HT ? M * K : M);
  }
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += THREADS) {
    s_ntok[s] = absent(s) ? 0 : min(hist[s * COUNT_ROW_INTS + LOCAL_EXPERTS], M);
    if (HT) s_nch[s] = absent(s) ? 0 : max(0, min(hist[s * COUNT_ROW_INTS + LOCAL_EXPERTS + 1], MAX_CHUNKS));
    if (HT) {
      const int b = absent(s) ? 0 : hist[s * COUNT_ROW_INTS + COUNT_BASE_AT];
      s_mbase[HT ? s : 0] = b;
      if (s_ntok[s] > 0 && (b < 0 || b + s_ntok[s] > p.recv_tokens)) s_bad = 1;
    }
  }
  __syncthreads();
  if constexpr (HT) {
    for (int q = threadIdx.x; q < R * (MAX_CHUNKS + 1); q += THREADS) {
      const int s = q / (MAX_CHUNKS + 1), c = q % (MAX_CHUNKS + 1);
      s_chpref[q] = c <= s_nch[s] ? hist[s * COUNT_ROW_INTS + LOCAL_EXPERTS + 2 + c] : 0x7fffffff;
    }
  }
  block_exclusive_scan(s_c, s_pref, LOCAL_EXPERTS * R);
  if (threadIdx.x == 0) {
    int ta = 0;
    // ht receives sources in the order me, me + 1, ... (its own messages land first)
    for (int q = 0; q < R; ++q) { s_tpref[q] = ta; ta += s_ntok[HT ? (p.me + q) % R : q]; }
    s_tpref[R] = ta;
    if (HT) {   // the same prefix in rank order (combine_send derives it again from hcount)
      int na = 0;
      for (int q = 0; q < R; ++q) { s_npref[HT ? q : 0] = na; na += max(0, s_ntok[q]); }
    }
  }
  __syncthreads();
  const int total = nshare + s_pref[LOCAL_EXPERTS * R];
  constexpr int F = FUSED ? 1 : 0;
  // rows of group g (the shared expert's, or a local expert's from every source)
  auto group_rows = [&](int g) { return (FUSED && g == 0) ? nshare : s_pref[(g - F + 1) * R] - s_pref[(g - F) * R]; };
  if constexpr (PLACED) {
    if constexpr (BATCHED) {
      for (int g = threadIdx.x; g <= GROUPS; g += THREADS) s_gstart[g] = g * CAP;
    } else {
      for (int g = threadIdx.x; g < GROUPS; g += THREADS) s_gpad[g] = (group_rows(g) + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
      __syncthreads();
      block_exclusive_scan(s_gpad, s_gstart, GROUPS);
    }
    __syncthreads();
  }
  // Receive capacity (capacity.cuh): block 0, which writes the outputs, needs the verdict of every rank; the other
  // blocks need only this rank's own rows (and the offsets), which keep expert_x and the receive buffer in bounds.
  bool void_round = s_pref[LOCAL_EXPERTS * R] > p.cap || s_bad;
  if (blockIdx.x == 0) {
    void_round = round_verdict(p, hist, round, s_bad);
    for (int g = threadIdx.x; g <= GROUPS; g += THREADS) {
      unsigned v;
      if (void_round) v = 0;   // a void round delivers nothing: every group empty
      else if (PLACED) v = s_gstart[PLACED ? g : 0];
      else if (FUSED && g == 0) v = 0;
      else v = nshare + s_pref[(g - (FUSED ? 1 : 0)) * R];
      p.row_offsets[g] = v;
      if (g < GROUPS) p.expert_ids[g] = (FUSED && g == 0) ? -1 : p.me * LOCAL_EXPERTS + (g - (FUSED ? 1 : 0));
    }
    for (int l = threadIdx.x; l < LOCAL_EXPERTS; l += THREADS) {
      int c = 0;
      for (int s = 0; s < R; ++s) c += s_c[l * R + s];
      p.tpe[l] = void_round ? 0 : c;
    }
    // the round of this dispatch (its combine's round) and the sources that refused their input (marked signals:
    // they sent nothing); read by the combine of this handle and, lazily, by the host (DispatchResult.rejected_ranks)
    for (int s = threadIdx.x; s < R; s += THREADS)
      p.hstatus[ST_REJECTED + s] = (!absent(s) && sig_rejected(ld_rlx(sig + s))) ? 1 : 0;
    if (threadIdx.x == 0) p.hstatus[ST_ROUND] = (int)round;
    if constexpr (HT) {
      for (int s = threadIdx.x; s < R; s += THREADS) {
        p.hcount[s] = s_ntok[s];
        p.hchunk[R * (MAX_CHUNKS + 1) + s] = s_nch[s];
      }
      for (int q = threadIdx.x; q < R * (MAX_CHUNKS + 1); q += THREADS) p.hchunk[q] = s_chpref[q];
    }
  }
  if constexpr (!PLACED) {
    // rows past the end: src_info = -1
    for (int i = total * 3 + blockIdx.x * THREADS + threadIdx.x; i < p.maxr * 3; i += gridDim.x * THREADS) p.src_info[i] = -1;
  } else {
    // every row that holds no token (alignment padding, a slab's rows past its count, past the end): src_info = -1
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < p.maxr; i += gridDim.x * THREADS) {
      int g;   // the group row i lies in (GROUPS: past the end)
      if constexpr (BATCHED) {
        g = i / CAP;
      } else {
        int lo = 0, hi = GROUPS;   // invariant: s_gstart[lo] <= i < s_gstart[hi] (or i past the end)
        if (i >= s_gstart[GROUPS]) lo = GROUPS;
        else while (hi - lo > 1) { const int mid = (lo + hi) >> 1; if (s_gstart[mid] <= i) lo = mid; else hi = mid; }
        g = lo;
      }
      if (g >= GROUPS || i - s_gstart[g] >= group_rows(g)) {
        p.src_info[(size_t)i * 3] = -1; p.src_info[(size_t)i * 3 + 1] = -1; p.src_info[(size_t)i * 3 + 2] = -1;
      }
    }
  }

#if EP_V_PROBE
  probe_block(p, 10);
  unsigned long long pr_wait = 0;   // this thread's latest flag wait over (lane 0 of a warp)
#endif
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  const char* rbuf = p.sym + p.off_drecv;
  if (void_round) {
    // nothing of a void round is expanded
  } else if constexpr (!HT) {
    const int nr = s_pref[LOCAL_EXPERTS * R];
    constexpr int NV = DATA_BYTES / 16;                       // 16-byte chunks of the data part
    constexpr int VPS = (NV + ROW_SLICES - 1) / ROW_SLICES;
    for (int it = gw; it < nr * ROW_SLICES; it += nw) {
      const int j = it / ROW_SLICES, sl = it % ROW_SLICES;
      // find q with s_pref[q] <= j < s_pref[q+1]
      int lo = 0, hi = LOCAL_EXPERTS * R;  // invariant: s_pref[lo] <= j < s_pref[hi]
      while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (s_pref[mid] <= j) lo = mid; else hi = mid; }
      int l = lo / R, s = lo % R, i = j - s_pref[lo];
      const char* msg = rbuf + ((((size_t)par * LOCAL_EXPERTS + l) * R + s) * M + i) * MSG_BYTES;
      int row = nshare + j;
      if constexpr (PLACED) {
        const int idx = j - s_pref[l * R];     // row of local expert l
        if (BATCHED && idx >= CAP) {           // a slab holds CAP rows: drop the rest, and say so
          if (lane == 0 && sl == 0) report(p, ERR_SLAB_OVERFLOW, p.me, l, (int)round, PHASE_DISPATCH);
          continue;
        }
        row = s_gstart[PLACED ? l + F : 0] + idx;
      }
      char* const dst[1] = {reinterpret_cast<char*>(p.ex) + (size_t)row * DATA_BYTES};
      warp_copy_multi<1, (VPS + 31) / 32>(dst, msg, sl * VPS, min(NV, (sl + 1) * VPS));
      if (sl != 0) continue;
      if (FP8)
        for (int c = lane; c < SCALE_COLS; c += 32)
          p.escale[scale_index(p, row, c)] = reinterpret_cast<const float*>(msg + DATA_BYTES)[c];
      if (lane == 0) {
        const int* meta = reinterpret_cast<const int*>(msg + DATA_BYTES + SCALE_BYTES);
        p.src_info[row * 3] = s; p.src_info[row * 3 + 1] = meta[0]; p.src_info[row * 3 + 2] = meta[1];
      }
    }
  } else {
    const int ntot = s_tpref[R];
    constexpr int NV = DATA_BYTES / 16;                       // 16-byte chunks of the data part
    constexpr int VPS = (NV + ROW_SLICES - 1) / ROW_SLICES;
    // Up to 4 rounds: (message, slice) units, spread statically over all warps. More: whole messages, taken in
    // order (atomic counter), sources from this rank on, so the blocks that are free early (their send items went
    // to this rank) expand what has landed while other blocks still send to the peers. (Whole messages pay only
    // when every warp has several: at 128 tokens one warp per message took 26 us.)
    const bool dyn = ntot * ROW_SLICES > 4 * nw;
    const int nunits = dyn ? ntot : ntot * ROW_SLICES;
    int ready_s = -1, ready_c = -1;   // the chunk this warp last found landed
    for (int u = dyn ? warp_grab(p, S_RCTR) : gw; u < nunits; u = dyn ? warp_grab(p, S_RCTR) : u + nw) {
      const int j = dyn ? u : u / ROW_SLICES, sl = dyn ? 0 : u % ROW_SLICES;
      int q = 0;
      while (q + 1 < R && s_tpref[q + 1] <= j) ++q;
      const int s = (p.me + q) % R;
      // dynamic: last message first (the sender's chunks go out last chunk first)
      const int i = dyn ? s_ntok[s] - 1 - (j - s_tpref[q]) : j - s_tpref[q];
      // the sender's chunk that holds message i: last c with prefix[c] <= i (binary search in shared memory)
      const int* cp = s_chpref + s * (MAX_CHUNKS + 1);
      int clo = 0, chi = max(1, s_nch[s]);  // invariant: cp[clo] <= i < cp[chi]
      while (chi - clo > 1) { const int mid = (clo + chi) >> 1; if (cp[mid] <= i) clo = mid; else chi = mid; }
      if (s != ready_s || clo != ready_c) {
        bool ok = true;
        if (lane == 0) {
          const unsigned long long* f =
              reinterpret_cast<const unsigned long long*>(p.sym + p.off_dflag) + ((size_t)par * R + s) * MAX_CHUNKS + clo;
          ok = thread_wait(p, f, round, PHASE_DISPATCH, s, clo, t0);
#if EP_V_PROBE
          if (ok) pr_wait = gtime();
#endif
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        __syncwarp();  // lane 0's acquire of the flag before every lane's reads of the chunk
        if (!ok) break;
        ready_s = s;
        ready_c = clo;
      }
      const char* msg = rbuf + ((size_t)par * p.recv_tokens + s_mbase[HT ? s : 0] + i) * MSG_BYTES;
      const int* meta = reinterpret_cast<const int*>(msg + DATA_BYTES + SCALE_BYTES);
      int t = meta[0];
      int rows[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        int id = meta[2 + k];
        int l = id - p.me * LOCAL_EXPERTS;
        rows[k] = (l >= 0 && l < LOCAL_EXPERTS) ? nshare + s_pref[l * R + s] + meta[2 + K + k] : -1;
        if constexpr (PLACED) {
          if (rows[k] >= 0) {
            const int idx = s_pref[l * R + s] - s_pref[l * R] + meta[2 + K + k];   // row of local expert l
            rows[k] = s_gstart[PLACED ? l + F : 0] + idx;
            if (BATCHED && idx >= CAP) {   // a slab holds CAP rows: drop the rest, and say so
              rows[k] = -1;
              if (lane == 0 && sl == 0) report(p, ERR_SLAB_OVERFLOW, p.me, l, (int)round, PHASE_DISPATCH);
            }
          }
        }
      }
      // one read of the message slice, one write per local expert slot
      char* dst[K];
#pragma unroll
      for (int k = 0; k < K; ++k)
        dst[k] = rows[k] >= 0 ? reinterpret_cast<char*>(p.ex) + (size_t)rows[k] * DATA_BYTES : nullptr;
      // own tokens (fused bf16): the row comes straight from x
      const char* src = (own_rows_from_x(fused) && s == p.me && t >= 0 && t < p.T)
                            ? reinterpret_cast<const char*>(p.x) + (size_t)t * DATA_BYTES : msg;
      if (dyn) warp_copy_multi<K, 7>(dst, src, 0, NV);
      else warp_copy_multi<K, (VPS + 31) / 32>(dst, src, sl * VPS, min(NV, (sl + 1) * VPS));
      if (sl == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (rows[k] < 0) continue;
          if (FP8)
            for (int c = lane; c < SCALE_COLS; c += 32)
              p.escale[scale_index(p, rows[k], c)] = reinterpret_cast<const float*>(msg + DATA_BYTES)[c];
          if (lane == 0) { p.src_info[rows[k] * 3] = s; p.src_info[rows[k] * 3 + 1] = t; p.src_info[rows[k] * 3 + 2] = k; }
        }
        // below recv_tokens: a round that expands its messages has them all inside the receive buffer (s_bad)
        int* hi = p.hinfo + ((size_t)s_npref[HT ? s : 0] + i) * (2 + K);
        if (lane == 0) { hi[0] = t; hi[1] = dest_index(meta + 2, p.me); }   // [1]: where s expects its row
        if (lane < K) hi[2 + lane] = rows[lane];
      }
    }
  }
#if EP_V_PROBE
  probe_max(p, 11, pr_wait);
  probe_block(p, 12);
#endif
  if (block_done(p, S_DRECV, false, false)) {
    if (threadIdx.x == 0) {
      if (HT) {   // every source reserved before it sent its count message: clear this parity's reservations
        *reinterpret_cast<volatile unsigned long long*>(p.sym + p.off_dresv + (size_t)par * 8) = 0ull;
        __threadfence_system();
      }
      stamp(p, 4); p.state[S_DRECV] = round; p.state[S_RCTR] = 0;
    }
  }
}

}  // namespace ep
