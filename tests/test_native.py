"""The native CPU kernel (hf_optim/kernels): exact against independent references and the eager step.

- fp32 state: bit-exact against a NumPy fp32 reference written here (NumPy's ops are
  correctly rounded, as the kernel's are).
- 8-bit state: codes and scales bit-identical to the eager codec's, and the quantizer equals
  brute-force nearest code; parameters within an ulp of the eager step's (torch's CPU sqrt
  is not correctly rounded, so the eager step itself is an ulp off the NumPy reference).
- bf16 parameters with Kahan compensation, NaN/Inf gradients, ragged sizes, amsgrad and
  maximize, the torch.library operator, and the engine's choice and errors.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import code_units, exact_nearest
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_optim
from hf_optim.kernels import native
from hf_optim.rules.base import Buffer
from hf_optim.state.blockwise import BLOCK, EIGHT_BIT, CodeMap

pytestmark = pytest.mark.skipif(native.library_error() is not None, reason=f"{native.library_error()}")

SHAPES = [(300, 257), (4096,), (77, 129), (5000,), (64, 512)]  # ragged and whole blocks
ADAMW_HP = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
LION_HP = {"lr": 3e-5, "betas": (0.85, 0.97), "weight_decay": 0.2}
F = np.float32


def gradients(shapes, steps, seed=0, poison_step=None, dtype=torch.float32, poison=(math.nan, math.inf, -math.inf)):
    """Per-step gradients with scales spread over decades; ``poison`` entries (NaN, +-Inf) at ``poison_step``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * math.exp(3 * torch.randn((), generator=gen).item())
            if step == poison_step and g.numel() > 10:
                for index, value in zip((3, 7, -1), poison):
                    g.view(-1)[index] = value
            grads.append(g.to(dtype))
        out.append(grads)
    return out


def run(execution, cls, grads, dtype=torch.float32, seed=1, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(g.shape, generator=gen).to(dtype) for g in grads[0]]
    opt = cls(params, execution=execution, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


# --- fp32 state: bit-exact against NumPy ---------------------------------------------------


def _f64(x):
    return torch.tensor(x, dtype=torch.float64)


def _f32(t):
    """A float64 scalar rounded once to fp32, as the engine rounds its scalar math."""
    return t.float().numpy() if isinstance(t, torch.Tensor) else F(t)


def numpy_adamw(p, grads, lr, betas, eps, weight_decay, amsgrad=False, maximize=False):
    p = p.numpy().astype(F).copy()
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    b1, b2, lr_t = _f64(betas[0]), _f64(betas[1]), _f64(lr)  # scalar math as the rule does it: float64 torch
    for t, g in enumerate(grads, start=1):
        g = -g.numpy() if maximize else g.numpy()
        step = _f64(float(t))
        decay = _f32(1 - lr_t * weight_decay)
        step_size = _f32(lr_t / (1 - b1**step))
        ibc2 = _f32((1 - b2**step).rsqrt())
        p = p * decay
        m = m * _f32(b1) + g * _f32(1 - b1)
        v = v * _f32(b2) + (g * g) * _f32(1 - b2)
        if amsgrad:
            vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax if amsgrad else v) * ibc2 + F(eps)
        p = p - (m / denom) * step_size
    return p, m, v


def numpy_lion(p, grads, lr, betas, weight_decay):
    p = p.numpy().astype(F).copy()
    m = np.zeros_like(p)
    b1, b2, lr_t = _f64(betas[0]), _f64(betas[1]), _f64(lr)
    decay = _f32(1 - lr_t * weight_decay)
    for g in grads:
        g = g.numpy()
        direction = np.sign(m * _f32(b1) + g * _f32(1 - b1))
        p = p * decay - direction * _f32(lr_t)
        m = m * _f32(b2) + g * _f32(1 - b2)
    return p, m


@pytest.mark.parametrize("flags", [{}, {"amsgrad": True}, {"maximize": True}])
def test_adamw_fp32_state_is_bit_exact_against_numpy(flags):
    grads = gradients(SHAPES, steps=5)
    params, opt = run("native", hf_optim.AdamW, grads, **ADAMW_HP, **flags)
    gen = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        start = torch.randn(p.shape, generator=gen)
        ref_p, ref_m, ref_v = numpy_adamw(start, [g[i] for g in grads], **ADAMW_HP, **flags)
        assert np.array_equal(p.numpy(), ref_p)
        assert np.array_equal(opt.state[p]["exp_avg"].numpy(), ref_m)
        assert np.array_equal(opt.state[p]["exp_avg_sq"].numpy(), ref_v)


