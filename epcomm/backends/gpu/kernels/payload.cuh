// A token's payload as it goes on the wire: a bf16 copy, or fp8 blockwise quantisation (bit-exact with
// epcomm.formats.quantize_fp8), by one warp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "common.cuh"

namespace ep {

// The fp8 scale of a block with absolute maximum amax: max(amax, 1e-4) / 448, or (UE8M0) the smallest power of two
// >= that: the exponent is rounded up unless the mantissa is zero (the value is a normal float: >= 1e-4 / 448).
__device__ __forceinline__ float block_scale(float amax) {
  const float s = fmaxf(amax, 1e-4f) / 448.0f;
  if constexpr (UE8M0) return __uint_as_float((__float_as_uint(s) + 0x007FFFFFu) & 0xFF800000u);
  return s;
}

// One lane's 8 channels (f, from bf16) quantised with the block's scale into 8 e4m3 bytes (lo: channels 0-3, hi: 4-7).
// Why not a division per channel: a correctly rounded division is ~10 instructions, and at 24 SMs the fp8 dispatch
// was compute-bound on it (3x DeepEP's time while moving half the bytes of bf16). The same quotient comes from one
// reciprocal per lane, r = RN(1 / scale): q0 = RN(x r), e = x - q0 scale (exact, by fma), q = RN(q0 + e r). With r
// correctly rounded and q0 faithful this is RN(x / scale) (Markstein's theorem); where the residual underflows
// (subnormal x) it may differ from the quotient in the last bit of a value far below e4m3's smallest step, and e == 0
// keeps q0 (the sign of -0). Checked exhaustively on the CPU (dev/qfast_exhaustive.c, tests/unit/
// test_qfast_exhaustive.py) over every finite bf16 block maximum and every bf16 x below it, both scale formats: the
// e4m3 bytes are identical to the division's (a block with an infinite channel, whose scale is not finite, keeps the
// division). Two channels per conversion instruction (cvt.rn.satfinite.e4m3x2.f32, the same rounding as the
// one-channel form). Measured as variant "qfast" (dev/GPU-LOG.md, sixth session, outcome).
__device__ __forceinline__ void quant_lane8(const float (&f)[8], float scale, uint32_t& lo, uint32_t& hi) {
  const float r = __frcp_rn(scale);
  float q[8];
  if (r == 0.0f || isinf(r)) {   // an infinite channel made the scale inf (ue8m0: -0): the division, as the spec
#pragma unroll
    for (int j = 0; j < 8; ++j) q[j] = __fdiv_rn(f[j], scale);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q0 = __fmul_rn(f[j], r);
      const float e = __fmaf_rn(-q0, scale, f[j]);
      q[j] = e == 0.0f ? q0 : __fmaf_rn(e, r, q0);
    }
  }
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    w[j] = (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(q[2 * j], q[2 * j + 1]), __NV_SATFINITE, __NV_E4M3);
  lo = w[0] | (w[1] << 16);
  hi = w[2] | (w[3] << 16);
}

// fp8 blockwise quantisation of one bf16 row by a warp: lane owns 8 channels (16 B) per step; 16 lanes = one block.
// A partial last block (hidden not a multiple of 128) is padded with zeros by the inactive lanes: no amax changes.
// sdst: the row's first scale; its block j goes to sdst[j * sstride] (1: row-major; column-major: the column stride).
__device__ __forceinline__ void warp_quant_row(const __nv_bfloat16* xrow, uint8_t* qdst, float* sdst,
                                               size_t sstride = 1) {
  for (int base = 0; base < ROW_VECS; base += 32) {
    int c = base + lane_id();
    bool act = c < ROW_VECS;
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
    float scale = block_scale(amax);
    if (act) {
      uint32_t lo, hi;
      quant_lane8(f, scale, lo, hi);
      reinterpret_cast<uint2*>(qdst)[c] = make_uint2(lo, hi);
      if ((lane_id() & 15) == 0) sdst[(size_t)(c / 16) * sstride] = scale;
    }
  }
}

// Index in expert_scales of row `row` (a flat row of expert_x), scale column c, in the configured scale layout
// (epcomm/layouts.py): row-major, or column-major with columns of rows rounded up to 4 floats (per slab if batched).
__device__ __forceinline__ size_t scale_index(const Params& p, int row, int c) {
  if constexpr (!COL_SCALES) {
    return (size_t)row * SCALE_COLS + c;
  } else if constexpr (BATCHED) {
    const int g = row / CAP, i = row - g * CAP;
    return ((size_t)g * SCALE_COLS + c) * CAP_AL4 + i;
  } else {
    return (size_t)c * (size_t)((p.maxr + 3) / 4 * 4) + row;
  }
}

// A caller-quantised token (p.x_scales set): its e4m3 row (H bytes) and scales, sent unchanged. One warp.
__device__ __forceinline__ void warp_copy_quantised(const Params& p, int t, char* dst_data, float* dst_scales,
                                                    size_t scale_stride) {
  warp_copy(dst_data, reinterpret_cast<const char*>(p.x) + (size_t)t * H, H);
  for (int c = lane_id(); c < SCALE_COLS; c += 32) dst_scales[(size_t)c * scale_stride] = p.x_scales[(size_t)t * SCALE_COLS + c];
}

