"""Triton transcriptions of the update rules, and the one multi-tensor step kernel.

Each ``*_update`` mirrors its rule's ``update`` in ``hf_optim/rules`` operation
for operation, in the same order (``a * b * c`` is ``(a * b) * c`` in both),
so with fp contraction off the moments match the eager step bit for bit. The
coefficients are the rule's own ``coefficients`` evaluated in torch, read here
by position: ``triton_step.COEFFICIENTS`` names each rule's order.

``step_kernel`` runs one tile (``ROWS`` blocks of 256 elements) of one tensor
per program. Which tensor and tile comes from two small tables built once per
bucket shape; each tensor's addresses come from the launch table, an int64
row per tensor (``triton_step.COLUMNS``). ``PASS == 1`` computes the per-tile
sums of squares the layer-wise rules (LAMB, LARS, StableAdamW) take norms of,
writing nothing else; ``PASS == 0`` is the step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codecs import SUM_COMBINE, decode, encode, load_tile, store_tile, to_dtype, typed

#: rule indices (``RULE`` constexprs), in ``triton_step.RULES`` order
#: (globals a kernel reads must be constexprs: compiled Triton rejects plain ones)
ADAMW: tl.constexpr = tl.constexpr(0)
LION: tl.constexpr = tl.constexpr(1)
SGD: tl.constexpr = tl.constexpr(2)
ADAN: tl.constexpr = tl.constexpr(3)
RANGER: tl.constexpr = tl.constexpr(4)
LAMB: tl.constexpr = tl.constexpr(5)
LARS: tl.constexpr = tl.constexpr(6)
STABLE_ADAMW: tl.constexpr = tl.constexpr(7)
#: launch-table columns: numel, param, grad, kahan, state data x4, block scales x4
COL_NUMEL: tl.constexpr = tl.constexpr(0)
COL_PARAM: tl.constexpr = tl.constexpr(1)
COL_GRAD: tl.constexpr = tl.constexpr(2)
COL_KAHAN: tl.constexpr = tl.constexpr(3)
COL_DATA: tl.constexpr = tl.constexpr(4)
COL_SCALES: tl.constexpr = tl.constexpr(8)
WIDTH: tl.constexpr = tl.constexpr(12)
BLOCK: tl.constexpr = tl.constexpr(256)


@triton.jit
def address(table, column):
    """A tensor's address from the launch table (int64)."""
    return tl.load(table + column)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))  # torch.sign: 0 for NaN too


@triton.jit
def adamw_update(p, g, m, v, vmax, c, n, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr):
    if MAXIMIZE:
        g = -g
    p = p * tl.load(c)  # decay
    m = m * tl.load(c + n) + g * tl.load(c + 2 * n)
    v = v * tl.load(c + 3 * n) + g * g * tl.load(c + 4 * n)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.sqrt_rn(vmax) * tl.load(c + 6 * n) + tl.load(c + 7 * n)
    else:
        denom = tl.sqrt_rn(v) * tl.load(c + 6 * n) + tl.load(c + 7 * n)
    p = p - tl.div_rn(m, denom) * tl.load(c + 5 * n)
    return p, m, v, vmax


@triton.jit
def lion_update(p, g, m, c, n):
    p = p * tl.load(c + n)
    direction = sign(m * tl.load(c + 2 * n) + g * tl.load(c + 3 * n))
    p = p - direction * tl.load(c)
    m = m * tl.load(c + 4 * n) + g * tl.load(c + 5 * n)
    return p, m


@triton.jit
def momentum_step(p, g, buf, momentum, c, n, NESTEROV: tl.constexpr):
    """SGD's and LARS's parameter update from the new momentum buffer: ``g + momentum * buf`` under Nesterov,
    else ``buf``; coefficient 5 > 0 says momentum is on (else the plain ``g``); coefficient 0 is the lr."""
    if NESTEROV:
        direction = g + buf * momentum
    else:
        direction = buf
    return p - tl.where(tl.load(c + 5 * n) > 0, direction, g) * tl.load(c)