def test_lion_fp32_state_is_bit_exact_against_numpy():
    grads = gradients(SHAPES, steps=5)
    params, opt = run("native", hf_optim.Lion, grads, **LION_HP)
    gen = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        ref_p, ref_m = numpy_lion(torch.randn(p.shape, generator=gen), [g[i] for g in grads], **LION_HP)
        assert np.array_equal(p.numpy(), ref_p)
        assert np.array_equal(opt.state[p]["exp_avg"].numpy(), ref_m)


# --- 8-bit state and bf16 parameters: against the eager step ------------------------------


CASES = [
    (hf_optim.AdamW, ADAMW_HP),
    (hf_optim.AdamW, {**ADAMW_HP, "amsgrad": True, "maximize": True}),
    (hf_optim.Lion, LION_HP),
    (hf_optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.01, "nesterov": False,
                    "maximize": True}),
    (hf_optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True}),
    (hf_optim.Adan, {"lr": 2e-3, "betas": (0.9, 0.85, 0.98), "eps": 1e-6, "weight_decay": 0.05}),
    # k=3: the lookahead syncs twice in the six steps
    (hf_optim.Ranger, {"lr": 2e-3, "betas": (0.85, 0.98), "eps": 1e-6, "weight_decay": 0.01, "k": 3, "alpha": 0.6}),
]


def assert_matches_eager(cls, hp, dtype, precision, poison_step=None, poison=(math.nan, math.inf, -math.inf)):
    grads = gradients(SHAPES, steps=6, poison_step=poison_step, dtype=dtype, poison=poison)
    options = {"state_precision": precision, **({"min_8bit_size": 0} if precision == "8bit" else {})}
    eager, eager_opt = run("eager", cls, grads, dtype=dtype, **hp, **options)
    ours, ours_opt = run("native", cls, grads, dtype=dtype, **hp, **options)
    for a, b in zip(eager, ours):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(b, a, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=1e-7, equal_nan=True)
        for key, value in eager_opt.state[a].items():
            if key in ("kahan_comp", "slow_param"):  # follow the parameter, and so the eager sqrt's ulp
                torch.testing.assert_close(ours_opt.state[b][key].float(), value.float(), rtol=1e-5, atol=1e-5,
                                           equal_nan=True)
            else:  # the moments never pass through sqrt: identical bits
                assert torch.equal(ours_opt.state[b][key].nan_to_num(), value.nan_to_num()), key


@pytest.mark.parametrize(("cls", "hp"), CASES)
def test_8bit_state_is_bit_identical_to_eager(cls, hp):
    assert_matches_eager(cls, hp, torch.float32, "8bit")


@pytest.mark.parametrize(("cls", "hp"), CASES)
def test_fp32_state_matches_eager(cls, hp):
    assert_matches_eager(cls, hp, torch.float32, "fp32")


@pytest.mark.parametrize(("cls", "hp"), CASES)
def test_nan_gradients_match_eager_and_stay_in_their_element(cls, hp):
    assert_matches_eager(cls, hp, torch.float32, "8bit", poison_step=3, poison=(math.nan, math.nan, math.nan))


@pytest.mark.parametrize(("cls", "hp"), CASES)
def test_inf_gradients_match_eager_and_stay_in_their_element(cls, hp):
    assert_matches_eager(cls, hp, torch.float32, "8bit", poison_step=3, poison=(math.inf, -math.inf, math.inf))


@pytest.mark.parametrize("precision", ["8bit", "fp32"])
@pytest.mark.parametrize("kahan", [True, False])
@pytest.mark.parametrize(("cls", "hp"), CASES[::2])
def test_bf16_parameters_match_eager(cls, hp, precision, kahan):
    assert_matches_eager(cls, {**hp, "kahan_sum": kahan}, torch.bfloat16, precision)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), numel=st.integers(1, 3 * BLOCK + 5), log_scale=st.floats(-30, 20))
