// The kernels' compile-time shape and memory layout: constants, the device error record, the parameter struct.
//
// The shape comes in as -D defines (jit.defines_for): EP_H hidden, EP_K topk, EP_E experts, EP_R ranks, EP_M max
// tokens per rank, EP_FP8 (0/1), EP_HT (0 = "ll", 1 = "ht"), EP_FUSED (fused shared expert), EP_SKIP (skip_a2a),
// EP_ARW (allreduce world size), EP_THREADS (block size). H, K, E, R, M keep the letters of the docs' formulas
// (R * M * K rows, ...). Every size derived from them arrives as a define as well (layout.py kernel_defines) and is
// checked against the derivation below.
#pragma once
#include <cstddef>
#include <cstdint>

#ifndef EP_H
#error "EP_H (hidden) must be defined"
#endif
#ifndef EP_MSG_BYTES
#error "the derived sizes (EP_MSG_BYTES, ...) must be defined: build with epcomm.backends.gpu.jit (kernel_defines)"
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
#ifndef EP_UE8M0
#define EP_UE8M0 0
#endif
constexpr bool UE8M0 = EP_UE8M0 != 0;   // fp8 scales rounded up to a power of two (scale_format "ue8m0")
// Output layout (epcomm/layouts.py): EP_ROW_ALIGN pads every group of the grouped layout to a multiple of that many
// rows; EP_BATCHED gives local expert g the rows [g * EP_CAP, (g + 1) * EP_CAP). PLACED: some rows hold no token.
#ifndef EP_ROW_ALIGN
#define EP_ROW_ALIGN 1
#endif
#ifndef EP_BATCHED
#define EP_BATCHED 0
#endif
#ifndef EP_CAP
#define EP_CAP 0
#endif
constexpr int ROW_ALIGN = EP_ROW_ALIGN;
constexpr bool BATCHED = EP_BATCHED != 0;
constexpr int CAP = EP_CAP;
constexpr bool PLACED = BATCHED || ROW_ALIGN > 1;
// EP_COL_SCALES: expert_scales column-major, each column padded to a multiple of 4 rows (16 bytes: TMA-aligned),
// per slab in the batched layout (scale_layout "col"); else row-major [rows, SCALE_COLS].
#ifndef EP_COL_SCALES
#define EP_COL_SCALES 0
#endif
constexpr bool COL_SCALES = EP_COL_SCALES != 0;
// Kernel variants (epcomm/backends/gpu/variants.py, EPCOMM_VARIANT): a variant under measurement is an `#if EP_V_*`
// block, 0 in the default build; once its A/B is in (dev/GPU-LOG.md) it becomes the code or is deleted.
// EP_V_QONCE_ALL: the ht fp8 dispatch quantises each token once (dispatch.cuh qonce_pass) at every batch size, not
// only from QONCE_MIN_TOKENS, so that the GPU worker's small test sizes take that path too (a test knob).
#ifndef EP_V_QONCE_ALL
#define EP_V_QONCE_ALL 0
#endif
// EP_V_PROBE: more phase times (state words 50..63, stamp indices 9..15: common.cuh probe_*), for the stamps runs.
#ifndef EP_V_PROBE
#define EP_V_PROBE 0
#endif
// EP_V_ONESHOT: a small ht round (T < 512, no receive capacity) ships each destination's count message from a send
// item of its own, beside the chunk items, instead of before the last chunk's data (dispatch.cuh oneshot_count_item).
#ifndef EP_V_ONESHOT
#define EP_V_ONESHOT 0
#endif
// Below this many tokens per rank the quantise-once pass's grid-wide wait costs more than quantising per item saves.
constexpr int QONCE_MIN_TOKENS = EP_V_QONCE_ALL ? 0 : 512;
constexpr int CAP_AL4 = (CAP + 3) / 4 * 4;   // column-major scales, batched: floats per column of a slab
constexpr bool HT = EP_HT != 0;
constexpr bool FUSED = EP_FUSED != 0;
constexpr bool SKIP = EP_SKIP != 0;
constexpr int ALLREDUCE_RANKS = EP_ARW;
constexpr int THREADS = EP_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int LOCAL_EXPERTS = E / R;
constexpr int GROUPS = LOCAL_EXPERTS + (FUSED ? 1 : 0);   // output groups: local experts (+ the shared expert)
constexpr int SCALE_COLS = (H + 127) / 128;               // fp8 scales per row (the last block may be partial)
constexpr int DATA_BYTES = FP8 ? H : 2 * H;               // data bytes of one row in the dispatch format
constexpr int SCALE_BYTES = FP8 ? 4 * SCALE_COLS : 0;
constexpr int al16(int x) { return (x + 15) / 16 * 16; }
constexpr int META_BYTES = HT ? al16(8 + 8 * K) : 16;     // ht: token, pad, K expert ids, K slot ranks; ll: token, k
constexpr int MSG_BYTES = al16(DATA_BYTES + SCALE_BYTES + META_BYTES);   // one message in the dispatch receive buffer
// ll: ints of one (source -> destination) count row: per-expert counts [LOCAL_EXPERTS], tokens, then the source's
// routed rows to every rank [R] (the receive-capacity verdict)
constexpr int HIST_ROW_INTS = (LOCAL_EXPERTS + 1 + R + 3) / 4 * 4;
constexpr int MAX_ITEM_TOKENS = 64;   // most tokens per send work item (the host picks p.ch <= MAX_ITEM_TOKENS)
// ht: a source's tokens are cut into at most MAX_CHUNKS chunks (send work items), each with its own ready flag on the
// destination, so the receiver expands the chunks that have landed while later ones are still on the link.
// The count message of ht: per-expert counts [LOCAL_EXPERTS], tokens, chunks, token prefix by chunk [chunks + 1], then
// the source's routed rows to every rank [R].
constexpr int MIN_CHUNKS = R <= 32 ? 256 : 128;
constexpr int MAX_CHUNKS =
    HT ? ((M + MAX_ITEM_TOKENS - 1) / MAX_ITEM_TOKENS > MIN_CHUNKS ? (M + MAX_ITEM_TOKENS - 1) / MAX_ITEM_TOKENS : MIN_CHUNKS)
       : 1;
