/* The layer-wise rules (LAMB, LARS, StableAdamW): a norm pass, then an update pass; coefficients and each
 * parameter's floats by name (hf_optim_coefficients.h). Included by cpu_step.c after cpu_rules.h. */
#ifndef HF_OPTIM_CPU_LAYERWISE_H
#define HF_OPTIM_CPU_LAYERWISE_H
#include "cpu_rules.h"

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

/* hf_optim/rules/lamb.py (coefficients by name); ic: scale (trust ratio * lr); state exp_avg, exp_avg_sq.
   Sums: ||p||^2 and ||r||^2, r = m^ / (sqrt(v^) + eps) + wd * p. */
#define LAMB_NORM_STREAMS (READ_PARAM | READ_GRAD | READ_STATE(0) | READ_STATE(1))
static void lamb_norms(NORM_ARGS) {
  const float wd = c[LAMB_WEIGHT_DECAY], b1 = c[LAMB_BETA1], omb1 = c[LAMB_ONE_MINUS_BETA1], b2 = c[LAMB_BETA2],
              omb2 = c[LAMB_ONE_MINUS_BETA2], ibc1 = c[LAMB_INV_BIAS_CORRECTION1],
              ibc2s = c[LAMB_INV_BIAS_CORRECTION2_SQRT], eps = c[LAMB_EPS];
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
  const float lr = c[LAMB_LR], wd = c[LAMB_WEIGHT_DECAY], b1 = c[LAMB_BETA1], omb1 = c[LAMB_ONE_MINUS_BETA1],
              b2 = c[LAMB_BETA2], omb2 = c[LAMB_ONE_MINUS_BETA2], ibc1 = c[LAMB_INV_BIAS_CORRECTION1],
              ibc2s = c[LAMB_INV_BIAS_CORRECTION2_SQRT], ibc2 = c[LAMB_INV_BIAS_CORRECTION2], eps = c[LAMB_EPS],
              scale = ic ? ic[LAMB_ITEM_SCALE] : 0.0f;
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

/* hf_optim/rules/lars.py (coefficients by name); ic: trust; state
   momentum_buffer. Sums: ||p||^2 and ||g||^2. */
#define LARS_NORM_STREAMS (READ_PARAM | READ_GRAD)
static void lars_norms(NORM_ARGS) {
  float pp = 0.0f, gg = 0.0f;
  (void)s, (void)c, (void)flags;
#pragma omp simd reduction(+ : pp, gg)
  for (int i = 0; i < n; ++i) pp += p[i] * p[i], gg += g[i] * g[i];
  out[0] = pp, out[1] = gg;
}

static void lars(RULE_ARGS) {
  const float lr = c[LARS_LR], wd = c[LARS_WEIGHT_DECAY], momentum = c[LARS_MOMENTUM],
              omd = c[LARS_ONE_MINUS_DAMPENING], trust = ic ? ic[LARS_ITEM_TRUST] : 1.0f;
  const int has_momentum = c[LARS_HAS_MOMENTUM] > 0, nesterov = flags & FLAG_NESTEROV, plain = flags & FLAG_PLAIN;
  float *restrict buf = s[0];
  for (int i = 0; i < n; ++i) {
    float gi = plain ? g[i] : (g[i] + p[i] * wd) * trust;
    float b = buf[i] * momentum + gi * omd;
    float direction = nesterov ? gi + b * momentum : b;
    p[i] = p[i] - (has_momentum ? direction : gi) * lr;
    buf[i] = b;
  }
}

/* hf_optim/rules/stable_adamw.py (coefficients by name); ic: lr_t, 1 - lr_t * wd; state exp_avg,
   exp_avg_sq. Sum: ||g / sqrt(max(v^, eps^2))||^2 (torch.maximum: NaN wins). */
#define STABLE_ADAMW_NORM_STREAMS (READ_GRAD | READ_STATE(1))
static void stable_adamw_norms(NORM_ARGS) {
  const float b2 = c[STABLE_ADAMW_BETA2], omb2 = c[STABLE_ADAMW_ONE_MINUS_BETA2],
              ibc2 = c[STABLE_ADAMW_INV_BIAS_CORRECTION2], eps_sq = c[STABLE_ADAMW_EPS_SQ];
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
  const float b1 = c[STABLE_ADAMW_BETA1], omb1 = c[STABLE_ADAMW_ONE_MINUS_BETA1], b2 = c[STABLE_ADAMW_BETA2],
              omb2 = c[STABLE_ADAMW_ONE_MINUS_BETA2], ibc1 = c[STABLE_ADAMW_INV_BIAS_CORRECTION1],
              ibc2s = c[STABLE_ADAMW_INV_BIAS_CORRECTION2_SQRT], eps = c[STABLE_ADAMW_EPS];
  const float lr = ic ? ic[STABLE_ADAMW_ITEM_LR] : 0.0f, decay = ic ? ic[STABLE_ADAMW_ITEM_DECAY] : 1.0f;
  float *restrict m = s[0], *restrict v = s[1];
  (void)flags;
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float pi = p[i] * decay;
    p[i] = pi - ((mi * ibc1) / (sqrtf(vi) * ibc2s + eps)) * lr;
    m[i] = mi, v[i] = vi;
  }
}

#endif
