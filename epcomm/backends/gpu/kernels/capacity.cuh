// Receive capacity: the verdict of a dispatch round, the same on every rank.
//
// Every count message ends with its source's routed rows to every rank ([R] ints at COUNT_ROWS_AT: ll, the count
// row the last send block ships; ht, the count message of each destination's last chunk item). Once a rank has the
// count messages of all sources, which its receive waits for anyway, it holds the whole [source][rank] matrix and
// reaches the same verdict as every other rank, without another exchange or a host sync (fencing: a masked rank's row
// is stale, it sent nothing this round: not counted, fenced_off): a round in which any rank
// would receive more routed rows than p.cap is void on every rank. Nothing of it is expanded, the combine of its
// handle sends and waits for nothing (combine.cuh), and the host raises EPCapacityError from the capacity record
// once (GpuBackend.check / synchronize); the buffer stays usable.
#pragma once
#include "common.cuh"

namespace ep {

// The whole block (block 0 of dispatch_recv): true when the round is void. Writes the output set's status word
// (Params.hstatus: [0] void, [1] the rank most over, [2] its rows, [3] the capacity) and, for a void round, the
// capacity record after ErrRec in pinned host memory. known_void: this rank already knows (an offset out of its
// receive buffer, which only an over-capacity round produces).
__device__ bool round_verdict(const Params& p, const int* hist, unsigned round, bool known_void) {
  __shared__ unsigned long long s_worst;   // (rows << 32) | ~rank of the rank most over: the most rows, lowest rank
  __shared__ int s_over;
  if (threadIdx.x == 0) { s_worst = 0ull; s_over = 0; }
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += THREADS) {
    if (SKIP && d != p.me) continue;   // skip_a2a: nothing reaches the other ranks
    long long need = 0;
    for (int s = 0; s < R; ++s)
      if (!(SKIP && s != p.me) && !fenced_off(p, s)) need += max(0, hist[s * COUNT_ROW_INTS + COUNT_ROWS_AT + d]);
    if (need > p.cap) {
      atomicAdd(&s_over, 1);
      atomicMax(&s_worst, ((unsigned long long)min(need, 0x7fffffffLL) << 32) | (0xffffffffu - (unsigned)d));
    }
  }
  __syncthreads();
  const bool void_round = s_over > 0 || known_void;
  if (threadIdx.x == 0) {
    p.hstatus[0] = void_round ? 1 : 0;
    if (void_round) {
      const int worst = (int)(0xffffffffu - (unsigned)(s_worst & 0xffffffffull)), need = (int)(s_worst >> 32);
      p.hstatus[1] = worst; p.hstatus[2] = need; p.hstatus[3] = p.cap;
      CapacityRec* rec = reinterpret_cast<CapacityRec*>(p.err + 1);
      rec->rank = worst; rec->needed = need; rec->capacity = p.cap; rec->over = s_over;
      __threadfence_system();
      rec->flag = (int)round;    // last: the host reads the fields once it sees the flag
      __threadfence_system();
    }
  }
  __syncthreads();
  return void_round;
}

}  // namespace ep
