// Fencing off dead ranks (issue 15 item 4; docs/FAILURES.md, "Fencing off a dead rank", GPU backend).
//
// Only a buffer made with fencing (EPBuffer(fence_dead_ranks=True): Params.fence = 1) runs any of this; without it
// the kernels test one parameter per destination or source (fenced_off, common.cuh) and nothing else changes.
//
// One mask per round, the same in every block: the blocks of a kernel compute the receive layout, the counts and the
// rows they send on their own, so they must not disagree on who is masked, and the round's combine must mask what
// its dispatch masked. No kernel reads the death notices (the symmetric `dead` words) directly but the snapshot:
// ep_fence_snapshot, one block launched right before every dispatch on the same stream (stream order: no host sync,
// captured and replayed with the dispatch in a CUDA graph), copies them into the output set's status words
// (ST_MASKED + r), and rewrites the caller's top-k ids into the set's handle copy (hids) with the slots whose expert
// lives on a masked rank set to -1 and marked in hdropped (DispatchResult.dropped). The dispatch then reads its ids
// from hids: nothing is counted for, sent to or awaited from a masked rank, its stale count message is not read, and
// the combine (which reads hids) sums the live slots only: the spec with masked_ranks (epcomm/reference.py).
//
// A death inside a round (the rank was in the snapshot's "live" set). With fencing a wait has no deadline of its own:
// its slow path (every 16 / 64 spins, as the abort word; nothing on the fast path) asks fence_poll, which finds the
// peer dead when its notice is here (declared by this rank or a peer) or when the deadline passed and the peer's
// heartbeat did not move (then this rank declares it: fence_declare writes the notice here and in every live peer's
// region, as GpuBackend.declare_dead does from the host). A waiting thread beats (fence_beat: this rank's count into
// every live peer's `beat` word, at most every timeout / 4), so a rank blocked on the dead one is not taken for dead
// too. A peer that beats but never sends is a timeout after three deadlines, as without fencing. The blocks of a wait
// then settle the round's verdict on each source (fence_decide: one atomicCAS'd word per phase and source), so that
// all of them build the same layout; a source found lost counts as one that sent nothing (the masked path: its mask
// word becomes 2 for the rest of the round and its combine). The combine receive counts this rank's tokens that had a
// slot on a rank lost in the round (count_lost): the refusal record with WHY_LOST, raised by the host as
// EPRankLostError. The next round's snapshot masks the rank (its notice is here by then).
#pragma once
#include "common.cuh"
#include "results.cuh"

namespace ep {

__device__ __forceinline__ unsigned long long* dead_words(const Params& p) {
  return reinterpret_cast<unsigned long long*>(p.sym + p.off_dead);
}

// Store the u64 v at symmetric offset `off` on rank d: same node through the peer pointer, other node an NVSHMEM
// signal (the abort word's transports). One thread.
__device__ __forceinline__ void put_word(const Params& p, int d, size_t off, unsigned long long v) {
  if (same_node(p, d)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[d] + off), v);
  else nvshmemx_signal_op(reinterpret_cast<uint64_t*>(p.sym + off), v, NVSHMEM_SIGNAL_SET, d);
}

// A rank this rank still talks to: a peer, not masked in the round, no death notice for it here.
__device__ __forceinline__ bool live_peer(const Params& p, int d) {
  return !SKIP && d != p.me && !fenced_off(p, d) && ld_rlx(dead_words(p) + d) == 0ull;
}

// One block. A dispatch the device will refuse (results.cuh: its set holds a live result) must find the set as it
// was: then nothing is written. A notice naming this rank (a peer declared it dead): it takes part with nobody (every
// other rank masked: it sends nothing and waits for nothing, so it cannot disturb the survivors) and records
// ERR_FENCED, which the host raises as EPFencedError.
__device__ void fence_snapshot(const Params& p) {
  __shared__ int s_mask[R];
  __shared__ int s_go;
  if (threadIdx.x == 0) {
    const unsigned long long holder = *reinterpret_cast<volatile unsigned long long*>(owner_word(p));
    s_go = dispatch_refusal(p, buffer_idle(p), holder) == 0;
  }
  __syncthreads();
  if (!s_go) return;
  const volatile unsigned long long* dead = dead_words(p);
  const unsigned long long self = dead[p.me];
  if (self != 0ull && threadIdx.x == 0)
    report(p, ERR_FENCED, (int)(self - 1ull), 0, (int)cur_round(p, S_DSEND), PHASE_DISPATCH);
  for (int r = threadIdx.x; r < R; r += THREADS) {
    const int m = r != p.me && (self != 0ull || dead[r] != 0ull);
    s_mask[r] = m;
    p.hstatus[ST_MASKED + r] = m;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.T * K; i += THREADS) {
    const int id = p.ids[i];
    const bool drop = id >= 0 && id < E && s_mask[id / LOCAL_EXPERTS];
    p.hids[i] = drop ? -1 : id;
    p.hdropped[i] = drop ? 1 : 0;
  }
}

// Heartbeat (one thread of a wait's slow path): at most every timeout / 4, this rank's beat count into beat[me] of
// every live peer, so that a peer waiting for this rank while this rank waits itself (blocked on the dead rank, e.g.
// in ht's two-step combine) does not take it for dead.
__device__ void fence_beat(const Params& p) {
  unsigned long long* last = reinterpret_cast<unsigned long long*>(p.state + S_BEAT_T);
  const unsigned long long now = gtime(), prev = *reinterpret_cast<volatile unsigned long long*>(last);
  if (now - prev < p.timeout_ns / 4 || atomicCAS(last, prev, now) != prev) return;   // not yet, or another thread's
  const unsigned long long n = atomicAdd(reinterpret_cast<unsigned long long*>(p.state + S_BEAT_N), 1ull) + 1ull;
  for (int d = 0; d < R; ++d)
    if (live_peer(p, d)) put_word(p, d, p.off_beat + (size_t)p.me * 8, n);
}

