"""Learning-rate schedules chosen by ``lr_scheduler_type``, exact across resume.

Why our own: transformers' schedules are ``LambdaLR`` closures (not picklable,
no record of the totals they were built for) and torch's compositions
(``SequentialLR``, ``OneCycleLR``) are recursive or crash one step past the end.
Here every schedule is an ``LRScheduler`` whose lr is a closed-form function of
the optimizer step (``last_epoch``), so a checkpoint needs only the step and the
totals: a resume reproduces the uninterrupted sequence exactly, stepping past
the end holds the final lr, and a resume with different totals follows an
explicit ``on_mismatch`` policy. A 0-d tensor lr is filled in place (torch's
``LRScheduler`` does so), so hf_optim's compiled step never recompiles.

Steps are optimizer steps: the Trainer passes totals after gradient
accumulation and world size. The base class is in :mod:`hf_optim.schedules.base`,
the schedules in :mod:`hf_optim.schedules.kinds`; this module is the name
registry, the option checker and the ``hf-optim schedule`` command.
"""

from __future__ import annotations

import ast
import inspect
import math
import typing
from typing import Any

import torch

from ..parsing.values import as_bool, as_int, as_number
from .base import Schedule
from .kinds import (
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
    Linear,
    OneCycle,
    Step,
    WarmupCosine,
    WarmupStableDecay,
)

SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (
        WarmupCosine,
        OneCycle,
        Step,
        Constant,
        ConstantWithWarmup,
        WarmupStableDecay,
        InverseSqrt,
        Linear,
    )
}

#: constructor parameters that are not lr_scheduler_kwargs options
_NOT_OPTIONS = ("self", "optimizer", "num_warmup_steps", "num_training_steps")


def is_registered(name: str) -> bool:
    return name in SCHEDULES


def all_names() -> list[str]:
    return sorted(set(SCHEDULES) | _transformers_names())


def _transformers_names() -> set[str]:
    from transformers.trainer_utils import SchedulerType

    return {member.value for member in SchedulerType}


def options(name: str) -> dict[str, inspect.Parameter]:
    """The ``lr_scheduler_kwargs`` a schedule accepts: its constructor's keyword options."""
    params = inspect.signature(_schedule_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k not in _NOT_OPTIONS}


def check_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``lr_scheduler_kwargs`` for schedule ``name``; return them with coerced types.

    An unknown key, a value of the wrong type, a missing required option or a
    value out of range is a ``ValueError`` naming the key (checks that need the
    step totals or the optimizer run when the schedule is built).
    """
    cls = _schedule_class(name)
    if not isinstance(kwargs, dict):
        raise ValueError(f"lr_scheduler_kwargs for {name} must be a dict, got {type(kwargs).__name__}")
    params = options(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"lr_scheduler_kwargs: unknown key(s) {', '.join(map(repr, unknown))} for schedule {name!r}; "
            f"valid keys: {', '.join(params)}"
        )
    hints = typing.get_type_hints(cls.__init__)
    out = {key: _coerce(name, key, value, hints[key]) for key, value in kwargs.items()}
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in out]
    if missing:
        raise ValueError(f"schedule {name!r} needs lr_scheduler_kwargs {', '.join(map(repr, missing))}")
    config = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    config.update(out)
    cls.check_options(config)
    return out


def get_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    **kwargs: Any,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build schedule ``name`` for ``optimizer``: transformers' ``get_scheduler`` with options as keywords.

    ``get_scheduler("warmup_cosine", opt, num_warmup_steps=100, num_training_steps=1000, min_lr_ratio=0.1)``.
    A name only transformers has (``cosine``, ``polynomial``, ...) is built by transformers.
    """
    name = str(getattr(name, "value", name))
    if type(optimizer).__name__ == "LayerWiseDummyOptimizer":  # GaLore layer-wise: one optimizer per param
        if name not in _transformers_names():
            raise ValueError(f"lr schedule {name!r} does not support transformers' layer-wise optimizers; "
                             f"use one of {', '.join(sorted(_transformers_names()))}")
        from transformers.optimization import get_scheduler as hf_get_scheduler

        return hf_get_scheduler(name, optimizer, num_warmup_steps, num_training_steps, kwargs or None)
    if not is_registered(name):
        if name in all_names():
            from transformers.optimization import get_scheduler as hf_get_scheduler

            return hf_get_scheduler(name, optimizer, num_warmup_steps, num_training_steps, kwargs or None)
        _schedule_class(name)  # raises with the valid names
    coerced = check_kwargs(name, kwargs)
    cls = SCHEDULES[name]
    return cls(optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, **coerced)


