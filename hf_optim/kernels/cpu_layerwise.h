/* The layer-wise rules (LAMB, LARS, StableAdamW): a norm pass, then an update pass; coefficients and each
 * parameter's floats by name (hf_optim_coefficients.h). Included by cpu_step.c after cpu_rules.h. */
#ifndef HF_OPTIM_CPU_LAYERWISE_H
#define HF_OPTIM_CPU_LAYERWISE_H
#include "cpu_rules.h"

/* ---- layer-wise rules: a norm pass (sums of squares) then an update pass ----
   The norm pass computes what the update pass needs (the new moments, LAMB's r). Where the state is fp32 in place
   (FLAG_FP32_STATE, set by cpu_step.c's entry points) LAMB's norm pass stores the new moments and its update pass
   reads them back instead of the gradient: the update then reads 12 bytes an element instead of 16, and the second
   pass is memory-bound. 8-bit state must be encoded from the very values the eager step has, so there the norm
   pass writes nothing and the update pass decodes and computes them again. Python turns the per-parameter sums
   into global norms (the rule's ``norm``: FSDP2 shards all-reduce there) and those into each parameter's ``ic``. */

/* the norm pass's block: out[0], out[1] = the block's two sums of squares (fp32 inside a block; omp simd lets the
   sums vectorize, in their own order: the eager step's norms are fp32 sums in another one, so they agree to
   rounding) */
/* what a rule's update pass reads after its norm pass ran over fp32 state (``<RULE>_STORED_UPDATE_STREAMS``):
   READ_ALL unless the norm pass stored something the update pass reads instead */
#define NORM_ARGS int n, const float *restrict p, const float *restrict g, float *const *s, const float *c, \
                  int flags, float *out

/* hf_optim/rules/lamb.py (coefficients by name); ic: scale (trust ratio * lr); state exp_avg, exp_avg_sq.
   Sums: ||p||^2 and ||r||^2, r = m^ / (sqrt(v^) + eps) + wd * p. */
#define LAMB_NORM_STREAMS (READ_PARAM | READ_GRAD | READ_STATE(0) | READ_STATE(1))
#define LAMB_STORED_UPDATE_STREAMS (READ_PARAM | READ_STATE(0) | READ_STATE(1)) /* the norm pass stored m, v */
static void lamb_norms(NORM_ARGS) {
  const float wd = c[LAMB_WEIGHT_DECAY], b1 = c[LAMB_BETA1], omb1 = c[LAMB_ONE_MINUS_BETA1], b2 = c[LAMB_BETA2],
              omb2 = c[LAMB_ONE_MINUS_BETA2], ibc1 = c[LAMB_INV_BIAS_CORRECTION1],
              ibc2s = c[LAMB_INV_BIAS_CORRECTION2_SQRT], eps = c[LAMB_EPS];
  float *restrict m = s[0], *restrict v = s[1];
  const int store = flags & FLAG_FP32_STATE; /* the new moments, for the update pass (the eager step's are in place) */
  float pp = 0.0f, rr = 0.0f;
#pragma omp simd reduction(+ : pp, rr)
  for (int i = 0; i < n; ++i) { /* a loop-invariant branch: the compiler makes two loops of it */
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float r = (mi * ibc1) / (sqrtf(vi) * ibc2s + eps) + p[i] * wd;
    pp += p[i] * p[i], rr += r * r;
    if (store) m[i] = mi, v[i] = vi;
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
  /* the eager step's second form of r: sqrt(v * ibc2s^2) */
  if (flags & FLAG_FP32_STATE) { /* the norm pass stored the new moments */
#pragma omp simd
    for (int i = 0; i < n; ++i) p[i] = p[i] - ((m[i] * ibc1) / (sqrtf(v[i] * ibc2) + eps) + p[i] * wd) * scale;
    return;
  }
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    p[i] = p[i] - ((mi * ibc1) / (sqrtf(vi * ibc2) + eps) + p[i] * wd) * scale;
    m[i] = mi, v[i] = vi;
  }
}

/* hf_optim/rules/lars.py (coefficients by name); ic: trust; state
   momentum_buffer. Sums: ||p||^2 and ||g||^2. */
#define LARS_NORM_STREAMS (READ_PARAM | READ_GRAD)
#define LARS_STORED_UPDATE_STREAMS READ_ALL
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
   exp_avg_sq. Sum: ||g / sqrt(max(v^, eps^2))||^2 (torch.maximum: NaN wins), as sum (g / max(v^, eps^2)) * g: one
   division an element instead of a square root and a division. The eager step squares g * rsqrt(.): the two agree
   to rounding (the sums are in another order anyway), and on the edges too, where g^2 would overflow (g / inf * g
   is 0, as g * rsqrt(inf) is) or w is 0. Over fp32 state the pass stores the new v. */
#define STABLE_ADAMW_NORM_STREAMS (READ_GRAD | READ_STATE(1))
#define STABLE_ADAMW_STORED_UPDATE_STREAMS READ_ALL
static void stable_adamw_norms(NORM_ARGS) {
  const float b2 = c[STABLE_ADAMW_BETA2], omb2 = c[STABLE_ADAMW_ONE_MINUS_BETA2],
              ibc2 = c[STABLE_ADAMW_INV_BIAS_CORRECTION2], eps_sq = c[STABLE_ADAMW_EPS_SQ];
  float *restrict v = s[1];
  const int store = flags & FLAG_FP32_STATE; /* the new v, for the update pass */
  float xx = 0.0f;
  (void)p;
#pragma omp simd reduction(+ : xx)
  for (int i = 0; i < n; ++i) {
    float gi = g[i], vi = v[i] * b2 + (gi * gi) * omb2, vh = vi * ibc2;
    float w = vh != vh ? vh : (vh > eps_sq ? vh : eps_sq);
    xx += (gi / w) * gi;
    if (store) v[i] = vi;
  }
  out[0] = xx, out[1] = 0.0f;
}

static void stable_adamw(RULE_ARGS) {
  const float b1 = c[STABLE_ADAMW_BETA1], omb1 = c[STABLE_ADAMW_ONE_MINUS_BETA1], b2 = c[STABLE_ADAMW_BETA2],
              omb2 = c[STABLE_ADAMW_ONE_MINUS_BETA2], ibc1 = c[STABLE_ADAMW_INV_BIAS_CORRECTION1],
              ibc2s = c[STABLE_ADAMW_INV_BIAS_CORRECTION2_SQRT], eps = c[STABLE_ADAMW_EPS];
  const float lr = ic ? ic[STABLE_ADAMW_ITEM_LR] : 0.0f, decay = ic ? ic[STABLE_ADAMW_ITEM_DECAY] : 1.0f;
  float *restrict m = s[0], *restrict v = s[1];
  if (flags & FLAG_FP32_STATE) { /* the norm pass stored the new v */
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      float mi = m[i] * b1 + g[i] * omb1, pi = p[i] * decay;
      p[i] = pi - ((mi * ibc1) / (sqrtf(v[i]) * ibc2s + eps)) * lr;
      m[i] = mi;
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    float gi = g[i], mi = m[i] * b1 + gi * omb1, vi = v[i] * b2 + (gi * gi) * omb2;
    float pi = p[i] * decay;
    p[i] = pi - ((mi * ibc1) / (sqrtf(vi) * ibc2s + eps)) * lr;
    m[i] = mi, v[i] = vi;
  }
}

#endif
