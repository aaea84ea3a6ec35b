"""Learning-rate schedules chosen by ``lr_scheduler_type`` (filled in by the schedules issue).

Interface used by the registry and the Trainer integration:
``is_registered(name)``, ``all_names()``, ``check_kwargs(name, kwargs)`` and
``get_scheduler(name, optimizer, num_warmup_steps=..., num_training_steps=..., **kwargs)``.
"""

from __future__ import annotations

from typing import Any

import torch

SCHEDULES: dict[str, Any] = {}


def is_registered(name: str) -> bool:
    return name in SCHEDULES


def all_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return sorted(set(SCHEDULES) | {member.value for member in SchedulerType})


def check_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError


def get_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    **kwargs: Any,
) -> torch.optim.lr_scheduler.LRScheduler:
    raise NotImplementedError