def test_kernel_quantizer_equals_brute_force_nearest_code(seed, numel, log_scale):
    # betas 0: the moments are exactly g and g*g, so their codes are the quantizer's output on them
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen) * math.exp(log_scale)
    p = torch.zeros(numel)
    p.grad = g
    opt = hf_optim.AdamW([p], execution="native", betas=(0.0, 0.0), state_precision="8bit", min_8bit_size=0)
    opt.step()
    for buffer, value in ((Buffer("exp_avg", "signed"), g), (Buffer("exp_avg_sq", "unsigned"), g * g)):
        cmap = EIGHT_BIT.code_map(buffer)
        codes, absmax = opt.state[p][f"{buffer.name}.codes"], opt.state[p][f"{buffer.name}.absmax"]
        nearest = exact_nearest(cmap, code_units(cmap, value, absmax.repeat_interleave(BLOCK)[:numel]))
        assert torch.equal(codes.long(), torch.where(value < 0, -nearest, nearest))


def kernel_codes(cmap: CodeMap, u: torch.Tensor) -> torch.Tensor:
    """The kernel's codes of exactly ``u`` in code units: m = g (signed) or v = g*g (unsigned) from an AdamW step
    with betas 0, one block per value, the block's other entries setting its scale to the map's top."""
    g = u if cmap.signed else u.sqrt()
    assert torch.equal(g if cmap.signed else g * g, u)
    blocks = torch.full((g.numel(), BLOCK), cmap.top if cmap.signed else 255.0**2)  # fl(255**4) is the top
    blocks[:, 0] = g
    m = EIGHT_BIT.allocate(Buffer("exp_avg", "signed"), blocks.view(-1))
    v = EIGHT_BIT.allocate(Buffer("exp_avg_sq", "unsigned"), blocks.view(-1))
    # decay 1, betas 0 (m = g, v = g*g), step size 0: the parameter stays, the moments are the gradient's
    coefficients = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    states = [m["exp_avg.codes"], m["exp_avg.absmax"], v["exp_avg_sq.codes"], v["exp_avg_sq.absmax"]]
    native.step([torch.zeros(blocks.numel())], [blocks.view(-1)], states, [], coefficients, "adamw", [1, 2], 0)
    codes, absmax = states[0:2] if cmap.signed else states[2:4]
    assert (absmax == cmap.top).all()
    return codes.view(-1, BLOCK)[:, 0].long()


def test_kernel_quantizer_at_levels_and_either_side_of_every_midpoint():
    for cmap in (EIGHT_BIT.signed_map, EIGHT_BIT.unsigned_map):
        codes = torch.arange(cmap.levels + 1, dtype=torch.float64)
        mid = ((codes[:-1] ** cmap.power + codes[1:] ** cmap.power) / 2).float()
        below, above = torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(math.inf))
        for values in ((codes**cmap.power).float(), below, mid, above):
            # unsigned: values v = g*g exactly representable near each one
            u = values if cmap.signed else values.sqrt().square()
            assert torch.equal(kernel_codes(cmap, u), exact_nearest(cmap, u)), cmap.signed


def test_torch_library_operator_passes_opcheck():
    p, g = torch.randn(700), torch.randn(700)
    stored = EIGHT_BIT.allocate(Buffer("exp_avg", "signed"), p)
    counter = torch.zeros(())
    args = ([p], [g], [stored["exp_avg.codes"], stored["exp_avg.absmax"]], [],
            torch.tensor([1e-4, 0.99, 0.9, 0.1, 0.99, 0.01]), "lion", [1], 0, [counter])
    torch.library.opcheck(torch.ops.hf_optim.cpu_step.default, args)
    torch.ops.hf_optim.cpu_step(*args)
    assert counter.item() == 1.0  # the kernel advances each step counter once per call


@pytest.mark.parametrize("precision", ["8bit", "fp32"])
def test_gradients_of_another_dtype_than_the_parameter_step_as_eager_does(precision):
    # e.g. fp32 gradients of bf16 parameters: the kernel takes matching dtypes only, so these run eagerly
    options = {"state_precision": precision, **({"min_8bit_size": 0} if precision == "8bit" else {})}
    results = []
    for execution in ("eager", "native"):
        p = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).bfloat16())
        p.grad_dtype = torch.float32  # torch's opt-in to gradients of another dtype
        opt = hf_optim.AdamW([p], execution=execution, **options, **ADAMW_HP)
        for step in range(3):
            p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(step + 1))  # fp32
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("name", sorted(native.KERNELS))
def test_each_rule_returns_every_coefficient_its_kernel_reads(name):
    from itertools import product

    rule = hf_optim.get_spec(name).load_class().rule
    hp = {key: torch.tensor(value) for key, value in rule.scalars(rule.defaults).items()}
    for values in product((False, True), repeat=len(rule.flag_names)):  # every flag setting
        flags = dict(zip(sorted(rule.flag_names), values))
        assert set(native.KERNELS[name].coefficients) <= set(rule.coefficients(hp, torch.tensor(3.0), flags))