@triton.jit
def sgd_update(p, g, buf, c, n, MAXIMIZE: tl.constexpr, NESTEROV: tl.constexpr):
    if MAXIMIZE:
        g = -g
    g = g + p * tl.load(c + n)
    momentum = tl.load(c + 2 * n)
    buf = tl.where(tl.load(c + 4 * n) > 0, g, buf * momentum + g * tl.load(c + 3 * n))
    return momentum_step(p, g, buf, momentum, c, n, NESTEROV), buf


@triton.jit
def adan_update(p, g, m, v, s, prev, c, n):
    beta2 = tl.load(c + 4 * n)
    diff = (g - prev) * tl.load(c + 11 * n)
    m = m * tl.load(c + 2 * n) + g * tl.load(c + 3 * n)
    v = v * beta2 + diff * tl.load(c + 5 * n)
    u = g + diff * beta2
    s = s * tl.load(c + 6 * n) + u * u * tl.load(c + 7 * n)
    denom = tl.sqrt_rn(s) * tl.load(c + 10 * n) + tl.load(c + 12 * n)
    step = tl.div_rn(m * tl.load(c + 8 * n) + v * tl.load(c + 9 * n), denom) * tl.load(c)
    p = (p - step) * tl.load(c + n)
    return p, m, v, s, g


@triton.jit
def ranger_update(p, g, m, v, slow, c, n):
    p = p * tl.load(c + n)
    m = m * tl.load(c + 2 * n) + g * tl.load(c + 3 * n)
    v = v * tl.load(c + 4 * n) + g * g * tl.load(c + 5 * n)
    m_hat = m * tl.load(c + 6 * n)
    adaptive = tl.div_rn(m_hat * tl.load(c + 9 * n), tl.sqrt_rn(v) * tl.load(c + 7 * n) + tl.load(c + 10 * n))
    p = p - tl.where(tl.load(c + 8 * n) > 0, adaptive, m_hat) * tl.load(c)
    sync = tl.load(c + 11 * n) > 0
    slow = tl.where(sync, slow + (p - slow) * tl.load(c + 12 * n), slow)
    p = tl.where(sync, slow, p)
    return p, m, v, slow


@triton.jit
def adam_moments(g, m, v, c, n):
    """LAMB's and StableAdamW's moments (``update_moments``): betas at 2..5."""
    m = m * tl.load(c + 2 * n) + g * tl.load(c + 3 * n)
    v = v * tl.load(c + 4 * n) + g * g * tl.load(c + 5 * n)
    return m, v


@triton.jit
def lamb_update(p, g, m, v, c, n, TRUST: tl.constexpr):
    m, v = adam_moments(g, m, v, c, n)
    m_hat = m * tl.load(c + 6 * n)
    if TRUST:  # coefficients 9, 10: inv_bias_correction2_sqrt squared, trust ratio * lr (from the sums pass)
        denom = tl.sqrt_rn(v * tl.load(c + 9 * n)) + tl.load(c + 8 * n)
        p = p - (tl.div_rn(m_hat, denom) + p * tl.load(c + n)) * tl.load(c + 10 * n)
    else:
        r = tl.div_rn(m_hat, tl.sqrt_rn(v) * tl.load(c + 7 * n) + tl.load(c + 8 * n))
        p = p - r * tl.load(c)
    return p, m, v


@triton.jit
def lamb_sums(p, g, m, v, c, n):
    """Squares of LAMB's norms: ||p||^2 and ||r||^2, r = m^ / (sqrt(v^) + eps) + wd * p."""
    m, v = adam_moments(g, m, v, c, n)
    r = tl.div_rn(m * tl.load(c + 6 * n), tl.sqrt_rn(v) * tl.load(c + 7 * n) + tl.load(c + 8 * n))
    r = r + p * tl.load(c + n)
    return p * p, r * r


