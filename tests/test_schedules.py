"""LR schedules (TESTING.md row 8): closed form, references, resume, pickling, bad input, CLI."""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import warnings
from contextlib import redirect_stdout

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, OneCycleLR, SequentialLR, StepLR
from transformers.optimization import get_scheduler as hf_get_scheduler

import hf_optim
from hf_optim import schedules
from hf_optim.guide.cli import main as cli_main

LRS = (0.1, 0.03)  # two param groups with different lrs
T, W = 23, 5


def make_opt(kind: str = "adamw", lrs=LRS, tensor_lr: bool = False) -> torch.optim.Optimizer:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": torch.tensor(lr) if tensor_lr else lr} for lr in lrs
    ]
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adagrad(groups)


def trace(opt: torch.optim.Optimizer, sched, n: int, momentum: bool = False) -> list[list[float]]:
    """lr (and beta1/momentum) of every group before each of ``n`` optimizer steps, and after the last."""
    out = []
    for i in range(n + 1):
        row = [float(g["lr"]) for g in opt.param_groups]
        if momentum:
            row += [float(g["betas"][0] if "betas" in g else g["momentum"]) for g in opt.param_groups]
        out.append(row)
        if i < n:
            opt.step()
            sched.step()
    return out


def assert_close(ours, ref, atol=1e-6):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, abs=atol, rel=0), f"step {step}: {a} != {b}"


def quiet_trace(build, n, momentum=False, kind="adamw"):
    """Trace one of ours and assert it emits no warning at all."""
    opt = make_opt(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = build(opt)
        rows = trace(opt, sched, n, momentum)
    assert not caught, [str(w.message) for w in caught]
    return rows


# --- parity with transformers for the shared names ------------------------------------------------------

HF_CASES = [
    ("linear", {}, W),
    ("linear", {}, 0),
    ("constant", {}, 0),
    ("constant_with_warmup", {}, W),
    ("inverse_sqrt", {}, W),
    ("inverse_sqrt", {"timescale": 7}, 3),
    ("inverse_sqrt", {}, 0),
    ("warmup_stable_decay", {"num_decay_steps": 8, "min_lr_ratio": 0.1}, W),
    ("warmup_stable_decay", {"num_decay_steps": 6, "warmup_type": "cosine", "decay_type": "1-sqrt",
                             "min_lr_ratio": 0.05}, 4),
    ("warmup_stable_decay", {"num_decay_steps": 10, "warmup_type": "1-sqrt", "decay_type": "linear"}, 3),
    ("warmup_stable_decay", {"num_decay_steps": 6, "num_stable_steps": 5, "num_cycles": 0.25,
                             "min_lr_ratio": 0.2}, W),
]


@pytest.mark.parametrize("name,kwargs,warmup", HF_CASES)
def test_same_values_as_transformers(name, kwargs, warmup):
    ours = quiet_trace(lambda o: hf_optim.get_scheduler(name, o, warmup, T, **kwargs), T + 4)
    ref_opt = make_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns when num_stable_steps and the total are both given
        ref = hf_get_scheduler(name, ref_opt, warmup, T, scheduler_specific_kwargs=kwargs)
    assert_close(ours, trace(ref_opt, ref, T + 4))


# --- parity with torch compositions --------------------------------------------------------------------


@pytest.mark.parametrize("start_factor,min_lr,warmup", [(0.1, 1e-3, W), (0.25, 0.0, 1), (1.0, 5e-3, 0)])
def test_warmup_cosine_equals_sequential_linear_cosine(start_factor, min_lr, warmup):
    ours = quiet_trace(
        lambda o: hf_optim.get_scheduler("warmup_cosine", o, warmup, T, start_factor=start_factor, min_lr=min_lr),
        T + 3,
    )
    ref_opt = make_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's own step-order/epoch warnings
        if warmup:
            ref = SequentialLR(
                ref_opt,
                [LinearLR(ref_opt, start_factor, 1.0, warmup), CosineAnnealingLR(ref_opt, T - warmup, eta_min=min_lr)],
                [warmup],
            )
        else:
            ref = CosineAnnealingLR(ref_opt, T, eta_min=min_lr)
        ref_rows = trace(ref_opt, ref, T)
    assert_close(ours[: T + 1], ref_rows)
    assert ours[T:] == [[min_lr, min_lr]] * 4  # the floor, exactly, and held past the end


def test_warmup_cosine_min_lr_ratio_closed_form_and_transformers():
    ratio = 0.1
    ours = quiet_trace(lambda o: hf_optim.get_scheduler("warmup_cosine", o, W, T, min_lr_ratio=ratio), T + 2)
    for step, row in enumerate(ours):
        for lr, base in zip(row, LRS):
            if step < W:
                want = base * step / W
            elif step < T:
                want = base * ratio + base * (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (step - W) / (T - W)))
            else:
                want = base * ratio
            assert lr == pytest.approx(want, abs=1e-12)
    ref_opt = make_opt()
    ref = hf_get_scheduler("cosine_with_min_lr", ref_opt, W, T, scheduler_specific_kwargs={"min_lr_rate": ratio})
    assert_close(ours[: T + 1], trace(ref_opt, ref, T))
    assert ours[-1] == [base * ratio for base in LRS]


