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
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from .. import memory
from ..engine import Optimizer, unwrap
from ..rules.lion import LION_MAX_LR, adamw_sized_advice
from ..state import keeps_kahan, planned_bytes
from ..user_warnings import warn_user

logger = logging.getLogger("hf_optim")

#: below this global batch size LAMB's layer-wise trust ratio buys nothing over AdamW
LAMB_MIN_BATCH = 256
SPIKE_ACTIONS = ("warn", "reduce_beta2", "skip")


class OptimizerWarning(UserWarning):
    """A configuration that trains, but worse than it could (category for ``warnings`` filters)."""



def rule_name(optimizer: Any) -> str:
    """``lion``, ``lamb``, ``adamw``, ... for hf_optim optimizers and, by class name, for others."""
    optimizer = unwrap(optimizer)
    rule = getattr(type(optimizer), "rule", None)
    if rule is not None and getattr(rule, "name", None):
        return str(rule.name)
    return type(optimizer).__name__.lower()


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _group_lr(group: Mapping[str, Any]) -> float:
    return _float(group.get("initial_lr", group["lr"]))  # a scheduler may start lr at 0 (warmup)


def _param_names(group: Mapping[str, Any]) -> list[str]:
    names = group.get("param_names")
    return list(names) if names else [f"param {i}" for i in range(len(group["params"]))]


# --- the report ---------------------------------------------------------------------------


