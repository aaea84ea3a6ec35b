/* The elementwise update rules on fp32 blocks in place: the same fp32 operations in the same order as the eager
 * step's (hf_optim/rules/), coefficients read by name from the generated hf_optim_coefficients.h (the rules'
 * ``native`` bindings). Included by cpu_step.c. */
#ifndef HF_OPTIM_CPU_RULES_H
#define HF_OPTIM_CPU_RULES_H
#include <math.h>
#include "hf_optim_coefficients.h"

/* ---- update rules: fp32 blocks in place ---- */

/* what a block's pass reads: the parameter, the gradient, state buffer k (the update pass: all of them) */
#define READ_PARAM 1
#define READ_GRAD 2
#define READ_STATE(k) (4 << (k))
#define READ_ALL (-1)

/* a rule's block: parameter, gradient, state buffers, the step's coefficients ``c`` and the parameter's own ``ic``
   (layer-wise rules: what the norm pass decided, e.g. LAMB's trust ratio; NULL for the others) */
#define RULE_ARGS int n, float *restrict p, const float *restrict g, float *const *s, const float *c, \
                  const float *ic, int flags

/* hf_optim/rules/adamw.py (coefficients by name); state exp_avg, exp_avg_sq[, max_exp_avg_sq] */
static void adamw(RULE_ARGS) {
  const float decay = c[ADAMW_DECAY], b1 = c[ADAMW_BETA1], omb1 = c[ADAMW_ONE_MINUS_BETA1], b2 = c[ADAMW_BETA2],
              omb2 = c[ADAMW_ONE_MINUS_BETA2], step_size = c[ADAMW_STEP_SIZE],
              ibc2 = c[ADAMW_INV_BIAS_CORRECTION2_SQRT], eps = c[ADAMW_EPS],
              sign = flags & FLAG_MAXIMIZE ? -1.0f : 1.0f;
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

/* hf_optim/rules/lion.py (coefficients by name); state exp_avg */
static void lion(RULE_ARGS) {
  const float lr = c[LION_LR], decay = c[LION_DECAY], b1 = c[LION_BETA1], omb1 = c[LION_ONE_MINUS_BETA1],
              b2 = c[LION_BETA2], omb2 = c[LION_ONE_MINUS_BETA2];
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

/* hf_optim/rules/sgd.py (coefficients by name); state
   momentum_buffer */
static void sgd(RULE_ARGS) {
  const float lr = c[SGD_LR], wd = c[SGD_WEIGHT_DECAY], momentum = c[SGD_MOMENTUM], omd = c[SGD_ONE_MINUS_DAMPENING],
              sign = flags & FLAG_MAXIMIZE ? -1.0f : 1.0f;
  const int first = c[SGD_FIRST] > 0, has_momentum = c[SGD_HAS_MOMENTUM] > 0, nesterov = flags & FLAG_NESTEROV;
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

/* hf_optim/rules/adan.py (coefficients by name); state exp_avg, exp_avg_diff,
   exp_avg_sq, prev_grad */
static void adan(RULE_ARGS) {
  const float lr = c[ADAN_LR], inv_decay = c[ADAN_INV_DECAY], b1 = c[ADAN_BETA1], omb1 = c[ADAN_ONE_MINUS_BETA1],
              b2 = c[ADAN_BETA2], omb2 = c[ADAN_ONE_MINUS_BETA2], b3 = c[ADAN_BETA3], omb3 = c[ADAN_ONE_MINUS_BETA3],
              ibc1 = c[ADAN_INV_BIAS_CORRECTION1], diff_scale = c[ADAN_DIFF_SCALE],
              ibc3 = c[ADAN_INV_BIAS_CORRECTION3_SQRT], has_prev = c[ADAN_HAS_PREV], eps = c[ADAN_EPS];
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

/* hf_optim/rules/ranger.py (coefficients by name); state exp_avg, exp_avg_sq, slow_param */
static void ranger(RULE_ARGS) {
  const float lr = c[RANGER_LR], decay = c[RANGER_DECAY], b1 = c[RANGER_BETA1], omb1 = c[RANGER_ONE_MINUS_BETA1],
              b2 = c[RANGER_BETA2], omb2 = c[RANGER_ONE_MINUS_BETA2], ibc1 = c[RANGER_INV_BIAS_CORRECTION1],
              ibc2 = c[RANGER_INV_BIAS_CORRECTION2_SQRT], rect = c[RANGER_RECT], eps = c[RANGER_EPS],
              alpha = c[RANGER_ALPHA];
  const int rectify = c[RANGER_RECTIFY] > 0, sync = c[RANGER_SYNC] > 0;
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

#endif