ONE_CYCLE_CASES = [
    ("adamw", {}),
    ("sgd", {}),
    ("adamw", {"pct_start": 0.4, "anneal_strategy": "linear", "div_factor": 10.0, "final_div_factor": 100.0,
               "base_momentum": 0.8, "max_momentum": 0.9}),
    ("sgd", {"pct_start": 0.15, "div_factor": 5.0, "cycle_momentum": False}),
]


@pytest.mark.parametrize("kind,kwargs", ONE_CYCLE_CASES)
def test_one_cycle_equals_torch(kind, kwargs):
    momentum = kwargs.get("cycle_momentum", True)
    ours = quiet_trace(lambda o: hf_optim.get_scheduler("one_cycle", o, 0, T, **kwargs), T + 5, momentum, kind)
    ref_opt = make_opt(kind)
    ref = OneCycleLR(ref_opt, list(LRS), total_steps=T, **kwargs)
    ref_rows = trace(ref_opt, ref, T - 1, momentum)  # OneCycleLR is defined for steps 0..T-1
    assert_close(ours[:T], ref_rows)
    final = [lr / kwargs.get("div_factor", 25.0) / kwargs.get("final_div_factor", 1e4) for lr in LRS]
    assert ours[T - 1][:2] == final and ours[-1][:2] == final  # floor exactly, held past the end (torch raises)
    if momentum:
        assert ours[-1][2:] == [kwargs.get("max_momentum", 0.95)] * 2


def test_one_cycle_warmup_steps_sets_the_peak():
    warmup = 6
    ours = quiet_trace(lambda o: hf_optim.get_scheduler("one_cycle", o, warmup, T), T)
    ref_opt = make_opt()
    ref = OneCycleLR(ref_opt, list(LRS), total_steps=T, pct_start=warmup / T)
    assert_close(ours[:T], trace(ref_opt, ref, T - 1, False))
    assert ours[warmup - 1] == pytest.approx(list(LRS))


@pytest.mark.parametrize("kwargs,ref_cls,ref_kwargs", [
    ({"milestones": [4, 9, 15], "gamma": 0.5}, MultiStepLR, {"milestones": [4, 9, 15], "gamma": 0.5}),
    ({"step_size": 6, "gamma": 0.3}, StepLR, {"step_size": 6, "gamma": 0.3}),
])
def test_step_equals_torch(kwargs, ref_cls, ref_kwargs):
    ours = quiet_trace(lambda o: hf_optim.get_scheduler("step", o, 0, T, **kwargs), T)
    ref_opt = make_opt()
    assert_close(ours, trace(ref_opt, ref_cls(ref_opt, **ref_kwargs), T))


def test_step_with_warmup_closed_form():
    ours = quiet_trace(lambda o: hf_optim.get_scheduler("step", o, 3, T, milestones=[10], gamma=0.5), 12)
    for step, row in enumerate(ours):
        factor = (step / 3 if step < 3 else 1.0) * (0.5 if step >= 10 else 1.0)
        assert row == pytest.approx([b * factor for b in LRS], abs=1e-12)


# --- tensor lr, state dict, pickling -------------------------------------------------------------------

ALL_CASES = [
    ("warmup_cosine", {"start_factor": 0.1, "min_lr_ratio": 0.05}, W),
    ("one_cycle", {"pct_start": 0.35}, 0),
    ("step", {"milestones": [6, 12], "gamma": 0.5}, 2),
    ("constant", {}, 0),
    ("constant_with_warmup", {}, W),
    ("warmup_stable_decay", {"num_decay_steps": 7, "min_lr_ratio": 0.1}, W),
    ("inverse_sqrt", {"timescale": 9}, W),
    ("linear", {}, W),
]


def test_every_registered_schedule_is_covered():
    assert sorted(schedules.SCHEDULES) == sorted(name for name, _, _ in ALL_CASES)


