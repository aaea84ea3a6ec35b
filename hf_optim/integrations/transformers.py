"""Drop-in ``TrainingArguments`` and ``Trainer`` that know every hf_optim name.

``TrainingArguments.optim`` / ``lr_scheduler_type`` accept every transformers
value plus every registered hf_optim name; ``optim_args`` is parsed by one
typed parser and checked against the optimizer's signature when the arguments
are built, not when training starts. ``with_hf_optim(cls)`` gives any
``TrainingArguments`` subclass (TRL's ``SFTConfig``, ...) the same fields, and
``HfOptimMixin`` gives any Trainer subclass the same behaviour by one extra base.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

import torch

from . import quiet_imports

quiet_imports.install()  # before transformers imports PEFT -> bitsandbytes/torchao and their CUDA-less noise

import transformers  # noqa: E402

from .. import registry, schedules  # noqa: E402
from ..parsing.optim_args import parse_optim_args  # noqa: E402
from . import deepspeed  # noqa: E402

logger = logging.getLogger("hf_optim")

#: TrainingArguments' Adam fields and their transformers defaults: passed on to
#: a rule only when set explicitly, so Lion keeps its own betas unless asked
_ADAM_FIELDS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}

#: fields every hf_optim arguments class adds or redefines, with their dataclass fields
_FIELDS: dict[str, tuple[type, Any]] = {
    "optim": (str, lambda: dataclasses.field(
        default="adamw",
        metadata={
            "help": "The optimizer: an hf_optim name ([paged_]<rule>[_8bit|_32bit], e.g. adamw, adamw_8bit, "
            "paged_lion_8bit, lamb) or any transformers optimizer name. `hf-optim list` shows them all."
        },
    )),
    "lr_scheduler_type": (str, lambda: dataclasses.field(
        default="linear",
        metadata={"help": "The schedule: an hf_optim schedule (warmup_cosine, one_cycle, ...) or a transformers one."},
    )),
    deepspeed.OPT_OUT_FLAG: (bool, lambda: dataclasses.field(
        default=False,
        metadata={"help": "Let a DeepSpeed config's `optimizer`/`offload_optimizer` section replace the hf_optim "
                  "optimizer instead of stopping with an error."},
    )),
}


def _check_and_init(self: Any, base_post_init: Any) -> None:
    """``__post_init__`` of every hf_optim arguments class: hf_optim names checked here,
    everything else validated by the base class with a value its enums know."""
    optim = str(getattr(self.optim, "value", self.optim))
    schedule = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
    spec = registry.resolve(optim)  # raises for unknown names, with a suggestion
    ours_schedule = schedules.is_registered(schedule)
    if not ours_schedule and schedule not in _transformers_schedules():
        raise ValueError(registry.unknown_name_message(schedule, "lr_scheduler_type", schedules.all_names()))
    if spec is not None:
        self.optim = "adamw_torch"
    if ours_schedule:
        self.lr_scheduler_type = "linear"
    if spec is not None:  # before transformers imports DeepSpeed for the config
        deepspeed.check(self.deepspeed, optim, allow=getattr(self, deepspeed.OPT_OUT_FLAG))
    try:
        base_post_init(self)
    finally:  # the user's names back, also when the base class raised
        if spec is not None:
            self.optim = optim
        if ours_schedule:
            self.lr_scheduler_type = schedule
    if spec is not None:
        optimizer_kwargs(self)  # check optim_args now, not at train time
    if ours_schedule:
        schedules.check_kwargs(schedule, self.lr_scheduler_kwargs or {})


#: base class -> its hf_optim subclass, so one base always gives one class (and unpickling finds it)
_GENERATED: dict[type, type] = {}


def with_hf_optim(base: type, name: str | None = None, module: str | None = None) -> type:
    """``base`` (a ``TrainingArguments`` dataclass subclass) with hf_optim's ``optim`` and ``lr_scheduler_type``.

    ``MyConfig = hf_optim.with_hf_optim(trl.DPOConfig)``: a dataclass subclass of
    ``base`` (so ``isinstance(args, base)`` holds and ``HfArgumentParser`` reads it)
    whose ``optim`` takes every hf_optim name and whose ``lr_scheduler_type`` takes
    every hf_optim schedule. Pair it with ``class T(hf_optim.HfOptimMixin, TheTrainer)``.
    Its instances pickle (the Trainer saves ``training_args.bin``) wherever it was made.
    """
    if not (isinstance(base, type) and issubclass(base, transformers.TrainingArguments)):
        raise TypeError(f"with_hf_optim: base={base!r} is not a transformers.TrainingArguments subclass")
    if name is None and base in _GENERATED:
        return _GENERATED[base]
    base_post_init = base.__post_init__

    def __post_init__(self: Any) -> None:
        _check_and_init(self, base_post_init)

    namespace: dict[str, Any] = {
        "__annotations__": {key: kind for key, (kind, _) in _FIELDS.items()},
        "__post_init__": __post_init__,
        "__doc__": base.__doc__,
        "__module__": module or sys._getframe(1).f_globals.get("__name__", __name__),
        "__qualname__": name or f"HfOptim{base.__name__}",
        **{key: make() for key, (_, make) in _FIELDS.items()},
    }
    if name is None:  # not importable by module.name: pickle through the base class, which is
        namespace["__reduce__"] = lambda self: (_restore, (base, dict(self.__dict__)))
    cls = dataclasses.dataclass(type(name or f"HfOptim{base.__name__}", (base,), namespace))
    _GENERATED.setdefault(base, cls)
    return cls


def _restore(base: type, state: dict[str, Any]) -> Any:
    cls = with_hf_optim(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


TrainingArguments = with_hf_optim(transformers.TrainingArguments, "TrainingArguments", __name__)


def _transformers_schedules() -> set[str]:
    from transformers.trainer_utils import SchedulerType

    return {member.value for member in SchedulerType}


def optimizer_kwargs(args: transformers.TrainingArguments) -> dict[str, Any]:
    """Hyperparameters for an hf_optim optimizer from ``TrainingArguments``.

    ``learning_rate`` always; the Adam fields when set away from their defaults
    and the rule takes them; then ``optim_args``, type-checked. One rule for a
    key both set: ``optim_args`` wins (``lr``, ``betas``, ``eps`` and
    ``weight_decay``, which goes on the decaying param group as transformers'
    ``weight_decay`` would), and the Trainer logs the override.
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