def optimizer_report(optimizer: Any, lr_scheduler: Any = None) -> dict[str, Any]:
    """What the optimizer is: class, schedule, hyperparameters, per-parameter storage, state bytes."""
    opt = unwrap(optimizer)
    cls = type(opt)
    report: dict[str, Any] = {
        "optimizer": f"{cls.__module__}.{cls.__qualname__}",
        "schedule": type(lr_scheduler).__name__ if lr_scheduler is not None else None,
        "groups": [],
        "params": [],
    }
    if lr_scheduler is not None and getattr(lr_scheduler, "name", None):
        report["schedule"] = f"{report['schedule']} ({lr_scheduler.name})"
    hf_opt = isinstance(opt, Optimizer)
    precisions = iter([row.precision for row in opt.precision_report().rows] if hf_opt else [])
    predicted = 0
    for index, group in enumerate(opt.param_groups):
        hp = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        report["groups"].append({"group": index, "n_params": len(group["params"]), **hp})
        for name, p in zip(_param_names(group), group["params"], strict=True):
            row = {"group": index, "name": name, "shape": tuple(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
            if hf_opt:
                row["state"] = next(precisions)  # the report's rows: groups and params in this order
                row["placement"] = str(group.get("placement", getattr(opt, "placement", "device")))
                if p.requires_grad:
                    rule = opt._rule_for(p, name)  # a companion rule's parameters (Muon's AdamW) have its buffers
                    predicted += planned_bytes(rule, opt._group_for(rule, group), name, p.numel(), p.dtype)
            else:
                row["state"] = "optimizer's own"
                row["placement"] = str(p.device)
            report["params"].append(row)
    measured = memory.state_bytes(opt)
    report["state_bytes"] = measured
    report["state_bytes_predicted"] = predicted if hf_opt else None
    trainable = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    report["n_trainable"] = sum(p.numel() for p in trainable)
    # Kahan buffers of bf16/fp16 parameters: part of the bytes above, and the part kahan_sum=False saves
    report["kahan_bytes"] = sum(
        p.numel() * p.dtype.itemsize for g in opt.param_groups for p in g["params"]
        if p.requires_grad and hf_opt and keeps_kahan(g, p.dtype)
    )
    return report


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"hf_optim: optimizer {report['optimizer']}, schedule {report['schedule']}"]
    for group in report["groups"]:
        hp = ", ".join(f"{k}={v}" for k, v in group.items() if k not in ("group", "n_params"))
        lines.append(f"  group {group['group']} ({group['n_params']} tensors): {hp}")
    counts: dict[tuple[str, str], int] = {}
    for row in report["params"]:
        counts[(row["state"], row["placement"])] = counts.get((row["state"], row["placement"]), 0) + 1
    lines.append("  state storage: " + ", ".join(f"{n} tensors {s} on {pl}" for (s, pl), n in counts.items()))
    for row in report["params"]:
        shape = str(row["shape"])
        lines.append(f"    {row['name']:60s} {row['dtype']:9s} {shape:22s} {row['state']:16s} {row['placement']}")
    if report.get("state_bytes_predicted") is not None:
        predicted, n = report["state_bytes_predicted"], max(report.get("n_trainable") or 0, 1)
        line = f"  state bytes once every parameter has stepped: {predicted:,} ({predicted / n:.2f} B/param"
        if report.get("kahan_bytes"):
            line += (f", of which {report['kahan_bytes']:,} Kahan buffers of bf16/fp16 parameters: "
                     f"optim_args='kahan_sum=False' makes it {(predicted - report['kahan_bytes']) / n:.2f} B/param")
        lines.append(line + ")")
    lines.append(f"  state bytes now: {report['state_bytes']:,}")
    return "\n".join(lines)


class OptimizerReportCallback(TrainerCallback):
    """Logs the effective optimizer at train start; adds state bytes (and paging stats, for paged
    optimizers) to every log.

    The report follows the Trainer's logging: it is an INFO line of the ``hf_optim``
    logger at the level ``TrainingArguments.log_level`` sets on the main process
    (``log_level_replica`` elsewhere), so ``log_level="info"`` shows it, on rank 0 only.
    """

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None:
            return
        follow_trainer_logging(args)
        self.report = optimizer_report(optimizer, lr_scheduler)
        if state.is_world_process_zero:
            logger.info("%s", format_report(self.report))
        warn_unquantized(self.report, optimizer)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or optimizer is None:
            return
        opt = unwrap(optimizer)
        extra: dict[str, float] = {"optim/state_bytes": memory.state_bytes(opt)}
        stats = getattr(opt, "paging_stats", None)
        if getattr(opt, "placement", None) == "paged" and callable(stats):
            for key, value in stats().items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    extra[f"optim/paging/{key}"] = value
        _add_to_logs(state, logs, extra)


def follow_trainer_logging(args: Any) -> None:
    """Give the ``hf_optim`` logger the Trainer's level for this process, and a handler if nothing else prints it."""
    get_level = getattr(args, "get_process_log_level", None)
    if callable(get_level):
        logger.setLevel(get_level())
    if not logger.handlers and not logging.getLogger().handlers:  # else the user's logging config prints it
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        logger.addHandler(handler)


#: an 8-bit optimizer that quantizes less than this share of the trainable elements saves (almost) nothing
MIN_QUANTIZED_SHARE = 0.5


def unquantized_advice(report: Mapping[str, Any], optimizer: Any) -> str | None:
    """What to change when an ``_8bit`` optimizer keeps (almost) all state in fp32, else None."""
    opt = unwrap(optimizer)
    if not isinstance(opt, Optimizer) or not any(g.get("state_precision") == "8bit" for g in opt.param_groups):
        return None
    sizes = [(math.prod(row["shape"]), "8bit" in str(row["state"])) for row in report["params"]]
    total = sum(numel for numel, _ in sizes)
    quantized = sum(numel for numel, eight_bit in sizes if eight_bit)
    if not total or quantized / total >= MIN_QUANTIZED_SHARE:
        return None
    smallest = min(g.get("min_8bit_size", 0) for g in opt.param_groups)
    return (
        f"8-bit optimizer state covers only {quantized / total:.0%} of the {total:,} trainable elements: tensors "
        f"under min_8bit_size={smallest} elements and names matching fp32_patterns (embeddings, lm_head, norms) "
        "keep fp32 state, so this uses about the fp32 optimizer's memory. For small tensors pass "
        "optim_args='min_8bit_size=0' (or a smaller size; PEFT adapter models get 256 by default); else the fp32 "
        "name does the same with less work."
    )


def warn_unquantized(report: Mapping[str, Any], optimizer: Any) -> None:
    advice = unquantized_advice(report, optimizer)
    if advice:
        warn_user(advice, OptimizerWarning, cause=advice)


def _add_to_logs(state: Any, logs: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Add keys to this log event and to the entry the Trainer already put in ``log_history``."""
    history = getattr(state, "log_history", None)
    last = history[-1] if history else None
    same_event = last is not None and all(last.get(k) == v for k, v in logs.items() if not k.startswith("optim/"))
    logs.update(extra)
    if same_event:
        last.update(extra)


# --- guard rails ----------------------------------------------------------------------------


def check_config(optimizer: Any, *, batch_size: int | None = None) -> list[str]:
    """Known misconfigurations of ``optimizer``, each as a message that says what to change."""
    return [message for _, message in _checks(optimizer, batch_size)]


def _checks(optimizer: Any, batch_size: int | None) -> list[tuple[str, str]]:
    opt = unwrap(optimizer)
    rule = rule_name(opt)
    problems: list[tuple[str, str]] = []
    hf_opt = isinstance(opt, Optimizer)
    for index, group in enumerate(opt.param_groups):
        lr = _group_lr(group)
        wd = _float(group.get("weight_decay", 0.0))
        if "lion" in rule and lr >= LION_MAX_LR:
            problems.append((
                "lion_lr",
                f"Lion got lr={lr:g} (group {index}), an AdamW-sized learning rate. {adamw_sized_advice(lr, wd)}",
            ))
        if wd > 0 and lr > 0 and not (hf_opt and group.get("kahan_sum")):
            bf16 = [n for n, p in zip(_param_names(group), group["params"], strict=True) if p.dtype == torch.bfloat16]
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


# --- loss spikes ----------------------------------------------------------------------------


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
            _add_to_logs(state, logs, {"optim/loss_spikes": len(self.events)})

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
            if betas is None or len(betas) < 2 or _float(betas[1]) <= self.beta2:
                continue
            new = (betas[0], self.beta2, *betas[2:])
            group["betas"] = tuple(new)
            logger.warning("hf_optim: group %d betas %s -> %s", index, tuple(map(_float, betas)), new)
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


# --- installing -----------------------------------------------------------------------------


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
