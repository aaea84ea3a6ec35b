"""The block-wise 8-bit codec alone (TESTING.md rows 5 and 12): quantizer, round trip, ragged, NaN/Inf."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import code_units, exact_nearest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from hf_optim.rules.base import Buffer
from hf_optim.state import CODECS, FP32, codec_for, validate_policy
from hf_optim.state.blockwise import BLOCK, EIGHT_BIT, BlockwiseCodec, CodeMap

SIGNED, UNSIGNED = Buffer("m", "signed"), Buffer("v", "unsigned")


def roundtrip(codec, buffer, x):
    stored = codec.allocate(buffer, x)
    codec.encode(x.reshape(-1), stored, buffer)
    return stored, codec.decode(stored, buffer, x.numel()).reshape(x.shape)


def brute_force_codes(codec: BlockwiseCodec, buffer: Buffer, x: Tensor, absmax: Tensor) -> Tensor:
    """Signed codes of the nearest levels to x in its block's code units, by exhaustive search."""
    cmap = codec.code_map(buffer)
    scale = absmax.repeat_interleave(BLOCK)[: x.numel()]
    nearest = exact_nearest(cmap, code_units(cmap, x, scale))
    return torch.where(x < 0, -nearest, nearest) if cmap.signed else nearest


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 3 * BLOCK + 7),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-20, 10),
    kind=st.sampled_from(["signed", "unsigned", "param"]),
)
def test_quantizer_equals_brute_force_nearest_code(numel, seed, log_scale, kind):
    buffer = Buffer("b", kind)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * math.exp(log_scale)
    x = x.abs() if kind == "unsigned" else x
    stored, _ = roundtrip(EIGHT_BIT, buffer, x)
    absmax = stored["b.absmax"]
    expected_absmax = torch.nn.functional.pad(x.abs(), (0, absmax.numel() * BLOCK - numel)).view(-1, BLOCK).amax(1)
    assert torch.equal(absmax, expected_absmax)
    assert torch.equal(stored["b.codes"].long(), brute_force_codes(EIGHT_BIT, buffer, x, absmax))