@pytest.mark.parametrize("name,kwargs,warmup", ALL_CASES)
def test_tensor_lr_is_filled_in_place(name, kwargs, warmup):
    opt = make_opt(tensor_lr=True)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    sched = hf_optim.get_scheduler(name, opt, warmup, T, **kwargs)
    rows = trace(opt, sched, T + 2)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors))  # same object: no recompile
    float_opt = make_opt()
    assert_close(rows, trace(float_opt, hf_optim.get_scheduler(name, float_opt, warmup, T, **kwargs), T + 2))


def test_tensor_lr_with_hf_optim_adamw_matches_float_lr():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    runs = []
    for tensor_lr in (False, True):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        lr = torch.tensor(1e-2) if tensor_lr else 1e-2
        opt = hf_optim.AdamW(ps, lr=lr, execution="eager")
        sched = hf_optim.get_scheduler("warmup_cosine", opt, 2, 6)
        for step in range(6):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
            sched.step()
        runs.append(torch.cat([p.detach() for p in ps]))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-7, rtol=0)


@pytest.mark.parametrize("name,kwargs,warmup", ALL_CASES)
def test_state_dict_mid_schedule_resumes_identically(name, kwargs, warmup, tmp_path):
    momentum = name == "one_cycle"
    opt = make_opt()
    sched = hf_optim.get_scheduler(name, opt, warmup, T, **kwargs)
    full = trace(opt, sched, T + 3, momentum)

    opt = make_opt()
    sched = hf_optim.get_scheduler(name, opt, warmup, T, **kwargs)
    head = trace(opt, sched, 7, momentum)
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    opt2 = make_opt()
    sched2 = hf_optim.get_scheduler(name, opt2, warmup, T, **kwargs)  # sets step-0 lrs
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    tail = trace(opt2, sched2, T + 3 - 7, momentum)
    assert head[:-1] + tail == full  # exactly
    assert saved["sched"]["config"]["num_training_steps"] == T
    assert saved["sched"]["config"]["num_warmup_steps"] == warmup


@pytest.mark.parametrize("name,kwargs,warmup", ALL_CASES)
def test_pickle_round_trip(name, kwargs, warmup):
    opt = make_opt()
    sched = hf_optim.get_scheduler(name, opt, warmup, T, **kwargs)
    trace(opt, sched, 4)
    clone = pickle.loads(pickle.dumps(sched))
    assert type(clone) is type(sched) and clone.last_epoch == sched.last_epoch == 4
    assert trace(clone.optimizer, clone, 6) == trace(opt, sched, 6)


@pytest.mark.parametrize("name,kwargs,floor", [
    ("warmup_cosine", {"min_lr": 2e-3}, lambda b: 2e-3),
    ("warmup_cosine", {"min_lr_ratio": 0.3}, lambda b: b * 0.3),
    ("warmup_cosine", {}, lambda b: 0.0),
    ("linear", {}, lambda b: 0.0),
    ("warmup_stable_decay", {"num_decay_steps": 9, "min_lr_ratio": 0.07}, lambda b: b * 0.07),
    ("one_cycle", {"final_div_factor": 50.0}, lambda b: b / 25.0 / 50.0),
    ("step", {"milestones": [3, 8], "gamma": 0.2}, lambda b: b * 0.2 ** 2),
])
def test_final_lr_is_the_floor_exactly(name, kwargs, floor):
    opt = make_opt()
    rows = trace(opt, hf_optim.get_scheduler(name, opt, 4, T, **kwargs), T + 10)
    assert rows[T] == rows[-1] == [floor(b) for b in LRS]


# --- resume with different totals ----------------------------------------------------------------------


def _checkpoint(total=T, steps=8):
    opt = make_opt()
    sched = hf_optim.get_scheduler("warmup_cosine", opt, W, total, min_lr_ratio=0.1)
    trace(opt, sched, steps)
    return opt.state_dict(), sched.state_dict()


def test_resume_with_other_totals_errors_by_default():
    opt_sd, sched_sd = _checkpoint()
    opt = make_opt()
    sched = hf_optim.get_scheduler("warmup_cosine", opt, W, 2 * T, min_lr_ratio=0.1)
    opt.load_state_dict(opt_sd)
    with pytest.raises(ValueError, match=rf"num_training_steps: checkpoint {T}, this run {2 * T}.*on_mismatch"):
        sched.load_state_dict(sched_sd)