// ht, then: the start of the source's messages in the destination's receive buffer (its reservation; -1: over)
constexpr int COUNT_ROW_INTS = HT ? (LOCAL_EXPERTS + 2 + MAX_CHUNKS + 1 + R + 1 + 3) / 4 * 4 : HIST_ROW_INTS;
constexpr int COUNT_ROWS_AT = HT ? LOCAL_EXPERTS + 3 + MAX_CHUNKS : LOCAL_EXPERTS + 1;   // the [R] routed rows
constexpr int COUNT_BASE_AT = HT ? COUNT_ROWS_AT + R : 0;
constexpr int COMBINE_ROW_BYTES = 2 * H;                  // bf16 row of the combine
// ht: the most ranks one token goes to: its combine rows come back packed [token][index of the rank among the token's
// ranks] and its staged messages to other nodes likewise
constexpr int MAX_DEST_RANKS = K < R ? K : R;
// ht combine: floats of one source's [M, K] weights in wrecv / cstage, padded to 16 bytes: the weights are copied
// with uint4 stores and M * K need not be a multiple of 4 (unpadded, such a stride misaligns those stores)
constexpr int WEIGHT_STRIDE = (M * K + 3) / 4 * 4;

// Rows are cut into slices so that several warps share one row (latency hiding when there are few rows).
constexpr int ROW_VECS = H / 8;                                          // 16-byte chunks of a bf16 row
constexpr int ROW_STEPS = (ROW_VECS + 31) / 32;                          // warp steps (32 chunks) per bf16 row
constexpr int SLICE_STEPS = ROW_STEPS >= 8 ? ROW_STEPS / 8 : 1;          // warp steps per slice
constexpr int ROW_SLICES = (ROW_STEPS + SLICE_STEPS - 1) / SLICE_STEPS;  // slices per row
constexpr int SLICE_VECS = SLICE_STEPS * 32;                             // bf16 chunks per slice

static_assert(H % (FP8 ? 16 : 8) == 0, "hidden: 16-byte rows (a multiple of 8 for bf16, 16 for fp8)");
static_assert(E % R == 0, "experts must divide by ranks");
static_assert(ROW_ALIGN >= 1 && (!BATCHED || (CAP >= 1 && !FUSED && ROW_ALIGN == 1)), "output layout");
static_assert(MAX_ITEM_TOKENS * K <= 4096, "chunk too large");
static_assert(K <= 32, "topk must be <= 32");
static_assert(THREADS % 32 == 0 && THREADS >= 64, "threads");
static_assert(R * (MAX_CHUNKS + 1) * 4 <= 36 * 1024, "ht: too many ranks x chunks for the receiver's shared chunk table");
static_assert(!HT || R <= 64, "ht: at most 64 ranks (destination masks are 64-bit)");

