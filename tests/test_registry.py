"""Registry: name grammar, aliases, pass-through, plugins, create_optimizer, optim_args parsing."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hf_optim
from hf_optim import registry
from hf_optim.parsing.optim_args import coerce_optim_args, parse_optim_args


@pytest.mark.parametrize("name", registry.hf_optim_names())
def test_every_registered_name_builds_its_class_with_its_storage(name):
    spec = hf_optim.get_spec(name)
    opt = spec.build([torch.zeros(4096, requires_grad=True)], lr=1e-4)
    assert isinstance(opt, spec.load_class())
    if spec.is_hf_optim:
        assert opt.param_groups[0]["state_precision"] == spec.state_precision
        assert opt.placement == spec.placement
        assert type(opt).rule.name == spec.rule


def test_grammar_composes_modifiers():
    assert registry.parse("adamw") == ("adamw", "fp32", "device")
    assert registry.parse("adamw_32bit") == ("adamw", "fp32", "device")
    assert registry.parse("adamw_8bit") == ("adamw", "8bit", "device")
    assert registry.parse("paged_adamw_8bit") == ("adamw", "8bit", "paged")
    assert registry.parse("adamw_bnb_8bit") == ("adamw", "8bit", "device")  # transformers alias
    assert registry.parse("adamw_torch_fused") is None  # not ours: passes through
    assert registry.parse("galore_adamw_8bit") is None


def test_unknown_name_lists_valid_names_with_a_suggestion():
    with pytest.raises(ValueError, match=r"Unknown optim 'adamw_typo'\. Did you mean 'adamw'.*Valid names: .*adamw"):
        hf_optim.resolve("adamw_typo")


def test_unavailable_modifier_raises_cleanly(monkeypatch):
    from hf_optim.state import placement

    monkeypatch.setattr(placement, "PLACEMENTS", {"device": None})
    with pytest.raises(ValueError, match="paged placement is not available yet"):
        hf_optim.resolve("paged_adamw")


def test_transformers_names_pass_through():
    assert hf_optim.resolve("adamw_torch_fused") is None
    model = torch.nn.Linear(3, 2)
    opt = hf_optim.create_optimizer("adamw_torch_fused", model, lr=1e-3, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_transformers_names_take_hyperparameters_and_reject_unknown_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = [torch.zeros(2, requires_grad=True)]
    opt = hf_optim.create_optimizer("adamw_torch", params, eps=1e-3, betas=(0.8, 0.9), weight_decay=0.2)
    assert opt.defaults["eps"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["weight_decay"] == 0.2
    with pytest.raises(TypeError, match="bogus"):
        hf_optim.create_optimizer("adamw_torch", params, eps=1e-3, bogus=1)
    assert list(tmp_path.iterdir()) == []  # no output_dir left behind


def test_create_optimizer_groups_a_model_like_transformers_and_takes_params_as_given():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = hf_optim.create_optimizer("adamw", model, lr=1e-4, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["param_names"] == ["0.weight"] and decay["weight_decay"] == 0.05
    assert no_decay["param_names"] == ["0.bias", "1.weight", "1.bias"] and no_decay["weight_decay"] == 0.0
    groups = [{"params": [model[0].weight], "lr": 0.5}, {"params": list(model[1].parameters())}]
    opt = hf_optim.create_optimizer("adamw", groups, lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-4]
    with pytest.raises(ValueError, match=r"unknown key 'betaz'.*did you mean 'betas'"):
        hf_optim.create_optimizer("adamw", model, betaz=(0.9, 0.9))


def test_entry_point_plugin_registers_an_optimizer(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent(
            """
            import torch
            class Plain(torch.optim.SGD):
                '''A plugin optimizer.'''
                def __init__(self, params, lr=0.1, momentum=0.0):
                    super().__init__(params, lr=lr, momentum=momentum)
            """
        )
    )
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hf_optim.optimizers]\nmy_sgd = my_plugin:Plain\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugin_spec.cache_clear()
    try:
        assert "my_sgd" in registry.hf_optim_names()
        opt = hf_optim.create_optimizer("my_sgd", [torch.zeros(2, requires_grad=True)], lr=0.3, momentum=0.9)
        assert type(opt).__name__ == "Plain" and opt.defaults["momentum"] == 0.9
        with pytest.raises(ValueError, match="unknown key 'nesterov'"):
            hf_optim.create_optimizer("my_sgd", [torch.zeros(2, requires_grad=True)], nesterov=True)
    finally:
        registry._plugin_spec.cache_clear()
        sys.modules.pop("my_plugin", None)


# --- optim_args ---------------------------------------------------------------------------

ADAMW_DEFAULTS = hf_optim.get_spec("adamw").defaults


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("betas=(0.9,0.99),eps=1e-6", {"betas": (0.9, 0.99), "eps": 1e-6}),
        ('{"betas": [0.8, 0.95], "amsgrad": true}', {"betas": (0.8, 0.95), "amsgrad": True}),
        ("eps='1e-5', amsgrad=False", {"eps": 1e-5, "amsgrad": False}),
        ("amsgrad=false,weight_decay=0", {"amsgrad": False, "weight_decay": 0.0}),
        ("lr=3E-4", {"lr": 3e-4}),
        ("", {}),
    ],
)
def test_optim_args_parse_and_coerce(text, expected):
    assert coerce_optim_args(parse_optim_args(text), ADAMW_DEFAULTS, "adamw") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_unorm=1.0", r"unknown key 'max_unorm' for adamw; valid keys: amsgrad, betas"),
        ("amsgrad=maybe", r"amsgrad='maybe' for adamw is not a boolean"),
        ("betas=(0.9,)", r"betas=\(0.9,\) for adamw is not a tuple of 2 numbers"),
        ("eps=small", r"eps='small' for adamw is not a number"),
        ("eps", r"expected key=value, got 'eps'"),
        ("eps=1,eps=2", r"key 'eps' given twice"),
        ("{not json", r"not valid JSON"),
    ],
)
def test_optim_args_errors_name_key_value_and_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        coerce_optim_args(parse_optim_args(text), ADAMW_DEFAULTS, "adamw")


def test_optim_args_integer_option_rejects_a_fraction():
    ranger = {"lr": 1e-3, "k": 6}
    assert coerce_optim_args(parse_optim_args("k=5"), ranger, "ranger") == {"k": 5}
    with pytest.raises(ValueError, match=r"k=5.5 for ranger is not an integer"):
        coerce_optim_args(parse_optim_args("k=5.5"), ranger, "ranger")


@given(
    st.floats(min_value=1e-12, max_value=1.0, allow_nan=False),
    st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
    st.booleans(),
)
def test_optim_args_text_round_trips(eps, betas, amsgrad):
    text = f"eps={eps!r},betas=({betas[0]!r}, {betas[1]!r}),amsgrad={amsgrad}"
    parsed = coerce_optim_args(parse_optim_args(text), ADAMW_DEFAULTS, "adamw")
    assert parsed == {"eps": eps, "betas": betas, "amsgrad": amsgrad}