def _schedule_class(name: str) -> type[Schedule]:
    if name not in SCHEDULES:
        from ..registry import unknown_name_message

        raise ValueError(unknown_name_message(name, "lr schedule", sorted(SCHEDULES)))
    return SCHEDULES[name]


def _coerce(name: str, key: str, value: Any, hint: Any) -> Any:
    """Coerce a (possibly string) option value to its annotated type: float | None, list[int], ..."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)

    def fail(expected: str) -> ValueError:
        return ValueError(f"lr_scheduler_kwargs: {key}={value!r} for schedule {name!r} is not {expected}")

    if hint is bool:
        flag = as_bool(value)
        if flag is None:
            raise fail("a boolean")
        return flag
    if hint is int:
        integer = as_int(value)
        if integer is None:
            raise fail("an integer")
        return integer
    if hint is float:
        number = as_number(value)
        if number is None:
            raise fail("a number")
        return number
    if origin is list:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value.replace(";", ","))
            except (ValueError, SyntaxError):
                raise fail("a list of integers") from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise fail("a list of integers")
        return [_coerce(name, key, v, int) for v in value]
    if hint is str or typing.get_origin(hint) is typing.Literal:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    return value


def schedule_values(
    name: str, steps: int, warmup: int | None = None, lr: float = 1e-3, **kwargs: Any
) -> list[float]:
    """The lr of each optimizer step ``0..steps`` (the last entry is the lr after the final step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps, **kwargs)
    values = []
    for _ in range(steps + 1):
        values.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()  # no grads: params untouched; keeps torch's step-order check quiet
        schedule.step()
    return values


def cli_arguments(parser: Any) -> None:
    """``hf-optim schedule NAME --steps N [--warmup W] [--lr LR] [--kwargs k=v,...] [--plot out.png] [--json]``."""
    parser.add_argument("name", help=f"one of: {', '.join(sorted(SCHEDULES))}")
    parser.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    parser.add_argument("--warmup", type=int, default=None, help="warmup optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr (the optimizer's lr)")
    parser.add_argument("--kwargs", default=None, help="schedule options, e.g. min_lr_ratio=0.1,milestones=[30,60]")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the curve into this image")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cli_run(args: Any) -> int:
    import json
    import sys

    from ..parsing.optim_args import parse_optim_args

    try:
        kwargs = parse_optim_args(args.kwargs)
        values = schedule_values(args.name, args.steps, args.warmup, args.lr, **kwargs)
    except ValueError as err:
        print(f"hf-optim schedule: error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        _plot(values, args)
    if args.json:
        print(json.dumps({"name": args.name, "steps": args.steps, "warmup": args.warmup, "lr": values}))
        return 0
    stride = max(1, math.ceil(len(values) / 50))  # at most ~50 rows; --json has every step
    shown = sorted({*range(0, len(values), stride), len(values) - 1})
    note = f" (every {stride} steps; --json for all)" if stride > 1 else ""
    print(f"{args.name}: lr at each optimizer step{note}")
    print("step  lr")
    for step in shown:
        print(f"{step:<5} {values[step]:.6g}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _plot(values: list[float], args: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(values)), values)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr")
    title = f"{args.name}: {args.steps} steps" + (f", {args.warmup} warmup" if args.warmup else "")
    ax.set_title(title + (f"\n{args.kwargs}" if args.kwargs else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)
