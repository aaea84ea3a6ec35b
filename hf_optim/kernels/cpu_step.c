/* hf_optim's native CPU step: decode -> update rule -> encode, one pass per 256-element block.
 *
 * The reference is the eager step (hf_optim/execution.py with hf_optim/rules/ and hf_optim/state/). The kernel
 * repeats only what that step computes per element, in the same fp32 operations in the same order (built with
 * -ffp-contract=off, so no fused multiply-adds, but for the quantizer's explicit exact ones), so its state is
 * bit-identical to the eager step's; parameters can differ in the last bit because torch's CPU sqrt is not
 * correctly rounded and this one is. Scalar math (bias corrections, step sizes) is not here: the rule's
 * ``coefficients`` computes it in torch, and C reads each by the name the rule's ``native`` binding gives it
 * (hf_optim_coefficients.h, generated at build time by native.py).
 *
 * Why by hand: a block-wise 8-bit step is compute-bound on CPU (decode, update and re-quantize every element), and
 * inductor's code for it ran ~4x slower than torch's fused fp32 AdamW. Here each block's temporaries live in L1.
 *
 * The files, by concern: cpu_quantize.h (the 8-bit codec per instruction set), cpu_rules.h (elementwise rules),
 * cpu_layerwise.h (LAMB, LARS, StableAdamW), this file (parameters, blocks, the parallel loops, entry points).
 */
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 256
#define MAX_BUFFERS 4
/* blocks to prefetch ahead: the quantizer's arithmetic then overlaps the loads of what comes next
   (measured here: 8-bit Lion 0.82 -> 0.73-0.76x fused AdamW; 8-bit AdamW, compute-bound, unchanged) */
#define PREFETCH_AHEAD 2

enum { STORE_FP32 = 0, STORE_SIGNED_8BIT = 1, STORE_UNSIGNED_8BIT = 2 };
enum { PARAM_FP32 = 0, PARAM_BF16 = 1 };

/* One parameter: addresses as integers (filled from Python), state buffers in rule order; ``counter`` is its fp32
   step count (0: none), advanced by one per step. */
typedef struct {
  int64_t numel, param, grad, kahan, counter;
  int64_t state[MAX_BUFFERS], absmax[MAX_BUFFERS];
} item_t;

#include "hf_optim_coefficients.h" /* generated: RULE_*, FLAG_*, each rule's coefficient indices */
/* not a rule's flag: set by the entry points when every state buffer is fp32, so a block's s[k] is the state itself
   and a layer-wise rule's norm pass may store its new moments there for the update pass (cpu_layerwise.h) */
#define FLAG_FP32_STATE (1 << 30)
#include "cpu_quantize.h"
#include "cpu_rules.h"
#include "cpu_layerwise.h"

/* ---- parameters: fp32 in place, or bf16 (+ Kahan compensation) through a block buffer ---- */

static inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

