"""A rule written in one file outside the package (tests/plugins/adabelief_rule.py) is a full hf_optim optimizer.

Registered with ``hf_optim.register_rule``, AdaBelief steps as ``adabelief``, ``adabelief_8bit`` and
``paged_adabelief_8bit`` under eager and compiled execution against an independent reference written
here, is accepted by ``hf_optim.TrainingArguments(optim=...)`` and trains a tiny BERT through
``hf_optim.Trainer``. The same rule installed as a package (a real dist-info with an ``hf_optim.rules``
entry point on ``sys.path``) resolves in a fresh process, and a broken plugin is a clear error naming
its entry point, not a crash. ``register_rule`` refuses malformed rules with errors that say what is
wrong, and the built-in rules pass the same checks.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_compiled, tiny_bert, tiny_dataset

import hf_optim
from hf_optim import registry
from hf_optim.plan import compiler_available
from hf_optim.rules import Buffer, Relation, UpdateRule
from hf_optim.rules.registry import builtin_rules, check_rule, unregister_rule

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))
from adabelief_rule import AdaBelief  # noqa: E402

HP = dict(AdaBelief.example)  # non-default: betas (0.85, 0.98), eps 1e-10, weight decay 0.05
SHAPES = ((48, 100), (37,), ())  # a matrix over the 8-bit threshold (4800 elements), a ragged vector, a 0-d


@pytest.fixture(scope="module", autouse=True)
def adabelief():
    hf_optim.register_rule(AdaBelief)
    yield AdaBelief
    unregister_rule("adabelief")


def reference_adabelief(params, grads_per_step, lr, betas, eps, weight_decay):
    """AdaBelief (decoupled decay, no rectification) in float64, written from the paper's Algorithm 2."""
    beta1, beta2 = betas
    ps = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    s = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            ps[i] = ps[i] * (1 - lr * weight_decay)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            s[i] = beta2 * s[i] + (1 - beta2) * (g - m[i]) ** 2 + eps
            m_hat, s_hat = m[i] / (1 - beta1**t), s[i] / (1 - beta2**t)
            ps[i] = ps[i] - lr * m_hat / (s_hat.sqrt() + eps)
    return ps, m, s


def gradients(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) for shape in SHAPES] for _ in range(steps)]


