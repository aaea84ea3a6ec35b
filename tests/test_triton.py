"""The Triton (CUDA) step, run by Triton's CPU interpreter: against the eager step, without a GPU.

``TRITON_INTERPRET=1`` is set before triton is first imported, so the very
kernels a GPU would compile run here on CPU tensors. Every rule x state
storage (fp32, bf16, 8-bit) x parameter dtype (fp32, bf16 with Kahan) steps a
bucket of ragged and whole-block tensors (whole and masked tiles, several
tensors per launch) with non-default hyperparameters, and every state tensor
must equal the eager step's bit for bit; parameters too, up to the last-place
differences the coefficient math and (LAMB, LARS, StableAdamW) the norms'
summation order allow. Plus: NaN/Inf gradients in 8-bit blocks, structural
flags, parameters at different step counts in one launch, mixed gradient and
fp16 parameter dtypes, strided and misaligned parameters, paged state, the
engine's choice of mode and its errors; the differential suite's drawn configurations
(tests/test_differential.py's draw, on this backend); what only a compiler shows (every
rule's kernel built for sm_90, its PTX checked: ``triton_ptx_check.py``); the
quantizer's tolerance of the GPU's fast square root; and the device script's
dry run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the kernels are interpreted if TRITON_INTERPRET=1 when they are defined; the setting is then put back (and
# set again around each test here), so the rest of the suite and its subprocesses never see it
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from hf_optim.kernels import triton_rules  # noqa: F401
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import hf_optim  # noqa: E402
from hf_optim.kernels import triton_step  # noqa: E402
from hf_optim.kernels.triton_step import RULES  # noqa: E402
from hf_optim.rules.registry import builtin_rules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not triton_step.interpreting(), reason="triton was imported before, not interpreted")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton also reads TRITON_INTERPRET when a kernel runs: set for these tests only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

#: non-default hyperparameters per rule: its own ``example`` (a decay or beta left at its default can hide a bug)
HP = {rule.name: dict(rule.example) for rule in builtin_rules()}
CLASSES = {rule.name: hf_optim.get_spec(rule.name).load_class() for rule in builtin_rules()}


@pytest.mark.parametrize("rule", builtin_rules(), ids=lambda r: r.name)
def test_every_builtin_rule_has_a_triton_kernel(rule):
    """A built-in rule without a kernel (it steps compiled on CUDA) shows as an xfail in the summary, not as a
    silent gap; one with a kernel has every structural flag of the rule in it."""
    if rule.name not in RULES:
        pytest.xfail(f"no triton kernel for {rule.name}: it runs compiled on CUDA")
    missing = sorted(rule.flag_names - triton_step.FLAGS.get(rule.name, frozenset()))
    assert not missing, f"the triton {rule.name} kernel lacks the flags {missing}"
#: one bucket: a ragged size over two tiles (one masked), a whole-block matrix, a small vector (biases)
SHAPES = [(1317,), (6, 256), (300,)]
STEPS = 3


def gradients(shapes, steps, seed=0, poison=False, dtype=torch.float32):
    """Gradients with per-tensor scales spread over decades; NaN/Inf entries on step 2 with ``poison``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * math.exp(2 * torch.randn((), generator=gen).item())
            if poison and step == 1:
                g.view(-1)[3], g.view(-1)[260], g.view(-1)[-1] = float("nan"), float("inf"), -float("inf")
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


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, in the interpreter
@pytest.mark.parametrize("rule", ["adamw", "lion", "adan"])
def test_nonfinite_gradients_in_8bit_blocks(rule):
    """NaN/Inf entries: confined to their elements exactly as eager confines them (codes, scales, params)."""
    grads = gradients(SHAPES, 3, poison=True)
    ours = run("triton", rule, grads, state_precision="8bit")
    reference = run("eager", rule, grads, state_precision="8bit")
    assert_same(ours, reference)
    if rule != "lion":  # (Lion's sign is 0 for NaN: its step stays finite, in eager too)
        assert not torch.isfinite(ours[0][0]).all()  # the fault stays visible in the parameter


