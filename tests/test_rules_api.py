"""Every built-in rule (read from the rule registry): the API bar (TESTING.md rows 1, 2, 6).

Bad input raises at construction naming key and value; every accepted
hyperparameter changes the update; every rule goes downhill; a state dict
saved mid-run resumes in exact lockstep. All eager: the compiled path is
checked against eager in ``test_rules.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import quadratic_params, roundtrip, set_grads

import hf_optim
from hf_optim.rules.registry import builtin_rules

#: every built-in rule (tests/test_register_rule.py checks the same for a rule registered at run time)
RULES = [rule.name for rule in builtin_rules()]

#: non-default settings per rule (each rule's own ``example``), the base of the "every kwarg changes the update" check
BASE = {rule.name: dict(rule.example) for rule in builtin_rules()}


def build(name, params, **hp):
    return hf_optim.get_spec(name).build(params, execution="eager", **hp)


# --- row 1: bad input ----------------------------------------------------------------------

BAD = [
    ("lion", {"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),
    ("lion", {"betas": (0.9, 1.5)}, ValueError, r"Invalid beta parameter at index 1: 1\.5"),
    ("lion", {"betas": (0.9,)}, ValueError, r"Invalid betas: \(0\.9,\) \(expected a tuple of 2 floats\)"),
    ("lion", {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0\.1"),
    ("lion", {"eps": 1e-8}, TypeError, r"Lion got unexpected keyword argument\(s\) 'eps'; valid: .*betas"),
    ("lamb", {"eps": -1.0}, ValueError, r"Invalid epsilon value: -1\.0"),
    ("lamb", {"bias_correction": "False"}, ValueError, r"Invalid bias_correction value: 'False' \(expected True"),
    ("lamb", {"exclude_bias_and_norm": 1}, ValueError, r"Invalid exclude_bias_and_norm value: 1 \(expected True"),
    ("lamb", {"max_grad_norm": 1.0}, TypeError, r"LAMB got unexpected keyword argument\(s\) 'max_grad_norm'"),
    ("lars", {"momentum": 1.5}, ValueError, r"Invalid momentum value: 1\.5 \(expected a number in \[0, 1\]\)"),
    ("lars", {"dampening": -0.1}, ValueError, r"Invalid dampening value: -0\.1"),
    ("lars", {"trust_coefficient": -1e-3}, ValueError, r"Invalid trust_coefficient value: -0\.001"),
    ("lars", {"nesterov": "yes"}, ValueError, r"Invalid nesterov value: 'yes'"),
    ("stable_adamw", {"betas": (1.0, 0.99)}, ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    ("stable_adamw", {"eps": -1e-6}, ValueError, r"Invalid epsilon value: -1e-06"),
    ("adan", {"betas": (0.9, 0.99)}, ValueError, r"Invalid betas: \(0\.9, 0\.99\) \(expected a tuple of 3 floats\)"),
    ("adan", {"betas": (0.98, 0.92, 1.0)}, ValueError, r"Invalid beta parameter at index 2: 1\.0"),
    ("ranger", {"k": 0}, ValueError, r"Invalid k value: 0 \(expected an integer >= 1\)"),
    ("ranger", {"k": 2.5}, ValueError, r"Invalid k value: 2\.5"),
    ("ranger", {"alpha": 1.5}, ValueError, r"Invalid alpha value: 1\.5 \(expected a number in \[0, 1\]\)"),
    ("sgd", {"momentum": -1.0}, ValueError, r"Invalid momentum value: -1\.0"),
    ("sgd", {"nesterov": True}, ValueError, r"Nesterov momentum requires a momentum and zero dampening"),
    ("sgd", {"foreach": True}, TypeError, r"SGD got unexpected keyword argument\(s\) 'foreach'"),
]


@pytest.mark.parametrize(("name", "kwargs", "exc", "match"), BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD])
def test_bad_input_raises_at_construction(name, kwargs, exc, match):
    cls = hf_optim.get_spec(name).load_class()  # the class itself: no optim_args coercion in between
    with pytest.raises(exc, match=match):
        cls([torch.zeros(3, requires_grad=True)], execution="eager", **kwargs)


@pytest.mark.parametrize("name", RULES)
def test_bad_value_in_a_param_group_raises(name):
    groups = [
        {"params": [torch.zeros(3, requires_grad=True)]},
        {"params": [torch.zeros(2, requires_grad=True)], "lr": -1},
    ]
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1"):
        build(name, groups)


# --- row 1: every accepted kwarg changes the update -----------------------------------------


def _variants(name):
    """One changed value per hyperparameter (each beta separately)."""
    rule = hf_optim.get_spec(name).load_class().rule
    hp = {**rule.defaults, **BASE[name]}
    for key, value in rule.defaults.items():
        if isinstance(value, bool):
            yield key, {**hp, key: not hp[key]}
        elif isinstance(value, tuple):
            for i in range(len(value)):
                betas = list(hp[key])
                betas[i] *= 0.9
                yield f"{key}[{i}]", {**hp, key: tuple(betas)}
        elif isinstance(value, int):  # a count (Ranger's k)
            yield key, {**hp, key: hp[key] + 1}
        elif value is None or isinstance(value, str):  # a choice (Muon's adjust_lr_fn, adamw_lr=None): back to it
            yield key, {**hp, key: value}
        else:
            yield key, {**hp, key: hp[key] * 0.5 if hp[key] else 0.1}


CHANGES = [(name, key, hp) for name in RULES for key, hp in _variants(name)]
#: gradients scaled where a hyperparameter acts only on small ones (Muon's eps floors the gradient's norm)
GRAD_SCALE = {("muon", "eps"): 1e-6}


@pytest.mark.parametrize(("name", "key", "hp"), CHANGES, ids=[f"{c[0]}-{c[1]}" for c in CHANGES])
def test_every_accepted_kwarg_changes_the_update(name, key, hp):
    if name == "sgd" and key == "nesterov":
        hp = {**hp, "dampening": 0.0}  # torch's rule: nesterov needs zero dampening
    base = {**hf_optim.get_spec(name).load_class().rule.defaults, **BASE[name]}
    if name == "sgd" and key == "nesterov":
        base = {**base, "dampening": 0.0}
    results = []
    for setting in (base, hp):
        params = [p.requires_grad_() for p in quadratic_params(shapes=((6, 4), (6,)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Lion's lr advice
            opt = build(name, params, **setting)
        for step in range(8):  # Ranger's rectified branch starts at step 6 (beta2 0.98)
            set_grads(params, step)
            for p in params:
                p.grad.mul_(GRAD_SCALE.get((name, key), 1.0))
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
    assert not torch.allclose(results[0], results[1], atol=1e-7, rtol=1e-6), f"{name}: {key} changed nothing"


# --- row 2: downhill on (W·x + b)^2 -----------------------------------------------------------

#: a quick-descent setting per rule where its example (the default for a rule not listed) descends too slowly
DOWNHILL = {"adamw": {"lr": 5e-2}, "lion": {"lr": 3e-2}, "lamb": {"lr": 5e-2},
            "lars": {"lr": 0.5, "trust_coefficient": 0.1}, "stable_adamw": {"lr": 5e-2}, "adan": {"lr": 5e-2},
            "ranger": {"lr": 2e-1}, "sgd": {"lr": 5e-2, "momentum": 0.9}, "muon": {"lr": 0.1, "adamw_lr": 5e-2}}


@pytest.mark.filterwarnings("ignore:Lion got")
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name", RULES)
def test_goes_downhill(name, contiguous, schedule):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    w = torch.randn(4, 8, generator=gen) if contiguous else torch.randn(8, 4, generator=gen).t()
    w.requires_grad_()
    b = torch.randn(4, generator=gen).requires_grad_()
    assert w.is_contiguous() == contiguous
    opt = build(name, [w, b], **DOWNHILL.get(name, BASE[name]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20) if schedule else None
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((x @ w.T + b) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


# --- row 6: state dict lockstep ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Lion got")
@pytest.mark.parametrize("name", RULES)
def test_state_dict_resume_is_exact(name):
    hp = {**BASE[name], "k": 3} if name == "ranger" else BASE[name]
    params = [p.requires_grad_() for p in quadratic_params()]
    opt = build(name, params, **hp)
    for step in range(10):
        set_grads(params, step)
        opt.step()
    saved = roundtrip(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = build(name, resumed_params, **hp)
    resumed.load_state_dict(saved)
    for step in range(10, 20):
        for a, b in zip(params, resumed_params):
            gen = torch.Generator().manual_seed(step)
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == resumed.state[b].keys()
        for key, value in opt.state[a].items():
            assert torch.equal(value, resumed.state[b][key]), (name, key)
    if name == "ranger":
        assert "slow_param" in saved["state"][0]


def test_registry_names_and_transformers_aliases():
    for rule in builtin_rules():
        cls = getattr(hf_optim, rule.__name__)  # the public class, named as the rule class
        assert cls.rule is rule and cls.__module__ == "hf_optim.optimizers" and cls.__qualname__ == rule.__name__
        for name in (rule.name, rule.name + "_32bit"):
            spec = hf_optim.get_spec(name)
            assert spec.load_class() is cls and spec.state_precision == "fp32"
    assert hf_optim.get_spec("lion_32bit").load_class() is hf_optim.Lion
    assert hf_optim.get_spec("paged_lion_32bit").placement == "paged"
    assert hf_optim.SGD.rule.defaults["lr"] == torch.optim.SGD([torch.zeros(1)]).defaults["lr"]


def test_every_optimizer_class_documents_its_rule():
    # help(hf_optim.AdamW) shows the rule module's formula and paper, then where the engine options are
    import sys

    for cls in (hf_optim.get_spec(rule.name).load_class() for rule in builtin_rules()):
        module_doc = sys.modules[cls.rule.__module__].__doc__
        assert module_doc and cls.__doc__.startswith(module_doc) and "hf_optim.Optimizer" in cls.__doc__, cls
