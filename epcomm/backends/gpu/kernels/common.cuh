// Building blocks of every kernel: memory-order loads / stores, waits with deadlines, fences and the per-phase
// hand-over, the device error report, ready flags, warp copies, work counters, the block scan.
#pragma once
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "layout.cuh"
#include "ordering.cuh"

namespace ep {

// ------------------------------------------------------------------------------------------------ small helpers
__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// Fencing (fence.cuh): rank r is masked in this launch's round (the snapshot in the output set's status words, the
// same for every block and for the round's combine): nothing is sent to it, nothing awaited from it. Without fencing
// (Params.fence == 0) one test of a kernel parameter per destination or source, never per row.
__device__ __forceinline__ bool fenced_off(const Params& p, int r) { return p.fence && p.hstatus[ST_MASKED + r] != 0; }
// ... masked by the snapshot itself, not found lost during the round (2): what the dispatch send's blocks skip (they
// must agree on it while the same kernel's receive may settle a rank lost: a block waiting for the reservation of a
// destination's last chunk would wait in vain if another block skipped that item).
__device__ __forceinline__ bool masked_at_snapshot(const Params& p, int r) {
  return p.fence && p.hstatus[ST_MASKED + r] == 1;
}
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << lane_id()) - 1u; }

// A token of this rank's combine went to the experts of rank `peer`, which refused its input this round (its signal
// carried SIG_REJECTED): counted here, published once by the combine's last block (publish_refusal).
__device__ __forceinline__ void count_refusal(const Params& p, int peer) {
  atomicAdd(&p.state[S_REJ_TOKENS], 1u);
  atomicMax(&p.state[S_REJ_RANK], (unsigned)(R - peer));   // the lowest refusing rank (0: none)
}

// Fencing (fence.cuh): a token of this rank's combine went to the experts of rank `peer`, which was lost (declared
// dead) in the round: its rows never came. Counted like a refusal, published with WHY_LOST (EPRankLostError).
__device__ __forceinline__ void count_lost(const Params& p, int peer) {
  atomicAdd(&p.state[S_LOST_TOKENS], 1u);
  atomicMax(&p.state[S_LOST_RANK], (unsigned)(R - peer));   // the lowest lost rank (0: none)
}

// The last block of a combine receive (one thread): the refusal record for the host, which raises
// EPPeerRejectedError from it once (check / synchronize) instead of handing out a partial sum (EPRankLostError for a
// rank lost in the round: that one is written when both happened). Not an error: the buffer stays usable. Only the
// device writes the record: the fields of this combine, then the count.
__device__ void publish_refusal(const Params& p, unsigned round) {
  const unsigned lost = *((volatile unsigned*)&p.state[S_LOST_TOKENS]);   // the other blocks' atomics (L2)
  const unsigned tokens = lost ? lost : *((volatile unsigned*)&p.state[S_REJ_TOKENS]);
  if (tokens == 0u) return;
  const int peer = R - (int)*((volatile unsigned*)&p.state[lost ? S_LOST_RANK : S_REJ_RANK]);
  p.state[S_REJ_TOKENS] = 0u;
  p.state[S_REJ_RANK] = 0u;
  p.state[S_LOST_TOKENS] = 0u;
  p.state[S_LOST_RANK] = 0u;
  RefusalRec* rec =
      reinterpret_cast<RefusalRec*>(reinterpret_cast<char*>(p.err) + sizeof(ErrRec) + sizeof(CapacityRec));
  rec->round = (int)round;
  rec->rank = peer;
  rec->what = lost ? WHY_LOST : p.hstatus[ST_REJECTED + peer] ? WHY_DISPATCH : WHY_COMBINE;
  rec->tokens = (int)tokens;
  __threadfence_system();
  *((volatile int*)&rec->count) += 1;   // last: the host reads the fields once it sees the count move
  __threadfence_system();
}

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

// A signal word (or ready flag) holds the round it was raised for in its low 32 bits, and SIG_REJECTED above them when
// its sender refused its input (layout.cuh): the waits compare the round bits only.
__device__ __forceinline__ bool not_yet(const unsigned long long* w, unsigned round) {
  return sig_round(ld_rlx(w)) < round || sig_round(ld_acq(w)) < round;
}