// Write token t's payload (data [+ scales]) to dst (a message or an output row).
__device__ __forceinline__ void warp_put_token(const Params& p, int t, char* dst_data, float* dst_scales,
                                               size_t scale_stride = 1) {
  const char* xrow = reinterpret_cast<const char*>(p.x) + (size_t)t * 2 * H;
  if (FP8 && p.x_scales != nullptr) {
    warp_copy_quantised(p, t, dst_data, dst_scales, scale_stride);
  } else if constexpr (FP8) {
    warp_quant_row(reinterpret_cast<const __nv_bfloat16*>(xrow), reinterpret_cast<uint8_t*>(dst_data), dst_scales,
                   scale_stride);
  } else {
    warp_copy(dst_data, xrow, 2 * H);
  }
}

// Write token t's payload to up to K destinations (nullptr = skip): x is read (and quantised) once.
__device__ __forceinline__ void warp_put_token_multi(const Params& p, int t, char* const (&dst)[K], int step0,
                                                     int step1) {
  const char* xrow = reinterpret_cast<const char*>(p.x) + (size_t)t * 2 * H;
  if (FP8 && p.x_scales != nullptr) {
    // caller-quantised: lane c moves the 8 e4m3 bytes of channels 8c..8c+7 (where it would store its quantised
    // ones), and the first lane of each block that block's scale
    const uint2* qrow = reinterpret_cast<const uint2*>(reinterpret_cast<const char*>(p.x) + (size_t)t * H);
    for (int st = step0; st < step1; ++st) {
      const int c = st * 32 + lane_id();
      if (c >= ROW_VECS) continue;
      const uint2 q = qrow[c];
      const float scale = p.x_scales[(size_t)t * SCALE_COLS + c / 16];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (!dst[k]) continue;
        reinterpret_cast<uint2*>(dst[k])[c] = q;
        if ((lane_id() & 15) == 0) reinterpret_cast<float*>(dst[k] + DATA_BYTES)[c / 16] = scale;
      }
    }
  } else if constexpr (FP8) {
    // the slice's SLICE_STEPS x 16-B loads of x are issued together, then quantised and stored step by step
    for (int st0 = step0; st0 < step1; st0 += SLICE_STEPS) {
      uint4 vv[SLICE_STEPS];
#pragma unroll
      for (int u = 0; u < SLICE_STEPS; ++u) {
        int c = (st0 + u) * 32 + lane_id();
        vv[u] = (st0 + u < step1 && c < ROW_VECS) ? __ldg(reinterpret_cast<const uint4*>(xrow) + c)
                                                  : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < SLICE_STEPS; ++u) {
        if (st0 + u >= step1) break;
        int c = (st0 + u) * 32 + lane_id();
        bool act = c < ROW_VECS;
        const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&vv[u]);
        float f[8];
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) { f[j] = __bfloat162float(h[j]); amax = fmaxf(amax, fabsf(f[j])); }
#pragma unroll
        for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        float scale = block_scale(amax);
        if (act) {
          uint32_t lo, hi;
          quant_lane8(f, scale, lo, hi);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (!dst[k]) continue;
            reinterpret_cast<uint2*>(dst[k])[c] = make_uint2(lo, hi);
            if ((lane_id() & 15) == 0) reinterpret_cast<float*>(dst[k] + DATA_BYTES)[c / 16] = scale;
          }
        }
      }
    }
  } else {
    const uint4* src = reinterpret_cast<const uint4*>(xrow);
    for (int st0 = step0; st0 < step1; st0 += SLICE_STEPS) {
      uint4 v[SLICE_STEPS];
#pragma unroll
      for (int u = 0; u < SLICE_STEPS; ++u) {
        int c = (st0 + u) * 32 + lane_id();
        if (st0 + u < step1 && c < ROW_VECS) v[u] = src[c];
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (!dst[k]) continue;
#pragma unroll
        for (int u = 0; u < SLICE_STEPS; ++u) {
          int c = (st0 + u) * 32 + lane_id();
          if (st0 + u < step1 && c < ROW_VECS) reinterpret_cast<uint4*>(dst[k])[c] = v[u];
        }
      }
    }
  }
}

// ht fp8 from QONCE_MIN_TOKENS (dispatch.cuh qonce_pass): steps [step0, step1) of a quantised message (qmsg: e4m3 data, its scales at DATA_BYTES) into dst,
// by one warp. The steps' data bytes are contiguous (a step: 32 x 8 channels, 256 bytes, 16-byte aligned), so they go
// as 16-byte vectors, up to 7 per lane in flight (a whole 7168-channel row in two round trips, where a copy shaped
// like the quantiser's stores, 8 bytes a lane, moves one 768-byte slice per round trip); the scales of the steps'
// blocks (two per step) beside them.
__device__ __forceinline__ void warp_copy_quantised_steps(const char* qmsg, char* dst, int step0, int step1) {
  const float* qs = reinterpret_cast<const float*>(qmsg + DATA_BYTES);
  float* ds = reinterpret_cast<float*>(dst + DATA_BYTES);
  const int j0 = 2 * step0 + lane_id(), j1 = min(2 * step1, SCALE_COLS);
  const float s0 = j0 < j1 ? qs[j0] : 0.0f, s1 = j0 + 32 < j1 ? qs[j0 + 32] : 0.0f;   // loads issued before the data's
  char* const d1[1] = {dst};
  warp_copy_multi<1, 7>(d1, qmsg, step0 * 16, min(step1 * 16, DATA_BYTES / 16));
  if (j0 < j1) ds[j0] = s0;
  if (j0 + 32 < j1) ds[j0 + 32] = s1;
  for (int j = j0 + 64; j < j1; j += 32) ds[j] = qs[j];
}

}  // namespace ep
