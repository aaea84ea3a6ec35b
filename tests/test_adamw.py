"""AdamW rule and engine: parity with torch.optim.AdamW, compiled == eager, API conformance."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_compiled, lockstep, quadratic_params, set_grads

import hf_optim

HP = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_parity_with_torch_adamw_fp32(amsgrad, maximize):
    ref = [p.requires_grad_() for p in quadratic_params()]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    ref_opt = torch.optim.AdamW(ref, amsgrad=amsgrad, maximize=maximize, foreach=False, **HP)
    ours_opt = hf_optim.AdamW(ours, amsgrad=amsgrad, maximize=maximize, execution="eager", **HP)
    lockstep(ref_opt, ours_opt, ref, ours)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if amsgrad else ()):
            torch.testing.assert_close(ours_opt.state[o][key], ref_opt.state[r][key], atol=1e-6, rtol=1e-5)


def test_bf16_params_track_fp32_reference_and_kahan_helps():
    ref = [p.requires_grad_() for p in quadratic_params(shapes=((64, 32),))]
    runs = {}
    for kahan in (True, False):
        ours = [p.detach().clone().to(torch.bfloat16).requires_grad_() for p in ref]
        ref_copy = [p.detach().float().requires_grad_() for p in ours]  # same starting values
        hp = {**HP, "lr": 1e-4}
        opt = hf_optim.AdamW(ours, kahan_sum=kahan, execution="eager", **hp)
        lockstep(torch.optim.AdamW(ref_copy, foreach=False, **hp), opt, ref_copy, ours, steps=30)
        runs[kahan] = (ours[0].float() - ref_copy[0].bfloat16().float()).abs().mean().item()
        if kahan:
            torch.testing.assert_close(ours[0].float(), ref_copy[0], atol=1e-3, rtol=1e-2)
        assert opt.state[ours[0]]["exp_avg"].dtype == torch.float32  # math and state in fp32
    # without compensation the 1e-4 updates round away; with it the param is the rounded fp32 trajectory
    assert runs[True] < runs[False] / 4, runs


def test_compiled_equals_eager_with_zero_dim_none_grad_and_unfrozen_param():
    params = {mode: [p.requires_grad_() for p in quadratic_params()] for mode in ("eager", "compiled")}
    opts = {mode: hf_optim.AdamW(ps, execution=mode, amsgrad=True, **HP) for mode, ps in params.items()}
    for step in range(8):
        for mode, ps in params.items():
            set_grads(ps, step)
            if step == 2:
                ps[1].grad = None  # a step without a gradient for one parameter
            if step < 4:
                ps[2].grad = None  # frozen, then unfrozen at step 4
            opts[mode].param_groups[0]["lr"] = 1e-2 * (1 + step)  # a schedule: must not recompile
            opts[mode].step()
    for e, c in zip(params["eager"], params["compiled"]):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
        for key, value in opts["eager"].state[e].items():
            torch.testing.assert_close(opts["compiled"].state[c][key], value, atol=1e-6, rtol=1e-5)
    assert opts["compiled"].state[params["compiled"][2]]["step"].item() == 4
    assert_compiled()


def test_changing_lr_and_betas_does_not_recompile():
    from torch._dynamo.utils import counters

    params = [p.requires_grad_() for p in quadratic_params(seed=3, shapes=((7, 3), (5,)))]
    opt = hf_optim.AdamW(params, execution="compiled", **HP)
    set_grads(params, 0)
    opt.step()
    before = dict(counters["stats"])
    for step in range(20):
        set_grads(params, step)
        opt.param_groups[0]["lr"] = 1e-3 / (step + 1)
        opt.param_groups[0]["betas"] = (0.9 - step * 0.01, 0.99)
        opt.step()
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)
    assert_compiled()


def test_non_contiguous_param_matches_contiguous():
    base = torch.randn(6, 4)
    strided = base.t().contiguous().t().requires_grad_()  # same values, transposed strides
    contiguous = base.clone().requires_grad_()
    assert not strided.is_contiguous()
    opts = [hf_optim.AdamW([p], execution="eager", **HP) for p in (strided, contiguous)]
    for step in range(5):
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        strided.grad, contiguous.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(strided, contiguous)


def test_tensor_lr_equals_float_lr():
    a = [p.requires_grad_() for p in quadratic_params()]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa = hf_optim.AdamW(a, execution="eager", **HP)
    ob = hf_optim.AdamW(b, execution="eager", **{**HP, "lr": torch.tensor(HP["lr"])})
    lockstep(oa, ob, a, b, steps=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_zero_grad_step_and_no_grad_step_leave_params_unchanged():
    params = [p.requires_grad_() for p in quadratic_params()]
    before = [p.detach().clone() for p in params]
    opt = hf_optim.AdamW(params, execution="eager", **{**HP, "weight_decay": 0.0})
    opt.step()  # no gradients at all
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    opt.zero_grad()
    assert all(p.grad is None for p in params)  # set_to_none=True, as torch


def test_step_hooks_fire_deepcopy_and_repr():
    params = [p.requires_grad_() for p in quadratic_params()]
    opt = hf_optim.AdamW(params, execution="eager", **HP)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    set_grads(params, 0)
    opt.step()
    assert calls == ["pre", "post"]
    clone = copy.deepcopy(opt)
    assert clone.execution == "eager" and torch.equal(
        clone.state[clone.param_groups[0]["params"][0]]["exp_avg"], opt.state[params[0]]["exp_avg"]
    )
    text = repr(opt)
    assert text.startswith("AdamW (execution=") and "lr: 0.01" in text and "params: 4 tensors" in text


def test_closure_is_called_with_grad_enabled():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = hf_optim.AdamW([w], execution="eager", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(20):
        last = opt.step(closure)
    assert last < first


def test_goes_downhill_on_linear_regression():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for execution in ("eager", "compiled"):
        model = torch.nn.Linear(8, 1)
        opt = hf_optim.create_optimizer("adamw", model, lr=1e-2, execution=execution)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] * 0.9, (execution, losses)