// Fencing (fence.cuh): the slow path of a wait on rank `peer` (only with Params.fence, where it replaces the
// deadline): FENCE_WAIT, FENCE_LOST (the peer is dead: declared by this rank at the deadline, or by a peer) or
// FENCE_TIMEOUT (it beats but never sends: a timeout, as without fencing).
struct FenceWait {
  unsigned long long t0;      // start of the wait (moved on when the peer's heartbeat moved)
  unsigned long long beat0;   // the peer's heartbeat when it was read last
  int extensions;             // deadlines passed with the peer's heartbeat moving
  bool primed;
};
enum { FENCE_WAIT = 0, FENCE_LOST = 1, FENCE_TIMEOUT = 2 };
__device__ int fence_poll(const Params& p, FenceWait& fw, int peer);

// Wait (every thread s < nsrc of the block) until sig[s] >= round (not for a masked rank: fenced_off). Returns false
// (for the whole block) on timeout. Fencing: lost[s] (shared, [R]) = 1 where source s sent nothing this round:
// masked, or found dead instead of a timeout (fence_poll); fence_settle then makes it the round's verdict.
__device__ bool block_wait(const Params& p, const unsigned long long* sig, unsigned round, int phase, int what,
                           unsigned long long t0, int* lost = nullptr) {
  bool bad = false;
  for (int s = threadIdx.x; s < R; s += THREADS) {
    if (lost) lost[s] = fenced_off(p, s) ? 1 : 0;
    if ((SKIP && s != p.me) || fenced_off(p, s)) continue;
    const unsigned long long* w = sig + s;
    const unsigned long long* ab = reinterpret_cast<const unsigned long long*>(p.sym + p.off_abort) + s;
    int spins = 0;
    unsigned nap = 32;
    FenceWait fw{t0, 0ull, 0, false};
    while (not_yet(w, round)) {
      __nanosleep(nap);
      if (nap < 256) nap <<= 1;
      if (++spins > 64) {
        spins = 0;
        if (ld_acq(ab) != 0ull) {  // that peer gave up (EPBuffer abort): stop now instead of at the deadline
          report(p, ERR_ABORT, s, what, (int)round, phase);
          bad = true;
          break;
        }
        const int f = p.fence && lost ? fence_poll(p, fw, s)
                                      : (gtime() - t0 > p.timeout_ns ? FENCE_TIMEOUT : FENCE_WAIT);
        if (f == FENCE_LOST) {
          lost[s] = 1;
          break;
        }
        if (f == FENCE_TIMEOUT) {
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
// another wait (so that a failed round ends at one deadline, not one per chunk). Fencing: a peer found dead
// (fence_poll) sets *lost and returns true where the caller passes `lost`, else it is a timeout.
__device__ bool thread_wait(const Params& p, const unsigned long long* flag, unsigned round, int phase, int peer,
                            int what, unsigned long long t0, bool* lost = nullptr) {
  const unsigned long long* ab = reinterpret_cast<const unsigned long long*>(p.sym + p.off_abort) + peer;
  int spins = 0;
  unsigned nap = 32;
  FenceWait fw{t0, 0ull, 0, false};
  // Poll relaxed, acquire once the value is there, and back off: hundreds of warps polling flat out (worse: with an
  // acquire per poll) slowed the copying warps of the whole GPU up to 10x (measured).
  while (not_yet(flag, round)) {
    __nanosleep(nap);
    if (nap < 1024) nap <<= 1;
    if (++spins > 16) {
      spins = 0;
      if (ld_rlx(ab) != 0ull) { report(p, ERR_ABORT, peer, what, (int)round, phase); return false; }
      if (p.fence) {
        const int f = fence_poll(p, fw, peer);
        if (f == FENCE_LOST && lost) { *lost = true; return true; }
        if (f != FENCE_WAIT) { report(p, ERR_TIMEOUT, peer, what, (int)round, phase); return false; }
      } else if (gtime() - t0 > p.timeout_ns) {
        report(p, ERR_TIMEOUT, peer, what, (int)round, phase);
        return false;
      }
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

// The whole block, after a __syncthreads that ordered its stores of one payload per destination: raise the signal
// word at symmetric offset sig_off on every destination to `value` (the round; with SIG_REJECTED for a refusing
// rank). Same node: the payload was written in place through the peer pointer; one thread per destination releases
// (st.release.sys). Other node: put_signal(d) puts the staged payload with the signal after the data, by the whole
// block (one thread would take nbytes / 16 serial steps per destination), one call per destination, then one quiet
// for all of them (the staging is reused next round).
template <typename PutSignal>
__device__ __forceinline__ void signal_every_destination(const Params& p, size_t sig_off, unsigned long long value,
                                                         PutSignal put_signal) {
  for (int d = threadIdx.x; d < R; d += THREADS) {
    if ((SKIP && d != p.me) || fenced_off(p, d)) continue;
    if (same_node(p, d)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + sig_off), value);
  }
  bool any_remote = false;
  for (int d = 0; d < R; ++d) {  // block-uniform conditions
    if ((SKIP && d != p.me) || same_node(p, d) || fenced_off(p, d)) continue;
    put_signal(d);
    any_remote = true;
  }
  if (any_remote && threadIdx.x == 0) nvshmem_quiet();
}

// ht: the index of rank d among the ranks the token with these K expert ids goes to, in rank order (skip_a2a: only
// this rank, index 0). A token's combine rows and staged messages are packed by it: MAX_DEST_RANKS per token.
__device__ __forceinline__ int dest_index(const int* ids, int d) {
  if (SKIP) return 0;
  unsigned long long below = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int id = ids[k];
    if (id >= 0 && id < E && id / LOCAL_EXPERTS < d) below |= 1ull << (id / LOCAL_EXPERTS);
  }
  return __popcll(below);
}

// ht: the start of this rank's messages in d's receive buffer this round, published in p.dbase by the item that
// reserved it (one thread; -1: over capacity, or an error recorded while waiting).
__device__ int wait_base(const Params& p, int d, unsigned round) {
  const unsigned long long t0 = gtime();
  unsigned nap = 32;
  unsigned long long v;
  while (((v = ld_acq(p.dbase + d)) >> 32) != (unsigned long long)round) {
    __nanosleep(nap);
    if (nap < 256) nap <<= 1;
    if (gtime() - t0 > p.timeout_ns) { report(p, ERR_TIMEOUT, p.me, d, (int)round, PHASE_DISPATCH); return -1; }
  }
  return (int)(unsigned)(v & 0xffffffffull);
}

// Phase timestamps (%globaltimer, ns) of the latest round in state words 32..49 (u64 [9]): 0 dispatch send start,
// 1 block 0's send work issued, 2 last send block signalled, 3 receive wait over (block 0), 4 receive done (last block),
// 5 combine send start, 6 combine send signalled, 7 combine receive wait over (block 0), 8 combine receive done.
// One store by one thread per phase: off the data path. Read by tests/gpu/bench_quick.py.
__device__ __forceinline__ void stamp(const Params& p, int i) {
  reinterpret_cast<unsigned long long*>(p.state + 32)[i] = gtime();
}

#if EP_V_PROBE
// Variant probe (a measurement, not a candidate): times of events inside the phases, each the latest over the grid
// in this round (%globaltimer only grows, so a max over rounds is this round's max), in state words 50..63 as u64
// [7] = stamp indices 9..15: 9 the last count message released (dispatch send), 10 the last block's receive layout
// done, 11 the last chunk-flag wait over, 12 the last block's units done (dispatch receive), 13 the last block past
// the weight signals, 14 the last chunk flag raised (combine send), 15 the last chunk-flag wait over (combine
// receive). One global atomic per block and event (probe_block / probe_max), or per item (probe_at).
__device__ __forceinline__ unsigned long long* probe_word(const Params& p, int i) {
  return reinterpret_cast<unsigned long long*>(p.state + 32) + i;
}
__device__ __forceinline__ void probe_at(const Params& p, int i) { atomicMax(probe_word(p, i), gtime()); }  // 1 thread
__device__ __forceinline__ void probe_block(const Params& p, int i) {   // whole block: when all its threads are here
  __syncthreads();
  if (threadIdx.x == 0) probe_at(p, i);
}
__device__ __forceinline__ void probe_max(const Params& p, int i, unsigned long long t) {   // whole block: max of t
  __shared__ unsigned long long s_pm;
  if (threadIdx.x == 0) s_pm = 0ull;
  __syncthreads();
  if (t != 0ull) atomicMax(&s_pm, t);
  __syncthreads();
  if (threadIdx.x == 0 && s_pm != 0ull) atomicMax(probe_word(p, i), s_pm);
}
#endif

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

// Tokens per send work item: the host's choice, clamped so that ht has at most MAX_CHUNKS chunks per source.
__device__ __forceinline__ int chunk_tokens(const Params& p) {
  const int ch = max(1, min(MAX_ITEM_TOKENS, p.ch));
  return HT ? max(ch, (p.T + MAX_CHUNKS - 1) / MAX_CHUNKS) : ch;
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

}  // namespace ep