def optim_args_overrides(args: transformers.TrainingArguments, kwargs: dict[str, Any]) -> list[str]:
    """``optim_args`` keys that replace a ``TrainingArguments`` value, as ``key: field=value -> value`` lines."""
    given = parse_optim_args(args.optim_args)
    fields = {"lr": ("learning_rate", args.learning_rate), "weight_decay": ("weight_decay", args.weight_decay),
              "betas": ("adam_beta1/adam_beta2", (args.adam_beta1, args.adam_beta2)),
              "eps": ("adam_epsilon", args.adam_epsilon)}
    return [
        f"{key}: {fields[key][0]}={fields[key][1]!r} -> {kwargs[key]!r}"
        for key in given if key in fields and key in kwargs and kwargs[key] != fields[key][1]
    ]


class HfOptimMixin:
    """Routes hf_optim ``optim``/``lr_scheduler_type`` names to hf_optim; others to transformers.

    Usage with another Trainer subclass: ``class MyTrainer(HfOptimMixin, SFTTrainer): ...``
    (with ``args`` of a ``with_hf_optim(...)`` class); ``hf_optim.trl`` has TRL's ready-made.
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
        kwargs = optimizer_kwargs(self.args)
        overrides = optim_args_overrides(self.args, kwargs)
        if overrides and self.args.should_log:
            from .callbacks import follow_trainer_logging

            follow_trainer_logging(self.args)
            logger.info("hf_optim: optim_args overrides TrainingArguments: %s", "; ".join(overrides))
        kwargs = {**registry.adapter_defaults(spec, opt_model, kwargs), **kwargs}
        weight_decay = kwargs.pop("weight_decay", self.args.weight_decay)
        decay_names = self.get_decay_parameter_names(opt_model)  # type: ignore[attr-defined]
        groups = registry.decay_groups(opt_model, weight_decay, decay_names)
        self.optimizer = spec.build(groups, **kwargs)
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

    def train(self, *args: Any, **kwargs: Any) -> Any:
        _undo_evaluation_prepare(self)
        result = super().train(*args, **kwargs)  # type: ignore[misc]
        check_ranks_in_sync(self)
        return result

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            _check_resumable(self.optimizer, self.args.optim, checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]


def _undo_evaluation_prepare(trainer: Any) -> None:
    """Let ``train()`` wrap the model in DDP after an ``evaluate()``.

    ``evaluate()`` before ``train()`` prepares the bare model for inference
    (accelerate marks it prepared, without DDP); ``train()`` then finds it
    "already prepared" and never wraps it, so with several processes each rank
    would train its own copy, silently. Clearing accelerate's mark (and the
    evaluation-time autocast wrapper, re-added by the training prepare) makes the
    training prepare wrap it as it does without the evaluation.
    """
    model = trainer.model
    accelerator = getattr(trainer, "accelerator", None)
    prepared = getattr(model, "_is_accelerate_prepared", False)
    if accelerator is None or trainer.model_wrapped is not model or not prepared:
        return
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return  # those prepares wrap at evaluation time already
    del model._is_accelerate_prepared
    if hasattr(model, "_original_forward"):  # the evaluation prepare's mixed-precision forward
        model.forward = model._original_forward
        del model._original_forward
    accelerator._models[:] = [m for m in accelerator._models if m is not model]


def check_ranks_in_sync(trainer: Any) -> None:
    """After data-parallel training, every rank must hold the same parameters, bit for bit.

    A launch that leaves each process training alone (a model that was never
    wrapped in DDP) otherwise ends with exit code 0 and one model per rank. Each
    rank hashes its parameters; rank 0 logs the hashes (INFO) and every rank
    raises if they differ. Sharded set-ups (FSDP, DeepSpeed) hold different
    shards by design and are skipped.
    """
    import hashlib

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return
    digest = hashlib.sha256()
    for name, p in trainer.model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"hf_optim: after training, the {len(digests)} ranks hold different parameters (sha256 per rank: "
            f"{', '.join(d[:12] for d in digests)}): each process trained its own model, never wrapped in DDP. On a "
            "machine without GPUs, launch with --use_cpu (TrainingArguments(use_cpu=True)) so the processes join."
        )
    if trainer.args.should_log:
        logger.info("hf_optim: %d ranks ended with identical parameters (sha256 per rank: %s)", len(digests),
                    " ".join(digests))


def _check_resumable(optimizer: Any, optim: str, checkpoint: str) -> None:
    """A clear error, before torch fails mid-step, when a non-hf_optim optimizer resumes 8-bit hf_optim state."""
    from ..engine import Optimizer, unwrap

    path = os.path.join(checkpoint, "optimizer.pt")
    if isinstance(unwrap(optimizer), Optimizer) or not os.path.isfile(path):
        return  # hf_optim converts any storage on load; a sharded or missing file is transformers' business
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable here: transformers' own load reports it
        return
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    stored = sorted({str(g.get("state_precision")) for g in groups if "hf_optim_format" in g} - {"fp32", "None"})
    if stored:
        spec = registry.parse(optim)
        hint = "optim='adamw'" if spec is None else f"optim={optim!r}"
        raise ValueError(
            f"{path} holds hf_optim {'/'.join(stored)} optimizer state, which optim={optim!r} "
            f"({type(unwrap(optimizer)).__name__}) cannot read. Resume with an hf_optim optimizer of the same rule "
            f"(e.g. {hint}: it converts the saved storage on load, 8-bit to fp32 too), or drop the optimizer "
            "state (start a new run from the checkpoint's weights)."
        )


class Trainer(HfOptimMixin, transformers.Trainer):
    """``transformers.Trainer`` with hf_optim's optimizers and schedules by name."""