# --- the engine's choice, and errors ----------------------------------------------------------


def test_auto_runs_native_where_it_applies_and_compiled_or_eager_elsewhere():
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    for cls, expected in ((hf_optim.AdamW, "native"), (hf_optim.Lion, "native"), (hf_optim.LAMB, "native"),
                          (hf_optim.LARS, "native"), (hf_optim.StableAdamW, "native")):
        opt = cls(params, execution="auto")
        opt.step()
        assert set(opt._modes.values()) == {expected}, cls
    fp16 = [torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float16))]
    fp16[0].grad = torch.randn_like(fp16[0])
    opt = hf_optim.AdamW(fp16, execution="auto")
    opt.step()
    assert set(opt._modes.values()) == {"eager"}


def test_native_for_a_rule_without_a_kernel_is_a_clear_error_at_construction(monkeypatch):
    monkeypatch.delitem(native.KERNELS, "lamb")  # every rule has a kernel now: take one away
    with pytest.raises(ValueError, match="Invalid execution: 'native' for LAMB: no native kernel for lamb"):
        hf_optim.LAMB([torch.nn.Parameter(torch.randn(4))], execution="native")


def test_native_with_storage_it_cannot_run_is_a_clear_error():
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn_like(p)
    opt = hf_optim.AdamW([p], execution="native", state_precision="bf16")
    with pytest.raises(ValueError, match="native kernels store state as fp32 or 8bit, not bf16"):
        opt.step()


def test_kernel_builds_in_a_fresh_cache_and_a_missing_compiler_falls_back(tmp_path):
    script = (
        "import torch, hf_optim\n"
        "from hf_optim.kernels import native\n"
        "print(native.library_error())\n"
        "p = torch.nn.Parameter(torch.ones(8)); p.grad = torch.ones(8)\n"
        "opt = hf_optim.AdamW([p], execution='auto'); opt.step()\n"
        "print(sorted(set(opt._modes.values())))\n"
    )
    env = {**os.environ, "HF_OPTIM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["None", "['native']"], out.stderr[-2000:]
    assert len(list((tmp_path / "cache").glob("cpu_step-*.so"))) == 1
    env["CC"] = str(tmp_path / "no-such-compiler")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    assert "does not run" in lines[0] and lines[1] == "['eager']", out.stdout


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" not in Path("/proc/cpuinfo").read_text(),
    reason="without AVX-512 the default build is already a reduced one",
)
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2"])
def test_reduced_paths_give_the_same_codes_as_the_eager_codec(tmp_path, flags):
    # AVX2 quantizes 8 lanes with a refined rsqrt guess, the plain C loop with a bit-level one: the same exact tests
    script = (
        "import torch, hf_optim\n"
        "from hf_optim.kernels import native\n"
        "assert native.library_error() is None, native.library_error()\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "g = torch.randn(40 * 256 + 77, generator=gen) * torch.logspace(-30, 18, 40 * 256 + 77)  # g*g finite\n"
        "g[::97] = float('nan')  # (+-Inf: see test_inf_gradients_match_eager_and_stay_in_their_element)\n"
        "codes = []\n"
        "for execution in ('eager', 'native'):\n"
        "    p = torch.nn.Parameter(torch.zeros_like(g)); p.grad = g.clone()\n"
        "    opt = hf_optim.AdamW([p], betas=(0.0, 0.0), execution=execution, state_precision='8bit',\n"
        "                         min_8bit_size=0)\n"
        "    opt.step()\n"
        "    codes.append([opt.state[p][k] for k in sorted(opt.state[p]) if k != 'step'])\n"
        "print(all(torch.equal(a, b) for a, b in zip(*codes)))\n"
    )
    env = {**os.environ, "HF_OPTIM_CACHE": str(tmp_path / "cache"), "HF_OPTIM_NATIVE_FLAGS": flags}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
