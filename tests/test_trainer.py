"""Trainer integration: TrainingArguments names and optim_args, training, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import tiny_bert, tiny_dataset

import hf_optim


def args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=8, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    return hf_optim.TrainingArguments(**{**defaults, **kwargs})


def test_trains_a_tiny_model_with_our_adamw_and_decreasing_loss(tmp_path):
    trainer = hf_optim.Trainer(
        model=tiny_bert(dropout=0.0), args=args(tmp_path, optim="adamw", num_train_epochs=4, weight_decay=0.01),
        train_dataset=tiny_dataset(),
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # unwrapped from accelerate's AcceleratedOptimizer
    assert type(optimizer) is hf_optim.AdamW
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(map(lambda x: x == x, losses)) and sum(losses[-4:]) < sum(losses[:4])
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert any("LayerNorm" in n for n in no_decay["param_names"])


def test_transformers_names_still_give_transformers_optimizers(tmp_path):
    trainer = hf_optim.Trainer(
        model=tiny_bert(), args=args(tmp_path, optim="adamw_torch_fused"), train_dataset=tiny_dataset()
    )
    trainer.create_optimizer()
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.optimizer.defaults["fused"]


def test_unknown_optim_and_bad_optim_args_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'adamw'"):
        args(tmp_path, optim="adamw_typo")
    with pytest.raises(ValueError, match=r"unknown key 'max_unorm'.*valid keys"):
        args(tmp_path, optim="adamw", optim_args="max_unorm=1.0")


def test_adam_fields_and_optim_args_reach_the_optimizer(tmp_path):
    a = args(tmp_path, optim="adamw", adam_beta2=0.95, adam_epsilon=1e-6, optim_args="amsgrad=True")
    cls, kwargs = hf_optim.Trainer.get_optimizer_cls_and_kwargs(a)
    assert cls is hf_optim.AdamW
    assert kwargs == {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-6, "amsgrad": True, "state_precision": "fp32"}


def test_to_dict_json_and_cli_round_trip(tmp_path):
    a = args(tmp_path, optim="adamw", optim_args="betas=(0.8,0.95)")
    d = a.to_dict()
    assert d["optim"] == "adamw" and json.loads(a.to_json_string())["optim"] == "adamw"
    again = hf_optim.TrainingArguments(**{k: v for k, v in d.items() if k in _init_fields()})
    assert again.optim == "adamw" and again.optim_args == "betas=(0.8,0.95)"
    parser = transformers.HfArgumentParser(hf_optim.TrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamw", "--optim_args", "betas=(0.8,0.95)", "--use_cpu"]
    )
    assert parsed.optim == "adamw"
    assert hf_optim.Trainer.get_optimizer_cls_and_kwargs(parsed)[1]["betas"] == (0.8, 0.95)


def _init_fields():
    import dataclasses

    return {f.name for f in dataclasses.fields(hf_optim.TrainingArguments) if f.init}


def test_mixin_gives_another_trainer_subclass_the_same_names(tmp_path):
    class MyTrainer(hf_optim.HfOptimMixin, transformers.Trainer):
        pass

    trainer = MyTrainer(model=tiny_bert(), args=args(tmp_path, optim="adamw"), train_dataset=tiny_dataset())
    trainer.create_optimizer()
    assert type(trainer.optimizer) is hf_optim.AdamW


def test_a_trainer_subclass_decides_which_parameters_decay(tmp_path):
    class NoDecayTrainer(hf_optim.Trainer):
        def get_decay_parameter_names(self, model):
            return []

    trainer = NoDecayTrainer(
        model=tiny_bert(), args=args(tmp_path, optim="adamw", weight_decay=0.1), train_dataset=tiny_dataset()
    )
    trainer.create_optimizer()
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.0]


def _train(tmp_path, optim, max_steps, resume=None, save_steps=5):
    model = tiny_bert(seed=1, dropout=0.1)
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)  # a frozen param
    trainer = hf_optim.Trainer(
        model=model,
        args=args(
            tmp_path, optim=optim, max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
            gradient_accumulation_steps=2, per_device_train_batch_size=4, weight_decay=0.1,
            lr_scheduler_type="linear", warmup_steps=3,
        ),
        train_dataset=tiny_dataset(n=96),
    )
    trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_resume_is_exact(tmp_path, optim: str) -> None:
    """TESTING.md row 10: resume from checkpoint-5 and -15 equals the uninterrupted run, bit for bit."""
    full = _train(tmp_path / "full", optim, max_steps=20)
    for checkpoint in (5, 15):
        resumed = _train(
            tmp_path / "full", optim, max_steps=20, resume=str(tmp_path / "full" / f"checkpoint-{checkpoint}")
        )
        for name, value in full.items():
            assert torch.equal(resumed[name], value), (checkpoint, name)


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, "adamw")
