"""The native kernels of the layer-wise rules (LAMB, LARS, StableAdamW): a norm pass, then the update.

- against the independent references: tests/test_rules.py runs its LAMB, LARS and StableAdamW reference
  tests under execution="native" too;
- against the eager step at fp32 rounding: parameters within a few ulps (the norms are sums in
  another order), moments that do not depend on a norm (LAMB's, StableAdamW's) bit-identical, in fp32
  and 8-bit state, fp32 and bf16 (Kahan) parameters, every flag;
- the rule's ``norm`` is what the kernel's norms go through (a sharded norm's scaling reaches the step);
- NaN gradients spread through the norm exactly as in the eager step; thousands of small tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_optim
from hf_optim.kernels import layerwise, native

pytestmark = pytest.mark.skipif(native.library_error() is not None, reason=f"{native.library_error()}")

TOL = {"atol": 1e-6, "rtol": 1e-5}
LAMB_HP = {"lr": 1e-2, "betas": (0.85, 0.99), "eps": 1e-5, "weight_decay": 0.1}
LARS_HP = {"lr": 0.5, "momentum": 0.8, "weight_decay": 0.1, "trust_coefficient": 0.02}
STABLE_HP = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-5, "weight_decay": 0.1}


# --- against the eager step ------------------------------------------------------------------

#: ragged and whole blocks, a bias-like vector (ndim 1: the plain step under exclude_bias_and_norm), a scalar
EAGER_SHAPES = [(100, 257), (4096,), (77, 129), (16, 512), ()]
CASES = [
    (hf_optim.LAMB, LAMB_HP),
    (hf_optim.LAMB, {**LAMB_HP, "bias_correction": False, "exclude_bias_and_norm": False}),
    (hf_optim.LARS, {**LARS_HP, "dampening": 0.1}),
    (hf_optim.LARS, {**LARS_HP, "nesterov": True, "exclude_bias_and_norm": False}),
    (hf_optim.LARS, {**LARS_HP, "momentum": 0.0}),
    (hf_optim.StableAdamW, STABLE_HP),
]
#: moments that never see a norm: the native step's must be the eager step's bits
NORM_FREE = {"exp_avg", "exp_avg_sq", "exp_avg.codes", "exp_avg.absmax", "exp_avg_sq.codes", "exp_avg_sq.absmax"}


#: what a poisoned step writes into a gradient: NaN, values whose square overflows fp32 (the second moment turns
#: Inf, and StableAdamW's g / sqrt(v) is 0 there, not NaN), or Inf
POISONS = {"nan": (float("nan"),), "huge": (3e19, -1e20), "inf": (float("inf"), 1.0)}


def run(execution, cls, hp, dtype, precision, steps, poison_step=None, shapes=EAGER_SHAPES, spike_step=None,
        poison="nan"):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    options = {"state_precision": precision, **({"min_8bit_size": 0} if precision == "8bit" else {})}
    opt = cls(params, execution=execution, **hp, **options)
    grads = torch.Generator().manual_seed(2)
    for step in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=grads) * math.exp(2 * torch.randn((), generator=grads).item())
            if step == poison_step and g.numel() > 10:
                values = POISONS[poison]
                g.view(-1)[3 : 3 + len(values)] = torch.tensor(values)
            p.grad = g.to(dtype) * (100 if step == spike_step else 1)  # a spike: StableAdamW's clipping engages
        opt.step()
    return params, opt


def assert_close_to_eager(cls, hp, dtype, precision, steps=6, poison_step=None, poison="nan"):
    eager, eager_opt = run("eager", cls, hp, dtype, precision, steps, poison_step, poison=poison)
    ours, ours_opt = run("native", cls, hp, dtype, precision, steps, poison_step, poison=poison)
    assert set(ours_opt._modes.values()) == {"native"}
    for a, b in zip(eager, ours):
        assert torch.equal(a.isnan(), b.isnan())
        scale = a.float().nan_to_num().abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
        elif "kahan_comp" in eager_opt.state[a]:  # bf16 + bf16 compensation (~2^-16 relative) hold the fp32 value
            torch.testing.assert_close(b.float() + ours_opt.state[b]["kahan_comp"].float(),
                                       a.float() + eager_opt.state[a]["kahan_comp"].float(), rtol=4e-5,
                                       atol=1e-6 * scale)
        else:  # bf16 alone: an ulp of the fp32 step can round either way, and the rounding feeds the next step
            torch.testing.assert_close(b.float(), a.float(), rtol=8e-3, atol=1e-3 * scale, equal_nan=True)
            assert (a != b).float().mean() < 0.01
        for key, value in eager_opt.state[a].items():
            mine = ours_opt.state[b][key]
            if key == "kahan_comp":
                continue
            if key in NORM_FREE and cls is not hf_optim.LARS:
                assert torch.equal(mine.nan_to_num(), value.nan_to_num()), key
            elif key != "step" and not (precision == "8bit" and cls is hf_optim.LARS):
                torch.testing.assert_close(mine.float(), value.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("precision", ["fp32", "8bit"])
@pytest.mark.parametrize(("cls", "hp"), CASES)
def test_native_layerwise_step_matches_eager(cls, hp, precision):
    if cls is hf_optim.LARS and precision == "8bit":
        pytest.skip("LARS's 8-bit trajectories part by a code flip: the one-step test below checks it")
    assert_close_to_eager(cls, hp, torch.float32, precision)


@pytest.mark.parametrize("precision", ["fp32", "8bit"])
@pytest.mark.parametrize("kahan", [True, False])
@pytest.mark.parametrize(("cls", "hp"), [CASES[0], CASES[5]])
def test_native_layerwise_bf16_parameters_match_eager(cls, hp, kahan, precision):
    assert_close_to_eager(cls, {**hp, "kahan_sum": kahan}, torch.bfloat16, precision)


def test_native_lars_8bit_step_from_the_eager_state_stays_within_a_code():
    # LARS's buffer takes the trust ratio, whose norm is summed in another order: a value on a midpoint may round
    # the other way, and the trajectories then part by 8-bit noise. So: one step each from the same primed state
    params, eager_opt = run("eager", hf_optim.LARS, LARS_HP, torch.float32, "8bit", steps=3)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours_opt = hf_optim.LARS(twins, execution="native", state_precision="8bit", min_8bit_size=0, **LARS_HP)
    ours_opt.load_state_dict(eager_opt.state_dict())
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(5))
        q.grad = p.grad.clone()
    eager_opt.step()
    ours_opt.step()
    assert set(ours_opt._modes.values()) == {"native"}
    for a, b in zip(params, twins):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        codes = [opt.state[p]["momentum_buffer.codes"].int() for opt, p in ((eager_opt, a), (ours_opt, b))]
        diff = codes[0] - codes[1]
        assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3


@pytest.mark.parametrize(("cls", "hp"), [CASES[0], CASES[3], CASES[5]])
def test_nan_gradients_spread_through_the_norm_as_in_the_eager_step(cls, hp):
    assert_close_to_eager(cls, hp, torch.float32, "fp32", steps=4, poison_step=2)


@pytest.mark.parametrize("poison", ["huge", "inf"])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
@pytest.mark.parametrize(("cls", "hp"), [CASES[0], CASES[5]])
def test_overflowing_and_infinite_gradients_step_as_in_the_eager_step(cls, hp, precision, poison):
    # the norm passes write their own forms (StableAdamW's g / w * g for (g * rsqrt(w))^2) and, over fp32 state,
    # store the new moments for the update pass: both must agree with the eager step where g^2 overflows
    assert_close_to_eager(cls, hp, torch.float32, precision, steps=4, poison_step=1, poison=poison)


def test_thousands_of_small_tensors_step_in_one_bucket_as_eager():
    shapes = [(100,)] * 1500 + [(10, 10)] * 1500
    for cls, hp in ((hf_optim.LAMB, LAMB_HP), (hf_optim.StableAdamW, STABLE_HP)):
        eager, _ = run("eager", cls, hp, torch.float32, "fp32", 2, shapes=shapes)
        ours, _ = run("native", cls, hp, torch.float32, "fp32", 2, shapes=shapes)
        for a, b in zip(eager, ours):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --- the norm goes through the rule's norm function ------------------------------------------


def test_global_norms_take_the_rules_norm_of_each_local_norm():
    squares = torch.tensor([4.0, 9.0, 0.0], dtype=torch.float64)
    assert torch.equal(layerwise.global_norms(squares, None), torch.tensor([2.0, 3.0, 0.0]))
    # a norm over two equal shards: sqrt(2 * local sum of squares)
    sharded = layerwise.global_norms(squares, lambda t: (2 * t.square().sum()).sqrt())
    torch.testing.assert_close(sharded, torch.tensor([2.0, 3.0, 0.0]) * math.sqrt(2))


def phantom_shard_norm(t: torch.Tensor) -> torch.Tensor:
    """The norm of ``t`` and of another shard whose sum of squares is 100 (what FSDP2's all-reduce adds)."""
    return (t.float().square().sum() + 100.0).sqrt()


@pytest.mark.parametrize(("cls", "hp"), [(hf_optim.LAMB, LAMB_HP), (hf_optim.LARS, LARS_HP),
                                         (hf_optim.StableAdamW, STABLE_HP)])
def test_kernel_norms_go_through_the_rules_norm(cls, hp, monkeypatch):
    from hf_optim import engine

    setup = {"steps": 3, "shapes": [(40, 7), (3, 5)], "spike_step": 2}
    plain, _ = run("native", cls, hp, torch.float32, "8bit", **setup)
    monkeypatch.setattr(engine, "_norm_for", lambda p: phantom_shard_norm)  # where FSDP2's norm comes from
    eager, _ = run("eager", cls, hp, torch.float32, "8bit", **setup)
    ours, opt = run("native", cls, hp, torch.float32, "8bit", **setup)
    assert set(opt._modes.values()) == {"native"}
    for a, b, c in zip(eager, ours, plain):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(b, c, rtol=1e-4, atol=0)  # the other shard's norm reached the step