// State words in device memory (uint32).
// Rounds per phase, S_DONE + phase: blocks done, S_RCTR / S_SCTR / S_CSCTR / S_CRCTR: ht work counters of dispatch
// receive / send and combine send / receive (reset by the last block of the phase).
// S_OWNER: u64 [2], the call whose dispatch result each output set holds (results.cuh).
enum { S_DSEND = 0, S_DRECV = 1, S_CSEND = 2, S_CRECV = 3, S_DONE = 8, S_RCTR = 16, S_SCTR = 17, S_CSCTR = 18,
       S_CRCTR = 19, S_FAIL = 20, S_QDONE = 21, S_OWNER = 24, S_REJ_TOKENS = 28, S_REJ_RANK = 29,
       S_LOST_TOKENS = 30, S_LOST_RANK = 31, S_BEAT_T = 50, S_BEAT_N = 52 };
// S_QDONE (quantise once): blocks past the ht fp8 dispatch's quantisation pass (reset by the send's last block).
// S_FAIL: set once any wait of this buffer failed (never reset: buffer is dead). S_OWNER: words 24..27 (u64 [2]).
// S_REJ_*: a combine's tokens on the experts of refusing ranks, and R - the lowest such rank (common.cuh
// count_refusal; reset by publish_refusal). S_LOST_*: the same for ranks lost in the round (fencing, fence.cuh
// count_lost). S_BEAT_T / S_BEAT_N (u64 each, words 50..53, after the phase timestamps): when this rank last beat and
// its heartbeats so far (fence.cuh fence_beat).

struct ErrRec {  // lives in host-mapped pinned memory
  int flag;      // 0 = none, else code
  int code;
  int peer;      // rank that did not arrive (or source rank of a bad row)
  int what;      // group / expert / row involved
  int waiter;    // rank that recorded it
  int round;
  int phase;     // PHASE_*
  int pad;
};
enum { ERR_TIMEOUT = 1, ERR_SLOT_OVERFLOW = 2, ERR_BAD_SOURCE = 3, ERR_ABORT = 4, ERR_SLAB_OVERFLOW = 5,
       ERR_FENCED = 6 };   // ERR_FENCED (fencing): a peer declared this rank dead; peer = that peer
enum { PHASE_DISPATCH = 0, PHASE_COMBINE = 1, PHASE_COMBINE_WEIGHTS = 2 };   // what a failed wait was waiting for

// A round over the receive capacity (not an error: the buffer stays usable), right after ErrRec in host memory.
struct CapacityRec {
  int flag;      // the device round of the latest void round (0 = none; the host clears it once raised)
  int rank;      // the rank most over its capacity
  int needed;    // its routed rows
  int capacity;  // p.cap
  int over;      // ranks over capacity
  int pad[3];
};

// A round's refusals (issue 15; not an error: the buffer stays usable), after CapacityRec in host memory: a combine
// whose tokens went to the experts of a rank that refused its input for that round (it took part empty, marked).
// The device only writes it (the latest such combine, then `count` + 1); the host raises one EPPeerRejectedError
// per increase of `count` it sees, so no refusal is lost between a host read and a later combine.
struct RefusalRec {
  int count;     // combines with a refusal so far (written last)
  int round;     // the device round of the latest one
  int rank;      // its lowest refusing rank that tokens of this rank went to
  int what;      // 1: that rank refused its dispatch (its experts did not run), 2: its combine, 3: it was declared
                 // dead during the round (fencing, fence.cuh: its rows never came)
  int tokens;    // tokens of this rank with a top-k slot on a refusing rank
  int pad[3];
};

// The "rejected" mark (issue 15): a rank that refused its input takes part in the round with nothing, and the
// signal words it raises carry this bit above the 32-bit round (waits compare the round bits only): ll / ht dispatch
// count signals, ll combine signals, ht combine weight signals and chunk flags.
constexpr unsigned long long SIG_REJECTED = 1ull << 32;
__host__ __device__ __forceinline__ unsigned sig_round(unsigned long long v) { return (unsigned)(v & 0xffffffffull); }
__host__ __device__ __forceinline__ bool sig_rejected(unsigned long long v) { return (v & SIG_REJECTED) != 0ull; }

