// The fp8 quantiser (epcomm/backends/gpu/kernels/payload.cuh quant_lane8), checked exhaustively:
// for every finite positive bf16 block maximum a and every bf16 x with |x| <= a (both signs), the e4m3 byte of
//     r = RN(1 / s), q0 = RN(x r), e = fma(-q0, s, x), q = (e == 0 ? q0 : fma(e, r, q0))
// equals the e4m3 byte of RN(x / s), the spec's quotient (epcomm.formats.quantize_fp8), with s = max(a, 1e-4) / 448
// (argument "ue8m0": s rounded up to a power of two). e4m3: round to nearest even, saturating at 448.
// Build and run: cc -O2 -ffp-contract=off -o /tmp/qfast dev/qfast_exhaustive.c -lm && /tmp/qfast [ue8m0]
// Exit 0 when no pair differs (prints the pair count), 1 otherwise (prints the first differences).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static float from_bf16(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static double e4m3_value[127];   // the finite non-negative e4m3 values by code 0..126
static void e4m3_table(void) {
  for (int c = 0; c < 127; ++c) {
    const int e = (c >> 3) & 15, m = c & 7;
    e4m3_value[c] = e == 0 ? m / 8.0 * ldexp(1.0, -6) : (1 + m / 8.0) * ldexp(1.0, e - 7);
  }
}
static int e4m3(float v) {   // finite v -> byte
  const int sign = signbit(v) ? 0x80 : 0;
  const double a = fabs((double)v);
  if (a >= 448.0) return sign | 126;
  int lo = 0;
  while (lo < 125 && e4m3_value[lo + 1] <= a) ++lo;
  if (e4m3_value[lo] == a) return sign | lo;
  const double dl = a - e4m3_value[lo], dh = e4m3_value[lo + 1] - a;
  if (dl != dh) return sign | (dl < dh ? lo : lo + 1);
  return sign | ((lo & 1) ? lo + 1 : lo);
}

int main(int argc, char** argv) {
  const int ue8m0 = argc > 1 && strcmp(argv[1], "ue8m0") == 0;
  e4m3_table();
  long long pairs = 0, bad = 0;
  for (uint32_t ab = 0x0001; ab < 0x7F80; ++ab) {   // every finite positive bf16 maximum
    const float a = from_bf16((uint16_t)ab);
    float s = (a > 1e-4f ? a : 1e-4f) / 448.0f;
    if (ue8m0) { uint32_t u = (bits_of(s) + 0x007FFFFFu) & 0xFF800000u; memcpy(&s, &u, 4); }
    const float r = 1.0f / s;
    for (uint32_t xb = 0; xb <= ab; ++xb) {
      for (int neg = 0; neg < 2; ++neg) {
        const float x = from_bf16((uint16_t)(xb | (neg ? 0x8000u : 0u)));
        const float ref = x / s;
        const float q0 = x * r;
        const float e = fmaf(-q0, s, x);
        const float q = e == 0.0f ? q0 : fmaf(e, r, q0);
        ++pairs;
        if (bits_of(q) != bits_of(ref) && e4m3(q) != e4m3(ref)) {
          if (bad < 10) printf("differs: max %g x %g scale %g: %.9g (e4m3 %02x) vs %.9g (e4m3 %02x)\n", (double)a,
                               (double)x, (double)s, (double)q, e4m3(q), (double)ref, e4m3(ref));
          ++bad;
        }
      }
    }
  }
  printf("%s: %lld pairs, %lld e4m3 differences\n", ue8m0 ? "ue8m0" : "float scales", pairs, bad);
  return bad != 0;
}
