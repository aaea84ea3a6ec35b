"""The memory model: exact bytes of weights, gradients and optimizer state.

Blog posts quote optimizer memory as multipliers ("AdamW: 2x", "8-bit: ~14 GB
for 7B"). Those are rounded, and they ignore what really decides the bytes:
which state buffers the update rule keeps, how the storage codec lays them out
(8-bit adds one fp32 scale per 256-element block; small tensors, embeddings,
lm_head and norms stay fp32), a per-tensor step counter, and a Kahan
compensation buffer for bf16 parameters. This module computes the bytes from
the same objects the optimizer allocates with (the registry's spec, the rule's
``buffers``, the codec's ``nbytes`` and ``codec_for``), so the prediction is
exact, and ``state_bytes(optimizer)`` measures a live optimizer to prove it.

Given only a parameter count there is no tensor structure: the count is
treated as one big tensor (no per-tensor step counters, everything eligible
for 8-bit), which reproduces the textbook figures (AdamW, 7B, fp32: 56 GB).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import registry
from ..parsing.sizes import parse_size
from ..rules.base import ParamInfo
from ..state import MIN_8BIT_SIZE, planned_bytes

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class MemoryRow:
    """Bytes one optimizer needs for one model (all exact integers)."""

    optim: str
    state_precision: str
    placement: str
    weights: int
    gradients: int
    state: int
    n_params: int
    kahan: int = 0  # bytes of ``state`` that are Kahan buffers of bf16/fp16 parameters (``kahan_sum=False`` drops them)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.state

    @property
    def state_bytes_per_param(self) -> float:
        return self.state / max(self.n_params, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "state_bytes_per_param": self.state_bytes_per_param}


def parse_count(text: str | int | float) -> int:
    """``7B``, ``125M``, ``1.5e9``, ``350_000`` -> an int (decimal multipliers)."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9._]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"Invalid parameter count: {text!r} (expected e.g. 7B, 125M, 350000)")
    return int(float(match.group(1).replace("_", "")) * _SCALE[match.group(2).upper()])


def parse_bytes(text: str | int | float) -> int:
    """``24GB``, ``80GiB``, ``512MB``, or a number of bytes -> an int (``hf_optim.parsing.sizes``)."""
    if isinstance(text, int | float):
        return int(text)
    size = parse_size(str(text))
    if size is None:
        raise ValueError(f"Invalid memory size: {text!r} (expected e.g. 24GB, 80GiB, 512MB or a byte count)")
    return size


def format_bytes(n: float) -> str:
    """Decimal units, as the guide and GPU spec sheets use them (1 GB = 1e9 bytes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[value]
    except KeyError:
        raise ValueError(f"Invalid param_dtype: {value!r} (allowed: {', '.join(_DTYPES)})") from None


# --- per-parameter state layout ---------------------------------------------------------


def _rule_and_defaults(spec: registry.OptimizerSpec) -> tuple[Any, dict[str, Any]]:
    cls = spec.load_class()
    return cls.rule, spec.defaults


def param_state_bytes(
    spec: registry.OptimizerSpec,
    name: str | None,
    numel: int,
    dtype: torch.dtype,
    *,
    hyperparameters: dict[str, Any] | None = None,
    step_counter: bool = True,
    shape: tuple[int, ...] | None = None,
) -> int:
    """Exact state bytes one parameter gets from the optimizer ``spec``.

    With its ``shape``, a parameter that the optimizer's rule hands to its companion (Muon: AdamW for what
    is not a hidden matrix) is counted with the companion's buffers; without, as the rule's own.
    """
    rule, defaults = _rule_and_defaults(spec)
    group = {**defaults, **(hyperparameters or {})}
    if shape is not None and rule.rule_for(ParamInfo(ndim=len(shape), shape=shape, name=name)) is not rule:
        rule, group = rule.other, rule.other_group(group)
    return planned_bytes(rule, group, name, numel, dtype, step_counter=step_counter)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Measured bytes of every tensor in a live optimizer's state (shared storage counted once)."""
    from ..engine import unwrap  # accelerate's AcceleratedOptimizer and similar wrappers

    optimizer = unwrap(optimizer)
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                # the view's own address: paged state keeps all of a parameter's buffers in one storage
                key = (value.data_ptr(), value.nbytes) if value.numel() else (id(value), 0)
                if key not in seen:
                    seen.add(key)
                    total += value.nbytes
    return total


# --- the table --------------------------------------------------------------------------


def _named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters())  # tied parameters appear once, as the optimizer sees them


