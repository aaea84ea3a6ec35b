"""Which optimizer for this model and machine: the usual decision flow, computed.

Advice on choosing an optimizer is a short flowchart (transformer or CNN?
memory-bound? batch over 8K? time to tune? unstable?) plus a few rules of
thumb (Lion wants a smaller lr and larger weight decay than AdamW,
beta2 0.95 for large batches or loss spikes, warmup + cosine for
transformers). ``recommend`` walks that flow for a concrete model and device,
with memory from the exact memory model (``hf_optim.guide.memory``) instead of
multipliers, and records every decision as a reason, so the answer explains
itself. ``Recommendation.to_training_args()`` turns it into
``TrainingArguments`` keyword arguments.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from .. import registry, schedules
from . import memory
from .translate import LION_FACTOR, translate_hparams

Task = Literal["transformer", "cnn", "other"]
TASKS = ("transformer", "cnn", "other")
TUNING_BUDGETS = ("low", "high")
#: above this global batch size LAMB's layer-wise trust ratio keeps training stable
LARGE_BATCH = 8192
#: above this global batch size beta2 0.95 is the usual AdamW setting
BETA2_BATCH = 4096
#: at or below this batch size Ranger suits CNNs that get no tuning
SMALL_CNN_BATCH = 512
#: models this large get the upper end of the usual weight-decay range
LARGE_MODEL = 1_000_000_000
STABLE_BETA2 = 0.95

#: the starting hyperparameters of each rule family: AdamW's for the task, the others relative to it
_ADAMW_LR = {"transformer": 1e-4, "cnn": 1e-3, "other": 1e-3}
_SCHEDULE = "warmup_cosine"


@dataclass
class Recommendation:
    """What to train with, and why."""

    optim: str
    lr_scheduler_type: str
    hyperparameters: dict[str, Any]
    memory: int | None
    reasons: list[str] = field(default_factory=list)
    warmup_ratio: float = 0.0
    task: str = "transformer"
    n_params: int | None = None
    memory_breakdown: dict[str, int] | None = None

    def to_training_args(self) -> dict[str, Any]:
        """Keyword arguments for ``hf_optim.TrainingArguments`` (or transformers' for its names)."""
        hp = dict(self.hyperparameters)
        kwargs: dict[str, Any] = {
            "optim": self.optim,
            "lr_scheduler_type": self.lr_scheduler_type,
            "learning_rate": hp.pop("lr"),
            "weight_decay": hp.pop("weight_decay", 0.0),
            "warmup_steps": self.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        }
        if hp:
            kwargs["optim_args"] = ",".join(f"{k}={_literal(v)}" for k, v in hp.items())
        return kwargs

    def __str__(self) -> str:
        lines = [f"optim: {self.optim}"]
        lines.append(f"lr_scheduler_type: {self.lr_scheduler_type} (warmup {self.warmup_ratio:.0%} of steps)")
        lines.append("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items()))
        if self.memory is not None:
            lines.append(f"memory (weights + gradients + optimizer state): {memory.format_bytes(self.memory)}")
        lines.append("why:")
        lines.extend(f"  - {r}" for r in self.reasons)
        return "\n".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def model_kind(model: torch.nn.Module) -> Task:
    """``transformer`` if the model has attention, ``cnn`` if most weights are convolutions, else ``other``."""
    conv_numel = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
            return "transformer"
        own = sum(p.numel() for p in module.parameters(recurse=False))
        total += own
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            conv_numel += own
    return "cnn" if total and conv_numel * 2 >= total else "other"


def _registered(name: str) -> bool:
    return registry.parse(name) is not None and registry.resolve_quietly(name)


def _fits(name: str, size: Any, budget: int, param_dtype: Any) -> tuple[bool, int]:
    row = memory.optimizer_memory(name, size, param_dtype=param_dtype)
    on_device = row.weights + row.gradients + (0 if row.placement == "paged" else row.state)
    return on_device <= budget, on_device


def recommend(
    model: torch.nn.Module | None = None,
    *,
    n_params: int | str | None = None,
    task: Task | None = None,
    device_memory: int | str | None = None,
    batch_size: int | None = None,
    tuning_budget: Literal["low", "high"] = "low",
    unstable: bool = False,
    param_dtype: str | torch.dtype | None = None,
    from_scratch: bool = False,
) -> Recommendation:
    """Recommend an optimizer, schedule and hyperparameters.

    Args:
        model: read for its parameter count, dtypes, parameter names and kind
            (attention -> transformer, mostly convolutions -> cnn).
        n_params: the parameter count when no model is given (``7_000_000_000`` or ``"7B"``).
        task: ``"transformer"``, ``"cnn"`` or ``"other"``; default from the model, else transformer.
        device_memory: accelerator memory in bytes or as ``"24GB"``; enables the memory branch.
        batch_size: the global batch size (per device x accumulation x devices).
        tuning_budget: ``"high"`` if you can tune the lr schedule (CNNs then get SGD + momentum).
        unstable: training shows loss spikes (StableAdamW, or beta2 0.95).
        param_dtype: parameter dtype for the memory figures (default the model's, or fp32).
        from_scratch: the model is trained from random initialization (pretraining), not fine-tuned: a
            transformer that fits then gets Muon for its hidden matrices (AdamW for the rest).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"Invalid task: {task!r} (allowed: {', '.join(TASKS)})")
    if tuning_budget not in TUNING_BUDGETS:
        raise ValueError(f"Invalid tuning_budget: {tuning_budget!r} (allowed: {', '.join(TUNING_BUDGETS)})")
    if not isinstance(from_scratch, bool):
        raise ValueError(f"Invalid from_scratch: {from_scratch!r} (allowed: True or False)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (allowed: a positive int)")
    if model is not None and n_params is not None:
        raise ValueError("give either model or n_params, not both")
    budget = memory.parse_bytes(device_memory) if device_memory is not None else None
    size: torch.nn.Module | int | None = model if model is not None else (
        memory.parse_count(n_params) if n_params is not None else None
    )
    count = sum(p.numel() for p in model.parameters()) if model is not None else size
    reasons: list[str] = []
    if task is None:
        task = model_kind(model) if model is not None else "transformer"
        if model is not None:
            reasons.append(f"the model is a {task} ({'has attention' if task == 'transformer' else 'by its layers'})")
    adamw_lr = _ADAMW_LR[task]
    wd = 0.1 if count is not None and count >= LARGE_MODEL else 0.01
    optim, warmup, hp = "adamw", 0.05, {"lr": adamw_lr, "weight_decay": wd}
    if count is not None and count >= LARGE_MODEL:
        reasons.append(f"{count / 1e9:.1f}B parameters: weight decay 0.1 (large models take the upper end of 0.01-0.1)")
    default_path = True

    if task == "transformer" and budget is not None and size is not None:
        fits, need = _fits("adamw", size, budget, param_dtype)
        if fits:
            reasons.append(
                f"AdamW fits: weights + gradients + fp32 states need {memory.format_bytes(need)} "
                f"of {memory.format_bytes(budget)} (activations not counted)"
            )
        else:
            default_path = False
            reasons.append(
                f"memory-constrained: AdamW needs {memory.format_bytes(need)} for weights, gradients and "
                f"states, the device has {memory.format_bytes(budget)}"
            )
            optim, hp = _memory_choice(size, budget, param_dtype, adamw_lr, wd, reasons)
    elif task == "cnn":
        if tuning_budget == "high":
            default_path = False
            optim, warmup = "sgd", 0.0
            hp = {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True}
            reasons.append("CNN with time to tune the lr schedule: SGD + Nesterov momentum + cosine generalizes best")
        elif batch_size is not None and batch_size <= SMALL_CNN_BATCH and _registered("ranger"):
            default_path = False
            optim, hp = "ranger", {"lr": 1e-3, "weight_decay": 0.01}
            reasons.append(f"CNN without tuning time at a small batch ({batch_size} <= {SMALL_CNN_BATCH}): Ranger")
        else:
            reasons.append("CNN without time to tune the lr schedule: AdamW works out of the box")
    elif task == "other":
        reasons.append("neither transformer nor CNN: AdamW is the robust default")
    else:
        reasons.append("transformer: AdamW is the standard" + ("" if budget is not None else
                                                               " (no device_memory given: memory not checked)"))

    if default_path:
        if batch_size is not None and batch_size > LARGE_BATCH and _registered("lamb"):
            optim = "lamb"
            hp = {"lr": 1e-3, "weight_decay": wd, "betas": (0.9, 0.999)}
            reasons.append(
                f"large batch ({batch_size} > {LARGE_BATCH}): LAMB's layer-wise trust ratio keeps it stable "
                "and tolerates a higher lr (1e-3)"
            )
        elif from_scratch and task == "transformer" and _registered("muon"):
            optim, hp = "muon", dict(translate_hparams("adamw", "muon", lr=adamw_lr, weight_decay=wd).values)
            reasons.append(
                "transformer trained from scratch: Muon orthogonalizes the hidden matrices' momentum (AdamW for "
                "embeddings, lm_head, norms and biases); pretraining runs reach AdamW's loss with ~half the compute "
                "(Moonlight, Liu et al. 2025). adjust_lr_fn='match_rms_adamw' lets AdamW's lr and weight decay carry "
                "over. For fine-tuning a model pretrained with AdamW no gain is known: keep AdamW there"
            )
            reasons.append("linear warmup (5% of steps) and cosine decay")
        else:
            if batch_size is not None and batch_size > BETA2_BATCH:
                hp["betas"] = (0.9, STABLE_BETA2)
                reasons.append(f"batch {batch_size} > {BETA2_BATCH}: beta2 0.95 instead of 0.999")
            reasons.append("AdamW with linear warmup (5% of steps) and cosine decay")

    if unstable:
        optim, hp = _stabilize(optim, hp, reasons)
    schedule = _SCHEDULE if schedules.is_registered(_SCHEDULE) else "cosine"
    if warmup == 0.0 and optim == "sgd":
        reasons.append(f"{schedule} schedule without warmup for SGD")
    mem_row = _memory(optim, size, param_dtype)
    return Recommendation(
        optim=optim,
        lr_scheduler_type=schedule,
        hyperparameters=hp,
        memory=mem_row.total if mem_row else None,
        reasons=reasons,
        warmup_ratio=warmup,
        task=task,
        n_params=count,
        memory_breakdown=(
            {"weights": mem_row.weights, "gradients": mem_row.gradients, "state": mem_row.state} if mem_row else None
        ),
    )


def _memory_choice(size, budget, param_dtype, adamw_lr, wd, reasons):
    """The memory branch: 8-bit AdamW, then Lion, then paged states, smallest change first."""
    candidates = [("adamw_8bit", "8-bit AdamW: two 8-bit moment buffers instead of two fp32 ones")]
    candidates.append(("lion_8bit", "8-bit Lion: one 8-bit buffer instead of two"))
    candidates.append(("paged_adamw_8bit", "paged 8-bit AdamW: states move off the device when it is full"))
    adamw = memory.optimizer_memory("adamw", size, param_dtype=param_dtype)
    # (fp32 Lion, 4 bytes/param, never fits where 8-bit AdamW, ~2 bytes/param, does not)
    for name, why in candidates:
        if not _registered(name):
            continue
        fits, need = _fits(name, size, budget, param_dtype)
        if fits:
            row = memory.optimizer_memory(name, size, param_dtype=param_dtype)
            reasons.append(f"{why} ({row.state_bytes_per_param:.2f} B/param of state vs AdamW's "
                           f"{adamw.state_bytes_per_param:.2f}); needs {memory.format_bytes(need)} on the device")
            if row.kahan:
                reasons.append(_kahan_reason(row))
            return name, _hyperparameters_for(name, adamw_lr, wd, reasons)
    reasons.append(
        "even weights and gradients alone exceed the device: train in bf16, shard (FSDP) or use adapters (LoRA); "
        "the most frugal registered optimizer is suggested"
    )
    for name in ("paged_adamw_8bit", "adamw_8bit", "lion_8bit"):
        if _registered(name):
            return name, _hyperparameters_for(name, adamw_lr, wd, reasons)
    return "adamw", {"lr": adamw_lr, "weight_decay": wd}


def _kahan_reason(row: memory.MemoryRow) -> str:
    per_param = row.kahan / max(row.n_params, 1)
    return (
        f"{per_param:.0f} B/param of that state is the Kahan buffer of the bf16/fp16 parameters (kahan_sum=True, "
        f"the default: it keeps the small updates bf16 rounding loses); optim_args='kahan_sum=False' is the cheaper "
        f"choice, {(row.state - row.kahan) / max(row.n_params, 1):.2f} B/param ({memory.format_bytes(row.kahan)} "
        "less), with fp32 master weights or some lost updates"
    )


def _hyperparameters_for(name: str, adamw_lr: float, wd: float, reasons: list[str]) -> dict[str, Any]:
    rule = registry.parse(name)[0]  # type: ignore[index]
    if rule == "lion":
        values = translate_hparams("adamw", name, lr=adamw_lr, weight_decay=wd).values
        reasons.append(
            f"Lion takes a {LION_FACTOR:g}x smaller lr ({values['lr']:g}) and {LION_FACTOR:g}x larger weight decay "
            f"({values['weight_decay']:g}) than AdamW, betas {values['betas']}"
        )
        return dict(values)
    return {"lr": adamw_lr, "weight_decay": wd}


def _stabilize(optim: str, hp: dict[str, Any], reasons: list[str]) -> tuple[str, dict[str, Any]]:
    parsed = registry.parse(optim)
    if parsed is not None and parsed[0] == "adamw":
        prefix = "paged_" if parsed[2] == "paged" else ""
        suffix = "_8bit" if parsed[1] == "8bit" else ""
        stable = f"{prefix}stable_adamw{suffix}"
        if _registered(stable):
            reasons.append("unstable training: StableAdamW clips each update (no gradient clipping needed)")
            return stable, {k: v for k, v in hp.items() if k != "betas"}
    betas = hp.get("betas")
    accepted = _accepted(optim)
    if "betas" in accepted and len(accepted["betas"]) >= 2:
        base = tuple(betas or accepted["betas"])
        new = (base[0], min(base[1], STABLE_BETA2), *base[2:])
        reasons.append(f"unstable training: beta2 {base[1]} -> {new[1]} so the second moment reacts to spikes sooner")
        return optim, {**hp, "betas": new}
    reasons.append(f"unstable training: {optim} has no beta2 to lower; lower the lr and add warmup")
    return optim, hp


def _accepted(optim: str) -> dict[str, Any]:
    try:
        spec = registry.resolve(optim)
    except ValueError:
        return {}
    return spec.defaults if spec is not None else {}


def _memory(optim: str, size: Any, param_dtype: Any) -> memory.MemoryRow | None:
    if size is None:
        return None
    try:
        return memory.optimizer_memory(optim, size, param_dtype=param_dtype)
    except (ValueError, ImportError):  # not an hf_optim name: no memory model
        return None


# --- command line ----------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local Hugging Face model directory (read on the meta device, no weights)")
    source.add_argument("--params", help="parameter count, e.g. 7B, 125M")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: from --model, else transformer")
    parser.add_argument("--device-memory", "--device_memory", dest="device_memory", help="e.g. 24GB, 80GiB")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="global batch size")
    parser.add_argument("--tuning-budget", "--tuning_budget", dest="tuning_budget", choices=TUNING_BUDGETS,
                        default="low", help="high: you can tune the lr schedule")
    parser.add_argument("--unstable", action="store_true", help="training shows loss spikes")
    parser.add_argument("--from-scratch", "--from_scratch", dest="from_scratch", action="store_true",
                        help="pretraining from random weights, not fine-tuning (transformers: Muon)")
    parser.add_argument("--dtype", default=None, help="parameter dtype for memory: fp32, bf16, fp16")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cli_run(args: argparse.Namespace) -> int:
    model = memory.load_model_skeleton(args.model) if args.model else None
    rec = recommend(
        model, n_params=args.params, task=args.task, device_memory=args.device_memory, batch_size=args.batch_size,
        tuning_budget=args.tuning_budget, unstable=args.unstable, param_dtype=args.dtype,
        from_scratch=args.from_scratch,
    )
    if args.json:
        print(json.dumps({**asdict(rec), "training_args": rec.to_training_args()}, indent=2, default=str))
        return 0
    print(rec)
    print("\nTrainingArguments(" + ", ".join(f"{k}={v!r}" for k, v in rec.to_training_args().items()) + ")")
    return 0
