"""Trainer callbacks: say what optimizer really runs, catch known misconfigurations, watch for loss spikes.

Three failure modes recur in optimizer bug reports: the optimizer that runs is
not the one configured (a DeepSpeed config, a stale checkpoint), a good
optimizer gets another one's hyperparameters (Lion at AdamW's lr, LAMB at a
tiny batch, weight decay that bf16 rounds away), and loss spikes that go
unnoticed until the run diverges. These callbacks answer each at the moment it
matters: a report at train start, guard-rail warnings that say what to change,
and a loss-spike watcher that warns, lowers beta2 or skips the step.

They are plain ``transformers.TrainerCallback``s: ``hf_optim.Trainer`` installs
them itself (``install(trainer)``), and any stock ``transformers.Trainer``
takes them with ``callbacks=default_callbacks()`` or ``install(trainer)``.
``install`` puts them first so the keys they add in ``on_log``
(``optim/state_bytes``, ``optim/paging/*``, ``optim/loss_spikes``) reach the
``report_to`` backends.

One module per family: ``report`` (the report and the logged state bytes),
``guard_rails`` (``check_config``), ``loss_spikes``; ``base`` has what they share.
Every name is importable from here.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .base import OptimizerWarning, rule_name
from .guard_rails import LAMB_MIN_BATCH, GuardRailCallback, check_config, global_batch_size
from .loss_spikes import SPIKE_ACTIONS, LossSpikeCallback
from .report import (
    MIN_QUANTIZED_SHARE,
    OptimizerReportCallback,
    follow_trainer_logging,
    format_report,
    optimizer_report,
    unquantized_advice,
    warn_unquantized,
)

__all__ = [
    "LAMB_MIN_BATCH",
    "MIN_QUANTIZED_SHARE",
    "SPIKE_ACTIONS",
    "GuardRailCallback",
    "LossSpikeCallback",
    "OptimizerReportCallback",
    "OptimizerWarning",
    "check_config",
    "default_callbacks",
    "follow_trainer_logging",
    "format_report",
    "global_batch_size",
    "install",
    "optimizer_report",
    "rule_name",
    "unquantized_advice",
    "warn_unquantized",
]


def default_callbacks(spike_action: str = "warn") -> list[TrainerCallback]:
    """The report, the guard rails and a loss-spike watcher, for ``Trainer(callbacks=...)``."""
    return [OptimizerReportCallback(), GuardRailCallback(), LossSpikeCallback(spike_action)]


def install(trainer: Any, callbacks: list[TrainerCallback] | None = None) -> None:
    """Put hf_optim's callbacks first in ``trainer``'s handler (skipping kinds already there).

    First, so the keys they add to a log event reach the ``report_to`` callbacks
    that run after them.
    """
    handler = trainer.callback_handler
    present = {type(cb) for cb in handler.callbacks}
    new = [cb for cb in (callbacks if callbacks is not None else default_callbacks()) if type(cb) not in present]
    handler.callbacks[0:0] = new