// Status words of a dispatch output set (Params.hstatus, the handle's): [ST_VOID] != 0 when the round was void (over
// capacity; [1..3] the rank most over, its rows, the capacity), [ST_ROUND] the device round of the dispatch (its
// combine's round: combine regions and signals are tagged by the dispatch round, as on the host backend, so a round
// that some ranks never combine cannot shift the others), [ST_REJECTED + s] != 0 when source s refused its input.
// Fencing (fence.cuh): [ST_MASKED + r] != 0 when rank r was masked (fenced off) for the round: 1 from the snapshot
// of the death notices taken by ep_fence_snapshot before the dispatch, which every kernel of the round and its
// combine read; 2 once the round decided it lost (it died in the round: fence_decide).
enum { ST_VOID = 0, ST_ROUND = 4, ST_REJECTED = 8 };
constexpr int ST_MASKED = ST_REJECTED + R;
constexpr int STATUS_INTS = ST_MASKED + R;
enum { WHY_DISPATCH = 1, WHY_COMBINE = 2, WHY_LOST = 3 };   // RefusalRec.what

// A launch refused because of a live result (results.cuh), after RefusalRec in host memory (word
// EP_OVERWRITE_RECORD_WORD): the first such refusal since the host read it, and how many since.
struct OverwriteRec {
  int flag;                 // 1: a record
  int count;                // launches refused since the host read it
  int op;                   // OP_* of results.cuh
  int why;                  // WHY_* of results.cuh
  unsigned long long holder;  // Params.call whose result the set held (0: none)
  unsigned long long call;    // Params.call of the refused launch
};

struct Params {
  const void* x;            // [T, H] bf16 (or e4m3 when x_scales is set)
  const int* ids;           // [T, K] int32
  const float* weights;     // [T, K] fp32 (combine)
  const void* expert_y;     // [MAXR, H] bf16 (combine)
  void* y;                  // [T, H] bf16 (combine output)
  void* ex;                 // expert_x [MAXR, H]
  float* escale;            // [MAXR, SCALE_COLS]
  unsigned* row_offsets;    // [GROUPS + 1]
  int* expert_ids;          // [GROUPS]
  int* src_info;            // [MAXR, 3]
  int* tpe;                 // [LOCAL_EXPERTS]
  int* hids;                // handle: copy of topk ids [M, K]
  int* hinfo;               // handle (HT): [recv_tokens][2 + K], per received message, packed over sources in rank
                            // order (t, index of this rank among t's ranks, row of each k or -1)
  int* hcount;              // handle (HT): [R] received tokens per source
  char* sym;                // local base of the symmetric region
  unsigned* state;          // device state words
  int* hist_acc;            // [R][HIST_ROW_INTS] accumulators (device memory, zeroed)
  ErrRec* err;              // host-mapped
  int* hchunk;              // handle (HT): chunk table of every source [R][MAX_CHUNKS + 1] (token prefix), then [R] chunks
  int* hstatus;             // handle: [STATUS_INTS] status words (ST_*): void round, dispatch round, refusals
  unsigned long long* dbase;  // ht, [R]: round << 32 | where this rank's messages to each rank start this round
  const float* x_scales;    // fp8, caller-quantised: [T, SCALE_COLS] fp32 (x is then [T, H] e4m3); nullptr: quantise x
  unsigned char* hdropped;  // handle, fencing: [M, K] 1 where the top-k slot's expert is on a masked rank (not sent)
  unsigned long long* fdec; // fencing: [3 phases][R] round << 2 | verdict on each source (fence.cuh fence_decide)
  unsigned long long timeout_ns;
  unsigned long long call;  // (call id << 2) | (output set << 1) | eager; a combine carries its dispatch's (results.cuh)
  unsigned long long off_drecv, off_dhist, off_dsig, off_stage, off_hstage;
  unsigned long long off_crecv, off_csig, off_wrecv, off_wsig, off_cstage, off_abort, off_dflag, off_cflag, off_dresv;
  unsigned long long off_dead, off_beat;   // fencing (issue 15 item 4, fence.cuh): death notices, heartbeats
  int T;
  int me;
  int maxr;                 // rows of expert_x
  int ch;                   // tokens per send work item (1..MAX_ITEM_TOKENS)
  int crb;                  // HT fused combine: blocks that receive from the start (0: all send, then receive)
  int cap;                  // receive capacity: routed rows this rank (and every rank) may receive per round
  int recv_tokens;          // ht: messages of the receive buffer per parity, min(sources x M, cap)
  int rejected;             // this rank refused its input: it takes part with nothing (T = 0), its signals marked
  int fence;                // the buffer fences off dead ranks (fence.cuh); 0: no fencing code runs
  char* peer[R];            // same-node peers' symmetric base (nullptr: use nvshmem)
};