// Declare rank s dead (one thread; the deadline found it silent): the notice dead[s] = me + 1 here, in every live
// peer's region and, best effort, in s's own when it is on this node (a rank that is only stuck learns it is out:
// ERR_FENCED at its next dispatch); to s on another node nothing is sent from a kernel (a put to a PE that is gone
// may not return). The first to set the word here writes the others. A rank that was declared dead itself declares
// nobody: it must not fence the survivors off.
__device__ void fence_declare(const Params& p, int s) {
  unsigned long long* dead = dead_words(p);
  const unsigned long long notice = (unsigned long long)p.me + 1ull;
  if (ld_rlx(dead + p.me) != 0ull || atomicCAS(dead + s, 0ull, notice) != 0ull) return;
  const size_t off = p.off_dead + (size_t)s * 8;
  for (int d = 0; d < R; ++d)
    if (d != s && live_peer(p, d)) put_word(p, d, off, notice);
  if (same_node(p, s)) st_rel(reinterpret_cast<unsigned long long*>(p.peer[s] + off), notice);
}

// The slow path of a wait on `peer` with fencing (common.cuh FenceWait): beat, then dead, alive or still waiting.
__device__ int fence_poll(const Params& p, FenceWait& fw, int peer) {
  const unsigned long long now = gtime();
  if (peer == p.me)   // its own signal missing is not a death (a grid that is not resident): the plain deadline
    return now - fw.t0 > p.timeout_ns ? FENCE_TIMEOUT : FENCE_WAIT;
  fence_beat(p);
  if (ld_rlx(dead_words(p) + peer) != 0ull) return FENCE_LOST;   // declared dead here: by this rank or a peer
  const unsigned long long b = ld_rlx(reinterpret_cast<const unsigned long long*>(p.sym + p.off_beat) + peer);
  if (!fw.primed) { fw.primed = true; fw.beat0 = b; }
  if (now - fw.t0 <= p.timeout_ns) return FENCE_WAIT;
  if (b == fw.beat0) { fence_declare(p, peer); return FENCE_LOST; }
  if (++fw.extensions >= 3) return FENCE_TIMEOUT;   // alive (it beats) but it never sends
  fw.beat0 = b;
  fw.t0 = now;
  return FENCE_WAIT;
}

// The round's verdict on source s in this phase, the same for every block: the first block to settle it sets the
// word by atomicCAS (round << 2 | 1 arrived, 2 lost), the others follow (a block that saw the signal and one that
// found the source dead at its deadline would otherwise build different layouts). Lost: its mask word is 2 from here
// on (the round's combine treats it as sending nothing and counts the tokens that needed it).
__device__ bool fence_decide(const Params& p, int phase, int s, unsigned round, bool lost) {
  unsigned long long* w = p.fdec + (size_t)phase * R + s;
  const unsigned long long mine = ((unsigned long long)round << 2) | (lost ? 2ull : 1ull);
  unsigned long long cur = *reinterpret_cast<volatile unsigned long long*>(w);
  while ((cur >> 2) != (unsigned long long)round) {   // another round's word (phases settle one round at a time)
    const unsigned long long prev = atomicCAS(w, cur, mine);
    cur = prev == cur ? mine : prev;
  }
  const bool verdict = (cur & 3ull) == 2ull;
  if (verdict) p.hstatus[ST_MASKED + s] = 2;
  return verdict;
}

// ht dispatch receive: a source's count message comes before its rows, so one that died in the middle of its send
// may have left a count message without all of its chunks. The verdict on a source waits for every chunk flag its
// count message announces (or for the source to be found dead): all of its tokens or none. False on a failure.
__device__ bool fence_wait_chunks(const Params& p, unsigned round, int* lost) {
  const int par = round & 1;
  const int* hist = reinterpret_cast<const int*>(p.sym + p.off_dhist) + (size_t)par * R * COUNT_ROW_INTS;
  const unsigned long long* flags = reinterpret_cast<const unsigned long long*>(p.sym + p.off_dflag);
  const unsigned long long t0 = gtime();
  bool ok = true;
  for (int s = threadIdx.x; s < R && ok; s += THREADS) {
    if ((SKIP && s != p.me) || lost[s]) continue;
    const int nch = max(0, min(hist[s * COUNT_ROW_INTS + LOCAL_EXPERTS + 1], MAX_CHUNKS));
    for (int c = 0; c < nch && ok; ++c) {
      bool gone = false;
      ok = thread_wait(p, flags + ((size_t)par * R + s) * MAX_CHUNKS + c, round, PHASE_DISPATCH, s, c, t0, &gone);
      if (gone) { lost[s] = 1; break; }
    }
  }
  return __syncthreads_or(!ok) == 0;
}

// Every thread of the block, after block_wait(..., lost) of this phase: the round's verdict on every source the
// snapshot did not mask (lost[s] in: this block's finding; out: the verdict). False on a failure (ht dispatch).
__device__ bool fence_settle(const Params& p, int phase, unsigned round, int* lost) {
  if (HT && phase == PHASE_DISPATCH && !fence_wait_chunks(p, round, lost)) return false;
  for (int s = threadIdx.x; s < R; s += THREADS) {
    if ((SKIP && s != p.me) || p.hstatus[ST_MASKED + s] == 1) continue;
    lost[s] = fence_decide(p, phase, s, round, lost[s] != 0);
  }
  __syncthreads();
  return true;
}

}  // namespace ep
