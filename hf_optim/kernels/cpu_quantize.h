/* The 8-bit block codec of hf_optim/state/blockwise.py: decode, and encode to the exact nearest code, on AVX-512,
 * AVX2 (+FMA) or in plain C (which the compiler vectorizes elsewhere, e.g. aarch64). Included by cpu_step.c.
 *
 * The quantizer needs no sqrt: a root guess plus one exact midpoint test (the eager codec makes two). The vector
 * paths quantize whole blocks with intrinsics (the hardware's reciprocal square root for the guess, packed
 * stores); the plain C loop handles ragged blocks and other CPUs. Each was checked against the exact nearest code
 * for every fp32 input in code units (benchmarks/quantizer_paths.py), and the tests compare them on each build.
 */
#ifndef HF_OPTIM_CPU_QUANTIZE_H
#define HF_OPTIM_CPU_QUANTIZE_H
#include <math.h>
#include <stdint.h>

/* codes' maps: level(c) = |c|^k * K with K = fl(1 / N^k) (exactly 1 at the top code) */
#define SIGNED_SCALE 6.200012e-05f     /* 1 / 127^2 */
#define UNSIGNED_SCALE 2.3650443e-10f  /* 1 / 255^4 */
/* fl(N^k): code units' upper end */
#define SIGNED_TOP 16129.0f
#define UNSIGNED_TOP 4228250624.0f
#define GUESS_BIAS (1.0f - 1.0f / 4096.0f)
#define TINY 1e-30f /* keeps the root guesses finite */
/* The nearest code is the number of midpoints below u: ceil(t) where midpoint(t) = u for real t. Over u >= 1/2,
   t lies in [root - 0.5 - 0.341, root - 0.5] (0.207 for the square map), and for u < 1/2 (code 0) root < 0.841, so
   g = ceil(root * GUESS_BIAS - GUESS_OFFSET) is ceil(t) or one under it: one midpoint test decides */
#define GUESS_OFFSET 0.92f

static inline float from_bits(uint32_t u) { union { uint32_t u; float f; } x = { .u = u }; return x.f; }
static inline uint32_t to_bits(float f) { union { float f; uint32_t u; } x = { .f = f }; return x.u; }

/* ---- 8-bit block codec (hf_optim/state/blockwise.py) ---- */

/* largest finite |x|: non-negative floats order like their bits, and an integer max vectorizes. The plain max
   first (2 operations a vector); only a block holding a NaN or Inf (its max's bits reach Inf's) takes the masked
   loop (5) */
static float block_absmax(int n, const float *restrict x) {
  uint32_t best = 0;
  for (int i = 0; i < n; ++i) {
    uint32_t u = to_bits(x[i]) & 0x7fffffffu;
    best = u > best ? u : best;
  }
  if (best < 0x7f800000u) return from_bits(best);
  best = 0;
  for (int i = 0; i < n; ++i) {
    uint32_t u = to_bits(x[i]) & 0x7fffffffu;
    u &= -(uint32_t)(u < 0x7f800000u); /* NaN and Inf count as 0 */
    best = u > best ? u : best;
  }
  return from_bits(best);
}

/* sqrt(t) from below within 1.8e-3 (t normal): bit-level guess of t^-1/2 and one Newton step */
static inline float sqrt_below(float t) {
  float y = from_bits(0x5f375a86u - (to_bits(t) >> 1));
  y = y * (1.5f - (0.5f * t) * (y * y));
  return t * y;
}

/* t^(1/4) from below within 4.6e-5 (t normal): bit-level guess of t^-1/4 and two Newton steps */
static inline float root4_below(float t) {
  float y = from_bits(0x4f584000u - (to_bits(t) >> 2));
  float y2 = y * y;
  y = y * (1.25f - (0.25f * t) * (y2 * y2));
  y2 = y * y;
  y = y * (1.25f - (0.25f * t) * (y2 * y2));
  return t * (y * y * y);
}

static inline float level(float c, int is_signed) {
  if (is_signed) return (c * c) * SIGNED_SCALE;
  float s = c * c;
  return (s * s) * UNSIGNED_SCALE;
}

/* the signed level is c |c| K: c^2 and c |c| are the same exact integer up to sign, and a product's rounding is
   symmetric, so this is copysign(c^2 K, c) bit for bit in two operations fewer */
static void decode_signed(int n, const int8_t *restrict q, float scale, float *restrict out) {
  for (int i = 0; i < n; ++i) {
    float c = (float)q[i];
    out[i] = ((c * fabsf(c)) * SIGNED_SCALE) * scale;
  }
}

static void decode_unsigned(int n, const uint8_t *restrict q, float scale, float *restrict out) {
  for (int i = 0; i < n; ++i) {
    out[i] = level((float)q[i], 0) * scale;
  }
}

