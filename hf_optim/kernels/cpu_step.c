/* hf_optim's native CPU step: decode -> update rule -> encode, one pass per 256-element block.
 *
 * The reference is the eager step (hf_optim/execution.py with hf_optim/rules/ and
 * hf_optim/state/). This file repeats only what that step computes per element, in the
 * same fp32 operations in the same order (built with -ffp-contract=off, so no fused
 * multiply-adds, but for the quantizer's explicit exact ones), so its state is
 * bit-identical to the eager step's; parameters can
 * differ in the last bit because torch's CPU sqrt is not correctly rounded and this
 * one is. Scalar math (bias corrections, step sizes) is not here: the rule's
 * ``coefficients`` computes it in torch; native.py passes it in the order ``KERNELS`` lists (and below).
 *
 * Why by hand: a block-wise 8-bit step is compute-bound on CPU (decode, update and
 * re-quantize every element), and inductor's code for it ran ~4x slower than torch's
 * fused fp32 AdamW. Here each block's temporaries live in L1 and the quantizer needs
 * no sqrt: a root guess plus one exact midpoint test (the eager codec, hf_optim/state/blockwise.py, makes two).
 * Where the compiler targets AVX-512, whole blocks are quantized with intrinsics (the
 * hardware's reciprocal square root for the guess, packed stores); the plain C loop
 * handles ragged blocks and other CPUs. Both were checked against the exact nearest
 * code for every fp32 input in code units, and the tests compare them on each build.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 256
#define MAX_BUFFERS 4
/* blocks to prefetch ahead: the quantizer's arithmetic then overlaps the loads of what comes next
   (measured here: 8-bit Lion 0.82 -> 0.73-0.76x fused AdamW; 8-bit AdamW, compute-bound, unchanged) */
#define PREFETCH_AHEAD 2

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

enum { STORE_FP32 = 0, STORE_SIGNED_8BIT = 1, STORE_UNSIGNED_8BIT = 2 };
enum { PARAM_FP32 = 0, PARAM_BF16 = 1 };
/* FLAG_PLAIN: LAMB's and LARS's biases and norms (exclude_bias_and_norm, ndim <= 1): no trust ratio, no decay */
enum { FLAG_MAXIMIZE = 1, FLAG_AMSGRAD = 2, FLAG_KAHAN = 4, FLAG_NESTEROV = 8, FLAG_PLAIN = 16 };
enum { RULE_ADAMW = 0, RULE_LION = 1, RULE_SGD = 2, RULE_ADAN = 3, RULE_RANGER = 4, RULE_LAMB = 5, RULE_LARS = 6,
       RULE_STABLE_ADAMW = 7 };

/* One parameter: addresses as integers (filled from Python), state buffers in rule order; ``counter`` is its fp32
   step count (0: none), advanced by one per step. */
typedef struct {
  int64_t numel, param, grad, kahan, counter;
  int64_t state[MAX_BUFFERS], absmax[MAX_BUFFERS];
} item_t;

static inline float from_bits(uint32_t u) { union { uint32_t u; float f; } x = { .u = u }; return x.f; }
static inline uint32_t to_bits(float f) { union { float f; uint32_t u; } x = { .f = f }; return x.u; }

/* ---- parameters: fp32 in place, or bf16 (+ Kahan compensation) through a block buffer ---- */

static inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

