"""Drop-in ``TrainingArguments`` and ``Trainer`` that know every hf_optim name.

``TrainingArguments.optim`` / ``lr_scheduler_type`` accept every transformers
value plus every registered hf_optim name; ``optim_args`` is parsed by one
typed parser and checked against the optimizer's signature when the arguments
are built, not when training starts. ``HfOptimMixin`` gives any Trainer
subclass (TRL's ``SFTTrainer``, ...) the same behaviour by one extra base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from .. import registry, schedules
from ..optim_args import parse_optim_args
from . import deepspeed

logger = logging.getLogger("hf_optim")

#: TrainingArguments' Adam fields and their transformers defaults: passed on to
#: a rule only when set explicitly, so Lion keeps its own betas unless asked
_ADAM_FIELDS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    __doc__ = transformers.TrainingArguments.__doc__

    optim: str = field(
        default="adamw",
        metadata={
            "help": "The optimizer: an hf_optim name ([paged_]<rule>[_8bit|_32bit], e.g. adamw, adamw_8bit, "
            "paged_lion_8bit, lamb) or any transformers optimizer name. `hf-optim list` shows them all."
        },
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "The schedule: an hf_optim schedule (warmup_cosine, one_cycle, ...) or a transformers one."},
    )
    allow_deepspeed_optimizer: bool = field(
        default=False,
        metadata={"help": "Let a DeepSpeed config's `optimizer`/`offload_optimizer` section replace the hf_optim "
                  "optimizer instead of stopping with an error."},
    )

    def __post_init__(self) -> None:
        optim = str(getattr(self.optim, "value", self.optim))
        schedule = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        spec = registry.resolve(optim)  # raises for unknown names, with a suggestion
        ours_schedule = schedules.is_registered(schedule)
        if not ours_schedule and schedule not in _transformers_schedules():
            raise ValueError(registry.unknown_name_message(schedule, "lr_scheduler_type", schedules.all_names()))
        # let transformers validate everything else with a value its enums know
        if spec is not None:
            self.optim = "adamw_torch"
        if ours_schedule:
            self.lr_scheduler_type = "linear"
        if spec is not None:  # before transformers imports DeepSpeed for the config
            deepspeed.check(self.deepspeed, optim, allow=self.allow_deepspeed_optimizer)
        super().__post_init__()
        if spec is not None:
            self.optim = optim
            optimizer_kwargs(self)  # check optim_args now, not at train time
        if ours_schedule:
            self.lr_scheduler_type = schedule
            schedules.check_kwargs(schedule, self.lr_scheduler_kwargs or {})


def _transformers_schedules() -> set[str]:
    from transformers.trainer_utils import SchedulerType

    return {member.value for member in SchedulerType}


def optimizer_kwargs(args: transformers.TrainingArguments) -> dict[str, Any]:
    """Hyperparameters for an hf_optim optimizer from ``TrainingArguments``.

    ``learning_rate`` always; the Adam fields when set away from their defaults
    and the rule takes them; then ``optim_args``, type-checked. ``weight_decay``
    goes on the param groups, as transformers does.
    """
    spec = registry.get_spec(args.optim)
    accepted = spec.defaults
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    betas = (args.adam_beta1, args.adam_beta2)
    if "betas" in accepted and len(accepted["betas"]) == 2 and betas != (0.9, 0.999):
        kwargs["betas"] = betas
    if "eps" in accepted and args.adam_epsilon != _ADAM_FIELDS["adam_epsilon"]:
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(parse_optim_args(args.optim_args))
    return spec.check_kwargs(kwargs)


class HfOptimMixin:
    """Routes hf_optim ``optim``/``lr_scheduler_type`` names to hf_optim; others to transformers.

    Usage with another Trainer subclass: ``class MyTrainer(HfOptimMixin, SFTTrainer): ...``.
    """

    args: transformers.TrainingArguments
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    lr_scheduler: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a DeepSpeed `optimizer` section means create_optimizer is never called: check up front
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        optim = str(getattr(getattr(training_args, "optim", None), "value", getattr(training_args, "optim", None)))
        if training_args is not None and registry.resolve_quietly(optim):
            deepspeed.check(
                getattr(training_args, "deepspeed", None),
                optim,
                allow=bool(getattr(training_args, deepspeed.OPT_OUT_FLAG, False)),
            )
        super().__init__(*args, **kwargs)
        from . import callbacks  # report, guard rails, loss-spike watcher; first, so report_to sees their keys

        callbacks.install(self)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        spec = registry.resolve(self.args.optim)
        if spec is None or self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None):
            return super().create_optimizer(model)  # type: ignore[misc]
        opt_model = self.model if model is None else model
        decay_names = self.get_decay_parameter_names(opt_model)  # type: ignore[attr-defined]
        groups = registry.decay_groups(opt_model, self.args.weight_decay, decay_names)
        self.optimizer = spec.build(groups, **optimizer_kwargs(self.args))
        logger.info("hf_optim: optimizer %s = %r", spec.name, self.optimizer)
        return self.optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: transformers.TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        spec = registry.resolve(args.optim)
        if spec is None:
            return transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        return spec.load_class(), {**spec.fixed_kwargs(), **optimizer_kwargs(args)}

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        name = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        if self.lr_scheduler is not None or not schedules.is_registered(name):
            return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        self.lr_scheduler = schedules.get_scheduler(
            name,
            optimizer if optimizer is not None else self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            **(self.args.lr_scheduler_kwargs or {}),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler


class Trainer(HfOptimMixin, transformers.Trainer):
    """``transformers.Trainer`` with hf_optim's optimizers and schedules by name."""
