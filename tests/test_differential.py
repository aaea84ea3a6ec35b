"""Differential suite (issue 14): drawn configurations, every execution path against the eager reference.

A seeded generator draws configurations across rule x storage (fp32, bf16, 8bit) x placement (device, paged)
x execution (native, auto, compiled) x parameter dtype (fp32, bf16, fp16, fp64) x layout (contiguous,
transposed, a sliced view, 0-d, a ragged size, a size under the block) x gradient pattern (None on some
steps, frozen then unfrozen, zeros) x random valid non-default hyperparameters x a save/load mid-run (into
the same or a converted storage). Each is run under its execution and under ``execution="eager"`` on the
same gradients; parameters and every decoded state buffer must agree. Eager is also checked against an
independent implementation where one exists (``torch.optim.AdamW`` and ``torch.optim.SGD``).

``HF_OPTIM_FUZZ=20`` (``make fuzz``) draws 20x as many configurations. Compiled configurations are the
slow ones (each new configuration compiles): only a few are drawn, from a small set whose graphs repeat.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field

import pytest
import torch
from helpers import roundtrip

import hf_optim
from hf_optim.kernels import native
from hf_optim.plan import compiler_available
from hf_optim.rules.registry import builtin_rules
from hf_optim.state import CODECS, BlockwiseCodec

FUZZ = max(1, int(os.environ.get("HF_OPTIM_FUZZ", "1")))
#: configurations per run: eager-fast paths (native, auto, paged) and compiled ones
FAST_CASES = 40 * FUZZ
COMPILED_CASES = 2 * FUZZ
STEPS = 6

#: every built-in rule, with its public class (read from the rule registry)
RULES = {rule.name: hf_optim.get_spec(rule.name).load_class() for rule in builtin_rules()}
LAYOUTS = ("contiguous", "transposed", "sliced", "scalar", "ragged", "under_block")
GRAD_PATTERNS = ("dense", "none_some_steps", "frozen_then_unfrozen", "zeros")


def _near(key: str, example, default, rng: random.Random):
    """A value near the rule's example: numbers scaled, betas moved in (0, 1), weight decay and
    zero-default values sometimes at 0 (a decay left at 0 hides decay bugs; one always on hides the branch)."""
    if example is None or isinstance(example, str) or (isinstance(example, tuple) and not key.endswith("betas")):
        return example  # a choice or a structural tuple (Muon's adjust_lr_fn, ns_coefficients): the example's
    if isinstance(example, tuple):
        return tuple(1 - (1 - b) * rng.uniform(0.5, 1.5) for b in example)
    if isinstance(example, int):
        return example + rng.randint(0, 2)
    if (key == "weight_decay" or default == 0) and rng.random() < 0.25:
        return 0.0
    return example * rng.uniform(0.5, 1.5)


def hyperparameters(rule: str, rng: random.Random) -> dict:
    """Valid, non-default values for every numeric hyperparameter (drawn around the rule's ``example``) and
    a random flag choice; redrawn until the rule accepts the set (e.g. SGD's nesterov needs zero dampening)."""
    spec = RULES[rule].rule
    for _ in range(50):
        hp = {key: _near(key, value, spec.defaults[key], rng) for key, value in spec.example.items()}
        hp.update({flag: (rng.random() < 0.3) != spec.defaults[flag] for flag in sorted(spec.flag_names)
                   if isinstance(spec.defaults[flag], bool)})  # flip 30%
        try:
            spec.validate({**spec.defaults, **hp})
        except ValueError:
            continue
        return hp
    raise AssertionError(f"no valid draw around {rule}'s example {spec.example}")


@dataclass
class Case:
    seed: int
    rule: str
    storage: str
    placement: str
    execution: str
    dtype: torch.dtype
    layouts: tuple[str, ...]
    grads: str
    hp: dict = field(default_factory=dict)
    reload: str | None = None  # None, "same" or another storage name

    def __str__(self) -> str:
        return (f"seed={self.seed} {self.rule} {self.storage} {self.placement} {self.execution} "
                f"{str(self.dtype).removeprefix('torch.')} {','.join(self.layouts)} {self.grads} reload={self.reload} "
                f"{self.hp}")


def draw(seed: int, executions: tuple[str, ...]) -> Case:
    rng = random.Random(seed)
    rule = rng.choice(sorted(RULES))
    execution = rng.choice(executions)
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    storage = rng.choice(["fp32", "bf16", "8bit"])
    if dtype == torch.float64 and storage == "8bit":
        storage = "fp32"  # refused at construction: test_float64_with_8bit_state_is_refused
    native_storage = storage in ("fp32", "8bit") and dtype in (torch.float32, torch.bfloat16)
    if execution == "native" and (native.rule_unsupported(RULES[rule].rule) is not None or not native_storage):
        execution = "auto"  # execution="native" refuses these at the first step (tests/test_native.py)
    layouts = tuple(rng.sample(LAYOUTS, k=3))
    reload = rng.choice([None, None, "same", "fp32", "8bit", "bf16"])
    if reload == "8bit" and dtype == torch.float64:
        reload = "same"
    if reload == "bf16" and execution == "native":
        reload = "fp32"  # native kernels store fp32 or 8-bit state; bf16 state is refused at the first step
    return Case(seed, rule, storage, rng.choice(["device", "device", "paged"]), execution, dtype, layouts,
                rng.choice(GRAD_PATTERNS), hyperparameters(rule, rng), reload)


def make_params(case: Case) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(case.seed)
    out = []
    for layout in case.layouts:
        def randn(*shape):
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype)

        if layout == "contiguous":
            t = randn(24, 300)
        elif layout == "transposed":
            t = randn(40, 160).t()
        elif layout == "sliced":
            t = randn(30, 520)[:, 5:517:2]  # a strided view of 256 columns
        elif layout == "scalar":
            t = randn()
        elif layout == "ragged":
            t = randn(3 * 256 + 77)
        else:  # under the block
            t = randn(5, 31)
        out.append(torch.nn.Parameter(t))  # keeps the view's strides
    return out


def gradients(case: Case, params: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(case.seed + 1)
    steps = []
    for step in range(STEPS):
        row: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if case.grads == "none_some_steps" and (step + i) % 3 == 1:
                g = None
            elif case.grads == "frozen_then_unfrozen" and i == 0 and 1 <= step <= 3:
                g = None
            elif case.grads == "zeros" and step % 2 == 1:
                g = torch.zeros_like(p)
            row.append(g)
        steps.append(row)
    return steps


def optimizer(case: Case, params, execution: str, placement: str, storage: str, tmp_path):
    options = {"state_precision": storage}
    if storage == "8bit":
        options["min_8bit_size"] = 0
    if placement == "paged":
        options.update(placement="paged", paged_budget=0, paged_dir=str(tmp_path))
    return RULES[case.rule](params, execution=execution, **case.hp, **options)


def run(case: Case, execution: str, placement: str, tmp_path):
    """The case's parameters after STEPS steps (with the mid-run save/load) and the final optimizer."""
    params = make_params(case)
    grads = gradients(case, params)
    opt = optimizer(case, params, execution, placement, case.storage, tmp_path)
    for step, row in enumerate(grads):
        if step == STEPS // 2 and case.reload is not None:
            storage = case.storage if case.reload == "same" else case.reload
            saved = roundtrip(opt.state_dict())
            opt = optimizer(case, params, execution, placement, storage, tmp_path)
            opt.load_state_dict(saved)
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def decoded(opt, p) -> dict[str, torch.Tensor]:
    """Every state buffer of ``p`` as fp64 values, whatever its storage (8-bit codes decoded)."""
    state = opt.state[p]
    out = {"step": state["step"].double()}
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    name = dict((id(q), n) for n, q in opt._named(group))[id(p)]
    flat = {k: v.reshape(-1) if k != "step" else v for k, v in state.items()}
    for buffer, codec in opt._layout(p, name, group):
        out[buffer.name] = codec.decode(flat, buffer, p.numel()).double().reshape(-1)
    if "kahan_comp" in state:
        out["kahan_comp"] = state["kahan_comp"].double().reshape(-1)
    return out


def tolerance(case: Case) -> tuple[float, float]:
    """(rtol, atol) for a path against eager: the rounding of fused arithmetic, through the parameter dtype."""
    if case.dtype == torch.float64:
        return 1e-12, 1e-12
    if case.dtype == torch.float32:
        return 1e-5, 1e-6
    return 1e-2, 1e-2  # one bf16/fp16 rounding step of the parameter may differ


def assert_same(case: Case, ours, theirs) -> None:
    (params_a, opt_a), (params_b, opt_b) = ours, theirs
    rtol, atol = tolerance(case)
    # Lion's and the SGD/LARS-free sign flips aside, every path rounds differently only in its last bits;
    # a sign-based rule may move an element by 2 lr where a moment sits at 0 within that rounding
    sign_slack = 2 * case.hp["lr"] * STEPS if case.rule == "lion" else 0.0
    quantized = isinstance(CODECS[opt_a.param_groups[0]["state_precision"]], BlockwiseCodec)
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, case)
        close = torch.isclose(a.double(), b.double(), rtol=rtol, atol=atol)
        if sign_slack:
            far = (a.double() - b.double()).abs() > sign_slack + atol
            assert not far.any() and close.double().mean() > 0.99, f"param {i}: {case}"
        elif quantized:
            # a value on an 8-bit code boundary may round to the neighbouring code on one path (the fused
            # arithmetic's last bit decides), moving that element by about lr x one code for a step: at most
            # one element in a thousand (one in a smaller tensor), each within 2 lr; every other element exact
            far = ~close
            limit = max(1, a.numel() // 1000)
            off = (a.double() - b.double()).abs()
            assert int(far.sum()) <= limit and (off[far] <= 2 * case.hp["lr"]).all(), (
                f"param {i}: {int(far.sum())} elements off (max {off.max():.3g}), allowed {limit}: {case}")
        else:
            assert close.all(), f"param {i}: max diff {(a.double() - b.double()).abs().max():.3g}: {case}"
        state_a, state_b = decoded(opt_a, a), decoded(opt_b, b)
        assert state_a.keys() == state_b.keys(), (i, case)
        for key, value in state_b.items():
            if key == "kahan_comp":
                continue  # follows the parameter's last bit, checked through it
            scale = value.abs().max().item() if value.numel() else 0.0
            slack = (2e-2 * scale if quantized or case.dtype not in (torch.float32, torch.float64) else 0.0)
            mine = state_a[key]
            if sign_slack:
                continue  # the moments are stepped identically; the parameter check above bounds the rest
            ok = torch.isclose(mine, value, rtol=max(rtol, 1e-5), atol=max(atol, slack)).double().mean()
            assert ok > 0.999, f"param {i} {key}: {case}"


FAST = [draw(seed, ("native", "auto", "auto")) for seed in range(FAST_CASES)]


def layerwise_case(seed: int) -> Case:
    """A drawn case on a layer-wise native kernel (a norm pass, then the update): over fp32 state the norm pass
    stores the new moments for the update pass, over 8-bit state it writes nothing. The plain draw reaches these
    kernels a few times in 40, rarely with fp32 state."""
    case = draw(30_000 + seed, ("native",))
    rng = random.Random(30_000 + seed)
    rule = rng.choice(sorted(name for name, kernel in native.KERNELS.items() if kernel.item_coefficients))
    return Case(**{**case.__dict__, "rule": rule, "hp": hyperparameters(rule, rng), "execution": "native",
                   "storage": rng.choice(["fp32", "fp32", "8bit"]),
                   "dtype": rng.choice([torch.float32, torch.bfloat16]),
                   "reload": rng.choice([None, "same", "fp32", "8bit"])})


LAYERWISE = [layerwise_case(seed) for seed in range(6 * FUZZ)]


def compiled_case(seed: int) -> Case:
    """A drawn case trimmed to what one compiled graph serves: 1-D working layouts (every size shares
    a dynamic-shape graph), one storage for the whole run (a converted reload would compile another)."""
    case = draw(10_000 + seed, ("compiled",))
    rng = random.Random(seed)
    rule = ("adamw", "lamb")[seed % 2]
    return Case(**{**case.__dict__, "rule": rule, "hp": hyperparameters(rule, rng),
                   "dtype": rng.choice([torch.float32, torch.bfloat16]),
                   "layouts": tuple(rng.sample(["contiguous", "ragged", "under_block"], k=2)),
                   "reload": rng.choice([None, "same"])})


COMPILED = [compiled_case(seed) for seed in range(COMPILED_CASES)]


@pytest.mark.parametrize("case", FAST + LAYERWISE, ids=str)
def test_native_auto_and_paged_match_eager(case, tmp_path):
    ours = run(case, case.execution, case.placement, tmp_path)
    eager = run(case, "eager", "device", tmp_path)
    assert_same(case, ours, eager)


#: layouts whose parameters the native kernel takes as they are (contiguous), so a group can reuse its kernel calls
RAW_LAYOUTS = {"contiguous", "scalar", "ragged", "under_block"}


def cached_case(seed: int) -> Case:
    """A drawn case trimmed to what the bucket cache takes: a native rule and storage, fp32/bf16 parameters the
    kernel reads as they are, the device placement (the plain draw reaches this corner too rarely to rely on)."""
    case = draw(40_000 + seed, ("native",))
    rng = random.Random(40_000 + seed)
    rule = rng.choice(sorted(native.KERNELS))
    return Case(**{**case.__dict__, "rule": rule, "hp": hyperparameters(rule, rng), "execution": "native",
                   "placement": "device", "storage": rng.choice(["fp32", "8bit"]),
                   "dtype": rng.choice([torch.float32, torch.bfloat16]),
                   "layouts": tuple(rng.sample(sorted(RAW_LAYOUTS), k=3)),
                   "reload": rng.choice([None, "same", "fp32", "8bit"]),
                   # a different set of parameters with gradients every step rebuilds the cache every step
                   "grads": rng.choice(["dense", "zeros", "frozen_then_unfrozen"])})


CACHED = [cached_case(seed) for seed in range(4 * FUZZ)]


@pytest.mark.parametrize("case", CACHED, ids=str)
def test_drawn_cases_step_from_the_bucket_cache_as_eager_does(case, tmp_path):
    """The seam between the ordinary native path and the bucket cache (hf_optim.buckets): drawn cases that the
    cache can take must really be stepped from it, and still match eager."""
    ours = run(case, "native", "device", tmp_path)
    assert ours[1]._buckets.hits > 0, f"the bucket cache never stepped: {case}"
    assert_same(case, ours, run(case, "eager", "device", tmp_path))


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("case", COMPILED, ids=str)
def test_compiled_matches_eager(case, tmp_path):
    ours = run(case, "compiled", case.placement, tmp_path)
    eager = run(case, "eager", "device", tmp_path)
    assert_same(case, ours, eager)


# --- eager against independent implementations -------------------------------------------------


def torch_reference(case: Case, params):
    hp = dict(case.hp)
    if case.rule == "adamw":
        return torch.optim.AdamW(params, foreach=False, **hp)
    return torch.optim.SGD(params, foreach=False, **hp)


REFERENCE_CASES = [
    Case(**{**draw(20_000 + seed, ("eager",)).__dict__, "rule": rule, "storage": "fp32", "placement": "device",
            "dtype": dtype, "hp": hyperparameters(rule, random.Random(seed))})
    for seed in range(12 * FUZZ)
    for rule, dtype in [(("adamw", "sgd")[seed % 2], (torch.float32, torch.float64)[(seed // 2) % 2])]
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_eager_matches_torch_optim(case, tmp_path):
    case = copy.copy(case)
    case.reload = "same" if case.reload is not None else None
    ours_params, ours = run(case, "eager", "device", tmp_path)
    ref_params = make_params(case)
    ref = torch_reference(case, ref_params)
    for row in gradients(case, ref_params):
        for p, g in zip(ref_params, row):
            p.grad = None if g is None else g.clone()
        ref.step()
    rtol, atol = (1e-12, 1e-12) if case.dtype == torch.float64 else (1e-5, 1e-6)
    for i, (a, b) in enumerate(zip(ours_params, ref_params)):
        assert torch.allclose(a.detach(), b.detach(), rtol=rtol, atol=atol), f"param {i}: {case}"
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            theirs = ref.state[b].get(key)
            if theirs is not None:
                assert ours.state[a][key].dtype == theirs.dtype, (key, case)
                torch.testing.assert_close(ours.state[a][key], theirs, rtol=rtol, atol=atol)


def test_float64_with_8bit_state_is_refused():
    with pytest.raises(ValueError, match=r"Invalid state_precision for param 0: .*8 bits.*float64"):
        hf_optim.AdamW([torch.zeros(5000, dtype=torch.float64)], state_precision="8bit")
    # small float64 tensors keep full-precision state under 8bit: allowed, and float64
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = hf_optim.AdamW([p], state_precision="8bit")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64


def test_the_draw_covers_every_axis():
    cases = FAST + COMPILED + REFERENCE_CASES
    seen = {
        "rule": {c.rule for c in cases}, "storage": {c.storage for c in cases},
        "placement": {c.placement for c in cases}, "execution": {c.execution for c in cases},
        "dtype": {c.dtype for c in cases}, "layout": {lay for c in cases for lay in c.layouts},
        "grads": {c.grads for c in cases}, "reload": {c.reload for c in cases},
    }
    assert seen["rule"] == set(RULES)
    assert seen["storage"] == {"fp32", "bf16", "8bit"}
    assert seen["placement"] == {"device", "paged"}
    assert seen["execution"] >= {"native", "auto", "compiled", "eager"}
    assert seen["dtype"] == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert seen["layout"] == set(LAYOUTS) and seen["grads"] == set(GRAD_PATTERNS)
    assert seen["reload"] == {None, "same", "fp32", "8bit", "bf16"}
    assert math.isfinite(sum(c.hp["lr"] for c in cases))