/* round to nearest even, NaN -> quiet NaN: torch's float -> bfloat16 */
static inline uint16_t float_to_bf16(float f) {
  uint32_t u = to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

/* ---- 8-bit block codec (hf_optim/state/blockwise.py) ---- */

/* largest finite |x|: non-negative floats order like their bits, and an integer max vectorizes */
static float block_absmax(int n, const float *restrict x) {
  uint32_t best = 0;
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

static void decode_signed(int n, const int8_t *restrict q, float scale, float *restrict out) {
  for (int i = 0; i < n; ++i) {
    float c = (float)q[i];
    out[i] = copysignf(level(c, 1), c) * scale;
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

/* t^-1/2: the hardware estimate (relative error up to 1.5 * 2^-12, more than GUESS_BIAS allows) and one Newton step,
   which leaves ~1e-6 */
static inline __m256 rsqrt_refined(__m256 t) {
  __m256 y = _mm256_rsqrt_ps(t);
  __m256 half_t_y = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), t), y);
  return _mm256_mul_ps(y, _mm256_fnmadd_ps(half_t_y, y, _mm256_set1_ps(1.5f)));
}

/* encode()'s loop on 8 values, as int32 codes; NaN and 0 handled as in the AVX-512 path (min/max pass their second
   operand on NaN; the integer indefinite from a NaN guess saturates to code 0) */
static inline __m256i quantize8(__m256 x, __m256 r, int is_signed) {
  const __m256 top = _mm256_set1_ps(is_signed ? SIGNED_TOP : UNSIGNED_TOP), half = _mm256_set1_ps(0.5f);
  /* NaN and Inf values store code 0 (blockwise.NAN_INF_POLICY): u = 0 where |x| is not below Inf */
  __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  __m256 u = _mm256_and_ps(_mm256_mul_ps(a, r), _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
  if (is_signed) u = _mm256_max_ps(u, _mm256_set1_ps(TINY));
  u = _mm256_min_ps(top, u);
  __m256 root = _mm256_mul_ps(u, rsqrt_refined(u));
  if (!is_signed) root = _mm256_mul_ps(root, rsqrt_refined(root));
  __m256 guess = _mm256_ceil_ps(_mm256_fmsub_ps(root, _mm256_set1_ps(GUESS_BIAS), _mm256_set1_ps(GUESS_OFFSET)));
  __m256i code = _mm256_cvttps_epi32(guess);
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

/* ---- update rules: fp32 blocks in place, coefficients in native.py KERNELS order ---- */

/* a rule's block: parameter, gradient, state buffers, the step's coefficients ``c`` and the parameter's own ``ic``
   (layer-wise rules: what the norm pass decided, e.g. LAMB's trust ratio; NULL for the others) */
#define RULE_ARGS int n, float *restrict p, const float *restrict g, float *const *s, const float *c, \
                  const float *ic, int flags

/* hf_optim/rules/adamw.py: decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
   inv_bias_correction2_sqrt, eps; state exp_avg, exp_avg_sq[, max_exp_avg_sq] */
static void adamw(RULE_ARGS) {
  const float decay = c[0], b1 = c[1], omb1 = c[2], b2 = c[3], omb2 = c[4], step_size = c[5], ibc2 = c[6],
              eps = c[7], sign = flags & FLAG_MAXIMIZE ? -1.0f : 1.0f;
  (void)ic;
  float *restrict m = s[0], *restrict v = s[1];
  if (flags & FLAG_AMSGRAD) {
    float *restrict vmax = s[2];
    for (int i = 0; i < n; ++i) {
      float gi = g[i] * sign, pi = p[i] * decay;
      float mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
      float w = vmax[i];
      w = (w != w || vi != vi) ? w + vi : (w > vi ? w : vi); /* torch.maximum: NaN wins */
      p[i] = pi - (mi / (sqrtf(w) * ibc2 + eps)) * step_size;
      m[i] = mi, v[i] = vi, vmax[i] = w;
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    float gi = g[i] * sign, pi = p[i] * decay;
    float mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    p[i] = pi - (mi / (sqrtf(vi) * ibc2 + eps)) * step_size;
    m[i] = mi, v[i] = vi;
  }
}

/* hf_optim/rules/lion.py: lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2; state exp_avg */
static void lion(RULE_ARGS) {
  const float lr = c[0], decay = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5];
  float *restrict m = s[0];
  (void)flags, (void)ic;
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i];
    float d = mi * b1 + gi * omb1;
    d = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f); /* torch.sign: NaN -> 0 */
    p[i] = p[i] * decay - d * lr;
    m[i] = mi * b2 + gi * omb2;
  }
}

/* hf_optim/rules/sgd.py: lr, weight_decay, momentum, one_minus_dampening, first, has_momentum; state
   momentum_buffer */
static void sgd(RULE_ARGS) {
  const float lr = c[0], wd = c[1], momentum = c[2], omd = c[3], sign = flags & FLAG_MAXIMIZE ? -1.0f : 1.0f;
  const int first = c[4] > 0, has_momentum = c[5] > 0, nesterov = flags & FLAG_NESTEROV;
  (void)ic;
  float *restrict buf = s[0];
  for (int i = 0; i < n; ++i) {
    float pi = p[i], gi = g[i] * sign + pi * wd;
    float b = first ? gi : buf[i] * momentum + gi * omd;
    float direction = nesterov ? gi + b * momentum : b;
    p[i] = pi - (has_momentum ? direction : gi) * lr;
    buf[i] = b;
  }
}

