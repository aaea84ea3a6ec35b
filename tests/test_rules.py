"""Every built-in rule: parity with independent implementations (``REFERENCES`` says which checks which).

Every comparison uses non-default hyperparameters (weight decay 0.1, betas
away from the defaults), 20 steps, params and state at fp32 atol 1e-6 /
rtol 1e-5. Peers store some state differently (optimi keeps bias-corrected
averages); the conversion is spelled out where it happens. LAMB has no peer
with the paper's definition (see ``hf_optim.rules.lamb``), so it is checked
against a transcription of Algorithm 2 written here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_compiled, lockstep, quadratic_params, set_grads

import hf_optim
from hf_optim.kernels import native
from hf_optim.rules.registry import builtin_rules

TOL = {"atol": 1e-6, "rtol": 1e-5}
SHAPES = ((10, 5), (10,), (3, 4, 2), ())


#: the layer-wise rules' reference tests run on the eager step and on the native kernel
EXECUTIONS = ["eager", pytest.param("native", marks=pytest.mark.skipif(
    native.library_error() is not None, reason=f"native kernel: {native.library_error()}"))]


def clones(ref):
    return [p.detach().clone().requires_grad_() for p in ref]


def assert_params(ref, ours) -> None:
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, **TOL)


#: rule -> the tests ("file::function") that check it against an independent implementation; a built-in
#: rule without one fails test_every_builtin_rule_has_an_independent_reference
REFERENCES = {
    "adamw": ["test_adamw.py::test_parity_with_torch_adamw_fp32"],
    "lion": ["test_rules.py::test_lion_matches_lion_pytorch"],
    "lamb": ["test_rules.py::test_lamb_matches_paper_algorithm"],
    "lars": ["test_rules.py::test_lars_matches_pytorch_optimizer"],
    "stable_adamw": ["test_rules.py::test_stable_adamw_matches_optimi"],
    "adan": ["test_rules.py::test_adan_matches_optimi"],
    "ranger": ["test_rules.py::test_ranger_matches_optimi"],
    "sgd": ["test_rules.py::test_sgd_matches_torch"],
    "muon": ["test_muon.py::test_eager_matches_torch_muon", "test_muon.py::test_compiled_matches_torch_muon"],
}


@pytest.mark.parametrize("rule", builtin_rules(), ids=lambda r: r.name)
def test_every_builtin_rule_has_an_independent_reference(rule):
    import importlib

    assert REFERENCES.get(rule.name), f"built-in rule {rule.name!r} has no parity test against an independent reference"
    for where in REFERENCES[rule.name]:
        module, _, function = where.partition("::")
        assert callable(getattr(importlib.import_module(module.removesuffix(".py")), function, None)), where


# --- Lion vs lion_pytorch ----------------------------------------------------------------


def test_lion_matches_lion_pytorch():
    from lion_pytorch import Lion

    hp = {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.1}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt, ours_opt = Lion(ref, **hp), hf_optim.Lion(ours, execution="eager", **hp)
    lockstep(ref_opt, ours_opt, ref, ours)
    assert_params(ref, ours)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(ours_opt.state[o]["exp_avg"], ref_opt.state[r]["exp_avg"], **TOL)
    assert ours_opt.state[ours[0]]["step"].item() == 20


# --- optimi: StableAdamW, Adan, Ranger (they store bias-corrected averages) ----------------


def _bias(beta: float, step: int) -> float:
    return 1 - beta**step


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_stable_adamw_matches_optimi(execution):
    import optimi

    hp = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-5, "weight_decay": 0.1}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = optimi.StableAdamW(ref, foreach=False, triton=False, **hp)
    ours_opt = hf_optim.StableAdamW(ours, execution=execution, **hp)
    # large gradients on some steps, so the RMS clipping actually engages
    for step in range(20):
        set_grads(ref, step)
        if step % 5 == 4:
            for p in ref:
                p.grad.mul_(30)
        for r, o in zip(ref, ours):
            o.grad = r.grad.clone()
        ref_opt.step()
        ours_opt.step()
    assert set(ours_opt._modes.values()) == {execution}
    assert_params(ref, ours)
    b1, b2 = hp["betas"]
    for r, o in zip(ref, ours):
        st = ours_opt.state[o]
        torch.testing.assert_close(st["exp_avg"] / _bias(b1, 20), ref_opt.state[r]["exp_avg"], **TOL)
        torch.testing.assert_close(st["exp_avg_sq"] / _bias(b2, 20), ref_opt.state[r]["exp_avg_sq"], **TOL)


def test_stable_adamw_clipping_engages():
    # steady gradients: RMS ~1, the same steps as AdamW; then a spike the second moment has not
    # seen: RMS >> 1 and StableAdamW's step shrinks to lr / RMS while AdamW's does not
    hp = {"lr": 1.0, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0}
    ps, pa = torch.zeros(100, requires_grad=True), torch.zeros(100, requires_grad=True)
    stable, plain = hf_optim.StableAdamW([ps], execution="eager", **hp), hf_optim.AdamW([pa], execution="eager", **hp)
    for grad in [1e-3] * 5 + [10.0]:
        before = ps.detach().clone()
        ps.grad, pa.grad = torch.full((100,), grad), torch.full((100,), grad)
        stable.step()
        plain.step()
        if grad < 1:
            torch.testing.assert_close(ps, pa, atol=1e-5, rtol=1e-5)
    stable_step, plain_step = (ps - before).abs().max(), (pa - before).abs().max()
    rms = 10.0 / (plain.state[pa]["exp_avg_sq"][0] / (1 - 0.99**6)).sqrt()
    assert rms > 2
    torch.testing.assert_close(stable_step, plain_step / rms, atol=1e-4, rtol=1e-4)


def test_adan_matches_optimi():
    import optimi

    hp = {"lr": 1e-2, "betas": (0.95, 0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = optimi.Adan(ref, foreach=False, triton=False, **hp)
    ours_opt = hf_optim.Adan(ours, execution="eager", **hp)
    lockstep(ref_opt, ours_opt, ref, ours)
    assert_params(ref, ours)
    b1, b2, b3 = hp["betas"]
    for r, o in zip(ref, ours):
        st, rs = ours_opt.state[o], ref_opt.state[r]
        torch.testing.assert_close(st["exp_avg"] / _bias(b1, 20), rs["exp_avg"], **TOL)
        torch.testing.assert_close(st["exp_avg_diff"] / _bias(b2, 20), rs["exp_avg_diff"], **TOL)
        torch.testing.assert_close(st["exp_avg_sq"] / _bias(b3, 20), rs["exp_avg_sq"], **TOL)
        torch.testing.assert_close(st["prev_grad"], -rs["prev_grad"], **TOL)  # optimi keeps it negated


def test_ranger_matches_optimi():
    import optimi

    # beta2 0.98: the RAdam rectification switches on at step 6, so both branches run; k=4 syncs 5 times
    hp = {"lr": 1e-2, "betas": (0.85, 0.98), "eps": 1e-5, "weight_decay": 0.1, "k": 4, "alpha": 0.6}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = optimi.Ranger(ref, foreach=False, triton=False, **hp)
    ours_opt = hf_optim.Ranger(ours, execution="eager", **hp)
    lockstep(ref_opt, ours_opt, ref, ours, steps=19)  # ends between syncs: slow != fast
    assert_params(ref, ours)
    b1, b2 = hp["betas"]
    for r, o in zip(ref, ours):
        st, rs = ours_opt.state[o], ref_opt.state[r]
        torch.testing.assert_close(st["exp_avg"] / _bias(b1, 19), rs["exp_avg"], **TOL)
        torch.testing.assert_close(st["exp_avg_sq"] / _bias(b2, 19), rs["exp_avg_sq"], **TOL)
        torch.testing.assert_close(st["slow_param"], rs["la_param"], **TOL)
    assert not torch.equal(ours_opt.state[ours[0]]["slow_param"], ours[0])


# --- LARS vs pytorch_optimizer, SGD vs torch ------------------------------------------------


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_pytorch_optimizer(nesterov, execution):
    from pytorch_optimizer import LARS

    hp = {"lr": 0.5, "momentum": 0.8, "weight_decay": 0.1, "trust_coefficient": 0.02, "nesterov": nesterov}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = LARS(ref, dampening=0.0 if nesterov else 0.1, foreach=False, **hp)
    ours_opt = hf_optim.LARS(ours, dampening=0.0 if nesterov else 0.1, execution=execution, **hp)
    lockstep(ref_opt, ours_opt, ref, ours)
    assert set(ours_opt._modes.values()) == {execution}
    assert_params(ref, ours)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(ours_opt.state[o]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], **TOL)


@pytest.mark.parametrize(
    "hp",
    [
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "nesterov": True, "maximize": True},
        {"lr": 0.05, "weight_decay": 0.1},  # no momentum: plain SGD
    ],
)
def test_sgd_matches_torch(hp):
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = torch.optim.SGD(ref, foreach=False, **hp)
    ours_opt = hf_optim.SGD(ours, execution="eager", **hp)
    lockstep(ref_opt, ours_opt, ref, ours)
    assert_params(ref, ours)
    if hp.get("momentum"):
        for r, o in zip(ref, ours):
            torch.testing.assert_close(ours_opt.state[o]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], **TOL)


# --- LAMB vs a transcription of the paper ----------------------------------------------------


class PaperLAMB:
    """You et al. 2020, Algorithm 2, written out per tensor (phi = identity)."""

    def __init__(self, params, lr, betas, eps, weight_decay, bias_correction=True, exclude_1d=True):
        self.params, self.lr, (self.b1, self.b2), self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.bias_correction, self.exclude_1d = bias_correction, exclude_1d
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.copy_(self.b1 * m + (1 - self.b1) * g)
            v.copy_(self.b2 * v + (1 - self.b2) * g * g)
            m_hat, v_hat = m, v
            if self.bias_correction:
                m_hat, v_hat = m / (1 - self.b1**self.t), v / (1 - self.b2**self.t)
            r = m_hat / (v_hat.sqrt() + self.eps)
            if self.exclude_1d and p.dim() <= 1:
                p.sub_(self.lr * r)
                continue
            r = r + self.wd * p
            w_norm, r_norm = p.norm().item(), r.norm().item()
            ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            p.sub_(self.lr * ratio * r)


@pytest.mark.parametrize(
    ("bias_correction", "exclude"), [(True, True), (False, True), (True, False)]
)
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_lamb_matches_paper_algorithm(bias_correction, exclude, execution):
    hp = {"lr": 1e-2, "betas": (0.85, 0.99), "eps": 1e-5, "weight_decay": 0.1}
    ref = [p.requires_grad_() for p in quadratic_params(shapes=SHAPES)]
    ours = clones(ref)
    ref_opt = PaperLAMB(ref, bias_correction=bias_correction, exclude_1d=exclude, **hp)
    ours_opt = hf_optim.LAMB(
        ours, execution=execution, bias_correction=bias_correction, exclude_bias_and_norm=exclude, **hp
    )
    lockstep(ref_opt, ours_opt, ref, ours)
    assert set(ours_opt._modes.values()) == {execution}
    assert_params(ref, ours)
    for r_m, r_v, o in zip(ref_opt.m, ref_opt.v, ours):
        torch.testing.assert_close(ours_opt.state[o]["exp_avg"], r_m, **TOL)
        torch.testing.assert_close(ours_opt.state[o]["exp_avg_sq"], r_v, **TOL)


def test_lamb_and_lars_trust_ratio_is_one_for_zero_norms():
    # a zero weight: ||p|| = 0, so LAMB takes the plain Adam step and LARS the plain momentum step
    for cls, hp in ((hf_optim.LAMB, {"weight_decay": 0.1}), (hf_optim.LARS, {"momentum": 0.0, "weight_decay": 0.1})):
        p = torch.zeros(4, 3, requires_grad=True)
        p.grad = torch.full((4, 3), 0.5)
        opt = cls([p], execution="eager", lr=0.1, **hp)
        opt.step()
        expected = -0.1 * torch.ones(4, 3) if cls is hf_optim.LAMB else -0.05 * torch.ones(4, 3)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_no_hidden_gradient_clipping_in_lamb_and_lars():
    # scaling every gradient by 1000 leaves LARS's and LAMB's matrix steps unchanged (the ratios
    # normalize), where a hidden global clip would change the excluded 1-D steps
    results = {}
    for scale in (1.0, 1000.0):
        for cls, hp in ((hf_optim.LARS, {"lr": 1.0, "momentum": 0.0}), (hf_optim.LAMB, {"lr": 0.01})):
            ps = [p.requires_grad_() for p in quadratic_params(shapes=((6, 4), (6,)))]
            set_grads(ps, 0)
            for p in ps:
                p.grad.mul_(scale)
            cls(ps, execution="eager", **hp).step()
            results[(cls.__name__, scale)] = [p.detach() for p in ps]
    torch.testing.assert_close(results[("LARS", 1.0)][0], results[("LARS", 1000.0)][0])
    start = quadratic_params(shapes=((6, 4), (6,)))[1]
    lars_1d_small = results[("LARS", 1.0)][1] - start
    lars_1d_big = results[("LARS", 1000.0)][1] - start
    torch.testing.assert_close(lars_1d_big, lars_1d_small * 1000.0)  # the bias takes the raw SGD step
    for i in (0, 1):  # LAMB: the matrix by its trust ratio, the excluded bias by Adam's own normalization
        torch.testing.assert_close(results[("LAMB", 1.0)][i], results[("LAMB", 1000.0)][i])


# --- compiled == eager ---------------------------------------------------------------------------

#: structural flags a rule's compiled graph should also be checked with (its example sets the numbers)
COMPILED_FLAGS = {"sgd": {"nesterov": True, "dampening": 0.0}, "lamb": {"bias_correction": False}}
#: every built-in rule but AdamW (its compiled parity, with a 0-d param and an unfrozen one: test_adamw.py)
COMPILED_CASES = {
    rule.name: {**rule.example, **COMPILED_FLAGS.get(rule.name, {})} for rule in builtin_rules() if rule.name != "adamw"
}


@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_equals_eager(name):
    # a matrix and a 0-d param; step 2 without a gradient for the matrix
    shapes = ((6, 5), ())
    params = {mode: [p.requires_grad_() for p in quadratic_params(shapes=shapes)] for mode in ("eager", "compiled")}
    opts = {
        mode: hf_optim.get_spec(name).build(ps, execution=mode, **COMPILED_CASES[name]) for mode, ps in params.items()
    }
    for step in range(7):
        for mode, ps in params.items():
            set_grads(ps, step)
            if step == 2:
                ps[0].grad = None
            opts[mode].step()
    for e, c in zip(params["eager"], params["compiled"]):
        torch.testing.assert_close(c, e, **TOL)
        for key, value in opts["eager"].state[e].items():
            torch.testing.assert_close(opts["compiled"].state[c][key], value, **TOL)
    assert opts["compiled"].state[params["compiled"][0]]["step"].item() == 6
    assert_compiled()


# --- guidance -----------------------------------------------------------------------------------


def test_lion_warns_for_adamw_sized_lr_and_weight_decay():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.warns(UserWarning, match=r"lr=0\.001, an AdamW-sized learning rate.*3-10x smaller lr") as record:
        hf_optim.Lion(p, lr=1e-3, weight_decay=0.1)
    assert record[0].filename == __file__  # points at the caller's line, not into hf_optim or torch
    with pytest.warns(UserWarning, match=r"weight_decay=0\.01, an AdamW-sized value.*0\.03-0\.1"):
        hf_optim.Lion(p, lr=1e-4, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_optim.Lion(p, lr=1e-4, weight_decay=0.0)  # decay off on purpose: no warning
        hf_optim.Lion(p)  # defaults: no warning


def test_translate_hparams_adamw_to_lion_and_back():
    t = hf_optim.translate_hparams(from_="adamw", to="lion", lr=3e-4, weight_decay=0.1)
    assert t.values == {"lr": 6e-5, "weight_decay": 0.5, "betas": (0.9, 0.99)}
    assert "3-10x smaller" in t.reasoning and "lr*wd" in t.reasoning
    back = hf_optim.translate_hparams(from_="lion_8bit", to="adamw", lr=6e-5, weight_decay=0.5)
    assert back.values == {"lr": 3e-4, "weight_decay": 0.1}
    assert str(t).startswith("adamw -> lion: lr=6e-05")


def test_translate_hparams_batch_scaling_and_errors():
    t = hf_optim.translate_hparams(from_="adamw", to="lamb", lr=1e-3, weight_decay=0.01, batch_size=4096,
                                   from_batch_size=256)
    assert t.values["lr"] == pytest.approx(4e-3) and "sqrt" in t.reasoning
    with pytest.raises(ValueError, match="cannot translate to='lars': LARS's lr multiplies a layer-wise trust"):
        hf_optim.translate_hparams(from_="adamw", to="lars", lr=1e-3)
    with pytest.raises(ValueError, match=r"Unknown to 'lino'; known rules: adamw, adan"):
        hf_optim.translate_hparams(from_="adamw", to="lino", lr=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        hf_optim.translate_hparams(lr=-1)
    with pytest.raises(ValueError, match="give both batch_size and from_batch_size"):
        hf_optim.translate_hparams(lr=1e-3, batch_size=64)