/* Codes of x (signed where ``is_signed``) in a block of largest finite magnitude ``scale``: u = |x| * r
   in code units, r = N^k / scale (NaN and Inf -> 0); the guess g is the nearest code or the one under
   it, and one exact midpoint test, u > m(g), decides (ties go down). The midpoint of c and c + 1
   is c(c + 1) + 1/2 for the square map and (c(c + 1) + 1)^2 - 1/2 for the fourth-power map; the second is tested
   as fl(q^2 - u) < 1/2 with one fused multiply-add, exact because near 1/2 that difference is representable. */
static inline float code_units(float x, float r, float top) {
  float a = fabsf(x);
  float u = a < INFINITY ? a * r : 0.0f; /* NaN and Inf values store code 0 (blockwise.NAN_INF_POLICY) */
  u = u > 0.0f ? u : 0.0f;              /* NaN u (0 times the infinite ratio of a subnormal scale) -> 0 */
  return u < top ? u : top;
}

static inline int32_t nearest_code(float u, float g, int is_signed) {
  float g1 = g + 1.0f, q = g * g1 + (is_signed ? 0.5f : 1.0f);
  return (int32_t)g + (is_signed ? u > q : fmaf(q, q, -u) < 0.5f);
}

/* AVX-512 F, BW (the byte packs) and DQ (movepi32_mask) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define HAS_AVX512 1
#else
#define HAS_AVX512 0
#endif
#if HAS_AVX512
#include <immintrin.h>

/* encode()'s loop on 16 values, as int32 codes: the root guessed with the hardware's reciprocal square root (relative
   error under 2^-14, well inside GUESS_BIAS) */
static inline __m512i quantize16(__m512 x, __m512 r, int is_signed) {
  const __m512 top = _mm512_set1_ps(is_signed ? SIGNED_TOP : UNSIGNED_TOP), half = _mm512_set1_ps(0.5f);
  const __m512i one = _mm512_set1_epi32(1);
  /* min returns its second operand when either is NaN: unsigned, a NaN or 0 u turns the guess into the integer
     indefinite, which the saturating packs store as 0; signed, max(., TINY) makes it TINY first */
  /* NaN and Inf values store code 0 (blockwise.NAN_INF_POLICY): u = 0 where |x| is not below Inf */
  __m512 a = _mm512_abs_ps(x);
  __m512 u = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_LT_OQ), a, r);
  if (is_signed) u = _mm512_max_ps(u, _mm512_set1_ps(TINY));
  u = _mm512_min_ps(top, u);
  __m512 root = _mm512_mul_ps(u, _mm512_rsqrt14_ps(u));
  if (!is_signed) root = _mm512_mul_ps(root, _mm512_rsqrt14_ps(root));
  __m512i code = _mm512_cvt_roundps_epi32(_mm512_fmsub_ps(root, _mm512_set1_ps(GUESS_BIAS), _mm512_set1_ps(GUESS_OFFSET)),
                                          _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  __m512 g = _mm512_cvtepi32_ps(code), g1 = _mm512_add_ps(g, _mm512_set1_ps(1.0f));
  __mmask16 up;
  if (is_signed) {
    up = _mm512_cmp_ps_mask(u, _mm512_fmadd_ps(g, g1, half), _CMP_GT_OQ);
  } else {
    __m512 q = _mm512_fmadd_ps(g, g1, _mm512_set1_ps(1.0f));
    up = _mm512_cmp_ps_mask(_mm512_fmsub_ps(q, q, u), half, _CMP_LT_OQ);
  }
  code = _mm512_mask_add_epi32(code, up, code, one);
  if (is_signed) code = _mm512_mask_sub_epi32(code, _mm512_movepi32_mask(_mm512_castps_si512(x)), _mm512_setzero_si512(), code);
  return code;
}

/* 64 codes from 64 values: saturating packs (exact: codes are in range) then one permute back to element order */
static inline __m512i quantize64(const float *x, __m512 r, int is_signed) {
  __m512i a = quantize16(_mm512_load_ps(x), r, is_signed), b = quantize16(_mm512_load_ps(x + 16), r, is_signed),
          c = quantize16(_mm512_load_ps(x + 32), r, is_signed), d = quantize16(_mm512_load_ps(x + 48), r, is_signed);
  __m512i packed = is_signed ? _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d))
                             : _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  /* the packs work per 128-bit lane: dword 4L + j holds source j's elements 4L..4L+3 */
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), packed);
}
#define VECTOR_PATH "avx512"
#define VECTOR_CODES 64
#define quantize_codes(x, r, is_signed, q) _mm512_storeu_si512((q), quantize64((x), _mm512_set1_ps(r), (is_signed)))

/* AVX2 + FMA (x86-64-v3): the same quantizer on 8 lanes */
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* The AVX2 guess needs no Newton step: the hardware's t^-1/2 (relative error at most 1.5 * 2^-12 on Intel and AMD;
   the offsets below hold up to 2^-11) puts the root within 127 * 2^-11 = 0.062 (square map) or 1.5 * 255 * 2^-11 =
   0.19 (fourth-power map, two estimates) of the true one. With t as above (midpoint(t) = u, t in
   [root - 0.5 - 0.207, root - 0.5] or [root - 0.5 - 0.341, root - 0.5]), g = nearest(root - AVX2_OFFSET) is ceil(t)
   or one under it as long as root - AVX2_OFFSET stays inside (t - 0.5, t + 0.5): OFFSET in (0.207 + 0.062, 1 - 0.062)
   and (0.341 + 0.19, 1 - 0.19); below 1/2 (code 0) the square map's root - 0.375 > -0.5 rounds to 0, and the fourth
   power's is clamped at 0 first. The default rounding mode (nearest) converts, so no separate ceil. */
