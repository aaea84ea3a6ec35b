"""The Trainer callbacks: optimizer report, guard rails, loss-spike watcher (real Trainer, CPU)."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import transformers

import hf_optim
from hf_optim.guide import memory
from hf_optim.integrations import callbacks as cb


class Regressor(torch.nn.Module):
    """A real model whose loss jumps x``spike_scale`` on its ``spike_at``-th training forward."""

    def __init__(self, spike_at: int | None = None, spike_scale: float = 50.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1))
        self.spike_at, self.spike_scale, self.calls = spike_at, spike_scale, 0

    def forward(self, x, labels):
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)
        if self.training:
            self.calls += 1
            if self.calls == self.spike_at:
                loss = loss * self.spike_scale
        return {"loss": loss}


def data(n: int = 128) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=gen)
    return [{"x": x[i], "labels": x[i, :4].sum().tanh()} for i in range(n)]


def targs(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to="none",
                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                optim_args="execution=eager")
    base.update(kwargs)
    return hf_optim.TrainingArguments(**base)


def params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 64).to(dtype)), torch.nn.Parameter(torch.randn(64).to(dtype))]


# --- guard rails ---------------------------------------------------------------------------


def test_lion_with_adamw_lr_warns_and_lion_lr_is_silent():
    loud = hf_optim.create_optimizer("lion", params(), lr=1e-3, weight_decay=0.01)
    (message,) = cb.check_config(loud)
    assert "Lion got lr=0.001" in message and "smaller lr" in message and "weight_decay" in message
    assert cb.check_config(hf_optim.create_optimizer("lion", params(), lr=1e-4, weight_decay=0.1)) == []


def test_lion_of_another_library_is_recognised_by_class_name():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    assert cb.check_config(lion_pytorch.Lion(params(), lr=3e-3))
    assert cb.check_config(lion_pytorch.Lion(params(), lr=3e-5)) == []


def test_bf16_weight_decay_underflow_warns_only_where_decay_is_lost():
    lost = torch.optim.AdamW(params(torch.bfloat16), lr=1e-4, weight_decay=0.01)  # 1 - 1e-6 rounds to 1 in bf16
    (message,) = cb.check_config(lost)
    assert "underflows in bf16" in message and "kahan_sum=True" in message and "param 0" in message
    assert cb.check_config(torch.optim.AdamW(params(torch.float32), lr=1e-4, weight_decay=0.01)) == []
    # large enough to survive bf16 rounding: 1 - 0.05 is representable
    assert cb.check_config(torch.optim.AdamW(params(torch.bfloat16), lr=0.5, weight_decay=0.1)) == []
    assert cb.check_config(torch.optim.AdamW(params(torch.bfloat16), lr=1e-4, weight_decay=0.0)) == []
    # hf_optim keeps the lost bits in its Kahan buffer by default; without it the decay is lost again
    assert cb.check_config(hf_optim.create_optimizer("adamw", params(torch.bfloat16), lr=1e-4)) == []
    assert cb.check_config(hf_optim.create_optimizer("adamw", params(torch.bfloat16), lr=1e-4, kahan_sum=False))


@pytest.mark.parametrize("kahan_sum", [False, True])
def test_underflow_is_real_for_bf16(kahan_sum):
    # the premise of the check: a bf16 step leaves the weight as it was, and only the Kahan buffer keeps the decay
    p = torch.nn.Parameter(torch.full((4,), 0.7, dtype=torch.bfloat16))
    opt = hf_optim.AdamW([p], lr=1e-4, weight_decay=0.01, kahan_sum=kahan_sum, execution="eager")
    assert bool(cb.check_config(opt)) is not kahan_sum
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)  # no gradient: the step is the decay alone
    opt.step()
    assert torch.equal(p.detach(), before)
    if kahan_sum:
        assert (opt.state[p]["kahan_comp"] < 0).all()


def test_lamb_with_a_tiny_batch_warns_and_a_large_batch_is_silent():
    lamb = hf_optim.create_optimizer("lamb", params(), lr=1e-3)
    (message,) = cb.check_config(lamb, batch_size=8)
    assert "LAMB with a global batch of 8" in message and "use adamw" in message
    assert cb.check_config(lamb, batch_size=16384) == []
    assert cb.check_config(hf_optim.create_optimizer("adamw", params()), batch_size=8) == []


def test_guard_rails_warn_once_per_cause_through_our_trainer(tmp_path):
    args = targs(tmp_path, optim="lamb", learning_rate=1e-3, max_steps=1)
    trainer = hf_optim.Trainer(model=Regressor(), args=args, train_dataset=data())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    lamb = [str(w.message) for w in seen if "LAMB with a global batch of 8" in str(w.message)]
    assert len(lamb) == 1 and issubclass(next(w.category for w in seen if "LAMB" in str(w.message)),
                                         cb.OptimizerWarning)
    # hf_optim's Lion warns when it is built (two param groups, validated again at train time): once in all
    args = targs(tmp_path, optim="lion", learning_rate=1e-3, max_steps=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = hf_optim.Trainer(model=Regressor(), args=args, train_dataset=data())
        trainer.train()
    lion = [str(w.message) for w in seen if "Lion got lr=0.001" in str(w.message)]
    assert len(lion) == 1, lion
    # weight_decay is 0 here: the advice must not ask for "a 3-10x larger weight_decay (0..0)"
    assert "(0..0)" not in lion[0] and "weight_decay is 0" in lion[0]


def test_sensible_config_trains_without_optimizer_warnings_with_the_stock_trainer(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=1e-4,
    )
    trainer = transformers.Trainer(model=Regressor(), args=args, train_dataset=data(),
                                   callbacks=cb.default_callbacks())
    with warnings.catch_warnings():
        warnings.simplefilter("error", cb.OptimizerWarning)
        trainer.train()
    report_cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, cb.OptimizerReportCallback))
    assert report_cb.report["optimizer"] == "torch.optim.adamw.AdamW"
    logged = [e for e in trainer.state.log_history if "loss" in e]
    # torch's AdamW state: exp_avg + exp_avg_sq (fp32) + a step tensor per parameter
    n = sum(p.numel() for p in trainer.model.parameters())
    assert logged and logged[-1]["optim/state_bytes"] == memory.state_bytes(trainer.optimizer) >= 8 * n


# --- the report ----------------------------------------------------------------------------


def test_report_logs_class_schedule_precision_and_exact_state_bytes(tmp_path, caplog):
    args = targs(tmp_path, optim="adamw_8bit", lr_scheduler_type="warmup_cosine", warmup_steps=2, max_steps=3,
                 log_level="info")
    trainer = hf_optim.Trainer(model=Regressor(), args=args, train_dataset=data())
    # installed first, so report_to callbacks see the keys they add
    assert isinstance(trainer.callback_handler.callbacks[0], cb.OptimizerReportCallback)
    caplog.set_level(logging.INFO)  # the capture handler takes INFO; the hf_optim logger starts at WARNING
    logging.getLogger("hf_optim").setLevel(logging.WARNING)
    trainer.train()  # log_level="info" is what lowers it
    report_cb = trainer.callback_handler.callbacks[0]
    report = report_cb.report
    assert report["optimizer"] == "hf_optim.optimizers.AdamW"
    assert "warmup_cosine" in report["schedule"] or "Cosine" in report["schedule"]
    precision = {row["name"]: row["state"] for row in report["params"]}
    assert precision["net.0.weight"] == "8bit" and precision["net.0.bias"] == "fp32"  # 512 < 4096 elements
    measured = memory.state_bytes(trainer.optimizer)
    assert report["state_bytes_predicted"] == measured == memory.optimizer_memory("adamw_8bit", trainer.model).state
    assert report["state_bytes"] == 0  # reported before the first step: state is lazy
    assert "hf_optim.optimizers.AdamW" in caplog.text and "net.0.weight" in caplog.text
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 3 and all(e["optim/state_bytes"] == measured for e in steps)
    assert all(e["optim/loss_spikes"] == 0 for e in steps)


def test_paging_stats_reach_the_logs(tmp_path):
    args = targs(tmp_path, optim="paged_adamw", max_steps=2)
    trainer = hf_optim.Trainer(model=Regressor(), args=args, train_dataset=data())
    trainer.train()
    stats = trainer.optimizer.optimizer.paging_stats()
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    assert stats and {f"optim/paging/{k}" for k, v in stats.items() if isinstance(v, int | float)} <= set(last)


# --- loss spikes ---------------------------------------------------------------------------


def test_spike_detection_against_the_running_median():
    watch = cb.LossSpikeCallback(factor=2.0, min_history=3, window=5)
    for loss in (1.0, 1.1, 0.9):
        assert watch.is_spike(loss)[0] is False
        watch.history.append(loss)
    assert watch.is_spike(1.9) == (False, 1.0)
    assert watch.is_spike(2.5) == (True, 1.0)
    assert watch.is_spike(math.nan)[0] and watch.is_spike(math.inf)[0]


@pytest.mark.parametrize("kwargs", [dict(action="pause"), dict(factor=1.0), dict(min_history=0), dict(beta2=1.0)])
def test_bad_spike_options_raise(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        cb.LossSpikeCallback(**kwargs)


def _spiky_trainer(tmp_path, action, spike_at=9):
    args = targs(tmp_path, optim="adamw", max_steps=10, learning_rate=1e-3)
    watch = cb.LossSpikeCallback(action, min_history=5)
    trainer = hf_optim.Trainer(model=Regressor(spike_at=spike_at), args=args, train_dataset=data(),
                               callbacks=[watch])
    return trainer, watch


def test_spike_warns_and_is_logged(tmp_path, caplog):
    trainer, watch = _spiky_trainer(tmp_path, "warn")
    assert sum(isinstance(c, cb.LossSpikeCallback) for c in trainer.callback_handler.callbacks) == 1
    with pytest.warns(cb.OptimizerWarning, match="loss spike at step 9"), caplog.at_level(logging.WARNING, "hf_optim"):
        trainer.train()
    assert [e["step"] for e in watch.events] == [9] and "loss spike at step 9" in caplog.text
    assert [e for e in trainer.state.log_history if "loss" in e][-1]["optim/loss_spikes"] == 1


def test_no_spike_no_event(tmp_path):
    trainer, watch = _spiky_trainer(tmp_path, "reduce_beta2", spike_at=None)
    trainer.train()
    assert watch.events == [] and trainer.optimizer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_spike_reduces_beta2_in_every_group(tmp_path, caplog):
    trainer, watch = _spiky_trainer(tmp_path, "reduce_beta2")
    with caplog.at_level(logging.WARNING, "hf_optim"):
        trainer.train()
    groups = trainer.optimizer.optimizer.param_groups
    assert len(groups) == 2 and all(g["betas"] == (0.9, 0.95) for g in groups)
    assert watch.events[0]["changed"] == [0, 1] and "betas (0.9, 0.999) -> (0.9, 0.95)" in caplog.text


def test_spike_skip_leaves_the_params_unchanged_at_that_step(tmp_path):
    trainer, watch = _spiky_trainer(tmp_path, "skip")
    snapshots: dict[int, list[torch.Tensor]] = {}

    class Snap(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            before = snapshots[state.global_step + 1]
            snapshots[state.global_step + 1] = [torch.equal(a, b) for a, b in zip(before, model.parameters())]

    trainer.add_callback(Snap())
    trainer.train()
    assert watch.events[0]["step"] == 9 and watch.events[0]["skipped"] == 4
    assert all(snapshots[9]) and not any(snapshots[8]) and not any(snapshots[10])
