"""Execution: the per-parameter step function and the working layout it takes.

``make_step`` closes over one configuration (rule, per-buffer codecs, flags,
parameter dtype) and returns a function of tensors only. The eager backend calls
it as is; the compiled backend hands the very same function to ``torch.compile``
(inductor: C++/OpenMP on CPU, Triton on GPU), which fuses decode -> update ->
encode into one pass over the parameter. Parameters arrive flattened to 1-D
and compilation uses dynamic shapes, so one graph serves every tensor size;
hyperparameters are 0-d tensors, so schedules never recompile.

Precision, one rule for every backend (``StepConfig.compute_dtype``): the
elementwise math runs in fp32 for fp32/bf16/fp16 parameters and in float64 for
float64 ones (whose dense state is float64, as torch.optim keeps it). The
scalar math (bias corrections, ``1 - beta``, step sizes) runs in float64 on the
float64 hyperparameters and step count and is rounded once to the compute dtype.

Which backend steps which parameter, and the write-back of strided parameters,
is the step plan's (``hf_optim.plan``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .rules.base import NO_PARAM_INFO, Buffer, NormFn, ParamInfo, UpdateRule
from .state.base import StateCodec
from .state.layouts import ELEMENT, StateLayout, flat_state  # noqa: F401 (flat_state: re-exported)

StepFn = Callable[[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]], None]

#: the key of the Kahan-compensation buffer kept for low-precision parameters
KAHAN_KEY = "kahan_comp"


def local_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's elementwise math runs in: float64 for float64 parameters, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def scalar_coefficients(
    rule: type[UpdateRule], hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any], dtype: torch.dtype
) -> dict[str, Tensor]:
    """The rule's coefficients computed in float64 (``hp`` are float64 0-d tensors) and rounded once to ``dtype``.

    Rounding beta to fp32 before ``1 - beta`` loses the small difference (beta2 0.99999: 1.4e-3
    relative in the second moment after 10 steps); here only the final values are rounded.
    """
    c = rule.coefficients(hp, step.to(torch.float64), flags)
    # one realized buffer: inductor would otherwise recompute the scalar math per element
    packed = torch.stack([value.to(torch.float64) for value in c.values()]).to(dtype)
    return {key: packed[i] for i, key in enumerate(c)}


def make_step(
    rule: type[UpdateRule],
    codecs: tuple[tuple[Buffer, StateCodec], ...],
    flags: Mapping[str, Any],
    param_dtype: torch.dtype,
    kahan: bool,
    norm: NormFn = local_norm,
    param: ParamInfo = NO_PARAM_INFO,
) -> StepFn:
    """The step for one configuration: ``fn(p, g, stored, hp)`` updates in place.

    ``stored`` is the parameter's state dict (``step``, already advanced to this
    step by the plan (``plan.Executor.run``), plus each codec's tensors in the working layout);
    ``p`` and ``g`` share that layout. ``param`` is what the rule declared it needs of the parameter
    (``UpdateRule.param_fields``), a constant of the step: part of the configuration.
    """
    compute = compute_dtype(param_dtype)
    low_precision = param_dtype != compute

    def step_fn(p: Tensor, g: Tensor, stored: dict[str, Tensor], hp: dict[str, Tensor]) -> None:
        pc = p.to(compute)
        if kahan:
            pc = pc + stored[KAHAN_KEY].to(compute)
        c = scalar_coefficients(rule, hp, stored["step"], flags, compute)
        state = {buffer.name: codec.decode(stored, buffer, p.numel()).to(compute) for buffer, codec in codecs}
        rule.update(pc, g.to(compute), state, c, flags, norm, param)
        for buffer, codec in codecs:
            codec.encode(state[buffer.name], stored, buffer)
        if low_precision:
            rounded = pc.to(param_dtype)
            if kahan:  # keep what rounding lost, re-added next step
                stored[KAHAN_KEY].copy_(pc - rounded.to(compute))
            p.copy_(rounded)

    return step_fn


class StepConfig(NamedTuple):
    """Everything that shapes the step's graph; parameters sharing one run as a bucket."""

    rule: type[UpdateRule]
    codecs: tuple[tuple[Buffer, StateCodec], ...]
    flags: tuple[tuple[str, Any], ...]
    param_dtype: torch.dtype
    kahan: bool
    norm: NormFn
    #: the parameter's ``ParamInfo`` reduced to the rule's ``param_fields`` (``NO_PARAM_INFO`` for an
    #: elementwise rule, so every tensor shares one configuration and one compiled graph)
    param: ParamInfo = NO_PARAM_INFO

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.param_dtype)

    @property
    def block(self) -> int | None:
        """The block of the (rows, block) working layout, if any (``state_layout``)."""
        return state_layout(self).block


