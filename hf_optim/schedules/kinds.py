"""The schedule classes behind :mod:`hf_optim.schedules`: closed-form lr(step) for each name.

Options are keyword arguments of each ``__init__`` — that signature is what
``lr_scheduler_kwargs`` is checked against. The schedules that transformers
also has give its values; ``warmup_cosine``, ``one_cycle`` and ``step`` give
torch's compositions' values.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

from .base import Schedule, _choice, _int, _num, _warmup

_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


class Linear(Schedule):
    """Linear warmup from 0, then linear decay to 0 at ``num_training_steps`` (transformers' ``linear``)."""

    name = "linear"

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                                         on_mismatch=on_mismatch))

    def lr_at(self, step: int, base: float) -> float:
        total, warmup = self.num_training_steps, self.num_warmup_steps
        if step < warmup:
            return base * _warmup(step, warmup)
        return base * max(0.0, float(total - step) / float(max(1, total - warmup)))


class Constant(Schedule):
    """The optimizer's lr throughout (transformers' ``constant``); a warmup is an error, not ignored."""

    name = "constant"
    needs_total = False

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                                         on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        if c.get("num_warmup_steps"):
            raise ValueError(f"constant: num_warmup_steps={c['num_warmup_steps']} given but this schedule has no "
                             "warmup; use constant_with_warmup")

    def lr_at(self, step: int, base: float) -> float:
        return base


class ConstantWithWarmup(Schedule):
    """Linear warmup from 0, then the optimizer's lr (transformers' ``constant_with_warmup``)."""

    name = "constant_with_warmup"
    needs_total = False

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                                         on_mismatch=on_mismatch))

    def lr_at(self, step: int, base: float) -> float:
        return base * float(step) / float(max(1.0, self.num_warmup_steps)) if step < self.num_warmup_steps else base


class InverseSqrt(Schedule):
    """Linear warmup, then ``lr·1/sqrt((step + timescale − warmup)/timescale)`` (transformers' ``inverse_sqrt``).

    ``timescale`` defaults to the warmup length, or 10 000 without warmup (Zhai et al., big_vision).
    """

    name = "inverse_sqrt"
    needs_total = False

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, timescale: int | None = None,
                 on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                                         timescale=timescale, on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        _int(cls.name, "timescale", c.get("timescale"), 1)

    def _configure(self, config: dict[str, Any], base_lrs: list[float], optimizer: Any) -> None:
        super()._configure(config, base_lrs, optimizer)
        self.timescale = config["timescale"] or self.num_warmup_steps or 10_000

    def lr_at(self, step: int, base: float) -> float:
        if step < self.num_warmup_steps:
            return base * _warmup(step, self.num_warmup_steps)
        return base * (1.0 / math.sqrt((step + self.timescale - self.num_warmup_steps) / self.timescale))


