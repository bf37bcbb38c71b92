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
#pragma once
#include "common.cuh"
#include "results.cuh"

namespace ep {

// One block. A dispatch the device will refuse (results.cuh: its set holds a live result) must find the set as it
// was: then nothing is written.
__device__ void fence_snapshot(const Params& p) {
  __shared__ int s_mask[R];
  __shared__ int s_go;
  if (threadIdx.x == 0) {
    const unsigned long long holder = *reinterpret_cast<volatile unsigned long long*>(owner_word(p));
    s_go = dispatch_refusal(p, buffer_idle(p), holder) == 0;
  }
  __syncthreads();
  if (!s_go) return;
  const volatile unsigned long long* dead = reinterpret_cast<const volatile unsigned long long*>(p.sym + p.off_dead);
  for (int r = threadIdx.x; r < R; r += THREADS) {
    const int m = r != p.me && dead[r] != 0ull;   // a notice naming this rank: the host's business (EPFencedError)
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

}  // namespace ep
