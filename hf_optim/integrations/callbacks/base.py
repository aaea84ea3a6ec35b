"""What the callbacks share: the ``hf_optim`` logger, the warning category, and reading a param group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ...engine import unwrap

logger = logging.getLogger("hf_optim")


class OptimizerWarning(UserWarning):
    """A configuration that trains, but worse than it could (category for ``warnings`` filters)."""


def rule_name(optimizer: Any) -> str:
    """``lion``, ``lamb``, ``adamw``, ... for hf_optim optimizers and, by class name, for others."""
    optimizer = unwrap(optimizer)
    rule = getattr(type(optimizer), "rule", None)
    if rule is not None and getattr(rule, "name", None):
        return str(rule.name)
    return type(optimizer).__name__.lower()


def float_value(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def group_lr(group: Mapping[str, Any]) -> float:
    return float_value(group.get("initial_lr", group["lr"]))  # a scheduler may start lr at 0 (warmup)


def param_names(group: Mapping[str, Any]) -> list[str]:
    names = group.get("param_names")
    return list(names) if names else [f"param {i}" for i in range(len(group["params"]))]


def add_to_logs(state: Any, logs: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Add keys to this log event and to the entry the Trainer already put in ``log_history``."""
    history = getattr(state, "log_history", None)
    last = history[-1] if history else None
    same_event = last is not None and all(last.get(k) == v for k, v in logs.items() if not k.startswith("optim/"))
    logs.update(extra)
    if same_event:
        last.update(extra)
