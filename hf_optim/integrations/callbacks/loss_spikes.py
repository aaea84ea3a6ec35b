"""The loss-spike watcher: a step's loss against the running median, and what to do about a spike."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from ...engine import unwrap
from ...util.user_warnings import warn_user
from .base import OptimizerWarning, add_to_logs, float_value, logger

SPIKE_ACTIONS = ("warn", "reduce_beta2", "skip")


class LossSpikeCallback(TrainerCallback):
    """Watches the training loss for spikes against its running median, and acts.

    A step's loss (the mean over its micro-batches, read from the model output's
    ``loss`` by a forward hook) is a spike when it exceeds ``factor`` times the
    median of the last ``window`` steps (or is not finite), once ``min_history``
    steps are known. ``action``:

    - ``"warn"``: warn and log;
    - ``"reduce_beta2"``: lower beta2 to ``beta2`` (0.999 -> 0.95) in every param
      group that has betas, so the second moment follows the new gradient scale sooner;
    - ``"skip"``: drop this step's gradients so the optimizer step changes nothing
      (the lr schedule still advances).

    Every action is logged (``logging.getLogger("hf_optim")``), kept in ``events``,
    and counted in the logs as ``optim/loss_spikes``. Models whose output has no
    ``loss`` are watched through the logged loss instead, where ``skip`` can only warn.
    """

    def __init__(
        self, action: str = "warn", *, factor: float = 2.0, window: int = 50, min_history: int = 10, beta2: float = 0.95
    ) -> None:
        if action not in SPIKE_ACTIONS:
            raise ValueError(f"Invalid action: {action!r} (allowed: {', '.join(SPIKE_ACTIONS)})")
        if not factor > 1.0:
            raise ValueError(f"Invalid factor: {factor!r} (allowed: a float > 1)")
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(
                f"Invalid window/min_history: {window}/{min_history} (allowed: 1 <= min_history <= window)"
            )
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2!r} (allowed: 0 <= beta2 < 1)")
        self.action, self.factor, self.min_history, self.beta2 = action, factor, min_history, beta2
        self.history: deque[float] = deque(maxlen=window)
        self.events: list[dict[str, Any]] = []
        self._pending: list[torch.Tensor] = []
        self._hook: Any = None
        self._hook_saw_loss = False

    # the loss, from the model's forward
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._record)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._pending.append(loss.detach().float().reshape(()))
            self._hook_saw_loss = True

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._pending:
            return
        loss = float(torch.stack(self._pending).mean().item())
        self._pending.clear()
        self._observe(loss, state.global_step + 1, optimizer, can_skip=True)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        if not self._hook_saw_loss and "loss" in logs:  # fallback: the logged (averaged) loss
            self._observe(float(logs["loss"]), state.global_step, optimizer, can_skip=False)
        if "loss" in logs:
            add_to_logs(state, logs, {"optim/loss_spikes": len(self.events)})

    # detection and actions
    def is_spike(self, loss: float) -> tuple[bool, float | None]:
        median = statistics.median(self.history) if self.history else None
        if not math.isfinite(loss):
            return True, median
        if len(self.history) < self.min_history:
            return False, median
        return loss - median > (self.factor - 1.0) * abs(median), median

    def _observe(self, loss: float, step: int, optimizer: Any, *, can_skip: bool) -> None:
        spike, median = self.is_spike(loss)
        if math.isfinite(loss):
            self.history.append(loss)
        if not spike:
            return
        where = f"loss spike at step {step}: {loss:.4g}" + (f" vs running median {median:.4g}" if median else "")
        event: dict[str, Any] = {"step": step, "loss": loss, "median": median, "action": self.action}
        if self.action == "reduce_beta2" and optimizer is not None:
            event["changed"] = self._reduce_beta2(optimizer)
            detail = (
                f"beta2 lowered to {self.beta2} in groups {event['changed']}" if event["changed"]
                else f"beta2 already <= {self.beta2}, nothing to lower"
            )
        elif self.action == "skip" and optimizer is not None and can_skip:
            event["skipped"] = self._drop_gradients(optimizer)
            detail = f"optimizer step skipped ({event['skipped']} gradients dropped)"
        elif self.action == "skip":
            event["action"] = "warn"
            detail = "cannot skip: the loss is only known after the step (model output has no loss)"
        else:
            detail = "consider action='reduce_beta2' (beta2 0.95), a lower lr, or optim='stable_adamw'"
        self.events.append(event)
        logger.warning("hf_optim: %s; %s", where, detail)
        if self.action == "warn" or event["action"] == "warn":
            warn_user(f"{where}; {detail}", OptimizerWarning)

    def _reduce_beta2(self, optimizer: Any) -> list[int]:
        changed = []
        for index, group in enumerate(unwrap(optimizer).param_groups):
            betas = group.get("betas")
            if betas is None or len(betas) < 2 or float_value(betas[1]) <= self.beta2:
                continue
            new = (betas[0], self.beta2, *betas[2:])
            group["betas"] = tuple(new)
            logger.warning("hf_optim: group %d betas %s -> %s", index, tuple(map(float_value, betas)), new)
            changed.append(index)
        return changed

    @staticmethod
    def _drop_gradients(optimizer: Any) -> int:
        dropped = 0
        for group in unwrap(optimizer).param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None
                    dropped += 1
        return dropped


