"""Block-wise 8-bit state: one byte per element plus one fp32 scale per 256.

Why this layout: optimizer state is 2x (AdamW) the parameter count in fp32,
8 bytes per parameter; at 8 bits it is 2 + 8/256 bytes. Each block of 256
consecutive elements (of the flattened tensor; the last block may be ragged)
is divided by its absolute maximum and the result, in [-1, 1], is stored as
the nearest of 255 signed (first moments, ``int8``) or 256 unsigned (second
moments, ``uint8``) code levels.

The code map is closed-form companding: level(c) = sign(c) * |c| ** k / N ** k,
with N = 127 and k = 2 (square) for signed buffers, N = 255 and k = 4 (fourth
power) for unsigned ones; in fp32, ``|c| ** k`` by exact integer products
times ``1 / N ** k`` (rounded so the top level is exactly 1). Encoding needs
no table search: a block's magnitudes are multiplied by ``fl(N ** k / scale)``
into code units ``u`` (one division per block), so the levels are the
integers ``c ** k``. A guess ``g = floor(u ** (1/k) * (1 - 2**-12))`` is never
above the code below ``u`` and at most one under it, and two tests against
the midpoints of g, g + 1 and g + 2, exact in fp32, give the nearest level,
ties going down. The compiled step is pure arithmetic that inductor fuses with
the update rule; the native CPU kernel (``hf_optim.kernels``) computes the
same codes with a cheaper root guess, offset so that one midpoint test
decides. Both were checked against the exact nearest level for every fp32
``u``. The code map is a function of the codec, never stored per parameter.

Chosen by measurement (``python benchmarks/state_memory.py --maps``): randn
round trip of 1024x1024 in blocks of 256 (signed map), and AdamW 8-bit vs
torch fp32 AdamW over 50 steps re-synced after each (16x4096 layer, lr 1e-3,
betas (0.85, 0.995), wd 0.1), with iid gradients and with per-element gradient
scales exp(2 * randn) ("spread": real layers' second moments span decades
inside one block). Mean abs / mean rel errors::

    map (signed / unsigned)      randn abs  randn rel  AdamW abs  AdamW rel  spread abs  spread rel
    bitsandbytes dynamic (bnb)     0.00853     0.0155    4.51e-6    5.61e-4     1.10e-4     0.0130
    square / fourth (chosen)       0.00559     0.0117    3.12e-6    4.20e-4     5.98e-5     0.00631
    square / square                0.00559     0.0117    2.89e-6    3.99e-4     2.96e-3     1.03
    cube / fourth                  0.00679     0.0115    3.69e-6    4.54e-4     5.95e-5     0.00600
    linear / fourth                0.00598     0.0313    3.28e-6    3.98e-4     1.60e-4     0.0221

(One seed, one run.) Square/fourth is within 8% of the best map on every
column, which no other map is (square/square fails once gradient scales
spread; linear/fourth has 2.7x the randn relative error; cube/fourth is 18-21%
worse on randn and AdamW abs), and has 0.49-0.75x the dynamic map's error.
A consequence: a bitsandbytes 8-bit state dict cannot be loaded (a clear
``ValueError`` says so); fp32 and bf16 state dicts, ours or torch.optim's,
convert to and from 8-bit on load.

Non-finite values (``NAN_INF_POLICY``, the one policy of every storage and
execution; README "Execution"): a NaN or +-Inf reaching 8-bit state is stored
as 0 (code 0) and confined to its element. A block's scale is the maximum over
its finite elements only, so the other elements of the block keep exactly the
codes they would have had, at this step and later ones (a saturated element
would stay the block's maximum and shift every neighbour's scale). The
parameter element itself becomes NaN/Inf just as it would with fp32 state, so
the fault stays visible (loss, grad norm) rather than silent; that element's
8-bit state restarts from 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

from ..rules.base import Buffer
from .base import StateCodec
from .layouts import ELEMENT, TensorLayout, per_block

#: what a non-finite value does, for every storage and execution (README "Execution")
NAN_INF_POLICY = (
    "A NaN/Inf gradient element poisons only its own element: the parameter element becomes NaN/Inf (visible, "
    "as with torch.optim); dense (fp32/bf16/fp64) state keeps the non-finite value in that element; 8-bit state "
    "stores it as 0, and each block's scale is the maximum of its finite elements, so every other element, of "
    "this block and of other parameters, steps exactly as if that element's state were 0."
)
#: elements per block (one fp32 scale each) of the default codec; a codec's own is ``codec.block``
BLOCK = 256
CODES_SUFFIX = ".codes"
ABSMAX_SUFFIX = ".absmax"


#: the root guess is scaled down by this so it never lands above the code below ``u``
GUESS_BIAS = 1.0 - 2.0**-12


class CodeMap:
    """``level(c) = sign(c) * |c| ** power / levels ** power`` for integer codes c."""

    def __init__(self, signed: bool, power: int) -> None:
        if power not in (1, 2, 3, 4):
            raise ValueError(f"Invalid power: {power} (allowed: 1, 2, 3, 4)")
        self.signed = signed
        self.power = power
        self.levels = 127 if signed else 255
        self.dtype = torch.int8 if signed else torch.uint8
        top = self._power(torch.tensor(float(self.levels)))
        self.scale = _unit_scale(top)
        #: fl32(levels ** power): the top of the code units a block's magnitudes are scaled to
        self.top = top.item()

    def _power(self, c: Tensor) -> Tensor:
        """``c ** power`` by products, exact for integral c up to 255 but for c**4's last rounding."""
        if self.power == 4:
            square = c * c
            return square * square
        out = c
        for _ in range(self.power - 1):
            out = out * c
        return out

    def level(self, magnitude_code: Tensor) -> Tensor:
        """|level| for non-negative fp32 code magnitudes."""
        return self._power(magnitude_code) * self.scale

    def root(self, u: Tensor) -> Tensor:
        if self.power == 1:
            return u
        if self.power == 2:
            return u.sqrt()
        if self.power == 4:
            return u.sqrt().sqrt()
        return u.pow(1.0 / self.power)

    def above_midpoint(self, u: Tensor, c: Tensor) -> Tensor:
        """Whether ``u`` lies above the midpoint of the exact levels ``c ** power`` and ``(c + 1) ** power``,
        decided exactly (for integral fp32 ``c``)."""
        if self.power == 2:  # c(c + 1) + 1/2: exact in fp32
            return u > c * (c + 1) + 0.5
        if self.power == 4:
            # (q^2 - 1/2) with q = c(c + 1) + 1 up to 65281: q^2 = A + B + C, each exact in fp32 (q = qh + ql,
            # qh a multiple of 256), and near the midpoint the two subtractions are exact too (checked for
            # every fp32 u by the tests)
            q = c * (c + 1) + 1
            qh = (q * (1 / 256)).floor() * 256
            ql = q - qh
            return (u - qh * qh) - 2 * qh * ql > ql * ql - 0.5
        exact = c.double()  # the other maps (compared in benchmarks only): float64 holds them exactly
        return u.double() > (self._power(exact) + self._power(exact + 1)) * 0.5

    def nearest(self, u: Tensor) -> Tensor:
        """The code magnitude (fp32, integral) whose level ``c ** power`` is nearest to ``u`` in [0, top] (code
        units); ties go down."""
        # g is the code just below u or the one under it (the bias beats the root's rounding),
        # so the nearest is g, g + 1 or g + 2: two exact midpoint tests decide
        g = (self.root(u) * GUESS_BIAS).floor().clamp(0, self.levels - 1)
        return g + self.above_midpoint(u, g).float() + self.above_midpoint(u, g + 1).float()


