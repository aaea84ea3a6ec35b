"""The CUDA step: one Triton launch per bucket of parameters (two for LAMB and StableAdamW).

``execution="triton"`` (and ``"auto"`` on CUDA, where it applies) steps every
parameter of one configuration with a single multi-tensor launch of
``triton_rules.step_kernel``: each program decodes, updates and re-encodes one
tile (1024 elements) of one tensor. The host builds, per bucket, an int64
launch table (one row of addresses per tensor, ``COLUMNS``) and a map from
program to tensor; both are cached (by addresses and by sizes), so a steady
training loop copies nothing to the device but what changed.

No host syncs here and no recompiles: step counters are advanced on the device,
and the rule's ``coefficients`` are evaluated in torch on the stacked counters
of the bucket (one column per tensor, so parameters at different step counts
share a launch); learning rate and betas are 0-d device tensors read by the
kernel. The kernel is compiled once per (rule, storage, dtype) configuration.

LAMB and StableAdamW need whole-tensor norms of what the step computes: a
first launch (``PASS=1``) writes per-tile sums of squares of what the rule
takes norms of (recomputing the new moments, writing nothing else), torch
turns them (in float64, by segment) into per-tensor factors (the
trust ratio, the clipped lr) through the configuration's ``norm``, and the
second launch is the elementwise step. LARS takes norms of its inputs only
(parameter, gradient): those are the rule's ``norm`` on them in torch, as in
the eager step, so its momentum stays bit-exact too.

Exactness: 8-bit codes and scales and fp32/bf16 state equal the eager step's
bit for bit (``triton_rules`` mirrors each rule's operation order, contraction
is off); parameters too, up to the last-place differences of the coefficient
math and, for layer-wise rules, of the norms' summation order.

Without a GPU, ``TRITON_INTERPRET=1`` (set before triton is imported) runs the
same kernels on CPU tensors: that is how the tests check them against eager.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..rules.base import Buffer, UpdateRule, trust_ratio
from ..state.base import StateCodec
from ..state.blockwise import EIGHT_BIT, BlockwiseCodec
from ..state.dense import DenseCodec

if TYPE_CHECKING:
    from ..execution import StepConfig, StepItem

#: rule name -> (kernel index, the coefficient names it reads, in order); see ``triton_rules``
RULES: dict[str, tuple[int, tuple[str, ...]]] = {
    "adamw": (0, ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size",
                  "inv_bias_correction2_sqrt", "eps")),
    "lion": (1, ("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2")),
    "sgd": (2, ("lr", "weight_decay", "momentum", "one_minus_dampening", "first", "has_momentum")),
    "adan": (3, ("lr", "inv_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3",
                 "one_minus_beta3", "inv_bias_correction1", "diff_scale", "inv_bias_correction3_sqrt", "has_prev",
                 "eps")),
    "ranger": (4, ("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
                   "inv_bias_correction2_sqrt", "rectify", "rect", "eps", "sync", "alpha")),
    "lamb": (5, ("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                 "inv_bias_correction1", "inv_bias_correction2_sqrt", "eps")),
    "lars": (6, ("lr", "weight_decay", "trust_coefficient", "momentum", "one_minus_dampening", "has_momentum")),
    "stable_adamw": (7, ("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                         "inv_bias_correction1", "inv_bias_correction2", "inv_bias_correction2_sqrt", "eps",
                         "eps_sq")),
}
#: the structural flags each rule's kernel takes (the configuration's ``param.ndim`` decides whether a layer-wise
#: rule's trust applies)
FLAGS: dict[str, frozenset[str]] = {
    "adamw": frozenset({"maximize", "amsgrad"}),
    "sgd": frozenset({"maximize", "nesterov"}),
    "lamb": frozenset({"bias_correction", "exclude_bias_and_norm"}),
    "lars": frozenset({"nesterov", "exclude_bias_and_norm"}),
}
#: one int64 row per tensor: numel, param, grad, kahan, 4 state data, 4 block scales (``triton_rules``)
COLUMNS = ("numel", "param", "grad", "kahan", *(f"data{i}" for i in range(4)), *(f"scales{i}" for i in range(4)))
MAX_BUFFERS = 4
#: quantization blocks per program: a tile of 4 x 256 elements, 8 per thread at 4 warps
ROWS = 4
TILE = ROWS * 256
NUM_WARPS = 4
#: the addresses the kernel reads must be 16-byte aligned (it declares them so, and its loads vectorize)
ALIGNMENT = 16
_STORE_NONE, _STORE_FP32, _STORE_BF16, _STORE_SIGNED_8BIT, _STORE_UNSIGNED_8BIT = range(5)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: cached device tables are dropped once this many pile up (a model has a few buckets)
_CACHE_LIMIT = 64


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: decided when they are defined (``triton.jit`` reads
    ``TRITON_INTERPRET=1`` then), so once they are, by what they are; before, by the environment."""
    rules = sys.modules.get(f"{__package__}.triton_rules")
    if rules is not None:
        return type(rules.step_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_error() -> str | None:
    """Why Triton cannot be used here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    return None


def storage_code(buffer: Buffer, codec: StateCodec) -> int | None:
    """How the kernel stores this buffer, or None if it cannot."""
    if isinstance(codec, DenseCodec) and codec.dtype in (torch.float32, torch.bfloat16):
        return _STORE_FP32 if codec.dtype == torch.float32 else _STORE_BF16
    if isinstance(codec, BlockwiseCodec) and codec.block == 256:
        cmap = codec.code_map(buffer)
        standard = EIGHT_BIT.code_map(buffer)
        if (cmap.signed, cmap.power, cmap.scale, cmap.top) == (standard.signed, standard.power, standard.scale,
                                                             standard.top):
            return _STORE_SIGNED_8BIT if cmap.signed else _STORE_UNSIGNED_8BIT
    return None


def unsupported(rule: type[UpdateRule], codecs: Sequence[tuple[Buffer, StateCodec]], flags: Mapping[str, object],
                param_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this configuration cannot run in the Triton kernel on ``device``, or None when it can."""
    if device.type == "cpu" and not interpreting():
        return "the triton kernel runs on CUDA (on CPU only under TRITON_INTERPRET=1, for tests)"
    if device.type not in ("cuda", "cpu"):
        return f"the triton kernel runs on CUDA, not {device.type}"
    why = triton_error()
    if why:
        return why
    if rule.name not in RULES:
        return f"no triton kernel for {rule.name} (kernels: {', '.join(RULES)})"
    extra = sorted(name for name in flags if name not in FLAGS.get(rule.name, ()))
    if extra:
        return f"the triton {rule.name} kernel has no {', '.join(extra)}"
    if param_dtype not in _DTYPES:
        return f"the triton kernel takes fp32, bf16 or fp16 parameters, not {param_dtype}"
    if len(codecs) > MAX_BUFFERS:
        return f"the triton kernel takes at most {MAX_BUFFERS} state buffers, not {len(codecs)}"
    for buffer, codec in codecs:
        if storage_code(buffer, codec) is None:
            return f"the triton kernel stores state as fp32, bf16 or 8bit, not {codec.name} ({buffer.name})"
    return None


def accepts(item: StepItem) -> bool:
    """Whether the kernel can take this item as it is: contiguous, aligned, on the parameter's device,
    with a gradient it reads (anything else steps eagerly, unchanged)."""
    device = item.p.device
    tensors = [item.p, item.g, *(value for key, value in item.state.items() if key != "step")]
    kahan = item.state.get(_kahan_key())
    return (item.g.dtype in _DTYPES and item.g.numel() == item.p.numel()
            and (kahan is None or kahan.dtype == item.p.dtype)
            and all(t.device == device and t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0 for t in tensors))


def run(config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
    """Step every item (their counters already advanced by the plan), one launch per gradient dtype (usually
    one)."""
    if not items:
        return
    by_grad: dict[torch.dtype, list[StepItem]] = {}
    for item in items:
        by_grad.setdefault(item.g.dtype, []).append(item)
    for group in by_grad.values():
        _step(config, group, hp)
    for item in items:  # the kernel wrote through raw addresses: tell autograd the parameters changed
        torch.autograd.graph.increment_version(item.p)


class _Shape:
    """The program -> tensor map of one bucket shape (sizes), and where each tensor's programs start and end."""

    def __init__(self, numels: Sequence[int], device: torch.device) -> None:
        tiles = torch.tensor([-(-n // TILE) for n in numels], dtype=torch.int64)
        starts = torch.cumsum(tiles, 0) - tiles
        self.programs = int(tiles.sum())
        self.tensor_of_program = _to_device(torch.repeat_interleave(torch.arange(len(numels)), tiles).int(), device)
        self.first_program = _to_device(starts.int(), device)
        self.starts, self.ends = _to_device(starts, device), _to_device(starts + tiles, device)
        self.numels = _to_device(torch.tensor(numels, dtype=torch.float64), device)


_shapes: dict[tuple, _Shape] = {}
_tables: dict[tuple, Tensor] = {}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":  # pinned, so the copy is asynchronous (no host sync)
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _cached(cache: dict, key: tuple, build: Any) -> Any:
    value = cache.get(key)
    if value is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        value = cache[key] = build()
    return value


def _step(config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
    """One bucket sharing a gradient dtype: one launch (two for LAMB and StableAdamW's norms)."""
    device = items[0].p.device
    shape, table = _launch_tables(config, items, device)
    if shape.programs == 0:  # only empty tensors
        return
    rule, flags = config.rule, dict(config.flags)
    # float64 scalar math rounded once to fp32 (as execution.scalar_coefficients)
    steps = torch.stack([item.state["step"] for item in items]).to(torch.float64)
    c = rule.coefficients(hp, steps, flags)  # one column per tensor: parameters may be at different steps
    c = {name: torch.broadcast_to(torch.as_tensor(value, device=device).to(torch.float32), steps.shape)
         for name, value in c.items()}
    columns = [c[name] for name in RULES[rule.name][1]]
    f0, f1, layer_wise = _kernel_flags(rule.name, flags, config.param.ndim)
    constants = _constants(config, items[0].g.dtype, f0, f1)
    if layer_wise and rule.name == "lars":  # norms of the inputs: the rule's norm on them, in torch, as eager
        columns += _layer_factors(rule.name, c, _input_norms(config, items), None)
    elif layer_wise:
        sums = torch.empty((shape.programs, 2), dtype=torch.float32, device=device)
        _launch(shape, table, torch.stack(columns).contiguous(), sums, constants, 1)
        columns += _layer_factors(rule.name, c, _norms(config, shape, sums), _ones_norms(config, shape))
    coef = torch.stack(columns).contiguous()
    _launch(shape, table, coef, coef, constants, 0)


def _launch_tables(config: StepConfig, items: list[StepItem], device: torch.device) -> tuple[_Shape, Tensor]:
    """The bucket's program map (cached by sizes) and its launch table of addresses (cached by addresses)."""
    keys = [codec.keys(buffer) for buffer, codec in config.codecs]
    pad = [0] * (MAX_BUFFERS - len(keys))
    kahan_key = _kahan_key()
    flat: list[int] = []
    for item in items:
        state = item.state
        flat += [item.p.numel(), item.p.data_ptr(), item.g.data_ptr(),
                 state[kahan_key].data_ptr() if config.kahan else 0]
        flat += [state[k[0]].data_ptr() for k in keys] + pad
        flat += [state[k[1]].data_ptr() if len(k) > 1 else 0 for k in keys] + pad
    numels = tuple(flat[:: len(COLUMNS)])
    shape = _cached(_shapes, (device, numels), lambda: _Shape(numels, device))
    key = (device, *flat)
    table = _cached(_tables, key, lambda: _to_device(torch.tensor(flat, dtype=torch.int64), device))
    return shape, table


def _constants(config: StepConfig, grad_dtype: torch.dtype, f0: bool, f1: bool) -> dict[str, Any]:
    """The kernel's compile-time arguments for this configuration (one compiled kernel each)."""
    stores = [storage_code(buffer, codec) for buffer, codec in config.codecs]
    stores += [_STORE_NONE] * (MAX_BUFFERS - len(stores))
    return {"RULE": RULES[config.rule.name][0], "S0": stores[0], "S1": stores[1], "S2": stores[2],
            "S3": stores[3], "PDT": _tl_dtype(config.param_dtype), "GDT": _tl_dtype(grad_dtype),
            "KAHAN": config.kahan, "F0": f0, "F1": f1, "ROWS": ROWS}


def _launch(shape: _Shape, table: Tensor, coef: Tensor, sums: Tensor, constants: dict[str, Any], pass_: int) -> None:
    from . import triton_rules  # imports triton: only once a kernel runs

    s_map, u_map = EIGHT_BIT.signed_map, EIGHT_BIT.unsigned_map
    options = {} if interpreting() else {"num_warps": NUM_WARPS}
    device = table.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # the tensors' GPU
        triton_rules.step_kernel[(shape.programs,)](
            table, shape.tensor_of_program, shape.first_program, coef, coef.shape[1], sums,
            s_map.scale, u_map.scale, s_map.top, u_map.top, PASS=pass_, enable_fp_fusion=False,
            **constants, **options,
        )


def _kernel_flags(rule: str, flags: Mapping[str, Any], ndim: int | None) -> tuple[bool, bool, bool]:
    """(F0, F1, whether a sums pass runs first) for one rule's kernel."""
    if rule == "adamw":
        return bool(flags["maximize"]), bool(flags["amsgrad"]), False
    if rule == "sgd":
        return bool(flags["maximize"]), bool(flags["nesterov"]), False
    if rule in ("lamb", "lars"):
        trust = not (flags["exclude_bias_and_norm"] and ndim is not None and ndim <= 1)
        return (trust, False, trust) if rule == "lamb" else (bool(flags["nesterov"]), trust, trust)
    return False, False, rule == "stable_adamw"


def _norms(config: StepConfig, shape: _Shape, sums: Tensor) -> Tensor:
    """Per-tensor L2 norms (tensors, 2) from per-program sums of squares, through the configuration's norm
    (a sharded parameter's norm all-reduces the square of what it is given)."""
    total = torch.cat([sums.new_zeros((1, 2), dtype=torch.float64), sums.double().cumsum(0)])
    local = (total[shape.ends] - total[shape.starts]).clamp(min=0).sqrt().float()
    from ..execution import local_norm

    if config.norm is local_norm:
        return local
    return torch.stack([torch.stack([config.norm(v.view(1)) for v in pair]) for pair in local])


def _input_norms(config: StepConfig, items: list[StepItem]) -> Tensor:
    """(tensors, 2): the norms of each fp32 parameter (Kahan-compensated) and gradient."""
    norms = []
    for item in items:
        p32 = item.p.float()
        if config.kahan:
            p32 = p32 + item.state[_kahan_key()].float()
        norms.append(torch.stack([config.norm(p32), config.norm(item.g.float())]))
    return torch.stack(norms)


def _ones_norms(config: StepConfig, shape: _Shape) -> Tensor:
    """Each tensor's ``norm(ones_like(p))``, the root of its (global, if sharded) element count."""
    from ..execution import local_norm

    local = shape.numels.sqrt().float()
    return local if config.norm is local_norm else torch.stack([config.norm(v.view(1)) for v in local])


def _layer_factors(rule: str, c: Mapping[str, Tensor], norms: Tensor, ones: Tensor | None) -> list[Tensor]:
    """The per-tensor coefficients the second launch reads after the rule's own (``triton_rules``)."""
    if rule == "lamb":  # ibc2_sqrt squared, then trust ratio * lr, as LAMB.update computes them
        return [torch.broadcast_to(c["inv_bias_correction2_sqrt"].square(), norms[:, 0].shape),
                trust_ratio(norms[:, 0], norms[:, 1]) * c["lr"]]
    if rule == "lars":
        p_norm = norms[:, 0]
        denominator = norms[:, 1] + c["weight_decay"] * p_norm
        return [trust_ratio(p_norm, denominator, c["trust_coefficient"])]
    # stable_adamw: rms = ||x|| / ||ones||, lr / max(1, rms), then the decay with that lr
    lr = c["lr"] / (norms[:, 0] / ones).clamp(min=1.0)
    return [lr, 1 - lr * c["weight_decay"]]


def _kahan_key() -> str:
    from ..execution import KAHAN_KEY

    return KAHAN_KEY


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