@triton.jit
def lars_update(p, g, buf, c, n, NESTEROV: tl.constexpr, TRUST: tl.constexpr):
    if TRUST:  # coefficient 6: the trust ratio (from the sums pass)
        g = (g + p * tl.load(c + n)) * tl.load(c + 6 * n)
    momentum = tl.load(c + 3 * n)
    buf = buf * momentum + g * tl.load(c + 4 * n)
    return momentum_step(p, g, buf, momentum, c, n, NESTEROV), buf


@triton.jit
def stable_adamw_update(p, g, m, v, c, n):
    """Coefficients 11, 12: this tensor's clipped lr and ``1 - lr * wd`` (from the sums pass)."""
    m, v = adam_moments(g, m, v, c, n)
    lr = tl.load(c + 11 * n)
    p = p * tl.load(c + 12 * n)
    denom = tl.sqrt_rn(v) * tl.load(c + 8 * n) + tl.load(c + 9 * n)
    p = p - tl.div_rn(m * tl.load(c + 6 * n), denom) * lr
    return p, m, v


@triton.jit
def stable_adamw_sums(g, m, v, c, n):
    """The square of ``g / sqrt(max(v^, eps^2))``, whose mean's root clips the lr."""
    m, v = adam_moments(g, m, v, c, n)
    v_hat = tl.maximum(v * tl.load(c + 7 * n), tl.load(c + 10 * n), propagate_nan=tl.PropagateNan.ALL)
    x = g * tl.div_rn(1.0, tl.sqrt_rn(v_hat))
    return x * x


