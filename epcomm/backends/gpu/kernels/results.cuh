// Live results: which dispatch result each output set holds, known on the device, so that eager calls and CUDA-graph
// replays can share one buffer (docs/ARCHITECTURE.md, "Micro-batches, graphs and eager calls").
//
// The host picks a call's output set when it issues it (eager) or captures it (a captured call's outputs are fixed
// tensors that the graph's later nodes read), and it cannot see replays. So every launch is admitted here first, by
// every block alike, before it touches anything. Params.call = (call id << 2) | (output set << 1) | eager (0: a
// captured call); a combine carries its dispatch's. The owner word of a set holds the call whose result is live in
// it (0: none): set by an admitted dispatch, cleared when the combine of that result has received (or by ep_release).
// * a dispatch is refused when its set holds the live result of another call, unless both calls are eager (EPBuffer
//   checked its own eager results and refuses a third live one before anything is sent), and when an *_async of this
//   buffer still waits for its *_wait (a launch in between would take that call's round);
// * a combine runs only for the live result its handle names; a separate receive only after its own send.
// A refused launch does nothing: no round counted, no signal, no output written. Every rank sees the same launches
// in the same order, so every rank refuses the same one and nobody waits for it. Block 0 writes the overwrite record
// (OverwriteRec, host-mapped, after the refusal record); the host raises EPOverwriteError from it; the buffer stays
// usable.
#pragma once
#include "common.cuh"

namespace ep {

enum { OP_DISPATCH = 0, OP_DISPATCH_RECV = 1, OP_COMBINE = 2, OP_COMBINE_RECV = 3 };   // OverwriteRec.op
enum { WHY_LIVE = 1, WHY_PENDING = 2, WHY_NOT_LIVE = 3 };                                // OverwriteRec.why
static_assert(OP_DISPATCH == EP_OP_DISPATCH && OP_DISPATCH_RECV == EP_OP_DISPATCH_RECV && OP_COMBINE == EP_OP_COMBINE &&
              OP_COMBINE_RECV == EP_OP_COMBINE_RECV, "layout.py RefusedOp");
static_assert(WHY_LIVE == EP_WHY_LIVE && WHY_PENDING == EP_WHY_PENDING && WHY_NOT_LIVE == EP_WHY_NOT_LIVE,
              "layout.py Refusal");
static_assert(sizeof(OverwriteRec) == 32 && S_OWNER % 2 == 0 && S_OWNER + 4 <= 32, "owner words: u64 [2] in state");

__device__ __forceinline__ unsigned long long* owner_word(const Params& p) {
  return reinterpret_cast<unsigned long long*>(p.state + S_OWNER) + ((p.call >> 1) & 1ull);
}

__device__ void record_overwrite(const Params& p, int op, int why, unsigned long long holder) {
  volatile OverwriteRec* rec = reinterpret_cast<volatile OverwriteRec*>(reinterpret_cast<char*>(p.err) +
                                                                      EP_OVERWRITE_RECORD_WORD * 4);
  if (rec->flag == 0) {   // the first refusal since the host read the record keeps its details
    rec->op = op; rec->why = why; rec->holder = holder; rec->call = p.call;
    __threadfence_system();
    rec->flag = 1;
  }
  rec->count = rec->count + 1;   // one writer at a time: launches of a buffer run in stream order
  __threadfence_system();
}

// Why a dispatch with this owner word would be refused (0: admitted). Also the verdict of ep_fence_snapshot
// (fence.cuh), launched right before the dispatch: it writes into the set only what an admitted dispatch may
// overwrite.
__device__ __forceinline__ int dispatch_refusal(const Params& p, bool idle, unsigned long long holder) {
  const bool eager_over_eager = (p.call & 1ull) && (holder & 1ull);
  return !idle ? WHY_PENDING : (holder != 0ull && holder != p.call && !eager_over_eager) ? WHY_LIVE : 0;
}
__device__ __forceinline__ bool buffer_idle(const Params& p) {   // no *_async waits for its *_wait
  const volatile unsigned* st = p.state;
  return st[S_DSEND] == st[S_DRECV] && st[S_CSEND] == st[S_CRECV];
}

// Every thread of the block calls it first thing; the same verdict in every block (see above: a dispatch's own
// owner write reads as admitted, and the round counters change only after every block has passed here).
__device__ bool admitted(const Params& p, int op) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) {
    const volatile unsigned* st = p.state;
    const bool idle = buffer_idle(p);
    unsigned long long* own = owner_word(p);
    const unsigned long long holder = *reinterpret_cast<volatile unsigned long long*>(own);
    int why = 0;
    if (op == OP_DISPATCH) {
      why = dispatch_refusal(p, idle, holder);
      if (why == 0) *own = p.call;
      else if (holder == p.call) *own = 0ull;   // a captured call's previous result is given up, not kept live
    } else if (op == OP_COMBINE) {
      why = !idle ? WHY_PENDING : holder != p.call ? WHY_NOT_LIVE : 0;
    } else if (op == OP_DISPATCH_RECV) {   // after its own send (refused sends were recorded there)
      why = (holder == p.call && st[S_DSEND] == st[S_DRECV] + 1u && st[S_CSEND] == st[S_CRECV]) ? 0 : -1;
    } else {   // combine rounds are their dispatch's (combine.cuh combine_round), not consecutive: its own send
               // wrote that round, its receive has not
      const unsigned r = (unsigned)p.hstatus[ST_ROUND];
      why = (holder == p.call && st[S_CSEND] == r && st[S_CRECV] != r && st[S_DSEND] == st[S_DRECV]) ? 0 : -1;
    }
    if (why > 0 && blockIdx.x == 0) record_overwrite(p, op, why, holder);
    s_ok = why == 0;
  }
  __syncthreads();
  return s_ok != 0;
}

// The last block of a combine's receive: its result is consumed, the set free for any call.
__device__ __forceinline__ void result_combined(const Params& p) {
  unsigned long long* own = owner_word(p);
  if (*own == p.call) *own = 0ull;
}

// ep_release (EPBuffer.release): the result of call p.call will not be combined; its set is free.
__device__ __forceinline__ void release_result(const Params& p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) result_combined(p);
}

}  // namespace ep