/* hf_optim/rules/adan.py: lr, inv_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
   inv_bias_correction1, diff_scale, inv_bias_correction3_sqrt, has_prev, eps; state exp_avg, exp_avg_diff,
   exp_avg_sq, prev_grad */
static void adan(RULE_ARGS) {
  const float lr = c[0], inv_decay = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5], b3 = c[6], omb3 = c[7],
              ibc1 = c[8], diff_scale = c[9], ibc3 = c[10], has_prev = c[11], eps = c[12];
  float *restrict m = s[0], *restrict v = s[1], *restrict nu = s[2], *restrict prev = s[3];
  (void)flags, (void)ic;
  for (int i = 0; i < n; ++i) {
    float gi = g[i], diff = (gi - prev[i]) * has_prev;
    float mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + diff * omb2;
    float u = gi + diff * b2, ni = nu[i] * b3 + (u * u) * omb3;
    float step = ((mi * ibc1 + vi * diff_scale) / (sqrtf(ni) * ibc3 + eps)) * lr;
    p[i] = (p[i] - step) * inv_decay;
    m[i] = mi, v[i] = vi, nu[i] = ni, prev[i] = gi;
  }
}

/* hf_optim/rules/ranger.py: lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction1,
   inv_bias_correction2_sqrt, rectify, rect, eps, sync, alpha; state exp_avg, exp_avg_sq, slow_param */
static void ranger(RULE_ARGS) {
  const float lr = c[0], decay = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5], ibc1 = c[6], ibc2 = c[7],
              rect = c[9], eps = c[10], alpha = c[12];
  const int rectify = c[8] > 0, sync = c[11] > 0;
  float *restrict m = s[0], *restrict v = s[1], *restrict slow = s[2];
  (void)flags, (void)ic;
  for (int i = 0; i < n; ++i) {
    float gi = g[i], pi = p[i] * decay;
    float mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float m_hat = mi * ibc1;
    float adaptive = (m_hat * rect) / (sqrtf(vi) * ibc2 + eps);
    pi = pi - (rectify ? adaptive : m_hat) * lr;
    float si = slow[i];
    si = sync ? si + (pi - si) * alpha : si;
    p[i] = sync ? si : pi;
    m[i] = mi, v[i] = vi, slow[i] = si;
  }
}

/* ---- layer-wise rules: a norm pass (sums of squares, nothing written) then an update pass ----
   The norm pass recomputes what the update pass will (the new moments, LAMB's r) without storing it: 8-bit state
   must be encoded from the very values the eager step has, so the update pass decodes and computes them again.
   Python turns the per-parameter sums into global norms (the rule's ``norm``: FSDP2 shards all-reduce there) and
   those into each parameter's ``ic``. */

/* the norm pass's block: out[0], out[1] = the block's two sums of squares (fp32 inside a block; omp simd lets the
   sums vectorize, in their own order: the eager step's norms are fp32 sums in another one, so they agree to
   rounding) */
#define NORM_ARGS int n, const float *restrict p, const float *restrict g, float *const *s, const float *c, \
                  int flags, float *out

/* hf_optim/rules/lamb.py: lr, weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction1,
   inv_bias_correction2_sqrt, inv_bias_correction2, eps; ic: scale (trust ratio * lr); state exp_avg, exp_avg_sq.
   Sums: ||p||^2 and ||r||^2, r = m^ / (sqrt(v^) + eps) + wd * p. */
static void lamb_norms(NORM_ARGS) {
  const float wd = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5], ibc1 = c[6], ibc2s = c[7], eps = c[9];
  const float *restrict m = s[0], *restrict v = s[1];
  float pp = 0.0f, rr = 0.0f;
  (void)flags;
#pragma omp simd reduction(+ : pp, rr)
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float r = (mi * ibc1) / (sqrtf(vi) * ibc2s + eps) + p[i] * wd;
    pp += p[i] * p[i], rr += r * r;
  }
  out[0] = pp, out[1] = rr;
}

