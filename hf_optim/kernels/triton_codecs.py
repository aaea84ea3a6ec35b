"""Triton helpers for the CUDA step: state storage (fp32, bf16, block-wise 8-bit) and rounding.

Every helper reproduces the eager codec's arithmetic operation for operation
(``hf_optim.state.dense``, ``hf_optim.state.blockwise``), so codes, scales and
bf16 values come out bit-identical; kernels are launched with fp contraction
off, and division and square root are the correctly rounded ``div_rn`` and
``sqrt_rn`` (Triton's plain ``/`` and ``sqrt`` are approximate on NVIDIA GPUs).

A tile is ``[ROWS, 256]``: ``ROWS`` consecutive quantization blocks of one
tensor (``BLOCK`` is 256, the codec's block), so a block's absolute maximum
is a row reduction.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: storage codes (``STORE`` constexprs): none, fp32, bf16, signed 8-bit (square map), unsigned 8-bit (fourth power)
#: (globals a kernel reads must be constexprs: compiled Triton rejects plain ones)
NONE: tl.constexpr = tl.constexpr(0)
FP32: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)
SIGNED_8BIT: tl.constexpr = tl.constexpr(3)
UNSIGNED_8BIT: tl.constexpr = tl.constexpr(4)
#: the code map's root guess bias (``blockwise.GUESS_BIAS``), exact in fp32
GUESS_BIAS: tl.constexpr = tl.constexpr(1.0 - 2.0**-12)
#: the combine functions of ``tl.max`` and ``tl.sum``, taken by ``tl.reduce`` directly: ``tl.max``/``tl.sum`` are
#: themselves jit functions, compiled (not interpretable) if triton was imported before TRITON_INTERPRET=1 was set,
#: while the interpreter recognizes these combine functions and reduces with NumPy
MAX_COMBINE = tl.standard._elementwise_max
SUM_COMBINE = tl.standard._sum_combine


@triton.jit
def to_bf16(x):
    """fp32 -> bf16, round to nearest even, by bits: the interpreter's cast truncates, the GPU's rounds,
    and this is the same on both (NaN becomes torch's quiet NaN 0x7FC0)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    half = tl.where(x != x, 0x7FC0, rounded & 0xFFFF)
    return half.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """fp32 -> ``DTYPE`` (fp32, bf16 or fp16), rounding to nearest even."""
    if DTYPE == tl.bfloat16:
        out = to_bf16(x)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def typed(address, DTYPE: tl.constexpr):
    """An int64 address as a ``DTYPE`` pointer, declared 16-byte aligned (the host checks that it is) so
    loads and stores through it vectorize."""
    return tl.multiple_of(address.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def load_tile(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def store_tile(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def decode(data, scales, offs, blocks, mask, row_mask, like, STORE: tl.constexpr, MASKED: tl.constexpr,
           SCALE_SIGNED, SCALE_UNSIGNED):
    """A state buffer's fp32 tile from its stored form (``data``/``scales``: int64 addresses)."""
    if STORE == FP32:
        value = load_tile(typed(data, tl.float32), offs, mask, MASKED)
    elif STORE == BF16:
        value = load_tile(typed(data, tl.bfloat16), offs, mask, MASKED).to(tl.float32)
    elif STORE == SIGNED_8BIT:
        q = load_tile(typed(data, tl.int8), offs, mask, MASKED).to(tl.float32)
        absmax = load_tile(scales.to(tl.pointer_type(tl.float32)), blocks, row_mask, MASKED)
        c = tl.abs(q)
        level = c * c * SCALE_SIGNED  # CodeMap.level: |c|**2 * scale, then the sign
        value = tl.where(q < 0, -level, level) * absmax
    elif STORE == UNSIGNED_8BIT:
        c = load_tile(typed(data, tl.uint8), offs, mask, MASKED).to(tl.float32)
        absmax = load_tile(scales.to(tl.pointer_type(tl.float32)), blocks, row_mask, MASKED)
        square = c * c
        value = square * square * SCALE_UNSIGNED * absmax
    else:
        value = like
    return value


@triton.jit
def above_midpoint(u, c, POWER: tl.constexpr):
    """``CodeMap.above_midpoint``: whether u lies above the midpoint of the levels c**k and (c+1)**k."""
    if POWER == 2:
        out = u > c * (c + 1) + 0.5
    else:
        q = c * (c + 1) + 1
        qh = tl.floor(q * (1.0 / 256)) * 256
        ql = q - qh
        out = (u - qh * qh) - 2 * qh * ql > ql * ql - 0.5
    return out


@triton.jit
def quantize(value, mask, top, POWER: tl.constexpr, LEVELS: tl.constexpr, MASKED: tl.constexpr):
    """``BlockwiseCodec._encode_part`` on a tile: (code magnitudes as fp32, each row's absmax [ROWS, 1])."""
    magnitude = tl.abs(value)
    finite = tl.where(magnitude < float("inf"), magnitude, 0.0)  # NaN and Inf fail `< inf`
    if MASKED:
        finite = tl.where(mask, finite, 0.0)
    block_max = tl.reduce(finite, 1, MAX_COMBINE)[:, None]
    top_like = block_max * 0.0 + top  # (block_max is finite: exactly top; tl.full_like is a jit function too)
    u = magnitude * tl.div_rn(top_like, tl.where(block_max > 0, block_max, 1.0))
    u = tl.where(u >= 0.0, tl.where(u < top, u, top), 0.0)  # a large u saturates, a NaN u becomes 0
    u = tl.where(magnitude < float("inf"), u, 0.0)  # NaN and +-Inf values store code 0 (NAN_INF_POLICY)
    # the root only guesses: the bias (2**-12) dwarfs the fast square root's error (about 2**-22 relative),
    # so g stays the code below u or the one under it, and the exact midpoint tests decide as in eager
    root = tl.sqrt(u)
    if POWER == 4:
        root = tl.sqrt(root)
    g = tl.minimum(tl.maximum(tl.floor(root * GUESS_BIAS), 0.0), LEVELS - 1.0)
    c = g + above_midpoint(u, g, POWER).to(tl.float32) + above_midpoint(u, g + 1, POWER).to(tl.float32)
    return c, block_max


@triton.jit
def encode(value, data, scales, offs, blocks, mask, row_mask, STORE: tl.constexpr, MASKED: tl.constexpr,
           TOP_SIGNED, TOP_UNSIGNED):
    """Write a state buffer's fp32 tile back in its stored form."""
    if STORE == FP32:
        store_tile(typed(data, tl.float32), offs, value, mask, MASKED)
    elif STORE == BF16:
        store_tile(typed(data, tl.bfloat16), offs, to_bf16(value), mask, MASKED)
    elif STORE == SIGNED_8BIT:
        c, block_max = quantize(value, mask, TOP_SIGNED, 2, 127, MASKED)
        c = tl.where(value < 0, -c, c)
        store_tile(typed(data, tl.int8), offs, c.to(tl.int8), mask, MASKED)
        store_tile(scales.to(tl.pointer_type(tl.float32)), blocks, block_max, row_mask, MASKED)
    elif STORE == UNSIGNED_8BIT:
        c, block_max = quantize(value, mask, TOP_UNSIGNED, 4, 255, MASKED)
        store_tile(typed(data, tl.uint8), offs, c.to(tl.uint8), mask, MASKED)
        store_tile(scales.to(tl.pointer_type(tl.float32)), blocks, block_max, row_mask, MASKED)