def optimizer_memory(
    optim: str,
    model_or_n_params: torch.nn.Module | int | str,
    *,
    param_dtype: str | torch.dtype | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> MemoryRow:
    """The exact memory row for one hf_optim optimizer name."""
    spec = registry.resolve(optim) if isinstance(optim, str) else None
    if spec is None:
        same = " (torch's AdamW keeps the same fp32 state as 'adamw')" if optim.startswith("adamw_torch") else ""
        raise ValueError(
            f"optim={optim!r} is a transformers optimizer; the memory model covers hf_optim names "
            f"(`hf-optim list`){same}"
        )
    if isinstance(model_or_n_params, torch.nn.Module):
        named = _named_params(model_or_n_params)
        dtype_of = (lambda p: _dtype(param_dtype)) if param_dtype is not None else (lambda p: p.dtype)
        weights = sum(p.numel() * dtype_of(p).itemsize for _, p in named)
        trainable = [(n, p) for n, p in named if p.requires_grad]
        gradients = sum(p.numel() * dtype_of(p).itemsize for _, p in trainable)
        def total_state(hp: dict[str, Any] | None) -> int:
            return sum(param_state_bytes(spec, n, p.numel(), dtype_of(p), hyperparameters=hp, shape=tuple(p.shape))
                       for n, p in trainable)

        n_params = sum(p.numel() for _, p in named)
    else:
        n_params = parse_count(model_or_n_params)
        dtype = _dtype(param_dtype or "fp32")
        weights = gradients = n_params * dtype.itemsize

        def total_state(hp: dict[str, Any] | None) -> int:
            return param_state_bytes(spec, None, n_params, dtype, hyperparameters=hp, step_counter=False)

    state = total_state(hyperparameters)
    group = {**spec.defaults, **(hyperparameters or {})}
    kahan = state - total_state({**(hyperparameters or {}), "kahan_sum": False}) if "kahan_sum" in group else 0
    return MemoryRow(
        optim=spec.name,
        state_precision=str(group["state_precision"]),
        placement=spec.placement,
        weights=weights,
        gradients=gradients,
        state=state,
        n_params=n_params,
        kahan=kahan,
    )


def memory_table(
    model_or_n_params: torch.nn.Module | int | str,
    *,
    optims: Iterable[str] | None = None,
    param_dtype: str | torch.dtype | None = None,
    canonical_only: bool = True,
) -> list[MemoryRow]:
    """Exact bytes of weights, gradients and state for every registered hf_optim optimizer.

    Args:
        model_or_n_params: a model (its real tensors, names and dtypes decide the
            codec per parameter) or a parameter count (``7_000_000_000`` or ``"7B"``).
        optims: names to include; default every registered grammar name.
        param_dtype: override the parameter dtype (``"bf16"`` for pure-bf16 training);
            default the model's own dtypes, or fp32 for a count.
        canonical_only: skip aliases and ``_32bit`` spellings of the same optimizer.
    """
    names = list(optims) if optims is not None else _canonical_names() if canonical_only else registry.hf_optim_names()
    return [optimizer_memory(name, model_or_n_params, param_dtype=param_dtype) for name in names]


def _canonical_names() -> list[str]:
    names = []
    for name in registry.hf_optim_names():
        parsed = registry.parse(name)
        if parsed is None or name in registry.ALIASES or name.endswith("_32bit"):
            continue
        names.append(name)
    return names


def rows_for_print(rows: Sequence[MemoryRow]) -> list[dict[str, str]]:
    return [
        {
            "optim": r.optim,
            "state": r.state_precision,
            "placement": r.placement,
            "weights": format_bytes(r.weights),
            "gradients": format_bytes(r.gradients),
            "optimizer state": format_bytes(r.state),
            "bytes/param": f"{r.state_bytes_per_param:.3f}",
            "without Kahan": f"{(r.state - r.kahan) / max(r.n_params, 1):.3f}" if r.kahan else "",
            "total": format_bytes(r.total),
        }
        for r in rows
    ]


PRINT_COLUMNS = ["optim", "state", "placement", "weights", "gradients", "optimizer state", "bytes/param", "total"]
KAHAN_COLUMN = "without Kahan"

KAHAN_NOTE = (
    "bf16/fp16 parameters: bytes/param includes hf_optim's Kahan buffer (2 B/param, kahan_sum=True by default), "
    "which keeps the small updates bf16 rounding would lose. `without Kahan` is the cheaper choice, "
    "optim_args='kahan_sum=False' (then keep fp32 master weights, or expect lost updates)."
)


# --- command line ----------------------------------------------------------------------------


def load_model_skeleton(path: str) -> torch.nn.Module:
    """A local HF model directory's architecture on the meta device: real names and shapes, no weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls: Any = transformers.AutoModel
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, cls)
        break
    with torch.device("meta"):
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="parameter count, e.g. 7B, 125M")
    source.add_argument("--model", help="a local Hugging Face model directory (read on the meta device)")
    parser.add_argument(
        "--dtype", default=None, help="parameter dtype: fp32, bf16, fp16 (default: the model's, or fp32)"
    )
    parser.add_argument("--optims", default=None, help="comma-separated names (default every optimizer)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (exact bytes)")


def cli_run(args: argparse.Namespace) -> int:
    from .cli import print_table

    size: Any = load_model_skeleton(args.model) if args.model else args.params
    optims = [n.strip() for n in args.optims.split(",") if n.strip()] if args.optims else None
    rows = memory_table(size, optims=optims, param_dtype=args.dtype)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    n = rows[0].n_params if rows else 0
    print(f"{n:,} parameters; exact bytes, shown in decimal units (1 GB = 1e9 B); activations not included")
    columns = PRINT_COLUMNS if not any(r.kahan for r in rows) else [*PRINT_COLUMNS[:-1], KAHAN_COLUMN, "total"]
    print_table(rows_for_print(rows), columns)
    if any(r.kahan for r in rows):
        print("\n" + KAHAN_NOTE)
    print("\npaged_*: the state moves to host memory (or a file) when the device is full: off the device budget.")
    if not args.model:
        print("8-bit: 1 byte per element + one fp32 scale per 256-element block; with a model (--model), "
              f"embeddings, lm_head, norms and tensors < {MIN_8BIT_SIZE} elements keep fp32 state.")
    return 0