static void lamb(RULE_ARGS) {
  const float lr = c[0], wd = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5], ibc1 = c[6], ibc2s = c[7],
              ibc2 = c[8], eps = c[9], scale = ic ? ic[0] : 0.0f;
  float *restrict m = s[0], *restrict v = s[1];
  if (flags & FLAG_PLAIN) {
    for (int i = 0; i < n; ++i) {
      float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
      p[i] = p[i] - ((mi * ibc1) / (sqrtf(vi) * ibc2s + eps)) * lr;
      m[i] = mi, v[i] = vi;
    }
    return;
  }
  for (int i = 0; i < n; ++i) { /* the eager step's second form of r: sqrt(v * ibc2s^2) */
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    p[i] = p[i] - ((mi * ibc1) / (sqrtf(vi * ibc2) + eps) + p[i] * wd) * scale;
    m[i] = mi, v[i] = vi;
  }
}

/* hf_optim/rules/lars.py: lr, weight_decay, momentum, one_minus_dampening, has_momentum; ic: trust; state
   momentum_buffer. Sums: ||p||^2 and ||g||^2. */
static void lars_norms(NORM_ARGS) {
  float pp = 0.0f, gg = 0.0f;
  (void)s, (void)c, (void)flags;
#pragma omp simd reduction(+ : pp, gg)
  for (int i = 0; i < n; ++i) pp += p[i] * p[i], gg += g[i] * g[i];
  out[0] = pp, out[1] = gg;
}

static void lars(RULE_ARGS) {
  const float lr = c[0], wd = c[1], momentum = c[2], omd = c[3], trust = ic ? ic[0] : 1.0f;
  const int has_momentum = c[4] > 0, nesterov = flags & FLAG_NESTEROV, plain = flags & FLAG_PLAIN;
  float *restrict buf = s[0];
  for (int i = 0; i < n; ++i) {
    float gi = plain ? g[i] : (g[i] + p[i] * wd) * trust;
    float b = buf[i] * momentum + gi * omd;
    float direction = nesterov ? gi + b * momentum : b;
    p[i] = p[i] - (has_momentum ? direction : gi) * lr;
    buf[i] = b;
  }
}

/* hf_optim/rules/stable_adamw.py: beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction1,
   inv_bias_correction2, inv_bias_correction2_sqrt, eps, eps_sq; ic: lr_t, 1 - lr_t * wd; state exp_avg,
   exp_avg_sq. Sum: ||g / sqrt(max(v^, eps^2))||^2 (torch.maximum: NaN wins). */
static void stable_adamw_norms(NORM_ARGS) {
  const float b2 = c[2], omb2 = c[3], ibc2 = c[5], eps_sq = c[8];
  const float *restrict v = s[1];
  float xx = 0.0f;
  (void)p, (void)flags;
#pragma omp simd reduction(+ : xx)
  for (int i = 0; i < n; ++i) {
    float gi = g[i], vh = (v[i] * b2 + (gi * gi) * omb2) * ibc2;
    float w = vh != vh ? vh : (vh > eps_sq ? vh : eps_sq);
    float x = gi * (1.0f / sqrtf(w));
    xx += x * x;
  }
  out[0] = xx, out[1] = 0.0f;
}

static void stable_adamw(RULE_ARGS) {
  const float b1 = c[0], omb1 = c[1], b2 = c[2], omb2 = c[3], ibc1 = c[4], ibc2s = c[6], eps = c[7];
  const float lr = ic ? ic[0] : 0.0f, decay = ic ? ic[1] : 1.0f;
  float *restrict m = s[0], *restrict v = s[1];
  (void)flags;
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float pi = p[i] * decay;
    p[i] = pi - ((mi * ibc1) / (sqrtf(vi) * ibc2s + eps)) * lr;
    m[i] = mi, v[i] = vi;
  }
}

typedef void rule_fn(RULE_ARGS);
typedef void norm_fn(NORM_ARGS);
static rule_fn *const RULES[] = { adamw, lion, sgd, adan, ranger, lamb, lars, stable_adamw };
/* per rule: its norm pass (NULL: elementwise) */
static norm_fn *const NORMS[] = { NULL, NULL, NULL, NULL, NULL, lamb_norms, lars_norms, stable_adamw_norms };
#define N_RULES ((int)(sizeof(RULES) / sizeof(RULES[0])))