@pytest.mark.parametrize(
    ("rule", "options"),
    [
        ("adamw", {"amsgrad": True, "maximize": True}),
        ("sgd", {"nesterov": True, "maximize": True, "dampening": 0.0}),
        ("sgd", {"momentum": 0.0}),
        ("lamb", {"bias_correction": False, "exclude_bias_and_norm": False}),
        ("lars", {"nesterov": True, "dampening": 0.0, "exclude_bias_and_norm": False}),
        ("lars", {"momentum": 0.0}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_flags_match_eager(rule, options, precision):
    grads = gradients(SHAPES, STEPS)
    ours = run("triton", rule, grads, state_precision=precision, **options)
    reference = run("eager", rule, grads, state_precision=precision, **options)
    assert_same(ours, reference)


def stepped_with_gaps(execution, rule, dtype=torch.float32, grad_dtype=None, **kwargs):
    """Parameter 1 is frozen for the first two steps (grad None), so one launch holds different step counts;
    parameter 2 may get gradients of another dtype."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]
    if grad_dtype:
        params[2].grad_dtype = None  # torch >= 2.10 checks a gradient's dtype against this
    opt = CLASSES[rule](params, execution=execution, **{**HP[rule], **kwargs})
    for step, step_grads in enumerate(gradients(SHAPES, 5)):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if (i == 1 and step < 2) else g.to(grad_dtype if (grad_dtype and i == 2) else dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("rule", ["adamw", "ranger", "sgd", "stable_adamw"])
def test_parameters_at_different_step_counts_share_a_launch(rule):
    ours = stepped_with_gaps("triton", rule, state_precision="8bit", min_8bit_size=1)
    reference = stepped_with_gaps("eager", rule, state_precision="8bit", min_8bit_size=1)
    assert [ours[1].state[p]["step"].item() for p in ours[0]] == [5.0, 3.0, 5.0]
    assert_same(ours, reference)


def test_fp32_gradients_of_bf16_parameters_and_fp16_parameters():
    ours = stepped_with_gaps("triton", "adamw", torch.bfloat16, grad_dtype=torch.float32)
    reference = stepped_with_gaps("eager", "adamw", torch.bfloat16, grad_dtype=torch.float32)
    assert_same(ours, reference)
    ours = stepped_with_gaps("triton", "lion", torch.float16, state_precision="bf16")
    reference = stepped_with_gaps("eager", "lion", torch.float16, state_precision="bf16")
    assert_same(ours, reference)


def test_bf16_parameters_without_kahan():
    grads = gradients(SHAPES, STEPS, dtype=torch.bfloat16)
    ours = run("triton", "adamw", grads, torch.bfloat16, kahan_sum=False, state_precision="8bit")
    reference = run("eager", "adamw", grads, torch.bfloat16, kahan_sum=False, state_precision="8bit")
    assert "kahan_comp" not in ours[1].state[ours[0][0]]
    assert_same(ours, reference)


def test_strided_and_misaligned_parameters_step_correctly():
    """A transposed parameter is stepped as a contiguous copy and written back; a view at an odd offset
    (not 16-byte aligned) is left to the eager step. Both equal eager."""
    def build(execution):
        gen = torch.Generator().manual_seed(4)
        base = torch.randn(40, 33, generator=gen)
        flat = torch.randn(1025, generator=gen)
        params = [base.t(), flat[1:]]  # non-contiguous; contiguous but 4 bytes off alignment
        opt = hf_optim.AdamW(params, execution=execution, state_precision="8bit", min_8bit_size=1, **HP["adamw"])
        for step_grads in gradients([p.shape for p in params], 3):
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        return params, opt

    ours, reference = build("triton"), build("eager")
    assert not ours[0][0].is_contiguous() and ours[0][1].data_ptr() % 16
    assert_same(ours, reference)


def test_paged_state_steps_as_on_device(tmp_path):
    """Paged placement streams each state in around its step: the same launch, the same numbers."""
    grads = gradients(SHAPES, STEPS)
    paged = run("triton", "adamw", grads, state_precision="8bit", placement="paged", paged_budget=1024,
                paged_dir=str(tmp_path))
    device = run("triton", "adamw", grads, state_precision="8bit")
    assert_same(paged, device, exact_params=True)


def test_engine_chooses_triton_only_where_asked_or_on_cuda():
    def with_grad(dtype=torch.float32):
        p = torch.randn(64, 64, dtype=dtype)
        p.grad = torch.randn(64, 64, dtype=dtype)
        return [p]

    auto = hf_optim.AdamW(with_grad(), execution="auto")
    auto.step()
    assert auto._modes and "triton" not in auto._modes.values()  # on CPU, "auto" never picks the interpreter
    triton_opt = hf_optim.AdamW(with_grad(), execution="triton")
    triton_opt.step()
    assert list(triton_opt._modes.values()) == ["triton"]
    with pytest.raises(ValueError, match=r"Invalid execution: 'triton' for AdamW: .*not torch.float64"):
        hf_optim.AdamW(with_grad(torch.float64), execution="triton").step()


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from hf_optim.optimizers import AdamW\n"
        "p = torch.randn(8); p.grad = torch.randn(8)\n"
        "try:\n"
        "    AdamW([p], execution='triton').step()\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "assert 'hf_optim.kernels.triton_rules' not in __import__('sys').modules  # no kernel was defined\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Invalid execution: 'triton' for AdamW: the triton kernel runs on CUDA (on CPU only under " \
           "TRITON_INTERPRET=1, for tests)" in result.stdout


@pytest.mark.slow
def test_kernels_compile_for_the_gpu_without_one():
    """Triton's real compiler (no device needed) builds every rule's kernel for sm_90: what the interpreter
    cannot show. The PTX must have no fused multiply-adds, only correctly rounded division and square root,
    and vectorized global loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_ptx_check.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all kernels compiled" in result.stdout


@pytest.mark.slow
def test_gpu_check_dry_run():
    """benchmarks/gpu_check.py runs its every section on CPU at tiny sizes, so the device script cannot rot."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    verdicts = next(line for line in out.splitlines() if line.startswith("== verdicts:"))
    assert "FAIL" not in verdicts and verdicts.count("PASS") == 5, verdicts
    table = out[out.index("== step time"):].splitlines()[2:]
    for rule in ("adamw", "lion", "sgd", "adan", "ranger", "lamb", "lars", "stableadamw"):
        for state in ("fp32", "8bit"):
            for layout in ("1 tensor", "Llama list"):
                assert any(line.split()[:2] == ["hf", rule] and f" {state} " in line and layout in line
                           for line in table), (rule, state, layout, table)
    assert sum("torch AdamW fused" in line for line in table) == 2
    assert "skipped: " in out and "bitsandbytes" in out  # what it could not run is said


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantizer_root_guess_tolerates_a_fast_square_root(signed):
    """On a GPU the kernel's root guess uses the fast (approximate) square root. Its bias, 2**-12, must keep the
    answer exact for any root off by far more than that square root's error (~2**-22): here every square root is
    off by +-2**-16, at the midpoints between levels (the hard cases) and at random code units, and the code is
    still the exact nearest level (brute force)."""
    from helpers import exact_nearest

    from hf_optim.state.blockwise import EIGHT_BIT, GUESS_BIAS

    cmap = EIGHT_BIT.signed_map if signed else EIGHT_BIT.unsigned_map
    c = torch.arange(cmap.levels, dtype=torch.float64)
    midpoints = ((c**cmap.power + (c + 1) ** cmap.power) / 2).float()
    near = torch.cat([midpoints, *(torch.nextafter(midpoints, torch.tensor(d)) for d in (0.0, float(cmap.top)))])
    u = torch.cat([near, torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * cmap.top,
                   torch.tensor([0.0, cmap.top])])
    expected = exact_nearest(cmap, u).float()
    for error in (1 + 2.0**-16, 1 - 2.0**-16):
        def fast_sqrt(x, error=error):
            return x.sqrt() * error

        root = fast_sqrt(u) if cmap.power == 2 else fast_sqrt(fast_sqrt(u))
        g = (root * GUESS_BIAS).floor().clamp(0, cmap.levels - 1)
        code = g + cmap.above_midpoint(u, g).float() + cmap.above_midpoint(u, g + 1).float()
        assert torch.equal(code, expected), (error, (code != expected).sum())


# --- the differential suite's drawn configurations, on the triton backend ----------------------------------

from test_differential import FUZZ, draw  # noqa: E402
from test_differential import assert_same as assert_same_as_eager  # noqa: E402
from test_differential import run as run_case  # noqa: E402


def _triton_case(seed: int):
    """A drawn case (rule, storage, placement, layouts, gradient pattern, hyperparameters, mid-run reload) with
    what the kernel takes: fp32/bf16/fp16 parameters (float64 ones step eagerly by design)."""
    case = draw(30_000 + seed, ("triton",))
    while case.rule not in RULES:  # a rule without a kernel (Muon) is refused by execution="triton": redraw
        case = draw(case.seed + 100_000, ("triton",))
    if case.dtype == torch.float64:
        case.dtype = torch.float32
    return case


TRITON_CASES = [_triton_case(seed) for seed in range(16 * FUZZ)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_drawn_configurations_match_eager(case, tmp_path):
    ours = run_case(case, "triton", case.placement, tmp_path)
    assert set(ours[1]._modes.values()) == {"triton"}
    assert_same_as_eager(case, ours, run_case(case, "eager", "device", tmp_path))
