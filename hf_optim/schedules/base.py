"""The base of hf_optim's schedules: a closed-form ``LRScheduler`` that records its totals.

``get_lr`` maps ``last_epoch`` (optimizer steps taken) and each group's base lr
to the lr in closed form, so no value depends on the history of calls:
``state_dict`` holds the step, the base lrs and the configuration (totals
included), and loading it recomputes the lr — after checking the totals
against this run's and applying ``on_mismatch``. Torch's ``LRScheduler`` fills
a tensor lr in place, which keeps hf_optim's compiled step from recompiling.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch
from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger("hf_optim")

#: on a resume whose totals differ: raise; continue at the saved step on this run's totals; or on the checkpoint's
MISMATCH_POLICIES = ("error", "rescale", "keep")


def _int(sched: str, key: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{sched}: {key} must be an integer >= {minimum}, got {value!r}")


def _num(sched: str, key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{sched}: {key} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def _choice(sched: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{sched}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _warmup(step: int, warmup: int) -> float:
    """transformers' linear warmup factor from 0."""
    return float(step) / float(max(1, warmup))


class Schedule(LRScheduler):
    """Base: validated config, closed-form ``get_lr``, state with totals, ``on_mismatch`` on load."""

    name: ClassVar[str] = ""
    needs_total: ClassVar[bool] = True

    def __init__(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
        if self.needs_total and config["num_training_steps"] is None:
            raise ValueError(f"{self.name}: num_training_steps is required")
        self.check_options(config)
        self.on_mismatch = config.pop("on_mismatch")
        self._configure(config, [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups], optimizer)
        super().__init__(optimizer)
        logger.info("hf_optim: lr schedule %s", self.describe())

    # --- per-schedule hooks ---------------------------------------------------------

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        """Range checks that need no optimizer; totals may be None (checked from ``lr_scheduler_kwargs``)."""
        _choice(cls.name, "on_mismatch", c.get("on_mismatch", "error"), MISMATCH_POLICIES)
        _int(cls.name, "num_training_steps", c.get("num_training_steps"), 1)
        _int(cls.name, "num_warmup_steps", c.get("num_warmup_steps"), 0)
        total, warmup = c.get("num_training_steps"), c.get("num_warmup_steps")
        if total is not None and warmup is not None and warmup > total:
            raise ValueError(f"{cls.name}: num_warmup_steps={warmup} exceeds num_training_steps={total}")

    def _configure(self, config: dict[str, Any], base_lrs: list[float], optimizer: Any) -> None:
        self.config = dict(config)
        self.num_training_steps: int | None = config["num_training_steps"]
        self.num_warmup_steps: int = config["num_warmup_steps"] or 0

    def lr_at(self, step: int, base: float) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.config.items() if not k.startswith("num_"))
        return (f"{self.name}: {self.num_warmup_steps} warmup steps, {self.num_training_steps} total optimizer steps"
                + (f" ({opts})" if opts else ""))

    # --- LRScheduler ----------------------------------------------------------------

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_at(max(self.last_epoch, 0), float(base)) for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def _apply(self) -> None:
        """Write the lr for ``last_epoch`` into the groups (in place for tensor lrs)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": [float(b) for b in self.base_lrs],
            "config": dict(self.config),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step; totals that differ from this run's follow ``on_mismatch``."""
        saved = dict(state_dict)
        if "config" not in saved:  # a torch/transformers scheduler's state: only the step carries over
            logger.warning("hf_optim: %s loads a scheduler state without totals (a torch or transformers "
                           "scheduler's); resuming at step %s with this run's totals", self.name,
                           saved.get("last_epoch"))
        elif saved.get("name") != self.name:
            raise ValueError(f"scheduler checkpoint is for schedule {saved.get('name')!r}, this run uses {self.name!r}")
        base_lrs = saved.get("base_lrs", self.base_lrs)
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"{self.name}: scheduler checkpoint has {len(base_lrs)} param groups, "
                             f"the optimizer has {len(self.optimizer.param_groups)}")
        if "config" in saved:
            diffs = {k: (v, self.config.get(k)) for k, v in saved["config"].items() if self.config.get(k) != v}
            if diffs and self.on_mismatch == "error":
                what = "; ".join(f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in diffs.items())
                raise ValueError(
                    f"{self.name}: the scheduler checkpoint was made for a different schedule ({what}). "
                    "Choose with on_mismatch (lr_scheduler_kwargs={'on_mismatch': ...}): 'rescale' continues at "
                    f"step {saved.get('last_epoch')} on this run's totals, 'keep' continues on the checkpoint's."
                )
            if diffs:
                logger.warning("hf_optim: %s resumes with on_mismatch=%r despite %s", self.name, self.on_mismatch,
                               ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diffs.items()))
            if diffs and self.on_mismatch == "keep":
                config = {**self.config, **saved["config"]}
                self.check_options(config)
                self._configure(config, [float(b) for b in base_lrs], self.optimizer)
        self.base_lrs = [float(b) for b in base_lrs]
        self.last_epoch = int(saved.get("last_epoch", self.last_epoch))
        self._step_count = int(saved.get("_step_count", self.last_epoch + 1))
        self._apply()