/* ---- one block of one parameter ---- */

typedef struct {
  rule_fn *rule;
  norm_fn *norms;
  const float *coefficients, *item_coefficients; /* item_coefficients: n_item_coefficients per item, or NULL */
  int n_item_coefficients, n_buffers, param_dtype, flags;
  const int *storage;
} spec_t;

/* a block's working copies: fp32 parameter and gradient (views, or bf16 widened), decoded state */
typedef struct {
  float pbuf[BLOCK] __attribute__((aligned(64))), gbuf[BLOCK] __attribute__((aligned(64)));
  float sbuf[MAX_BUFFERS][BLOCK] __attribute__((aligned(64)));
  float *p, *s[MAX_BUFFERS];
  const float *g;
} block_t;

/* always inlined: as a function of its own, gcc judges a prefetch-only body side-effect free and deletes the call */
static inline __attribute__((always_inline)) void prefetch_ahead(const spec_t *sp, const item_t *it, int64_t off) {
  if (off + (PREFETCH_AHEAD + 1) * BLOCK > it->numel) return;
  const int64_t ahead = off + PREFETCH_AHEAD * BLOCK;
  const int size = sp->param_dtype == PARAM_FP32 ? 4 : 2;
  const char *pa = (const char *)it->param + ahead * size, *ga = (const char *)it->grad + ahead * size;
  for (int line = 0; line < BLOCK * size; line += 64) {
    __builtin_prefetch(pa + line, 1, 3);
    __builtin_prefetch(ga + line, 0, 3);
  }
  for (int k = 0; k < sp->n_buffers; ++k) {
    const int state_size = sp->storage[k] == STORE_FP32 ? 4 : 1;
    const char *sa = (const char *)it->state[k] + ahead * state_size;
    for (int line = 0; line < BLOCK * state_size; line += 64) __builtin_prefetch(sa + line, 1, 3);
  }
}

static void load_block(const spec_t *sp, const item_t *it, int64_t block, int n, block_t *b) {
  const int64_t off = block * BLOCK;
  if (sp->param_dtype == PARAM_FP32) {
    b->p = (float *)it->param + off;
    b->g = (const float *)it->grad + off;
  } else {
    const uint16_t *ph = (const uint16_t *)it->param + off, *gh = (const uint16_t *)it->grad + off;
    for (int i = 0; i < n; ++i) b->pbuf[i] = bf16_to_float(ph[i]), b->gbuf[i] = bf16_to_float(gh[i]);
    if (sp->flags & FLAG_KAHAN) {
      const uint16_t *kh = (const uint16_t *)it->kahan + off;
      for (int i = 0; i < n; ++i) b->pbuf[i] = b->pbuf[i] + bf16_to_float(kh[i]);
    }
    b->p = b->pbuf, b->g = b->gbuf;
  }
  for (int k = 0; k < sp->n_buffers; ++k) {
    const float scale = sp->storage[k] == STORE_FP32 ? 0.0f : ((const float *)it->absmax[k])[block];
    switch (sp->storage[k]) {
      case STORE_FP32: b->s[k] = (float *)it->state[k] + off; break;
      case STORE_SIGNED_8BIT: decode_signed(n, (const int8_t *)it->state[k] + off, scale, b->s[k] = b->sbuf[k]); break;
      default: decode_unsigned(n, (const uint8_t *)it->state[k] + off, scale, b->s[k] = b->sbuf[k]); break;
    }
  }
}

static inline int block_size(const item_t *it, int64_t block) {
  const int64_t off = block * BLOCK;
  return (int)(it->numel - off < BLOCK ? it->numel - off : BLOCK);
}

