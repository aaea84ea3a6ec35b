"""hf_optim.Trainer trains a tiny config-built BERT with each built-in rule: finite, decreasing loss."""

from __future__ import annotations

import itertools
import math

import pytest
from helpers import tiny_bert, tiny_dataset

import hf_optim
from hf_optim.rules.registry import builtin_rules

#: (learning rate, optim_args) for a quick fit, per rule; a rule not listed trains at its example lr
FIT = {
    "lion": (9e-4, None),
    "lamb": (1e-2, None),
    "lars": (1.0, "trust_coefficient=0.2"),
    "stable_adamw": (1e-2, None),
    "adan": (1e-2, None),
    "ranger": (3e-2, None),  # its first 5 steps are RAdam's un-normalized warm-up steps
    "sgd": (0.1, "momentum=0.9"),
}
#: every built-in rule but AdamW (tests/test_trainer.py trains it)
CASES = [
    (rule.name, *FIT.get(rule.name, (rule.example["lr"], None))) for rule in builtin_rules() if rule.name != "adamw"
]


@pytest.mark.parametrize(("optim", "lr", "optim_args"), CASES, ids=[c[0] for c in CASES])
def test_trainer_fits_a_batch_with(optim, lr, optim_args, tmp_path):
    args = hf_optim.TrainingArguments(
        str(tmp_path), optim=optim, learning_rate=lr, optim_args=optim_args, weight_decay=0.01,
        per_device_train_batch_size=16, num_train_epochs=6, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    trainer = hf_optim.Trainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset(n=16))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    assert isinstance(opt, hf_optim.get_spec(optim).load_class()), type(opt)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    # one fixed batch, no dropout: every step must lower the loss, by a visible total
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 5e-3, losses
