"""Guard rails: warnings at train start about hyperparameters that fit another optimizer, each saying what to
change (Lion at AdamW's lr, weight decay that bf16 rounds away, LAMB at a small batch)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ...engine import Optimizer, unwrap
from ...rules.lion import LION_MAX_LR, adamw_sized_advice
from ...util.user_warnings import warn_user
from .base import OptimizerWarning, float_value, group_lr, param_names, rule_name

#: below this global batch size LAMB's layer-wise trust ratio buys nothing over AdamW
LAMB_MIN_BATCH = 256


def check_config(optimizer: Any, *, batch_size: int | None = None) -> list[str]:
    """Known misconfigurations of ``optimizer``, each as a message that says what to change."""
    return [message for _, message in _checks(optimizer, batch_size)]


def _checks(optimizer: Any, batch_size: int | None) -> list[tuple[str, str]]:
    opt = unwrap(optimizer)
    rule = rule_name(opt)
    problems: list[tuple[str, str]] = []
    hf_opt = isinstance(opt, Optimizer)
    for index, group in enumerate(opt.param_groups):
        lr = group_lr(group)
        wd = float_value(group.get("weight_decay", 0.0))
        if "lion" in rule and lr >= LION_MAX_LR:
            problems.append((
                "lion_lr",
                f"Lion got lr={lr:g} (group {index}), an AdamW-sized learning rate. {adamw_sized_advice(lr, wd)}",
            ))
        if wd > 0 and lr > 0 and not (hf_opt and group.get("kahan_sum")):
            bf16 = [n for n, p in zip(param_names(group), group["params"], strict=True) if p.dtype == torch.bfloat16]
            factor = 1.0 - lr * wd
            if bf16 and torch.tensor(factor, dtype=torch.bfloat16).item() == 1.0:
                problems.append((
                    "bf16_decay",
                    f"weight decay underflows in bf16 (group {index}): lr*weight_decay = {lr * wd:.3g} per step is "
                    f"below bf16's resolution (2^-8 = {2**-8:.3g} relative), so the decay factor {factor:.8f} rounds "
                    f"to 1 and {len(bf16)} bf16 parameters (e.g. {bf16[0]}) never decay. Keep fp32 master weights "
                    "(bf16=True mixed precision instead of a bf16 model) or use an hf_optim optimizer with "
                    "kahan_sum=True (its default).",
                ))
    if "lamb" in rule and batch_size is not None and batch_size < LAMB_MIN_BATCH:
        problems.append((
            "lamb_batch",
            f"LAMB with a global batch of {batch_size}: its layer-wise trust ratio is made for large batches "
            f"(thousands; beyond 8K where AdamW diverges). Below {LAMB_MIN_BATCH} it only adds cost: use adamw, "
            "or raise the batch (gradient_accumulation_steps, more devices).",
        ))
    return problems


def global_batch_size(args: Any) -> int:
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world


class GuardRailCallback(TrainerCallback):
    """Warns at train start about hyperparameters that fit another optimizer (see ``check_config``).

    One ``OptimizerWarning`` per cause, on the main process only; hf_optim's Lion
    already warns about an AdamW-sized lr when it is built, so that one is not repeated.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        found = _checks(optimizer, global_batch_size(args))
        self.problems = [message for _, message in found]
        rule_warned = isinstance(unwrap(optimizer), Optimizer)
        given: set[str] = set()
        for kind, message in found:
            if kind in given or (kind == "lion_lr" and rule_warned):
                continue  # several groups with one mistake: the first says it
            given.add(kind)
            warn_user(message, OptimizerWarning, cause=message)


