// Probes for the latency term of the bench's floor (epcomm/bench/latency.py builds and runs them):
//   probe_empty          a kernel that does nothing: what one launch costs inside a CUDA-event window;
//   probe_flag_pingpong  one thread per rank of a pair: the initiator raises a flag word in the peer's memory and
//                        waits for the peer to raise its flag back (the echo); timed on the initiator with
//                        %globaltimer over `rounds` round trips. Same node: a release store through the peer pointer
//                        (as the EP kernels raise their ready flags); another node: an NVSHMEM signal (SET).
// Flag words hold round numbers that only grow (the host passes `base`), so a late echo of an earlier call can never
// satisfy a later wait, and no flag needs resetting between calls.
#include <nvshmem.h>
#include <nvshmemx.h>

// The clock and the memory-order loads / stores of the EP kernels themselves (one source of truth)
#include "ordering.cuh"

namespace probe {

// Spin (no sleep: the probe measures the latency, not a polite wait) until *flag >= seq; false after timeout_ns.
__device__ bool wait_for(const unsigned long long* flag, unsigned long long seq, unsigned long long deadline) {
  unsigned spins = 0;
  while (ep::ld_rlx(flag) < seq) {
    if ((++spins & 1023u) == 0 && ep::gtime() > deadline) return false;
  }
  return ep::ld_acq(flag) >= seq;
}

}  // namespace probe

extern "C" __global__ void probe_empty() {}

// flag: this rank's flag word (a symmetric address); peer_flag: the peer's flag word through its peer pointer, or
// null to signal it through NVSHMEM (pe peer_pe). out[0] = ns of the timed round trips (initiator), out[1] = the
// round that timed out (0: none).
extern "C" __global__ void probe_flag_pingpong(unsigned long long* flag, unsigned long long* peer_flag, int peer_pe,
                                               int initiator, unsigned long long base, int warmup, int rounds,
                                               unsigned long long timeout_ns, unsigned long long* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const unsigned long long deadline = ep::gtime() + timeout_ns;
  unsigned long long t0 = ep::gtime();
  out[0] = 0;
  out[1] = 0;
  for (int i = 1; i <= warmup + rounds; ++i) {
    const unsigned long long seq = base + (unsigned long long)i;
    if (i == warmup + 1) t0 = ep::gtime();
    if (!initiator && !probe::wait_for(flag, seq, deadline)) {
      out[1] = seq;
      return;
    }
    if (peer_flag != nullptr) {
      ep::st_rel(peer_flag, seq);
    } else {
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(flag), seq, NVSHMEM_SIGNAL_SET, peer_pe);
    }
    if (initiator && !probe::wait_for(flag, seq, deadline)) {
      out[1] = seq;
      return;
    }
  }
  out[0] = ep::gtime() - t0;
}