#define AVX2_SIGNED_OFFSET 0.375f
#define AVX2_UNSIGNED_OFFSET 0.67f

/* encode()'s loop on 8 values, as int32 codes. Zero and NaN: the square map's u >= TINY keeps its root finite; the
   fourth power's 0 u gives a NaN root, which max(., 0) (its second operand on NaN) turns into the guess 0 */
static inline __m256i quantize8(__m256 x, __m256 r, int is_signed) {
  const __m256 top = _mm256_set1_ps(is_signed ? SIGNED_TOP : UNSIGNED_TOP), half = _mm256_set1_ps(0.5f);
  /* NaN and Inf values store code 0 (blockwise.NAN_INF_POLICY): u = 0 where |x| is not below Inf */
  __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  __m256 u = _mm256_and_ps(_mm256_mul_ps(a, r), _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
  if (is_signed) u = _mm256_max_ps(u, _mm256_set1_ps(TINY));
  u = _mm256_min_ps(top, u);
  __m256 root = _mm256_mul_ps(u, _mm256_rsqrt_ps(u)), guess;
  if (is_signed) {
    guess = _mm256_sub_ps(root, _mm256_set1_ps(AVX2_SIGNED_OFFSET));
  } else {
    root = _mm256_mul_ps(root, _mm256_rsqrt_ps(root));
    guess = _mm256_max_ps(_mm256_sub_ps(root, _mm256_set1_ps(AVX2_UNSIGNED_OFFSET)), _mm256_setzero_ps());
  }
  __m256i code = _mm256_cvtps_epi32(guess);
  __m256 g = _mm256_cvtepi32_ps(code), g1 = _mm256_add_ps(g, _mm256_set1_ps(1.0f));
  __m256 up;
  if (is_signed) {
    up = _mm256_cmp_ps(u, _mm256_fmadd_ps(g, g1, half), _CMP_GT_OQ);
  } else {
    __m256 q = _mm256_fmadd_ps(g, g1, _mm256_set1_ps(1.0f));
    up = _mm256_cmp_ps(_mm256_fmsub_ps(q, q, u), half, _CMP_LT_OQ);
  }
  code = _mm256_sub_epi32(code, _mm256_castps_si256(up)); /* true lanes are -1 */
  /* negative x (sign bit set) negates the code; +0 zeroes it, which is its code anyway */
  if (is_signed) code = _mm256_sign_epi32(code, _mm256_castps_si256(x));
  return code;
}

/* 32 codes from 32 values: saturating packs, then one permute back to element order */
static inline __m256i quantize32(const float *x, __m256 r, int is_signed) {
  __m256i a = quantize8(_mm256_load_ps(x), r, is_signed), b = quantize8(_mm256_load_ps(x + 8), r, is_signed),
          c = quantize8(_mm256_load_ps(x + 16), r, is_signed), d = quantize8(_mm256_load_ps(x + 24), r, is_signed);
  __m256i packed = is_signed ? _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d))
                             : _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  /* per 128-bit lane: dword 4L + j holds source j's elements 4L..4L+3 */
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#define VECTOR_PATH "avx2"
#define VECTOR_CODES 32
#define quantize_codes(x, r, is_signed, q) \
  _mm256_storeu_si256((__m256i *)(q), quantize32((x), _mm256_set1_ps(r), (is_signed)))
#else
#define VECTOR_PATH "portable"
#define VECTOR_CODES 0
#endif

/* which quantizer this build has (benchmarks print it) */
const char *hf_optim_vector_path(void) { return VECTOR_PATH; }

/* One block's codes into ``q`` (int8 or uint8, by ``is_signed``) */
static void encode(int n, const float *restrict x, float scale, void *restrict q, int is_signed) {
  const float top = is_signed ? SIGNED_TOP : UNSIGNED_TOP, r = top / (scale > 0 ? scale : 1.0f);
#if VECTOR_CODES
  if (n == BLOCK) {
    for (int i = 0; i < BLOCK; i += VECTOR_CODES) quantize_codes(x + i, r, is_signed, (uint8_t *)q + i);
    return;
  }
#endif
  uint8_t *restrict out = q;
  for (int i = 0; i < n; ++i) {
    float u = code_units(x[i], r, top), t = u > TINY ? u : TINY;
    float g = ceilf((is_signed ? sqrt_below(t) : root4_below(t)) * GUESS_BIAS - GUESS_OFFSET);
    int32_t c = nearest_code(u, g, is_signed);
    out[i] = (uint8_t)(is_signed && signbit(x[i]) ? -c : c); /* two's complement: the int8 code */
  }
}

#endif