class WarmupStableDecay(Schedule):
    """Warmup, a stable phase at the peak, then decay to ``min_lr_ratio``·lr (transformers' ``warmup_stable_decay``).

    WSD (Hu et al., MiniCPM, 2024). ``num_stable_steps`` defaults to what the total leaves; warmup + stable +
    decay may end before the total (the lr then holds at the floor) but not after it.
    """

    name = "warmup_stable_decay"

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, num_decay_steps: int, num_stable_steps: int | None = None,
                 warmup_type: str = "linear", decay_type: str = "cosine", min_lr_ratio: float = 0.0,
                 num_cycles: float = 0.5, on_mismatch: str = "error") -> None:
        self.needs_total = num_stable_steps is None
        super().__init__(optimizer, dict(
            num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, num_decay_steps=num_decay_steps,
            num_stable_steps=num_stable_steps, warmup_type=warmup_type, decay_type=decay_type,
            min_lr_ratio=min_lr_ratio, num_cycles=num_cycles, on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        _int(cls.name, "num_decay_steps", c.get("num_decay_steps"), 0)
        _int(cls.name, "num_stable_steps", c.get("num_stable_steps"), 0)
        _choice(cls.name, "warmup_type", c.get("warmup_type"), _WSD_SHAPES)
        _choice(cls.name, "decay_type", c.get("decay_type"), _WSD_SHAPES)
        _num(cls.name, "min_lr_ratio", c.get("min_lr_ratio"), 0.0, 1.0)
        _num(cls.name, "num_cycles", c.get("num_cycles"), 0.0, low_open=True)
        total, warmup, decay = c.get("num_training_steps"), c.get("num_warmup_steps"), c.get("num_decay_steps")
        if total is None or warmup is None or decay is None:
            return
        stable = c.get("num_stable_steps")
        used = warmup + decay + (stable or 0)
        if used > total:
            raise ValueError(f"{cls.name}: num_warmup_steps + num_stable_steps + num_decay_steps = {used} exceeds "
                             f"num_training_steps={total}; lower num_decay_steps")

    def _configure(self, config: dict[str, Any], base_lrs: list[float], optimizer: Any) -> None:
        super()._configure(config, base_lrs, optimizer)
        c = config
        self.decay = c["num_decay_steps"]
        self.stable = c["num_stable_steps"]
        if self.stable is None:
            self.stable = self.num_training_steps - self.num_warmup_steps - self.decay

    def lr_at(self, step: int, base: float) -> float:
        c, warmup, ratio = self.config, self.num_warmup_steps, self.config["min_lr_ratio"]
        if step < warmup:
            progress = _warmup(step, warmup)
            shape = c["warmup_type"]
            factor = (progress if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
                      if shape == "cosine" else 1.0 - math.sqrt(1.0 - progress))
            return base * max(0.0, factor * (1.0 - ratio) + ratio)
        if step < warmup + self.stable:
            return base
        if step < warmup + self.stable + self.decay:
            progress = float(step - warmup - self.stable) / float(max(1, self.decay))
            shape = c["decay_type"]
            factor = (1.0 - progress if shape == "linear" else
                      0.5 * (1.0 + math.cos(math.pi * float(c["num_cycles"]) * 2.0 * progress))
                      if shape == "cosine" else 1.0 - math.sqrt(progress))
            return base * max(0.0, factor * (1.0 - ratio) + ratio)
        return base * ratio


class WarmupCosine(Schedule):
    """Linear warmup from ``start_factor``·lr to lr, then cosine decay to a floor.

    ``lr(s) = lr·(f0 + (1 − f0)·s/W)`` for ``s < W``; then
    ``floor + (lr − floor)·(1 + cos(π·(s − W)/(T − W)))/2``; ``floor`` from ``s = T`` on. The floor is
    ``min_lr`` (absolute) or ``min_lr_ratio``·lr (default 0). SGDR (Loshchilov & Hutter, 2017) with
    the warmup of Goyal et al. (2017); equals ``SequentialLR(LinearLR, CosineAnnealingLR)``.
    """

    name = "warmup_cosine"

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, start_factor: float = 0.0, min_lr: float | None = None,
                 min_lr_ratio: float | None = None, on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(
            num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, start_factor=start_factor,
            min_lr=min_lr, min_lr_ratio=min_lr_ratio, on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        _num(cls.name, "start_factor", c.get("start_factor"), 0.0, 1.0)
        _num(cls.name, "min_lr", c.get("min_lr"), 0.0)
        _num(cls.name, "min_lr_ratio", c.get("min_lr_ratio"), 0.0, 1.0)
        if c.get("min_lr") is not None and c.get("min_lr_ratio") is not None:
            raise ValueError(f"{cls.name}: give min_lr or min_lr_ratio, not both")
        total, warmup = c.get("num_training_steps"), c.get("num_warmup_steps")
        if total is not None and warmup is not None and warmup >= total:
            raise ValueError(f"{cls.name}: num_warmup_steps={warmup} leaves no decay in num_training_steps={total}")

    def _configure(self, config: dict[str, Any], base_lrs: list[float], optimizer: Any) -> None:
        super()._configure(config, base_lrs, optimizer)
        min_lr = config["min_lr"]
        for i, base in enumerate(base_lrs):
            if min_lr is not None and min_lr > base:
                raise ValueError(f"{self.name}: min_lr={min_lr} exceeds the lr {base} of param group {i}")

    def floor(self, base: float) -> float:
        min_lr, ratio = self.config["min_lr"], self.config["min_lr_ratio"]
        return float(min_lr) if min_lr is not None else base * float(ratio or 0.0)

    def lr_at(self, step: int, base: float) -> float:
        total, warmup, f0 = self.num_training_steps, self.num_warmup_steps, self.config["start_factor"]
        if step < warmup:
            return base * (f0 + (1.0 - f0) * step / warmup)
        floor = self.floor(base)
        if step >= total:
            return floor
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


class Step(Schedule):
    """``lr·gamma^k``, ``k`` = milestones passed (``milestones``) or ``step // step_size``; optional linear warmup.

    Step decay (He et al., 2016); equals torch's ``MultiStepLR`` / ``StepLR`` without warmup.
    """

    name = "step"
    needs_total = False

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, milestones: list[int] | None = None,
                 step_size: int | None = None, gamma: float = 0.1, on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(
            num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
            milestones=None if milestones is None else list(milestones), step_size=step_size, gamma=gamma,
            on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        milestones, step_size = c.get("milestones"), c.get("step_size")
        if (milestones is None) == (step_size is None):
            raise ValueError(f"{cls.name}: give exactly one of milestones or step_size")
        _int(cls.name, "step_size", step_size, 1)
        if milestones is not None:
            if not milestones or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) \
                    or list(milestones) != sorted(set(milestones)):
                raise ValueError(f"{cls.name}: milestones must be increasing positive integers, got {milestones!r}")
        _num(cls.name, "gamma", c.get("gamma"), 0.0, low_open=True)

    def lr_at(self, step: int, base: float) -> float:
        warmup, milestones = self.num_warmup_steps, self.config["milestones"]
        factor = _warmup(step, warmup) if step < warmup else 1.0
        count = bisect.bisect_right(milestones, step) if milestones is not None else step // self.config["step_size"]
        return base * factor * self.config["gamma"] ** count


class OneCycle(Schedule):
    """1cycle (Smith & Topin, 2018), torch ``OneCycleLR``'s semantics with the group's lr as ``max_lr``.

    From ``lr/div_factor`` up to ``lr`` over ``pct_start`` of the steps (or ``num_warmup_steps``), then down to
    ``lr/(div_factor·final_div_factor)`` at step ``T − 1``, by ``anneal_strategy`` ``cos``
    (``end + (start − end)·(1 + cos(π·pct))/2``) or ``linear``. With ``cycle_momentum`` beta1 (or ``momentum``)
    moves inversely between ``max_momentum`` and ``base_momentum``.
    """

    name = "one_cycle"

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, pct_start: float | None = None,
                 anneal_strategy: str = "cos", div_factor: float = 25.0, final_div_factor: float = 1e4,
                 cycle_momentum: bool = True, base_momentum: float = 0.85, max_momentum: float = 0.95,
                 on_mismatch: str = "error") -> None:
        super().__init__(optimizer, dict(
            num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, pct_start=pct_start,
            anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
            cycle_momentum=cycle_momentum, base_momentum=base_momentum, max_momentum=max_momentum,
            on_mismatch=on_mismatch))

    @classmethod
    def check_options(cls, c: dict[str, Any]) -> None:
        super().check_options(c)
        if c.get("pct_start") is not None and c.get("num_warmup_steps"):
            raise ValueError(f"{cls.name}: give pct_start or num_warmup_steps (warmup_steps), not both")
        _num(cls.name, "pct_start", c.get("pct_start"), 0.0, 1.0, high_open=True)
        _choice(cls.name, "anneal_strategy", c.get("anneal_strategy"), ("cos", "linear"))
        _num(cls.name, "div_factor", c.get("div_factor"), 0.0, low_open=True)
        _num(cls.name, "final_div_factor", c.get("final_div_factor"), 0.0, low_open=True)
        _num(cls.name, "base_momentum", c.get("base_momentum"), 0.0, 1.0)
        _num(cls.name, "max_momentum", c.get("max_momentum"), 0.0, 1.0)
        total, warmup = c.get("num_training_steps"), c.get("num_warmup_steps")
        if total is not None and warmup and warmup >= total:
            raise ValueError(f"{cls.name}: num_warmup_steps={warmup} leaves no annealing in num_training_steps={total}")

    def _configure(self, config: dict[str, Any], base_lrs: list[float], optimizer: Any) -> None:
        super()._configure(config, base_lrs, optimizer)
        pct = config["pct_start"]
        if self.num_warmup_steps:
            self.peak_step = float(self.num_warmup_steps) - 1.0
        else:
            self.peak_step = float((0.3 if pct is None else pct) * self.num_training_steps) - 1.0
        if config["cycle_momentum"]:
            for i, group in enumerate(optimizer.param_groups):
                if "betas" not in group and "momentum" not in group:
                    raise ValueError(f"{self.name}: cycle_momentum=True but param group {i} has neither betas nor "
                                     "momentum; pass cycle_momentum=False")

    def describe(self) -> str:
        return super().describe() + f"; peak at step {self.peak_step + 1:g}"

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.config["anneal_strategy"] == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return (end - start) * pct + start

    def _at(self, step: int, start: float, peak: float, end: float) -> float:
        """Value at ``step`` of the curve start -> peak (phase 1) -> end (phase 2, reached at T - 1)."""
        last, peak_step = float(self.num_training_steps - 1), self.peak_step
        if step <= peak_step:
            return self._anneal(start, peak, step / peak_step if peak_step > 0 else 1.0)
        if step >= last:
            return end
        return self._anneal(peak, end, (step - peak_step) / (last - peak_step))

    def lr_at(self, step: int, base: float) -> float:
        start = base / self.config["div_factor"]
        return self._at(step, start, base, start / self.config["final_div_factor"])

    def get_lr(self) -> list[float]:  # type: ignore[override]
        if self.config["cycle_momentum"]:
            hi, lo = self.config["max_momentum"], self.config["base_momentum"]
            momentum = self._at(max(self.last_epoch, 0), hi, lo, hi)  # opposite to the lr
            for group in self.optimizer.param_groups:
                key = "betas" if "betas" in group else "momentum"
                old = group[key][0] if key == "betas" else group[key]
                if isinstance(old, torch.Tensor):
                    old.fill_(momentum)
                elif key == "betas":
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return super().get_lr()

    _get_closed_form_lr = get_lr