#: id(config) -> (config, its state layout): by id, as a StepConfig hashes its nested tuples on every lookup
#: (the engine asks once per parameter per step); the config is kept so its id stays its own
_STATE_LAYOUTS: dict[int, tuple[StepConfig, StateLayout]] = {}


def state_layout(config: StepConfig) -> StateLayout:
    """The declared layout of every tensor in ``config``'s state dicts: its codecs' and the Kahan buffer."""
    cached = _STATE_LAYOUTS.get(id(config))
    if cached is None or cached[0] is not config:
        cached = _STATE_LAYOUTS[id(config)] = (config, StateLayout.of(config.codecs, {KAHAN_KEY: ELEMENT}))
    return cached[1]


def working_layout(p: Tensor, layout: StateLayout) -> tuple[int, ...]:
    """The shape a parameter is stepped in: (rows, block) when its state's block tiles it exactly,
    else 1-D (``StateLayout.working_shape``). Either way one compiled graph serves every size."""
    return layout.working_shape(p.numel())


def working_state(state: Mapping[str, Tensor], shape: tuple[int, ...], layout: StateLayout) -> dict[str, Tensor]:
    """Views of a parameter's state in its working layout, as codecs receive them: each tensor
    shaped by its declared layout (``hf_optim.state.layouts``); the 0-d step stays."""
    return layout.working(state, shape)


def with_state(layout: StateLayout, item: StepItem, state: Mapping[str, Tensor]) -> StepItem:
    """``item`` stepping ``state`` (e.g. a placement's device copy) instead: in the working layout for a
    working item, as it is (flat) for a raw one (the native kernel's, parameter-shaped)."""
    shape = tuple(item.p.shape)
    if shape != layout.working_shape(item.p.numel()):
        return item._replace(state=dict(state))
    return item._replace(state=layout.working(state, shape))


def as_tensors(scalars: Mapping[str, Any], kept: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The hyperparameters as float64 0-d tensors: the scalar math runs in float64 and is rounded once
    (fp32 on Apple's MPS, which has no float64).

    The tensors are ``kept`` between steps and refilled in place (``fill_`` with a host number is a kernel
    argument): on CUDA a step then makes no host-to-device copy, and so no host sync, per hyperparameter. A
    tensor hyperparameter already on ``device`` in the right dtype (a schedule's) is used as it is.
    """
    dtype = torch.float32 if device.type == "mps" else torch.float64
    out = {}
    for key, value in scalars.items():
        if isinstance(value, Tensor) and value.device == device and value.dtype == dtype and value.dim() == 0:
            out[key] = value
            continue
        held = kept.get(key)
        if held is None:
            held = kept[key] = torch.zeros((), dtype=dtype, device=device)
        if isinstance(value, Tensor) and value.device.type != "cpu":
            held.copy_(value.reshape(()))  # device to device: no host sync
        else:
            held.fill_(value.item() if isinstance(value, Tensor) else value)
        out[key] = held
    return out


#: rows (of a block-wise codec's 256) per compiled call when an elementwise rule steps a
#: large parameter: the fused 8-bit step keeps fp32 temporaries, and at 2 MiB a chunk
#: they stay in cache (8M-element tensors stepped whole ran ~2-4x slower per element)
CHUNK_ROWS = 2048


def row_chunks(item: StepItem, layout: StateLayout) -> list[StepItem]:
    """Split a (rows, block) working item into row chunks stepped as separate items
    (they share the step counter, which the plan advances before any runs). Chunks are views of the
    item's working tensors (every declared layout has rows first there), so the plan's write-back of
    the whole item follows them."""
    total = item.p.shape[0]
    if item.p.dim() != 2 or total <= CHUNK_ROWS:
        return [item]
    chunks = []
    for start in range(0, total, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        chunks.append(StepItem(item.p[rows], item.g[rows], layout.rows(item.state, rows), None))
    return chunks


class StepItem(NamedTuple):
    """One parameter's step inputs (flattened to the working layout, or raw for the native kernel);
    ``writeback`` is the strided original, if any."""

    p: Tensor
    g: Tensor
    state: dict[str, Tensor]
    writeback: Tensor | None




def working_item(p: Tensor, g: Tensor, state: Mapping[str, Tensor], layout: StateLayout) -> StepItem:
    """A parameter, its gradient and its state in the working layout the step takes.

    1-D, or (rows, block) for block-wise state (``working_layout``). A non-contiguous
    parameter is stepped as a contiguous copy, which the plan writes back.
    """
    shape = layout.working_shape(p.numel())
    p, g = p.detach(), g.detach()  # plain tensors: dynamo refuses row views of views of autograd leaves
    if p.is_contiguous():
        return StepItem(p.view(shape), g.reshape(shape), layout.working(state, shape), None)
    return StepItem(p.reshape(shape).clone(), g.reshape(shape), layout.working(state, shape), p)