/* round to nearest even, NaN -> quiet NaN: torch's float -> bfloat16 */
static inline uint16_t float_to_bf16(float f) {
  uint32_t u = to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

typedef void rule_fn(RULE_ARGS);
typedef void norm_fn(NORM_ARGS);
/* by RULE_ index (generated from the bindings): each rule's block function and norm pass (NULL: elementwise) */
static rule_fn *const RULES[] = { RULE_FUNCTIONS };
static norm_fn *const NORMS[] = { NORM_FUNCTIONS };
static const int NORM_READS[] = { NORM_STREAMS }; /* what each norm pass reads (READ_*; cpu_layerwise.h) */
static const int STORED_UPDATE_READS[] = { STORED_UPDATE_STREAMS }; /* ... and the update pass after it, fp32 state */
#define N_RULES ((int)(sizeof(RULES) / sizeof(RULES[0])))

/* ---- one block of one parameter ---- */

typedef struct {
  rule_fn *rule;
  norm_fn *norms;
  const float *coefficients, *item_coefficients; /* item_coefficients: n_item_coefficients per item, or NULL */
  int n_item_coefficients, n_buffers, param_dtype, flags;
  const int *storage;
  int reads; /* what a block's pass reads (READ_*): the update pass everything, a norm pass what its rule says */
} spec_t;

/* a block's working copies: fp32 parameter and gradient (views, or bf16 widened), decoded state */
typedef struct {
  float pbuf[BLOCK] __attribute__((aligned(64))), gbuf[BLOCK] __attribute__((aligned(64)));
  float sbuf[MAX_BUFFERS][BLOCK] __attribute__((aligned(64)));
  float *p, *s[MAX_BUFFERS];
  const float *g;
} block_t;

/* always inlined: as a function of its own, gcc judges a prefetch-only body side-effect free and deletes the call
   (a stream the pass does not read is not prefetched: that would double a StableAdamW norm pass's traffic) */
static inline __attribute__((always_inline)) void prefetch_ahead(const spec_t *sp, const item_t *it, int64_t off) {
  if (off + (PREFETCH_AHEAD + 1) * BLOCK > it->numel) return;
  const int64_t ahead = off + PREFETCH_AHEAD * BLOCK;
  const int size = sp->param_dtype == PARAM_FP32 ? 4 : 2;
  const char *pa = (const char *)it->param + ahead * size, *ga = (const char *)it->grad + ahead * size;
  for (int line = 0; line < BLOCK * size; line += 64) {
    if (sp->reads & READ_PARAM) __builtin_prefetch(pa + line, 1, 3);
    if (sp->reads & READ_GRAD) __builtin_prefetch(ga + line, 0, 3);
  }
  for (int k = 0; k < sp->n_buffers; ++k) {
    if (!(sp->reads & READ_STATE(k))) continue;
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
    if (sp->reads & READ_GRAD)
      for (int i = 0; i < n; ++i) b->gbuf[i] = bf16_to_float(gh[i]);
    if (sp->reads & READ_PARAM)
      for (int i = 0; i < n; ++i) b->pbuf[i] = bf16_to_float(ph[i]);
    if (sp->flags & FLAG_KAHAN && sp->reads & READ_PARAM) {
      const uint16_t *kh = (const uint16_t *)it->kahan + off;
      for (int i = 0; i < n; ++i) b->pbuf[i] = b->pbuf[i] + bf16_to_float(kh[i]);
    }
    b->p = b->pbuf, b->g = b->gbuf;
  }
  for (int k = 0; k < sp->n_buffers; ++k) {
    b->s[k] = b->sbuf[k];
    if (!(sp->reads & READ_STATE(k))) continue; /* a norm pass that does not read it: not decoded */
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

static int fp32_state(int n_buffers, const int *storage) {
  for (int k = 0; k < n_buffers; ++k)
    if (storage[k] != STORE_FP32) return 0;
  return FLAG_FP32_STATE;
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
  if (rule < 0 || rule >= N_RULES || n_buffers > MAX_BUFFERS || flags & FLAG_FP32_STATE) return 1;
  flags |= fp32_state(n_buffers, storage);
  /* after a norm pass (no FLAG_PLAIN) over fp32 state, the update may read less than everything */
  const int reads = NORMS[rule] && flags & FLAG_FP32_STATE && !(flags & FLAG_PLAIN) ? STORED_UPDATE_READS[rule]
                                                                                      : READ_ALL;
  const spec_t sp = { RULES[rule], NORMS[rule], coefficients, item_coefficients, n_item_coefficients, n_buffers,
                      param_dtype, flags, storage, reads };
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
   across blocks). Writes no parameter or counter; over fp32 state a rule's pass may store its new moments, which
   its update pass (hf_optim_step_items, next) then reads. Returns 1 for a rule without one, 2 out of memory. */
int hf_optim_norms(int rule, const item_t *items, int64_t n_items, const int64_t *first_block,
                   const float *coefficients, int n_buffers, const int *storage, int param_dtype, int flags,
                   int n_threads, double *sums) {
  if (rule < 0 || rule >= N_RULES || !NORMS[rule] || n_buffers > MAX_BUFFERS || flags & FLAG_FP32_STATE) return 1;
  flags |= fp32_state(n_buffers, storage);
  const spec_t sp = { RULES[rule], NORMS[rule], coefficients, NULL, 0, n_buffers, param_dtype, flags, storage,
                      NORM_READS[rule] };
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
