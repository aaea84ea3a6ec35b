"""The optimizer report at train start (what really runs: class, schedule, hyperparameters, per-parameter
storage and placement, state bytes) and the state bytes and paging stats added to every log."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from ...engine import Optimizer, unwrap
from ...guide import memory
from ...state import keeps_kahan, planned_bytes
from ...util.user_warnings import warn_user
from .base import OptimizerWarning, add_to_logs, logger, param_names


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
        for name, p in zip(param_names(group), group["params"], strict=True):
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
        add_to_logs(state, logs, extra)


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
