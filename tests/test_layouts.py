"""Codecs declare the layout of their tensors; working views, row chunks and the memory model read it.

``Nibble4`` (a test codec, not a public one) packs two 4-bit codes per byte with one fp32 scale per
64 elements: it only works if every path that reshapes or slices state honours ``packed`` and the
codec's own block size. A block-wise 8-bit codec with a block of 64 checks the same for per-block scales.
Reference: the same rule with fp32 state whose moments are round-tripped through the codec's quantizer on
the flat tensor after every step, which must equal (bit for bit) stepping the stored form.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import roundtrip, set_grads

import hf_optim
from hf_optim import execution
from hf_optim.rules.base import Buffer
from hf_optim.state import CODECS, planned_bytes
from hf_optim.state.base import StateCodec
from hf_optim.state.blockwise import BlockwiseCodec
from hf_optim.state.layouts import ELEMENT, StateLayout, TensorLayout, packed, per_block

BLOCK = 64
HP = {"lr": 2e-2, "betas": (0.8, 0.9), "weight_decay": 0.1, "eps": 1e-3}
# rows of 64 (chunked at 3 rows), a 2-D multiple, ragged odd and even sizes (1-D), a 0-d one
SHAPES = ((8 * BLOCK,), (5, BLOCK), (7 * BLOCK + 1,), (100,), ())


def quantize(value: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 -> (4-bit codes as uint8 0..15, one scale per block of 64); the last block ragged."""
    n = value.numel()
    blocks = math.ceil(n / BLOCK)
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = value.reshape(-1)
    rows = padded.view(blocks, BLOCK)
    scale = rows.abs().amax(dim=1, keepdim=True)
    levels, offset = (7, 8) if signed else (15, 0)
    q = (rows / torch.where(scale > 0, scale, 1.0) * levels).round().clamp(-levels if signed else 0, levels)
    return (q + offset).to(torch.uint8).view(-1)[:n], scale.view(-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    levels, offset = (7, 8) if signed else (15, 0)
    n = codes.numel()
    q = codes.float() - offset
    per_element = scale.repeat_interleave(BLOCK)[:n]
    return q * per_element / levels


def pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def unpack(nibbles: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([nibbles & 15, nibbles >> 4], dim=1).view(-1)[:n]


class Nibble4(StateCodec):
    """``<buffer>.nibbles`` (uint8, two codes per byte) and ``<buffer>.scale`` (fp32, one per 64 elements)."""

    name = "nibble4"
    block = BLOCK

    def layouts(self, buffer: Buffer) -> dict[str, TensorLayout]:
        return {buffer.name + ".nibbles": packed(2), buffer.name + ".scale": per_block(self.block)}

    def allocate(self, buffer, like):
        n = like.numel()
        return {buffer.name + ".nibbles": torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=like.device),
                buffer.name + ".scale": torch.zeros(math.ceil(n / BLOCK), device=like.device)}

    def decode(self, stored, buffer, numel):
        nibbles, scale = stored[buffer.name + ".nibbles"], stored[buffer.name + ".scale"]
        # the working layout as declared: (rows, 32) nibbles and (rows, 1) scales, or both 1-D
        assert nibbles.dim() == scale.dim() and (nibbles.dim() == 1 or nibbles.shape[1] * 2 == BLOCK == 64)
        value = dequantize(unpack(nibbles.reshape(-1), numel), scale.reshape(-1), buffer.kind == "signed")
        return value.view(nibbles.shape[0], BLOCK) if nibbles.dim() == 2 else value

    def encode(self, value, stored, buffer):
        nibbles, scale = stored[buffer.name + ".nibbles"], stored[buffer.name + ".scale"]
        codes, scales = quantize(value, buffer.kind == "signed")
        nibbles.copy_(pack(codes).view(nibbles.shape))
        scale.copy_(scales.view(scale.shape))

    def nbytes(self, numel):
        return math.ceil(numel / 2) + 4 * math.ceil(numel / BLOCK)


def round_trip(value: torch.Tensor, signed: bool, codec: StateCodec) -> torch.Tensor:
    """``value`` (flat) stored by ``codec`` and read back, on the flat tensor (the reference layout)."""
    buffer = Buffer("m", "signed" if signed else "unsigned")
    stored = codec.allocate(buffer, value)
    stored = {k: t.view(-1) for k, t in stored.items()}
    codec.encode(value.reshape(-1).clone(), stored, buffer)
    return codec.decode(stored, buffer, value.numel()).view(value.shape)


def params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


@pytest.fixture
def codecs(monkeypatch):
    nib, eight = Nibble4(), BlockwiseCodec("8bit_b64", block=BLOCK)
    monkeypatch.setitem(CODECS, nib.name, nib)
    monkeypatch.setitem(CODECS, eight.name, eight)
    monkeypatch.setattr(execution, "CHUNK_ROWS", 3)  # the 512-element parameter steps as 3 row chunks
    return {nib.name: nib, eight.name: eight}


def test_declared_layouts_shape_the_working_views():
    layout = StateLayout({"m": ELEMENT, "m.q": packed(2), "m.s": per_block(64)})
    assert layout.block == 64 and layout.working_shape(640) == (10, 64) and layout.working_shape(650) == (650,)
    state = {"step": torch.zeros(()), "m": torch.zeros(640), "m.q": torch.zeros(320), "m.s": torch.zeros(10)}
    views = layout.working(state, (10, 64))
    assert {k: tuple(v.shape) for k, v in views.items()} == {"step": (), "m": (10, 64), "m.q": (10, 32), "m.s": (10, 1)}
    assert {k: tuple(v.shape) for k, v in layout.rows(views, slice(3, 6)).items()} == \
        {"step": (), "m": (3, 64), "m.q": (3, 32), "m.s": (3, 1)}
    flat = layout.working({"m": torch.zeros(5, 130), "m.q": torch.zeros(325), "m.s": torch.zeros(11)}, (650,))
    assert {tuple(v.shape) for v in flat.values()} == {(650,), (325,), (11,)}
    assert [TensorLayout("packed", 2).count(n) for n in (0, 1, 2, 7)] == [0, 1, 1, 4]
    assert per_block(64).count(65) == 2 and ELEMENT.count(9) == 9
    # packing that rows of the block would split, or two block sizes: stepped 1-D
    assert StateLayout({"q": packed(3), "s": per_block(64)}).block is None
    assert StateLayout({"a": per_block(64), "b": per_block(256)}).block is None
    with pytest.raises(KeyError, match="state tensor 'x' has no declared layout"):
        layout.working({"x": torch.zeros(640)}, (10, 64))
    with pytest.raises(ValueError, match="Invalid layout kind"):
        TensorLayout("rowwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid elements per entry"):
        packed(0)


def test_codecs_declare_their_own_layouts_and_block():
    buffer = Buffer("exp_avg", "signed")
    assert CODECS["fp32"].layouts(buffer) == {"exp_avg": ELEMENT}
    assert CODECS["8bit"].layouts(buffer) == {"exp_avg.codes": ELEMENT, "exp_avg.absmax": per_block(256)}
    small = BlockwiseCodec("8bit_b64", block=64)
    assert small.layouts(buffer)["exp_avg.absmax"] == per_block(64) and CODECS["8bit"].block == 256
    assert small.allocate(buffer, torch.zeros(130))["exp_avg.absmax"].numel() == 3 and small.nbytes(130) == 142
    with pytest.raises(ValueError, match="Invalid block: 0"):
        BlockwiseCodec(block=0)


@pytest.mark.parametrize("precision", ["nibble4", "8bit_b64"])
def test_a_packed_and_a_small_block_codec_step_exactly_like_the_flat_reference(codecs, precision):
    codec = codecs[precision]
    ours_params, ref_params = params(), params()
    options = {"min_8bit_size": 1} if precision == "8bit_b64" else {}
    ours = hf_optim.AdamW(ours_params, execution="auto", state_precision=precision, **options, **HP)
    ref = hf_optim.AdamW(ref_params, execution="eager", **HP)
    for step in range(6):
        set_grads(ours_params, step)
        set_grads(ref_params, step)
        ours.step()
        ref.step()
        for p in ref_params:  # the reference keeps what the codec can store, computed on the flat tensor
            state = ref.state[p]
            state["exp_avg"].copy_(round_trip(state["exp_avg"], True, codec))
            state["exp_avg_sq"].copy_(round_trip(state["exp_avg_sq"], False, codec))
        for a, b in zip(ours_params, ref_params, strict=True):
            assert torch.equal(a, b), step
    assert set(ours._modes.values()) <= {"eager", "compiled"}  # the native kernel has no such storage
    buffer = Buffer("exp_avg", "signed")
    for p, q in zip(ours_params, ref_params, strict=True):
        state = ours.state[p]
        stored = {k: state[k].view(-1) for k in codec.keys(buffer)}
        assert torch.equal(codec.decode(stored, buffer, p.numel()).view(p.shape), ref.state[q]["exp_avg"])
        # the memory model and the report use the codec's declared sizes
        assert sum(t.nbytes for t in state.values()) == planned_bytes(ours.rule, ours.param_groups[0], None,
                                                                       p.numel(), p.dtype)


def test_a_packed_state_round_trips_through_the_state_dict(codecs):
    a_params, b_params = params(), params()
    a = hf_optim.AdamW(a_params, execution="eager", state_precision="nibble4", **HP)
    for step in range(3):
        set_grads(a_params, step)
        a.step()
    b = hf_optim.AdamW(b_params, execution="eager", state_precision="nibble4", **HP)
    b.load_state_dict(roundtrip(a.state_dict()))
    for p, q in zip(b_params, a_params, strict=True):
        p.data.copy_(q)
    for step in range(3, 5):
        for ps, o in ((a_params, a), (b_params, b)):
            set_grads(ps, step)
            o.step()
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
    # fp32 <-> packed converts on load
    c = hf_optim.AdamW(params(), execution="eager", **HP)
    c.load_state_dict(a.state_dict())
    assert c.state[c.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32


def test_native_refuses_a_block_size_its_kernel_does_not_have(codecs):
    opt = hf_optim.AdamW(params(), execution="native", state_precision="8bit_b64", min_8bit_size=1, **HP)
    set_grads(opt.param_groups[0]["params"], 0)
    with pytest.raises(ValueError, match="Invalid execution: 'native'"):
        opt.step()