def test_resume_rescale_continues_on_this_runs_totals():
    opt_sd, sched_sd = _checkpoint()
    opt = make_opt()
    sched = hf_optim.get_scheduler("warmup_cosine", opt, W, 2 * T, min_lr_ratio=0.1, on_mismatch="rescale")
    opt.load_state_dict(opt_sd)
    sched.load_state_dict(sched_sd)
    fresh_opt = make_opt()
    fresh = hf_optim.get_scheduler("warmup_cosine", fresh_opt, W, 2 * T, min_lr_ratio=0.1)
    want = trace(fresh_opt, fresh, 2 * T + 1)[8:]
    assert sched.last_epoch == 8
    assert trace(opt, sched, 2 * T + 1 - 8) == want


def test_resume_keep_continues_on_the_checkpoints_totals():
    opt_sd, sched_sd = _checkpoint()
    opt = make_opt()
    sched = hf_optim.get_scheduler("warmup_cosine", opt, 2, 2 * T, min_lr_ratio=0.1, on_mismatch="keep")
    opt.load_state_dict(opt_sd)
    sched.load_state_dict(sched_sd)
    ref_opt = make_opt()
    ref = hf_optim.get_scheduler("warmup_cosine", ref_opt, W, T, min_lr_ratio=0.1)
    assert sched.num_training_steps == T and sched.num_warmup_steps == W
    assert trace(opt, sched, T + 2 - 8) == trace(ref_opt, ref, T + 2)[8:]


def test_loading_a_transformers_lambdalr_state_keeps_the_step(caplog):
    ref_opt = make_opt()
    ref = hf_get_scheduler("linear", ref_opt, W, T)
    want = trace(ref_opt, ref, T)
    ref_opt = make_opt()
    ref = hf_get_scheduler("linear", ref_opt, W, T)
    trace(ref_opt, ref, 9)
    opt = make_opt()
    sched = hf_optim.get_scheduler("linear", opt, W, T)
    with caplog.at_level(logging.WARNING, logger="hf_optim"):
        sched.load_state_dict(ref.state_dict())
    assert "without totals" in caplog.text
    assert_close(trace(opt, sched, T - 9), want[9:])


def test_group_count_mismatch_raises():
    _, sched_sd = _checkpoint()
    opt = make_opt(lrs=(0.1,))
    sched = hf_optim.get_scheduler("warmup_cosine", opt, W, T, min_lr_ratio=0.1)
    with pytest.raises(ValueError, match=r"2 param groups.*has 1"):
        sched.load_state_dict(sched_sd)


# --- bad input ------------------------------------------------------------------------------------------

BAD = [
    ("warmup_cosine", {"min_lr": 1e-3, "min_lr_ratio": 0.1}, W, T, "min_lr or min_lr_ratio"),
    ("warmup_cosine", {"start_factor": 1.5}, W, T, "start_factor"),
    ("warmup_cosine", {"min_lr": -1.0}, W, T, "min_lr"),
    ("warmup_cosine", {"min_lr": 0.05}, W, T, r"min_lr=0.05 exceeds the lr 0.03 of param group 1"),
    ("warmup_cosine", {"min_lr_ratio": 2.0}, W, T, "min_lr_ratio"),
    ("warmup_cosine", {}, T, T, "num_warmup_steps"),
    ("warmup_cosine", {}, W, None, "num_training_steps is required"),
    ("warmup_cosine", {}, W, 0, "num_training_steps"),
    ("warmup_cosine", {}, -1, T, "num_warmup_steps"),
    ("warmup_cosine", {"on_mismatch": "ignore"}, W, T, "on_mismatch"),
    ("warmup_cosine", {"bogus": 1}, W, T, r"unknown key\(s\) 'bogus'.*valid keys: start_factor, min_lr"),
    ("warmup_cosine", {"min_lr_ratio": "abc"}, W, T, "min_lr_ratio='abc'"),
    ("one_cycle", {"pct_start": 1.0}, 0, T, "pct_start"),
    ("one_cycle", {"anneal_strategy": "exp"}, 0, T, "anneal_strategy"),
    ("one_cycle", {"pct_start": 0.3}, 4, T, "pct_start or num_warmup_steps"),
    ("one_cycle", {"div_factor": 0.0}, 0, T, "div_factor"),
    ("one_cycle", {"max_momentum": 1.5}, 0, T, "max_momentum"),
    ("step", {"milestones": [3], "step_size": 4}, 0, T, "milestones or step_size"),
    ("step", {}, 0, T, "milestones or step_size"),
    ("step", {"milestones": [8, 3]}, 0, T, "milestones"),
    ("step", {"step_size": 4, "gamma": 0.0}, 0, T, "gamma"),
    ("warmup_stable_decay", {}, W, T, "num_decay_steps"),
    ("warmup_stable_decay", {"num_decay_steps": T}, W, T, "exceeds num_training_steps"),
    ("warmup_stable_decay", {"num_decay_steps": 5, "decay_type": "exp"}, W, T, "decay_type"),
    ("constant", {}, W, T, "num_warmup_steps=5 given but this schedule has no warmup"),
    ("inverse_sqrt", {"timescale": 0}, W, T, "timescale"),
    ("linear", {}, W, None, "num_training_steps is required"),
    ("cosine_annealing", {}, W, T, "Unknown lr schedule 'cosine_annealing'"),
]


