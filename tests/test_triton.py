"""The Triton (CUDA) step, run by Triton's CPU interpreter: against the eager step, without a GPU.

``TRITON_INTERPRET=1`` is set before triton is first imported, so the very
kernels a GPU would compile run here on CPU tensors. Every rule x state
storage (fp32, bf16, 8-bit) x parameter dtype (fp32, bf16 with Kahan) steps a
bucket of ragged and whole-block tensors (whole and masked tiles, several
tensors per launch) with non-default hyperparameters, and every state tensor
must equal the eager step's bit for bit; parameters too, up to the last-place
differences the coefficient math and (LAMB, LARS, StableAdamW) the norms'
summation order allow. Plus: NaN/Inf gradients in 8-bit blocks, parameters at
different step counts in one launch, mixed gradient dtypes, a strided
parameter, the engine's choice of mode and its errors, and the device
script's dry run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernels are decorated on import)
triton = pytest.importorskip("triton")

import hf_optim  # noqa: E402
from hf_optim.kernels import triton_step  # noqa: E402
from hf_optim.kernels.triton_step import RULES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not triton_step.interpreting(), reason="TRITON_INTERPRET was set to 0")

#: non-default hyperparameters per rule (a decay or beta left at its default can hide a bug)
HP = {
    "adamw": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    "lion": {"lr": 3e-4, "betas": (0.85, 0.97), "weight_decay": 0.2},
    "sgd": {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05},
    "adan": {"lr": 2e-3, "betas": (0.9, 0.9, 0.98), "eps": 1e-6, "weight_decay": 0.05},
    "ranger": {"lr": 2e-3, "betas": (0.85, 0.98), "eps": 1e-6, "weight_decay": 0.01, "k": 2, "alpha": 0.6},
    "lamb": {"lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    "lars": {"lr": 0.5, "momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3, "trust_coefficient": 2e-3},
    "stable_adamw": {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
}
CLASSES = {
    "adamw": hf_optim.AdamW, "lion": hf_optim.Lion, "sgd": hf_optim.SGD, "adan": hf_optim.Adan,
    "ranger": hf_optim.Ranger, "lamb": hf_optim.LAMB, "lars": hf_optim.LARS, "stable_adamw": hf_optim.StableAdamW,
}
#: one bucket: a ragged size over two tiles (one masked), a whole-block matrix, a small vector (biases)
SHAPES = [(1317,), (6, 256), (300,)]
STEPS = 4


def gradients(shapes, steps, seed=0, poison=False, dtype=torch.float32):
    """Gradients with per-tensor scales spread over decades; NaN/Inf entries on step 2 with ``poison``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * math.exp(2 * torch.randn((), generator=gen).item())
            if poison and step == 1:
                g.view(-1)[3], g.view(-1)[300], g.view(-1)[-1] = float("nan"), float("inf"), -float("inf")
            grads.append(g.to(dtype))
        out.append(grads)
    return out


def run(execution, rule, grads, dtype=torch.float32, **kwargs):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(g.shape, generator=gen).to(dtype) for g in grads[0]]
    hp = {**HP[rule], **kwargs}
    if hp.get("state_precision") == "8bit":
        hp.setdefault("min_8bit_size", 1)  # every tensor quantized, the small one too
    opt = CLASSES[rule](params, execution=execution, **hp)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def assert_same(ours, reference, exact_params=False):
    """Every state tensor bit for bit; parameters within fp32 rounding (or exactly)."""
    (params, opt), (ref_params, ref_opt) = ours, reference
    for i, (p, ref) in enumerate(zip(params, ref_params)):
        if exact_params:
            torch.testing.assert_close(p, ref, rtol=0, atol=0, equal_nan=True, msg=f"param {i}")
        else:
            tol = {"rtol": 1e-6, "atol": 1e-7} if p.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
            torch.testing.assert_close(p.float(), ref.float(), equal_nan=True, **tol, msg=f"param {i}")
        state, ref_state = opt.state[p], ref_opt.state[ref]
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            if key == "kahan_comp" and not exact_params:
                # the compensation is what the parameter's rounding lost: it follows the parameter's last ulp
                torch.testing.assert_close(state[key].float(), ref_state[key].float(), rtol=0, atol=1e-2)
                continue
            assert torch.equal(state[key], ref_state[key]) or (
                state[key].is_floating_point() and torch.allclose(state[key], ref_state[key], equal_nan=True,
                                                                  rtol=0, atol=0)
            ), f"param {i} {key}: {(state[key].float() - ref_state[key].float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("rule", list(RULES))
def test_matches_eager(rule, precision, dtype):
    grads = gradients(SHAPES, STEPS, dtype=dtype)
    ours = run("triton", rule, grads, dtype, state_precision=precision)
    reference = run("eager", rule, grads, dtype, state_precision=precision)
    assert all(mode == "triton" for mode in ours[1]._modes.values())
    assert_same(ours, reference)