// ------------------------------------------------------------------------------------------------ agreement with the host
// Bytes of each symmetric region as the kernels index it (staging included: as with peers on other nodes).
// drecv: ll [parity][expert][source][slot]; ht [parity][Params.recv_tokens] messages, sized by the capacity at run
// time (each source's packed at the offset it reserved in dresv)
constexpr long long REGION_BYTES_DRECV = 2LL * LOCAL_EXPERTS * R * M * MSG_BYTES;
constexpr long long REGION_BYTES_DHIST = 2LL * R * COUNT_ROW_INTS * 4;                       // [parity][source] counts
constexpr long long REGION_BYTES_DSIG = 2LL * R * 8;
constexpr long long REGION_BYTES_STAGE = 1LL * M * (HT ? MAX_DEST_RANKS : K) * MSG_BYTES;   // [token][rank index / k]
constexpr long long REGION_BYTES_HSTAGE = 1LL * R * COUNT_ROW_INTS * 4;                      // [destination] counts
constexpr long long REGION_BYTES_CRECV = 2LL * M * (HT ? MAX_DEST_RANKS : K) * COMBINE_ROW_BYTES;   // [par][t][idx/k]
constexpr long long REGION_BYTES_CSIG = 2LL * R * 8;
constexpr long long REGION_BYTES_WRECV = HT ? 2LL * R * WEIGHT_STRIDE * 4 : 0;               // [parity][source] weights
constexpr long long REGION_BYTES_WSIG = 2LL * R * 8;
// cstage: the weights [WEIGHT_STRIDE] (one copy, put to every other-node destination), then one row per received
// token message (sized by the capacity at run time)
constexpr long long CSTAGE_WEIGHT_BYTES = HT ? 1LL * WEIGHT_STRIDE * 4 : 0;
constexpr long long REGION_BYTES_ABORT = 1LL * R * 8;
constexpr long long REGION_BYTES_DFLAG = HT ? 2LL * R * MAX_CHUNKS * 8 : 0;                  // [parity][source][chunk]
constexpr long long REGION_BYTES_CFLAG = HT ? 2LL * R * MAX_CHUNKS * 8 : 0;
constexpr long long REGION_BYTES_DRESV = 2LL * 8;                                           // [parity] reservations
// fencing (issue 15 item 4, fence.cuh): [R] dead[D] = declarer + 1, [R] heartbeats
constexpr long long REGION_BYTES_DEAD = 1LL * R * 8;
constexpr long long REGION_BYTES_BEAT = 1LL * R * 8;