@pytest.mark.parametrize("power", [1, 2, 3, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_every_map_is_exact_at_and_between_its_levels(power, signed):
    cmap = CodeMap(signed, power)
    codes = torch.arange(0, cmap.levels + 1, dtype=torch.float64)
    exact, mid = codes**power, (codes[:-1] ** power + codes[1:] ** power) / 2
    levels = exact.float()  # the top of c**4 rounds in fp32
    assert torch.equal(cmap.nearest(levels), exact_nearest(cmap, levels).float())
    assert torch.equal(cmap.nearest(exact.float()[:-1]), codes[:-1].float())
    # either side of every midpoint, and on it where fp32 holds it (ties go down)
    below = torch.nextafter(mid.float(), torch.tensor(0.0))
    above = torch.nextafter(mid.float(), torch.tensor(math.inf))
    for u in (below, mid.float(), above):
        u = u.clamp(max=cmap.top)
        assert torch.equal(cmap.nearest(u), exact_nearest(cmap, u).float())
    on = mid.float().double() == mid
    assert torch.equal(cmap.nearest(mid.float()[on]), codes[:-1][on].float())
    assert torch.equal(cmap.nearest(above[on]), codes[1:][on].float())


@pytest.mark.parametrize("cmap", [EIGHT_BIT.signed_map, EIGHT_BIT.unsigned_map], ids=["signed", "unsigned"])
def test_nearest_is_exact_within_32_ulps_of_every_midpoint_and_across_the_fp32_range(cmap):
    # the midpoint tests run in fp32 (exact by construction for these maps); an exhaustive run over all
    # 2.5e9 fp32 code units found no difference from the exact nearest level, and this samples it
    codes = torch.arange(0, cmap.levels + 1, dtype=torch.float64)
    mid = (codes[:-1] ** cmap.power + codes[1:] ** cmap.power) / 2
    top = torch.tensor(cmap.top).view(torch.int32).item()
    near = mid.float().view(torch.int32)[:, None] + torch.arange(-32, 33, dtype=torch.int32)
    bits = torch.cat([near.flatten(), torch.arange(0, top, 9973, dtype=torch.int32)]).clamp(0, top)
    u = bits.view(torch.float32)
    assert torch.equal(cmap.nearest(u).long(), exact_nearest(cmap, u))


def test_round_trip_error_on_randn_is_within_bitsandbytes_thresholds():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    _, y = roundtrip(EIGHT_BIT, SIGNED, x)
    err = (y - x).abs()
    assert err.mean() < 0.011
    assert (err / (x.abs() + 1e-8)).mean() < 0.018
    v = x.square()
    _, w = roundtrip(EIGHT_BIT, UNSIGNED, v)
    assert ((w - v).abs() / (v + 1e-8)).mean() < 0.02


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 1000, 4097])
def test_ragged_sizes_and_exact_bytes(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    stored, y = roundtrip(EIGHT_BIT, SIGNED, x)
    assert stored["m.codes"].shape == (numel,) and stored["m.codes"].dtype == torch.int8
    assert stored["m.absmax"].shape == (math.ceil(numel / BLOCK),)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == EIGHT_BIT.nbytes(numel)
    # the tail block is scaled by its own maximum
    tail = x[(math.ceil(numel / BLOCK) - 1) * BLOCK:]
    assert stored["m.absmax"][-1] == tail.abs().max()
    assert ((y - x).abs() <= x.abs().max() * 2 / 127).all()


def test_all_zero_block_stays_zero():
    x = torch.zeros(300)
    x[260] = 1.0
    stored, y = roundtrip(EIGHT_BIT, SIGNED, x)
    assert torch.equal(y, x) and stored["m.absmax"][0] == 0


@pytest.mark.parametrize(
    "bad, buffer",
    [(math.nan, SIGNED), (math.inf, SIGNED), (-math.inf, SIGNED), (math.nan, UNSIGNED), (math.inf, UNSIGNED)],
)
def test_a_non_finite_value_never_poisons_its_block(bad, buffer):
    """Policy (``NAN_INF_POLICY``): the block scale ignores non-finite values, which store 0."""
    x = torch.randn(2 * BLOCK, generator=torch.Generator().manual_seed(1))
    x = x.abs() if buffer.kind == "unsigned" else x
    clean = x.clone()
    clean[5] = 0.0
    poisoned = x.clone()
    poisoned[5] = bad
    clean_stored, _ = roundtrip(EIGHT_BIT, buffer, clean)
    stored, y = roundtrip(EIGHT_BIT, buffer, poisoned)
    assert torch.equal(stored[f"{buffer.name}.absmax"], clean_stored[f"{buffer.name}.absmax"])
    others = torch.ones(2 * BLOCK, dtype=torch.bool)
    others[5] = False
    assert torch.equal(stored[f"{buffer.name}.codes"][others], clean_stored[f"{buffer.name}.codes"][others])
    assert y.isfinite().all()
    assert y[5].item() == 0.0


def test_compiled_codec_equals_eager_on_ragged_sizes():
    def step(x, stored):
        EIGHT_BIT.encode(x * 1.5, stored, SIGNED)
        return EIGHT_BIT.decode(stored, SIGNED, x.numel())

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    for numel in (1000, 4097, 300):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        a, b = EIGHT_BIT.allocate(SIGNED, x), EIGHT_BIT.allocate(SIGNED, x)
        assert torch.equal(step(x, a), compiled(x, b))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_policy_keeps_small_embedding_head_and_norm_state_fp32():
    assert CODECS["8bit"] is EIGHT_BIT
    big = 1 << 16
    assert codec_for("8bit", "encoder.layer.0.attention.self.query.weight", big) is EIGHT_BIT
    assert codec_for("8bit", "encoder.layer.0.attention.self.query.weight", 4095) is FP32
    assert codec_for("8bit", "encoder.layer.0.attention.self.query.weight", 4096) is EIGHT_BIT
    for name in ("bert.embeddings.word_embeddings.weight", "model.embed_tokens.weight", "transformer.wte.weight",
                 "lm_head.weight", "encoder.layer.0.output.LayerNorm.weight", "h.0.ln_1.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert codec_for("8bit", name, big) is FP32, name
    assert codec_for("8bit", None, big) is EIGHT_BIT  # unnamed: size alone decides
    assert codec_for("fp32", "mlp.weight", big) is FP32
    # overridable
    assert codec_for("8bit", "lm_head.weight", big, fp32_patterns=[]) is EIGHT_BIT
    assert codec_for("8bit", "mlp.weight", 10, min_8bit_size=0) is EIGHT_BIT
    assert codec_for("8bit", "mlp.weight", big, fp32_patterns=[r"^mlp\."]) is FP32


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("min_8bit_size", -1, "Invalid min_8bit_size: -1"),
        ("min_8bit_size", 1.5, "Invalid min_8bit_size: 1.5"),
        ("min_8bit_size", True, "Invalid min_8bit_size: True"),
        ("fp32_patterns", "norm", "Invalid fp32_patterns: 'norm'"),
        ("fp32_patterns", [3], "Invalid fp32_patterns entry: 3"),
        ("fp32_patterns", ["(unclosed"], "is not a regex"),
    ],
)
def test_policy_options_are_validated(option, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_policy({option: value, "state_precision": "8bit"})


def test_invalid_power_is_rejected():
    with pytest.raises(ValueError, match="Invalid power: 5"):
        CodeMap(True, 5)


@pytest.mark.parametrize("option, value", [("min_8bit_size", 0), ("fp32_patterns", ["mlp"])])
def test_policy_options_are_refused_where_they_would_be_ignored(option, value):
    with pytest.raises(ValueError, match=f"{option}=.* only applies to quantized state"):
        validate_policy({option: value, "state_precision": "fp32"})