@triton.jit
def step_body(table, t, coef, n_tensors, sums, pid, start, numel, scale_signed, scale_unsigned, top_signed,
              top_unsigned, RULE: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
              S3: tl.constexpr, PDT: tl.constexpr, GDT: tl.constexpr, KAHAN: tl.constexpr, F0: tl.constexpr,
              F1: tl.constexpr, PASS: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    offs = start + rows * BLOCK + tl.arange(0, BLOCK)[None, :]
    blocks = start // BLOCK + rows
    mask = offs < numel
    row_mask = blocks * BLOCK < numel
    c = coef + t  # this tensor's column of the (coefficients, tensors) table
    n = n_tensors
    base = table + t * WIDTH

    p = load_tile(typed(address(base, COL_PARAM), PDT), offs, mask, MASKED).to(tl.float32)
    if KAHAN:
        kahan_ptr = typed(address(base, COL_KAHAN), PDT)
        p = p + load_tile(kahan_ptr, offs, mask, MASKED).to(tl.float32)
    g = load_tile(typed(address(base, COL_GRAD), GDT), offs, mask, MASKED).to(tl.float32)
    d0, d1 = address(base, COL_DATA), address(base, COL_DATA + 1)
    d2, d3 = address(base, COL_DATA + 2), address(base, COL_DATA + 3)
    a0, a1 = tl.load(base + COL_SCALES), tl.load(base + COL_SCALES + 1)
    a2, a3 = tl.load(base + COL_SCALES + 2), tl.load(base + COL_SCALES + 3)
    s0 = decode(d0, a0, offs, blocks, mask, row_mask, g, S0, MASKED, scale_signed, scale_unsigned)
    s1 = decode(d1, a1, offs, blocks, mask, row_mask, g, S1, MASKED, scale_signed, scale_unsigned)
    s2 = decode(d2, a2, offs, blocks, mask, row_mask, g, S2, MASKED, scale_signed, scale_unsigned)
    s3 = decode(d3, a3, offs, blocks, mask, row_mask, g, S3, MASKED, scale_signed, scale_unsigned)

    if PASS == 1:  # sums of squares for the layer-wise norms; nothing is written but them
        if RULE == LAMB:
            x0, x1 = lamb_sums(p, g, s0, s1, c, n)
        elif RULE == LARS:
            x0, x1 = p * p, g * g
        else:
            x0 = stable_adamw_sums(g, s0, s1, c, n)
            x1 = x0
        if MASKED:
            x0, x1 = tl.where(mask, x0, 0.0), tl.where(mask, x1, 0.0)
        tl.store(sums + 2 * pid, tl.reduce(tl.reduce(x0, 1, SUM_COMBINE), 0, SUM_COMBINE))
        tl.store(sums + 2 * pid + 1, tl.reduce(tl.reduce(x1, 1, SUM_COMBINE), 0, SUM_COMBINE))
    else:
        if RULE == ADAMW:
            p, s0, s1, s2 = adamw_update(p, g, s0, s1, s2, c, n, F0, F1)
        elif RULE == LION:
            p, s0 = lion_update(p, g, s0, c, n)
        elif RULE == SGD:
            p, s0 = sgd_update(p, g, s0, c, n, F0, F1)
        elif RULE == ADAN:
            p, s0, s1, s2, s3 = adan_update(p, g, s0, s1, s2, s3, c, n)
        elif RULE == RANGER:
            p, s0, s1, s2 = ranger_update(p, g, s0, s1, s2, c, n)
        elif RULE == LAMB:
            p, s0, s1 = lamb_update(p, g, s0, s1, c, n, F0)
        elif RULE == LARS:
            p, s0 = lars_update(p, g, s0, c, n, F0, F1)
        else:
            p, s0, s1 = stable_adamw_update(p, g, s0, s1, c, n)
        encode(s0, d0, a0, offs, blocks, mask, row_mask, S0, MASKED, top_signed, top_unsigned)
        encode(s1, d1, a1, offs, blocks, mask, row_mask, S1, MASKED, top_signed, top_unsigned)
        encode(s2, d2, a2, offs, blocks, mask, row_mask, S2, MASKED, top_signed, top_unsigned)
        encode(s3, d3, a3, offs, blocks, mask, row_mask, S3, MASKED, top_signed, top_unsigned)
        param_ptr = typed(address(base, COL_PARAM), PDT)
        if PDT == tl.float32:
            store_tile(param_ptr, offs, p, mask, MASKED)
        else:
            rounded = to_dtype(p, PDT)
            if KAHAN:  # keep what rounding lost, re-added next step
                kahan_ptr = typed(address(base, COL_KAHAN), PDT)
                store_tile(kahan_ptr, offs, to_dtype(p - rounded.to(tl.float32), PDT), mask, MASKED)
            store_tile(param_ptr, offs, rounded, mask, MASKED)


@triton.jit
def step_kernel(table, tensor_of_program, first_program, coef, n_tensors, sums, scale_signed, scale_unsigned,
                top_signed, top_unsigned, RULE: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
                S2: tl.constexpr, S3: tl.constexpr, PDT: tl.constexpr, GDT: tl.constexpr, KAHAN: tl.constexpr,
                F0: tl.constexpr, F1: tl.constexpr, PASS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tensor_of_program + pid).to(tl.int64)
    numel = tl.load(table + t * WIDTH + COL_NUMEL)
    start = (pid - tl.load(first_program + t)).to(tl.int64) * (ROWS * BLOCK)
    # whole tiles take unmasked (vectorizable) loads; only a tensor's last tile is masked
    if start + ROWS * BLOCK <= numel:
        step_body(table, t, coef, n_tensors, sums, pid, start, numel, scale_signed, scale_unsigned, top_signed,
                  top_unsigned, RULE, S0, S1, S2, S3, PDT, GDT, KAHAN, F0, F1, PASS, ROWS, False)
    else:
        step_body(table, t, coef, n_tensors, sums, pid, start, numel, scale_signed, scale_unsigned, top_signed,
                  top_unsigned, RULE, S0, S1, S2, S3, PDT, GDT, KAHAN, F0, F1, PASS, ROWS, True)