static void step_block(const spec_t *sp, const item_t *it, int64_t item, int64_t block) {
  const int64_t off = block * BLOCK;
  const int n = block_size(it, block);
  prefetch_ahead(sp, it, off);
  block_t b;
  load_block(sp, it, block, n, &b);
  const float *ic = sp->item_coefficients ? sp->item_coefficients + item * sp->n_item_coefficients : NULL;
  sp->rule(n, b.p, b.g, b.s, sp->coefficients, ic, sp->flags);
  for (int k = 0; k < sp->n_buffers; ++k) {
    if (sp->storage[k] == STORE_FP32) continue;
    const float scale = block_absmax(n, b.s[k]);
    encode(n, b.s[k], scale, (uint8_t *)it->state[k] + off, sp->storage[k] == STORE_SIGNED_8BIT);
    ((float *)it->absmax[k])[block] = scale;
  }
  if (sp->param_dtype == PARAM_BF16) {
    uint16_t *ph = (uint16_t *)it->param + off;
    if (sp->flags & FLAG_KAHAN) {
      uint16_t *kh = (uint16_t *)it->kahan + off;
      for (int i = 0; i < n; ++i) {
        uint16_t r = float_to_bf16(b.p[i]);
        kh[i] = float_to_bf16(b.p[i] - bf16_to_float(r)), ph[i] = r;
      }
    } else {
      for (int i = 0; i < n; ++i) ph[i] = float_to_bf16(b.p[i]);
    }
  }
}

/* the item holding global block b: ``first_block[i]`` is the running count of blocks before item i */
static inline int64_t item_of(const int64_t *first_block, int64_t n_items, int64_t b) {
  int64_t lo = 0, hi = n_items - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

/* Step every parameter of a bucket: one parallel loop over all their blocks (n_items + 1 entries in first_block).
   ``item_coefficients``: ``n_item_coefficients`` floats per item (layer-wise rules), or NULL. */
int hf_optim_step_items(int rule, const item_t *items, int64_t n_items, const int64_t *first_block,
                        const float *coefficients, const float *item_coefficients, int n_item_coefficients,
                        int n_buffers, const int *storage, int param_dtype, int flags, int n_threads) {
  if (rule < 0 || rule >= N_RULES || n_buffers > MAX_BUFFERS) return 1;
  const spec_t sp = { RULES[rule], NORMS[rule], coefficients, item_coefficients, n_item_coefficients, n_buffers,
                      param_dtype, flags, storage };
  const int64_t total = first_block[n_items];
  for (int64_t i = 0; i < n_items; ++i)
    if (items[i].counter) *(float *)items[i].counter += 1.0f;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t b = 0; b < total; ++b) {
    const int64_t i = item_of(first_block, n_items, b);
    step_block(&sp, &items[i], i, b - first_block[i]);
  }
  return 0;
}

/* the elementwise rules' entry */
int hf_optim_step(int rule, const item_t *items, int64_t n_items, const int64_t *first_block,
                  const float *coefficients, int n_buffers, const int *storage, int param_dtype, int flags,
                  int n_threads) {
  return hf_optim_step_items(rule, items, n_items, first_block, coefficients, NULL, 0, n_buffers, storage,
                             param_dtype, flags, n_threads);
}

/* The norm pass of a layer-wise rule: ``sums[2 i], sums[2 i + 1]`` = item i's two local sums of squares (fp64
   across blocks). Writes no parameter, state or counter. Returns 1 for a rule without one, 2 out of memory. */
int hf_optim_norms(int rule, const item_t *items, int64_t n_items, const int64_t *first_block,
                   const float *coefficients, int n_buffers, const int *storage, int param_dtype, int flags,
                   int n_threads, double *sums) {
  if (rule < 0 || rule >= N_RULES || !NORMS[rule] || n_buffers > MAX_BUFFERS) return 1;
  const spec_t sp = { RULES[rule], NORMS[rule], coefficients, NULL, 0, n_buffers, param_dtype, flags, storage };
  const int64_t total = first_block[n_items];
  float *partial = malloc((size_t)(total > 0 ? total : 1) * 2 * sizeof(float));
  if (!partial) return 2;
#pragma omp parallel num_threads(n_threads) /* one parallel region, two loops */
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < total; ++b) {
      const int64_t i = item_of(first_block, n_items, b), block = b - first_block[i];
      const int n = block_size(&items[i], block);
      prefetch_ahead(&sp, &items[i], block * BLOCK);
      block_t blk;
      load_block(&sp, &items[i], block, n, &blk);
      sp.norms(n, blk.p, blk.g, blk.s, coefficients, flags, partial + 2 * b);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_items; ++i) {
      double a = 0.0, c = 0.0;
      for (int64_t b = first_block[i]; b < first_block[i + 1]; ++b) a += partial[2 * b], c += partial[2 * b + 1];
      sums[2 * i] = a, sums[2 * i + 1] = c;
    }
  }
  free(partial);
  return 0;
}