// Every size the host derives (epcomm/backends/gpu/layout.py kernel_defines) comes in as a define and must equal the
// kernel's own derivation: the CPU compile test of every specialisation proves the two layouts agree.
#define EP_AGREES(kernel, host) \
  static_assert((long long)(kernel) == (long long)(host), #host " (host layout.py) != " #kernel " (kernel)")
EP_AGREES(LOCAL_EXPERTS, EP_LOCAL_EXPERTS);
EP_AGREES(GROUPS, EP_GROUPS);
EP_AGREES(SCALE_COLS, EP_SCALE_COLS);
EP_AGREES(DATA_BYTES, EP_DATA_BYTES);
EP_AGREES(SCALE_BYTES, EP_SCALE_BYTES);
EP_AGREES(META_BYTES, EP_META_BYTES);
EP_AGREES(MSG_BYTES, EP_MSG_BYTES);
EP_AGREES(HIST_ROW_INTS, EP_HIST_ROW_INTS);
EP_AGREES(MAX_ITEM_TOKENS, EP_MAX_ITEM_TOKENS);
EP_AGREES(MAX_CHUNKS, EP_MAX_CHUNKS);
EP_AGREES(COUNT_ROW_INTS, EP_COUNT_ROW_INTS);
EP_AGREES(COMBINE_ROW_BYTES, EP_COMBINE_ROW_BYTES);
EP_AGREES(WEIGHT_STRIDE, EP_WEIGHT_STRIDE);
EP_AGREES(COUNT_ROWS_AT, EP_COUNT_ROWS_AT);
EP_AGREES(sizeof(ErrRec) / 4, EP_CAPACITY_RECORD_WORD);   // CapacityRec follows ErrRec
EP_AGREES((sizeof(ErrRec) + sizeof(CapacityRec)) / 4, EP_REFUSAL_RECORD_WORD);   // RefusalRec follows CapacityRec
EP_AGREES(STATUS_INTS, EP_STATUS_INTS);                    // layout.py device_arrays "status"
EP_AGREES(ST_ROUND, EP_ST_ROUND);
EP_AGREES(ST_REJECTED, EP_ST_REJECTED);
EP_AGREES(ST_MASKED, EP_ST_MASKED);
EP_AGREES(WHY_DISPATCH, EP_REFUSED_DISPATCH);                 // layout.py REFUSED_*
EP_AGREES(WHY_COMBINE, EP_REFUSED_COMBINE);
EP_AGREES(WHY_LOST, EP_REFUSED_LOST);
EP_AGREES((sizeof(ErrRec) + sizeof(CapacityRec) + sizeof(RefusalRec)) / 4, EP_OVERWRITE_RECORD_WORD);   // then OverwriteRec
#if !EP_HT
EP_AGREES(REGION_BYTES_DRECV, EP_REGION_BYTES_DRECV);
#endif
EP_AGREES(REGION_BYTES_DRESV, EP_REGION_BYTES_DRESV);
EP_AGREES(COUNT_BASE_AT, EP_COUNT_BASE_AT);
EP_AGREES(REGION_BYTES_DHIST, EP_REGION_BYTES_DHIST);
EP_AGREES(REGION_BYTES_DSIG, EP_REGION_BYTES_DSIG);
EP_AGREES(REGION_BYTES_STAGE, EP_REGION_BYTES_STAGE);
EP_AGREES(REGION_BYTES_HSTAGE, EP_REGION_BYTES_HSTAGE);
EP_AGREES(REGION_BYTES_CRECV, EP_REGION_BYTES_CRECV);
EP_AGREES(REGION_BYTES_CSIG, EP_REGION_BYTES_CSIG);
EP_AGREES(REGION_BYTES_WRECV, EP_REGION_BYTES_WRECV);
EP_AGREES(REGION_BYTES_WSIG, EP_REGION_BYTES_WSIG);
EP_AGREES(CSTAGE_WEIGHT_BYTES, EP_CSTAGE_WEIGHT_BYTES);
EP_AGREES(MAX_DEST_RANKS, EP_MAX_DEST_RANKS);
EP_AGREES(REGION_BYTES_ABORT, EP_REGION_BYTES_ABORT);
EP_AGREES(REGION_BYTES_DFLAG, EP_REGION_BYTES_DFLAG);
EP_AGREES(REGION_BYTES_CFLAG, EP_REGION_BYTES_CFLAG);
EP_AGREES(REGION_BYTES_DEAD, EP_REGION_BYTES_DEAD);
EP_AGREES(REGION_BYTES_BEAT, EP_REGION_BYTES_BEAT);
EP_AGREES(ERR_TIMEOUT, EP_ERR_TIMEOUT);                    // layout.py ErrorCode
EP_AGREES(ERR_SLOT_OVERFLOW, EP_ERR_SLOT_OVERFLOW);
EP_AGREES(ERR_SLAB_OVERFLOW, EP_ERR_SLAB_OVERFLOW);
EP_AGREES(ERR_BAD_SOURCE, EP_ERR_BAD_SOURCE);
EP_AGREES(ERR_ABORT, EP_ERR_ABORT);
EP_AGREES(ERR_FENCED, EP_ERR_FENCED);
EP_AGREES(PHASE_DISPATCH, EP_PHASE_DISPATCH);              // layout.py Phase
EP_AGREES(PHASE_COMBINE, EP_PHASE_COMBINE);
EP_AGREES(PHASE_COMBINE_WEIGHTS, EP_PHASE_COMBINE_WEIGHTS);
EP_AGREES(sizeof(Params), EP_PARAMS_BYTES);                // layout.py params_struct
EP_AGREES(offsetof(Params, T), EP_PARAMS_OFFSET_T);
EP_AGREES(offsetof(Params, peer), EP_PARAMS_OFFSET_PEER);
#undef EP_AGREES

}  // namespace ep
