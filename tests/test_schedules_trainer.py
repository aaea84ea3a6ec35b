"""hf_optim schedules inside ``hf_optim.Trainer``: logged lr, gradient accumulation, resume."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_optim

LR, MIN_RATIO = 1e-2, 0.1


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def args(out, **overrides) -> hf_optim.TrainingArguments:
    kwargs = dict(
        output_dir=str(out), optim="adamw", learning_rate=LR, lr_scheduler_type="warmup_cosine",
        lr_scheduler_kwargs={"min_lr_ratio": MIN_RATIO}, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return hf_optim.TrainingArguments(**kwargs)


def train(training_args, n: int = 32, resume: str | None = None) -> hf_optim.Trainer:
    trainer = hf_optim.Trainer(model=tiny_model(), args=training_args, train_dataset=Tokens(n))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged_lrs(trainer) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}


def closed_form(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return LR * step / warmup
    if step >= total:
        return LR * MIN_RATIO
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return LR * MIN_RATIO + LR * (1 - MIN_RATIO) * cos


def test_logged_lr_warms_up_then_decays_to_the_floor(tmp_path):
    trainer = train(args(tmp_path, max_steps=10, warmup_steps=3))
    lrs = logged_lrs(trainer)  # the log at global step g shows the lr optimizer step g used: lr(g - 1)
    assert sorted(lrs) == list(range(1, 11))
    for step, lr in lrs.items():
        assert lr == pytest.approx(closed_form(step - 1, 3, 10), abs=1e-9), step
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4] == pytest.approx(LR)
    assert all(lrs[s] > lrs[s + 1] for s in range(4, 10))
    assert lrs[10] > LR * MIN_RATIO
    floor = [LR * MIN_RATIO] * len(trainer.optimizer.param_groups)  # after the last step: the floor, exactly
    assert trainer.lr_scheduler.get_last_lr() == floor == [g["lr"] for g in trainer.optimizer.param_groups]
    assert isinstance(trainer.lr_scheduler, hf_optim.schedules.SCHEDULES["warmup_cosine"])


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 64 samples / batch 2 = 32 micro-batches = 8 optimizer steps with accumulation 4; warmup 25 % = 2 steps
    trainer = train(args(tmp_path, num_train_epochs=1, gradient_accumulation_steps=4, warmup_steps=0.25), n=64)
    sched = trainer.lr_scheduler
    assert (sched.num_training_steps, sched.num_warmup_steps, sched.last_epoch) == (8, 2, 8)
    lrs = logged_lrs(trainer)
    assert sorted(lrs) == list(range(1, 9))
    # optimizer steps 0, 1 warm up (lr 0, LR/2); step 2 is the first at the peak
    assert lrs[1] == 0.0 and lrs[2] == pytest.approx(LR / 2) and lrs[3] == pytest.approx(LR)
    assert lrs[4] < lrs[3] and trainer.lr_scheduler.get_last_lr()[0] == LR * MIN_RATIO


def test_resume_in_warmup_mid_decay_and_at_the_end_matches_uninterrupted(tmp_path):
    common = dict(max_steps=10, warmup_steps=4, save_strategy="steps", save_steps=2)
    full = train(args(tmp_path / "full", **common))
    want = logged_lrs(full)
    floor = LR * MIN_RATIO
    for ckpt in (2, 6, 10):  # in warmup, mid-decay, at the end
        out = tmp_path / f"resumed-{ckpt}"
        resumed = train(args(out, **common), resume=str(tmp_path / "full" / f"checkpoint-{ckpt}"))
        got = logged_lrs(resumed)
        assert {step: lr for step, lr in got.items() if step <= 10} == want, ckpt
        # transformers 5.x runs one more step when resumed from the last checkpoint: it holds the floor
        assert all(lr == floor for step, lr in got.items() if step > 10)
        assert resumed.lr_scheduler.last_epoch == resumed.state.global_step
        assert resumed.lr_scheduler.get_last_lr() == [floor] * len(resumed.optimizer.param_groups)


def test_resume_with_other_totals_is_an_explicit_choice(tmp_path):
    common = dict(warmup_steps=2, save_strategy="steps", save_steps=4)
    train(args(tmp_path, max_steps=4, **common))
    with pytest.raises(ValueError, match=r"num_training_steps: checkpoint 4, this run 6.*on_mismatch"):
        train(args(tmp_path, max_steps=6, **common), resume=str(tmp_path / "checkpoint-4"))
    rescale = {"min_lr_ratio": MIN_RATIO, "on_mismatch": "rescale"}
    trainer = train(args(tmp_path, max_steps=6, lr_scheduler_kwargs=rescale, **common),
                    resume=str(tmp_path / "checkpoint-4"))
    lrs = logged_lrs(trainer)
    assert lrs[5] == pytest.approx(closed_form(4, 2, 6), abs=1e-9)  # step 4 on the 6-step schedule
    assert lrs[6] == pytest.approx(closed_form(5, 2, 6), abs=1e-9)
    assert trainer.lr_scheduler.get_last_lr()[0] == LR * MIN_RATIO


def test_training_arguments_check_schedule_kwargs_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'bogus'.*valid keys: start_factor, min_lr, min_lr_ratio"):
        hf_optim.TrainingArguments(str(tmp_path), lr_scheduler_type="warmup_cosine", lr_scheduler_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="num_decay_steps"):
        hf_optim.TrainingArguments(str(tmp_path), lr_scheduler_type="warmup_stable_decay", use_cpu=True)
    ok = hf_optim.TrainingArguments(str(tmp_path), lr_scheduler_type="one_cycle",
                                    lr_scheduler_kwargs='{"pct_start": 0.25, "anneal_strategy": "linear"}')
    assert ok.lr_scheduler_type == "one_cycle" and ok.lr_scheduler_kwargs["pct_start"] == 0.25


def test_default_linear_is_ours_and_logs_what_transformers_logs(tmp_path):
    import transformers

    common = dict(max_steps=6, warmup_steps=2, per_device_train_batch_size=2, logging_steps=1, use_cpu=True,
                  report_to=[], disable_tqdm=True, save_strategy="no", learning_rate=LR)
    ours = train(hf_optim.TrainingArguments(str(tmp_path / "ours"), optim="adamw_torch", **common))
    assert isinstance(ours.lr_scheduler, hf_optim.schedules.SCHEDULES["linear"])
    ref = transformers.Trainer(model=tiny_model(), args=transformers.TrainingArguments(str(tmp_path / "ref"), **common),
                               train_dataset=Tokens(32))
    ref.train()
    assert logged_lrs(ours) == pytest.approx(logged_lrs(ref), abs=1e-12)
    assert ours.lr_scheduler.get_last_lr() == pytest.approx(ref.lr_scheduler.get_last_lr(), abs=1e-12)
