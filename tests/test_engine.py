"""Engine contracts: constructor validation, every kwarg matters, state dict, faults."""

from __future__ import annotations

import io
import re

import pytest
import torch
from helpers import quadratic_params, roundtrip, set_grads

import hf_optim


def make(params=None, **kwargs):
    params = params if params is not None else [p.requires_grad_() for p in quadratic_params()]
    return hf_optim.AdamW(params, **{"execution": "eager", **kwargs})


BAD_INPUTS = [
    ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"),
    ({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
    ({"betas": (1.0, 0.999)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, 1.5)}, ValueError, "Invalid beta parameter at index 1: 1.5"),
    ({"betas": (0.9,)}, ValueError, "Invalid betas"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ({"amsgrad": "no"}, ValueError, "Invalid amsgrad value: 'no' \\(expected True or False\\)"),
    ({"maximize": 1}, ValueError, "Invalid maximize value: 1"),
    ({"state_precision": "int3"}, ValueError, "Invalid state_precision: 'int3' \\(allowed: .*fp32"),
    ({"execution": "jit"}, ValueError, "Invalid execution: 'jit' \\(allowed: auto, eager, compiled, native, triton\\)"),
    ({"placement": "moon"}, ValueError, "Invalid placement: 'moon'"),
    ({"foreach": True}, TypeError, "unexpected keyword argument.*'foreach'.*valid: .*lr"),
    ({"fused": True}, TypeError, "'fused'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS, ids=[str(k) for k, _, _ in BAD_INPUTS])
def test_constructor_rejects_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_bad_param_group_value_is_rejected_when_added():
    opt = make()
    with pytest.raises(ValueError, match="Invalid learning rate: -2"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -2})


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ([], ValueError, "empty parameter list"),
        ([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], ValueError, "complex parameters: param 0"),
        ([torch.zeros(2, dtype=torch.int64)], ValueError, "floating-point"),
    ],
)
def test_bad_params(params, error, message):
    with pytest.raises(error, match=message):
        make(params)


def test_duplicate_params_across_groups_raise():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        hf_optim.AdamW([{"params": [p]}, {"params": [p]}])


def test_sparse_gradient_raises_naming_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = hf_optim.create_optimizer("adamw", emb, execution="eager")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=re.escape("does not support sparse gradients (weight)")):
        opt.step()


def _one_step(params, **kwargs):
    opt = make(params, **kwargs)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    return params


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", 3e-2),
        ("betas", (0.5, 0.999)),
        ("betas", (0.9, 0.99)),
        ("eps", 1.0),
        ("weight_decay", 0.5),
        ("amsgrad", True),
        ("maximize", True),
        ("state_precision", "bf16"),
    ],
)
def test_every_accepted_kwarg_changes_the_update(key, value):
    # beta2 low enough that the second moment can shrink, so amsgrad's max matters
    base_kwargs = {"lr": 1e-2, "betas": (0.9, 0.6)}
    base = _one_step([p.requires_grad_() for p in quadratic_params()], **base_kwargs)
    changed = _one_step([p.requires_grad_() for p in quadratic_params()], **{**base_kwargs, key: value})
    assert not all(torch.allclose(a, b) for a, b in zip(base, changed))


def test_kahan_sum_changes_the_update_of_bf16_params():
    def run(kahan):
        params = [p.bfloat16().requires_grad_() for p in quadratic_params(shapes=((32, 32),))]
        return _one_step(params, lr=1e-5, kahan_sum=kahan)

    assert not torch.equal(run(True)[0], run(False)[0])


def _lockstep_after_reload(make_a, make_b):
    """Prime 10 steps, save, load into a fresh optimizer, 10 more steps in lockstep."""
    a_params = [p.requires_grad_() for p in quadratic_params()]
    a = make_a(a_params)
    for step in range(10):
        set_grads(a_params, step)
        a.step()
    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = make_b(b_params)
    b.load_state_dict(roundtrip(a.state_dict()))
    for step in range(10, 20):
        set_grads(a_params, step)
        set_grads(b_params, step)
        a.step()
        b.step()
    return a_params, b_params, a, b


def test_state_dict_lockstep_is_exact_and_loads_weights_only():
    a_params, b_params, a, b = _lockstep_after_reload(
        lambda ps: make(ps, lr=1e-2, weight_decay=0.1), lambda ps: make(ps, lr=0.5)
    )
    for x, y in zip(a_params, b_params):
        assert torch.equal(x, y)
    assert b.param_groups[0]["lr"] == 1e-2  # hyperparameters come from the checkpoint, as in torch
    assert a.state_dict()["param_groups"][0]["hf_optim_format"] == 1


def test_loads_a_torch_adamw_checkpoint_and_continues_identically():
    ref_params, ours_params, _, _ = _lockstep_after_reload(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), make
    )
    for x, y in zip(ref_params, ours_params):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_bf16_state_checkpoint_converts_to_fp32_and_keeps_dtypes():
    params = [p.requires_grad_() for p in quadratic_params()]
    bf16 = make(params, state_precision="bf16")
    set_grads(params, 0)
    bf16.step()
    assert bf16.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    again = make([p.detach().clone().requires_grad_() for p in params], state_precision="bf16")
    again.load_state_dict(roundtrip(bf16.state_dict()))  # same layout: the exact bits and dtype
    saved = bf16.state_dict()
    saved["param_groups"][0]["state_precision"] = "fp32"  # an fp32 optimizer loads it, converting
    fp32 = make([p.detach().clone().requires_grad_() for p in params])
    fp32.load_state_dict(roundtrip(saved))
    p0 = fp32.param_groups[0]["params"][0]
    assert fp32.state[p0]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(fp32.state[p0]["exp_avg"], bf16.state[params[0]]["exp_avg"].float())


def test_mismatched_checkpoint_raises_naming_the_parameter_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = hf_optim.create_optimizer("adamw", model, execution="eager")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    target = hf_optim.create_optimizer("adamw", other, execution="eager", lr=0.123)
    before = repr(target.param_groups)
    with pytest.raises(ValueError, match=r"1\.weight.*'exp_avg' has shape \(2, 3\), expected \(5, 3\)"):
        target.load_state_dict(saved)
    assert repr(target.param_groups) == before and not target.state
    with pytest.raises(ValueError, match="1 parameter groups, this optimizer has 2"):
        target.load_state_dict({"state": {}, "param_groups": saved["param_groups"][:1]})


def test_truncated_checkpoint_file_raises_and_nothing_is_loaded(tmp_path):
    params = [p.requires_grad_() for p in quadratic_params()]
    opt = make(params)
    set_grads(params, 0)
    opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    fresh = make([p.detach().clone().requires_grad_() for p in params])
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(torch.load(path, weights_only=True))
    assert not fresh.state


def test_nan_gradient_policy_fp32_propagates_like_torch():
    # dense fp32 state follows torch.optim: a NaN gradient makes that parameter NaN (visible, not silent);
    # Trainer users rely on the loss going NaN. Quantized storage has its own policy (see state/blockwise).
    p = torch.ones(4, requires_grad=True)
    opt = make([p])
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step()
    assert torch.isnan(p[1]) and torch.isfinite(p[[0, 2, 3]]).all()


def test_pickle_roundtrip_keeps_execution_mode():
    opt = make(lr=0.3)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    assert clone.execution == "eager" and clone.param_groups[0]["lr"] == 0.3