@pytest.mark.parametrize("name,kwargs,warmup,total,message", BAD)
def test_bad_arguments_raise_value_error(name, kwargs, warmup, total, message):
    with pytest.raises(ValueError, match=message):
        hf_optim.get_scheduler(name, make_opt(), warmup, total, **kwargs)


def test_cycle_momentum_needs_momentum_or_betas():
    with pytest.raises(ValueError, match="cycle_momentum"):
        hf_optim.get_scheduler("one_cycle", make_opt("adagrad"), 0, T)
    hf_optim.get_scheduler("one_cycle", make_opt("adagrad"), 0, T, cycle_momentum=False)


def test_check_kwargs_coerces_strings():
    assert schedules.check_kwargs("warmup_cosine", {"min_lr_ratio": "0.1", "on_mismatch": "keep"}) == {
        "min_lr_ratio": 0.1, "on_mismatch": "keep"}
    assert schedules.check_kwargs("step", {"milestones": "[3, 7]", "gamma": "0.5"}) == {
        "milestones": [3, 7], "gamma": 0.5}
    assert schedules.check_kwargs("one_cycle", {"cycle_momentum": "false"}) == {"cycle_momentum": False}
    assert schedules.check_kwargs("inverse_sqrt", {"timescale": 100.0}) == {"timescale": 100}
    with pytest.raises(ValueError, match=r"timescale=1.5.*integer"):
        schedules.check_kwargs("inverse_sqrt", {"timescale": 1.5})


def test_creation_logs_resolved_steps(caplog):
    with caplog.at_level(logging.INFO, logger="hf_optim"):
        hf_optim.get_scheduler("warmup_cosine", make_opt(), 4, 20, min_lr_ratio=0.1)
    assert "warmup_cosine: 4 warmup steps, 20 total optimizer steps (start_factor=0.0" in caplog.text


def test_transformers_only_names_are_built_by_transformers():
    opt = make_opt()
    sched = hf_optim.get_scheduler("cosine", opt, W, T, num_cycles=0.5)
    ref_opt = make_opt()
    assert trace(opt, sched, T) == trace(ref_opt, hf_get_scheduler("cosine", ref_opt, W, T), T)


def test_layerwise_optimizers_keep_transformers_schedules():
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer, LayerWiseDummyScheduler

    param = torch.nn.Parameter(torch.zeros(2))  # one: transformers' dummy scheduler trips torch 2.13 with more
    dummy = LayerWiseDummyOptimizer({param: torch.optim.SGD([param], lr=0.1)}, lr=0.1)
    assert isinstance(hf_optim.get_scheduler("linear", dummy, 2, 10), LayerWiseDummyScheduler)
    with pytest.raises(ValueError, match="'warmup_cosine' does not support transformers' layer-wise"):
        hf_optim.get_scheduler("warmup_cosine", dummy, 2, 10)


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_prints_json_and_plots(tmp_path):
    out = io.StringIO()
    png = tmp_path / "curve.png"
    with redirect_stdout(out):
        rc = cli_main(["schedule", "warmup_cosine", "--steps", "20", "--warmup", "4", "--lr", "1e-3",
                       "--kwargs", "min_lr_ratio=0.1", "--plot", str(png), "--json"])
    assert rc == 0
    values = json.loads(out.getvalue())["lr"]
    assert len(values) == 21 and values[0] == 0.0 and values[4] == pytest.approx(1e-3) and values[20] == 1e-4
    assert max(values) == values[4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_and_errors(capsys):
    assert cli_main(["schedule", "step", "--steps", "10", "--kwargs", "milestones=[3,6],gamma=0.5"]) == 0
    text = capsys.readouterr().out
    assert "step  lr" in text and "\n10    0.00025" in text
    assert cli_main(["schedule", "warmup_cosine", "--steps", "10", "--kwargs", "bogus=1"]) == 2
    assert "unknown key(s) 'bogus'" in capsys.readouterr().err