def _unit_scale(top: Tensor) -> float:
    """fp32 ``1 / top``, or a neighbour of it for which ``top * scale`` is exactly 1 (the top
    level), where one exists (it does for the square and fourth-power maps)."""
    scale = torch.ones(()).div(top)
    for candidate in (scale, torch.nextafter(scale, torch.tensor(1.0)), torch.nextafter(scale, torch.tensor(0.0))):
        if (top * candidate).item() == 1.0:
            return candidate.item()
    return scale.item()


class BlockwiseCodec(StateCodec):
    """8-bit storage: ``<buffer>.codes`` (int8/uint8, one per element) and ``<buffer>.absmax`` (fp32, one per
    ``block`` elements)."""

    def __init__(self, name: str = "8bit", signed_power: int = 2, unsigned_power: int = 4, block: int = BLOCK) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"Invalid block: {block!r} (allowed: an int >= 1)")
        self.name = name  # type: ignore[misc]
        self.block = block
        self.signed_map = CodeMap(True, signed_power)
        self.unsigned_map = CodeMap(False, unsigned_power)

    def code_map(self, buffer: Buffer) -> CodeMap:
        return self.unsigned_map if buffer.kind == "unsigned" else self.signed_map

    def keys(self, buffer: Buffer) -> tuple[str, ...]:
        return (buffer.name + CODES_SUFFIX, buffer.name + ABSMAX_SUFFIX)

    def layouts(self, buffer: Buffer) -> dict[str, TensorLayout]:
        return {buffer.name + CODES_SUFFIX: ELEMENT, buffer.name + ABSMAX_SUFFIX: per_block(self.block)}

    def allocate(self, buffer: Buffer, like: Tensor) -> dict[str, Tensor]:
        codes_key, absmax_key = self.keys(buffer)
        blocks = math.ceil(like.numel() / self.block)
        return {
            codes_key: torch.zeros(like.numel(), dtype=self.code_map(buffer).dtype, device=like.device),
            absmax_key: torch.zeros(blocks, dtype=torch.float32, device=like.device),
        }

    def decode(self, stored: Mapping[str, Tensor], buffer: Buffer, numel: int) -> Tensor:
        codes_key, absmax_key = self.keys(buffer)
        codes, absmax = stored[codes_key], stored[absmax_key]
        cmap = self.code_map(buffer)
        q = codes.float()
        level = cmap.level(q.abs()) * q.sign() if cmap.signed else cmap.level(q)
        if codes.dim() == 2:  # (rows, block) working layout, absmax (rows, 1): one broadcast, no reshapes
            return level * absmax
        # whole blocks as (blocks, block) times their scales, then the ragged tail by itself:
        # zero-padding the tail instead made inductor emit scalar, modulo-indexed loops (15x
        # slower), and an indexed load absmax[arange(numel) // block] lost the tail when fused
        block = _static_block(self)
        full = numel // block
        out = (level[: full * block].view(full, block) * absmax[:full].view(full, 1)).view(-1)
        if numel % block:
            out = torch.cat([out, level[full * block :] * absmax[full]])
        return out

    def encode(self, value: Tensor, stored: MutableMapping[str, Tensor], buffer: Buffer) -> None:
        codes_key, absmax_key = self.keys(buffer)
        codes, absmax = stored[codes_key], stored[absmax_key]
        if codes.dim() == 2:  # (rows, block) working layout
            self._encode_part(value, codes, absmax, buffer)
            return
        numel, block = value.numel(), _static_block(self)
        full = numel // block
        self._encode_part(value[: full * block].view(full, block), codes[: full * block], absmax[:full], buffer)
        if numel % block:
            self._encode_part(value[full * block :].view(1, -1), codes[full * block :], absmax[full:], buffer)

    def _encode_part(self, value: Tensor, codes: Tensor, absmax: Tensor, buffer: Buffer) -> None:
        """Quantize ``value`` (blocks, block size) into ``codes`` (flat) and ``absmax`` (blocks)."""
        cmap = self.code_map(buffer)
        magnitude = value.abs()
        # the scale is the largest *finite* magnitude (NaN and Inf fail `< inf`); comparisons and
        # selects only, because isfinite/isinf compile to scalar loops on CPU
        block_max = torch.where(magnitude < math.inf, magnitude, 0.0).amax(dim=1, keepdim=True)
        # into code units: one division per block, then products (the native kernel's arithmetic)
        u = magnitude * torch.full_like(block_max, cmap.top).div_(torch.where(block_max > 0, block_max, 1.0))
        # a NaN u (0 times the infinite ratio of a subnormal scale) fails `>= 0` and becomes 0, a large one
        # saturates to the top; NaN and +-Inf values fail `< inf` and store code 0 (NAN_INF_POLICY)
        u = torch.where(u >= 0.0, torch.where(u < cmap.top, u, cmap.top), 0.0)
        u = torch.where(magnitude < math.inf, u, 0.0)
        c = cmap.nearest(u)
        if cmap.signed:
            c = torch.where(value < 0, -c, c)
        codes.copy_(c.view(codes.shape))
        absmax.copy_(block_max.view(absmax.shape))

    def nbytes(self, numel: int) -> int:
        return numel + 4 * math.ceil(numel / self.block)

    def holds(self, stored: Mapping[str, Tensor], buffer: Buffer) -> bool:
        if "__bnb_optimizer_quant_state__" in stored or ("qmap1" in stored and "state1" in stored):
            raise ValueError(
                "cannot load a bitsandbytes 8-bit optimizer state (state1/qmap1/absmax1): its dynamic code "
                "map differs from hf_optim's companding map, so its codes cannot be reused; load it into "
                "bitsandbytes and save an fp32 state dict (or start the optimizer state fresh)"
            )
        codes_key, absmax_key = self.keys(buffer)
        codes = stored.get(codes_key)
        return codes is not None and absmax_key in stored and codes.dtype == self.code_map(buffer).dtype


def _static_block(codec: BlockwiseCodec) -> int:
    """``codec.block`` as a constant of the compiled graph where it is the default. The compiled step reaches
    the codec through its closure, and under ``dynamic=True`` an int read from there becomes a symbol: a
    (numel // block, block) view with a symbolic block then fails in inductor's lowering (the step falls
    back to eager, with a warning). Comparing it with ``BLOCK`` makes dynamo guard on, and specialize to,
    that value; other block sizes keep the symbol."""
    block = codec.block
    return BLOCK if block == BLOCK else block


EIGHT_BIT = BlockwiseCodec()