def start_params(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def run(name, execution, grads, tmp_path, **options):
    params = start_params()
    if name.startswith("paged_"):
        tmp_path.mkdir(exist_ok=True)
        options = {"paged_budget": 0, "paged_dir": str(tmp_path), **options}  # every state tensor paged out
    opt = hf_optim.create_optimizer(name, params, execution=execution, **HP, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


EXECUTIONS = ["eager", pytest.param("compiled", marks=pytest.mark.skipif(
    not compiler_available(), reason="no C++ compiler for torch.compile"))]


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_fp32_matches_the_independent_reference(execution, tmp_path):
    grads = gradients(12)
    params, opt = run("adabelief", execution, grads, tmp_path)
    assert type(opt).__name__ == "AdaBelief" and type(opt).rule is AdaBelief
    ref_params, ref_m, ref_s = reference_adabelief(start_params(), grads, **HP)
    for p, rp, rm, rs in zip(params, ref_params, ref_m, ref_s):
        torch.testing.assert_close(p.detach().double(), rp, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), rm, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["exp_avg_var"].double(), rs, atol=1e-9, rtol=1e-5)
        assert opt.state[p]["step"].item() == 12
    if execution == "compiled":
        assert_compiled()


@pytest.mark.parametrize("name", ["adabelief_8bit", "paged_adabelief_8bit"])
def test_8bit_tracks_fp32_within_quantization_error(name, tmp_path):
    """Per-step re-sync (TESTING.md row 5): from the same parameters, one 8-bit step lands within the
    quantization error of the fp32 step; the fp32 run is the one checked against the reference above."""
    grads = gradients(40, seed=3)
    p32, p8 = start_params(), start_params()
    opt32 = hf_optim.create_optimizer("adabelief", p32, execution="eager", **HP)
    paged = {"paged_budget": 0, "paged_dir": str(tmp_path)} if name.startswith("paged_") else {}
    opt8 = hf_optim.create_optimizer(name, p8, execution="eager", **HP, **paged)
    assert opt8.state_dict()["param_groups"][0]["state_precision"] == "8bit"
    abs_err, rel_err = [], []
    for step_grads in grads:
        for a, b, g in zip(p32, p8, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt32.step()
        opt8.step()
        big32, big8 = p32[0].detach(), p8[0].detach()  # the quantized matrix
        abs_err.append((big8 - big32).abs().mean().item())
        rel_err.append(((big8 - big32).abs() / big32.abs().clamp_min(1e-3)).mean().item())
        with torch.no_grad():
            for a, b in zip(p32, p8):
                b.copy_(a)
    assert "exp_avg.codes" in opt8.state[p8[0]] and opt8.state[p8[0]]["exp_avg_var.codes"].dtype == torch.uint8
    assert sum(abs_err) / len(abs_err) < 6e-5 * 2e3 * HP["lr"] and max(abs_err) < HP["lr"], abs_err
    assert sum(rel_err) / len(rel_err) < 6e-4 * 2e3 * HP["lr"], rel_err
    assert torch.isfinite(p8[0]).all()


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("name", ["adabelief_8bit", "paged_adabelief_8bit"])
def test_8bit_compiled_equals_eager(name, tmp_path):
    grads = gradients(7, seed=5)
    grads[2][0] = None  # a step without a gradient for the matrix
    eager_params, eager = run(name, "eager", grads, tmp_path / "e")
    compiled_params, compiled = run(name, "compiled", grads, tmp_path / "c")
    for e, c in zip(eager_params, compiled_params):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
        for key, value in eager.state[e].items():
            got = compiled.state[c][key]
            if value.dtype in (torch.int8, torch.uint8):  # a code may round to its neighbour
                assert (got.int() - value.int()).abs().max() <= 1, key
            else:
                torch.testing.assert_close(got, value, atol=1e-6, rtol=1e-5)
    assert_compiled()


def test_the_generated_class_is_public_and_pickles():
    cls = hf_optim.get_spec("adabelief").load_class()
    assert cls is hf_optim.optimizers.AdaBelief and cls.__module__ == "hf_optim.optimizers"
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert "Zhuang et al." in cls.__doc__  # the rule module's docstring: formula and paper
    names = hf_optim.hf_optim_names()
    for name in ("adabelief", "adabelief_8bit", "adabelief_32bit", "paged_adabelief", "paged_adabelief_8bit"):
        assert name in names
        assert registry.resolve(name).rule == "adabelief"
    assert hf_optim.translate_hparams("adamw", "adabelief", lr=3e-4).values == {
        "lr": 3e-4, "weight_decay": 0.0, "eps": 1e-16}
    opt = cls([torch.nn.Parameter(torch.ones(3))], execution="eager")
    again = pickle.loads(pickle.dumps(opt))
    assert type(again) is cls and again.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_training_arguments_accept_it_and_the_trainer_trains(tmp_path):
    args = hf_optim.TrainingArguments(
        str(tmp_path), optim="adabelief", learning_rate=1e-2, weight_decay=0.01, optim_args="betas=(0.9,0.99)",
        per_device_train_batch_size=16, num_train_epochs=6, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    trainer = hf_optim.Trainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset(n=16))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(opt) is hf_optim.optimizers.AdaBelief and opt.param_groups[0]["betas"] == (0.9, 0.99)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 5e-3, losses


def test_an_unknown_kwarg_is_refused_with_the_rules_own_list():
    with pytest.raises(TypeError, match=r"AdaBelief got unexpected keyword argument\(s\) 'momentum'; valid: .*eps"):
        hf_optim.optimizers.AdaBelief([torch.nn.Parameter(torch.ones(2))], momentum=0.9)
    with pytest.raises(ValueError, match=r"unknown key 'momentum' for optimizer 'adabelief'; valid keys: betas, eps"):
        hf_optim.create_optimizer("adabelief", [torch.nn.Parameter(torch.ones(2))], momentum=0.9)
    with pytest.raises(ValueError, match=r"Invalid epsilon value: -1"):
        hf_optim.create_optimizer("adabelief", [torch.nn.Parameter(torch.ones(2))], eps=-1.0)


# --- register_rule refuses malformed rules -------------------------------------------------------------


def _rule(name="fresh_rule", **attrs):
    """A minimal valid rule class, with ``attrs`` replacing its parts."""
    body = {
        "name": name,
        "description": "a test rule",
        "defaults": {"lr": 0.1, "weight_decay": 0.0},
        "buffers": classmethod(lambda cls, flags: (Buffer("buf", "signed"),)),
        "update": staticmethod(lambda p, g, state, c, flags, norm, param: p.sub_(g * c["lr"])),
        **attrs,
    }
    return type(attrs.pop("class_name", "FreshRule"), (UpdateRule,), body)


BAD_RULES = [
    ("not a class", lambda: "adamw", TypeError, r"expects a subclass of hf_optim.rules.UpdateRule, got 'adamw'"),
    ("not a rule", lambda: dict, TypeError, r"expects a subclass of hf_optim.rules.UpdateRule"),
    ("bad name", lambda: _rule("Fresh-Rule"), ValueError,
     r"\.name must be lower-case words joined by '_'.*'Fresh-Rule'"),
    ("paged prefix", lambda: _rule("paged_fresh"), ValueError, r"name 'paged_fresh' carries a modifier"),
    ("8bit suffix", lambda: _rule("fresh_8bit"), ValueError, r"name 'fresh_8bit' carries a modifier"),
    ("taken", lambda: _rule("adamw"), ValueError, r"rule name 'adamw' .* is already registered by hf_optim\.rules"),
    ("alias", lambda: _rule("adamw_bnb_8bit"), ValueError, r"carries a modifier|alias"),
    ("transformers name", lambda: _rule("rmsprop"), ValueError,
     r"rule name 'rmsprop' .* would take over the transformers optimizer name\(s\) 'rmsprop'.*"
     r"takes_over_transformers_name"),
    ("transformers composed", lambda: _rule("ademamix"), ValueError, r"'ademamix', 'ademamix_8bit'"),
    ("class name", lambda: _rule(class_name="Lion"), ValueError,
     r"class name 'Lion' is taken by the registered rule 'lion'"),
    ("no lr", lambda: _rule(defaults={"weight_decay": 0.0}), ValueError, r"\.defaults must be .* including 'lr'"),
    ("flags", lambda: _rule(flag_names=frozenset({"nesterov"})), ValueError, r"flag_names must be a set of keys"),
    ("flag default", lambda: _rule(defaults={"lr": 0.1, "on": [1]}, flag_names=frozenset({"on"})), ValueError,
     r"the flags \['on'\] need hashable defaults"),
    ("no description", lambda: _rule(description=""), ValueError, r"\.description must be a one-line description"),
    ("no update", lambda: _rule(update=UpdateRule.update), ValueError, r"must implement update\(p, g, state"),
    ("no buffers", lambda: _rule(buffers=UpdateRule.buffers), ValueError,
     r"\.buffers\(\{\}\) raised NotImplementedError.*declares its state buffers"),
    ("buffer type", lambda: _rule(buffers=classmethod(lambda cls, flags: ("buf",))), ValueError,
     r"must return a tuple of hf_optim\.rules\.Buffer"),
    ("reserved buffer", lambda: _rule(buffers=classmethod(lambda cls, flags: (Buffer("step", "signed"),))),
     ValueError, r"buffer names \['step'\] are repeated, reserved"),
    ("buffer kind", lambda: _rule(buffers=classmethod(lambda cls, flags: (Buffer("b", "int4"),))), ValueError,
     r"unknown buffer kind\(s\) \['int4'\]; allowed: signed, unsigned, param"),
    ("relation", lambda: _rule(relation={"lr_factor": 1.0}), ValueError,
     r"\.relation must be an hf_optim\.rules\.Relation"),
    ("example key", lambda: _rule(example={"momentum": 0.9}), ValueError,
     r"\.example has keys \['momentum'\] that are not in defaults \(lr, weight_decay\)"),
    ("example value", lambda: _rule(example={"lr": -1.0}), ValueError,
     r"\.example is not valid for the rule: Invalid learning rate: -1\.0"),
]


@pytest.mark.parametrize(("what", "make", "exc", "match"), BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_register_rule_refuses(what, make, exc, match):
    before = hf_optim.hf_optim_names()
    with pytest.raises(exc, match=match):
        hf_optim.register_rule(make())
    assert hf_optim.hf_optim_names() == before  # nothing half-registered


def test_register_and_unregister_a_fresh_rule():
    rule = _rule("fresh_rule", relation=Relation.no_equivalent("there is none"))
    assert hf_optim.register_rule(rule) is rule and hf_optim.register_rule(rule) is rule  # again: no-op
    try:
        opt = hf_optim.create_optimizer("paged_fresh_rule_8bit", [torch.nn.Parameter(torch.ones(3))])
        assert type(opt).__name__ == "FreshRule"
        with pytest.raises(ValueError, match=r"cannot translate to='fresh_rule': there is none"):
            hf_optim.translate_hparams("adamw", "fresh_rule", lr=1e-3)
    finally:
        unregister_rule("fresh_rule")
    with pytest.raises(ValueError, match=r"Unknown optim 'fresh_rule'"):
        registry.resolve("fresh_rule")
    assert not hasattr(hf_optim.optimizers, "FreshRule")
    with pytest.raises(ValueError, match=r"'adamw' is a built-in rule and cannot be unregistered"):
        unregister_rule("adamw")


# --- the built-in rules declare the same data ------------------------------------------------------------


@pytest.mark.parametrize("rule", builtin_rules(), ids=lambda r: r.name)
def test_builtin_rules_pass_the_checks_and_declare_their_data(rule):
    check_rule(rule)  # as a plugin would be checked, the transformers-name clash included
    assert rule.relation is not None, f"{rule.name}: no guidance relation (translate_hparams)"
    numeric = {k for k, v in rule.defaults.items() if not isinstance(v, bool)}
    assert set(rule.example) == numeric, f"{rule.name}: example should set every numeric hyperparameter"
    same = sorted(k for k in numeric if rule.example[k] == rule.defaults[k])
    assert not same, f"{rule.name}: example leaves {same} at the default (a default can hide a bug)"
    takeover = {n for n in registry.transformers_names() if registry.parse(n) and registry.parse(n)[0] == rule.name}
    assert bool(takeover) == rule.takes_over_transformers_name, (rule.name, sorted(takeover))
    assert hf_optim.get_spec(rule.name).load_class() is getattr(hf_optim, rule.__name__)


# --- the entry-point route, in fresh processes ---------------------------------------------------------------


def _dist_info(site: Path, dist: str, entry_points: str) -> None:
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hf_optim.rules]\n{entry_points}\n")


def _python(code: str, site: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_an_installed_plugin_resolves_in_a_fresh_process(tmp_path):
    site = tmp_path / "site"
    _dist_info(site, "adabelief_plugin", "adabelief = adabelief_rule:AdaBelief")
    _dist_info(site, "broken_plugin", "broken = no_such_module_for_hf_optim:Rule\nmisnamed = adabelief_rule:AdaBelief")
    result = _python(f"""
        import warnings
        import torch
        import hf_optim
        from hf_optim.rules import RulePluginError

        args = hf_optim.TrainingArguments({str(tmp_path / 'out')!r}, optim="paged_adabelief_8bit", report_to=[],
                                          use_cpu=True, optim_args="betas=(0.85,0.98)")
        spec = hf_optim.get_spec(args.optim)
        cls = spec.load_class()
        print("class", cls.__module__, cls.__qualname__, spec.state_precision, spec.placement)
        params = [torch.nn.Parameter(torch.ones(5000))]
        opt = spec.build(params, betas=(0.85, 0.98), min_8bit_size=0)
        params[0].grad = torch.ones(5000)
        opt.step()
        print("state", sorted(opt.state[params[0]]))
        print("adamw", hf_optim.get_spec("adamw").load_class().__name__)
        for name in ("broken", "misnamed_8bit"):
            try:
                hf_optim.get_spec(name)
            except RulePluginError as err:
                print("error", err)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = hf_optim.hf_optim_names()
        print("listed", "paged_adabelief_8bit" in names, "broken" in names, len(caught))
    """, site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "class hf_optim.optimizers AdaBelief 8bit paged" in out
    assert "state ['exp_avg.absmax', 'exp_avg.codes', 'exp_avg_var.absmax', 'exp_avg_var.codes', 'step']" in out
    assert "adamw AdamW" in out
    assert ("error hf_optim rule plugin 'broken' (entry point 'broken = no_such_module_for_hf_optim:Rule' in group "
            "'hf_optim.rules' from broken_plugin 0.1) failed to import: ModuleNotFoundError") in out
    assert ("error hf_optim rule plugin 'misnamed' (entry point 'misnamed = adabelief_rule:AdaBelief' in group "
            "'hf_optim.rules' from broken_plugin 0.1) is not a valid rule: the entry point is named 'misnamed' but "
            "the rule it loads is named 'adabelief'") in out
    assert "listed True False 2" in out  # the two broken plugins: one warning each, left out


def test_a_broken_plugin_never_breaks_import_or_the_cli(tmp_path):
    site = tmp_path / "site"
    _dist_info(site, "broken_plugin", "broken = no_such_module_for_hf_optim:Rule")
    _dist_info(site, "adabelief_plugin", "adabelief = adabelief_rule:AdaBelief")
    result = _python("""
        import hf_optim
        from hf_optim.guide.cli import main
        raise SystemExit(main(["list"]))
    """, site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = result.stdout.split("Passed through")[0]
    assert "adamw_8bit" in listed and "broken" not in listed
    row = next(line for line in listed.splitlines() if line.startswith("paged_adabelief_8bit "))
    assert "AdaBelief: Adam with the variance" in row and "paged state" in row and "eps=1e-16" in row, row
    assert "hf_optim rule plugin 'broken'" in result.stderr and "its names are left out" in result.stderr
