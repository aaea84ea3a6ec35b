"""Execution: one per-parameter step function, run eagerly, compiled or natively.

``make_step`` closes over one configuration (rule, per-buffer codecs, flags,
parameter dtype) and returns a function of tensors only. The eager path calls
it as is; the compiled path hands the very same function to ``torch.compile``
(inductor: C++/OpenMP on CPU, Triton on GPU), which fuses decode -> update ->
encode into one pass over the parameter. Parameters arrive flattened to 1-D
and compilation uses dynamic shapes, so one graph serves every tensor size;
hyperparameters are 0-d tensors, so schedules never recompile.

The native path (``hf_optim.kernels``, CPU only, for the rules it covers)
takes the rule's coefficients from the same ``coefficients`` and does the
elementwise part in a hand-written kernel, one call per bucket and step count.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kernels import native, triton_step
from .rules.base import Buffer, NormFn, UpdateRule
from .state.base import StateCodec
from .user_warnings import warn_user

StepFn = Callable[[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]], None]

#: the key of the Kahan-compensation buffer kept for low-precision parameters
KAHAN_KEY = "kahan_comp"


def local_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


def make_step(
    rule: type[UpdateRule],
    codecs: tuple[tuple[Buffer, StateCodec], ...],
    flags: Mapping[str, Any],
    param_dtype: torch.dtype,
    kahan: bool,
    norm: NormFn = local_norm,
) -> StepFn:
    """The step for one configuration: ``fn(p, g, stored, hp)`` updates in place.

    ``stored`` is the parameter's state dict (``step``, already advanced to this
    step by ``Executor.run``, plus each codec's tensors in the working layout);
    ``p`` and ``g`` share that layout.
    """
    low_precision = param_dtype != torch.float32

    def step_fn(p: Tensor, g: Tensor, stored: dict[str, Tensor], hp: dict[str, Tensor]) -> None:
        step = stored["step"]
        p32 = p.float()
        if kahan:
            p32 = p32 + stored[KAHAN_KEY].float()
        c = rule.coefficients(hp, step, flags)
        # one realized buffer: inductor would otherwise recompute the scalar math per element
        packed = torch.stack(list(c.values()))
        c = {key: packed[i] for i, key in enumerate(c)}
        state = {buffer.name: codec.decode(stored, buffer, p.numel()) for buffer, codec in codecs}
        rule.update(p32, g.float(), state, c, flags, norm)
        for buffer, codec in codecs:
            codec.encode(state[buffer.name], stored, buffer)
        if low_precision:
            rounded = p32.to(param_dtype)
            if kahan:  # keep what rounding lost, re-added next step
                stored[KAHAN_KEY].copy_(p32 - rounded.float())
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

    @property
    def block(self) -> int | None:
        """The block of a block-wise codec among the buffers', if any (see ``working_state``)."""
        return next((codec.block for _, codec in self.codecs if codec.block), None)


def working_layout(p: Tensor, block: int | None) -> tuple[int, ...]:
    """The shape a parameter is stepped in: (rows, block) when a block-wise codec's
    blocks tile it exactly, else 1-D. Either way one compiled graph serves every size."""
    numel = p.numel()
    if block and numel >= block and numel % block == 0:
        return (numel // block, block)
    return (numel,)


def working_state(state: Mapping[str, Tensor], shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Views of a parameter's state in its working layout, as codecs receive them.

    The 0-d step stays; a buffer's elements take the parameter's working shape;
    one-per-block tensors (block scales) become (rows, 1) in the (rows, block) layout.
    """
    numel = math.prod(shape)
    out = {}
    for key, value in state.items():
        if key == "step":
            out[key] = value
        elif value.numel() == numel:
            out[key] = value if value.shape == shape else value.view(shape)
        elif len(shape) == 2 and value.numel() == shape[0]:
            out[key] = value.view(shape[0], 1)
        else:
            out[key] = value if value.dim() == 1 else value.view(-1)
    return out


def flat_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """1-D views of every state tensor but the 0-d step (codecs' layout for whole-tensor work)."""
    return {k: v if v.dim() == 1 or k == "step" else v.view(-1) for k, v in state.items()}


#: rows (of a block-wise codec's 256) per compiled call when an elementwise rule steps a
#: large parameter: the fused 8-bit step keeps fp32 temporaries, and at 2 MiB a chunk
#: they stay in cache (8M-element tensors stepped whole ran ~2-4x slower per element)
CHUNK_ROWS = 2048


def row_chunks(item: StepItem) -> list[StepItem]:
    """Split a (rows, block) working item into row chunks stepped as separate items
    (they share the step counter, which ``Executor.run`` advances before any runs)."""
    total = item.p.shape[0]
    if item.p.dim() != 2 or total <= CHUNK_ROWS or item.writeback is not None:
        return [item]
    chunks = []
    for start in range(0, total, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        state = {key: value if key == "step" else value[rows] for key, value in item.state.items()}
        chunks.append(StepItem(item.p[rows], item.g[rows], state, None))
    return chunks


class StepItem(NamedTuple):
    """One parameter's step inputs (flattened to the working layout, or raw for the native kernel);
    ``writeback`` is the strided original, if any."""

    p: Tensor
    g: Tensor
    state: dict[str, Tensor]
    writeback: Tensor | None


#: compiled calls take buckets of these sizes (largest first), so a group of any
#: size needs at most this many graphs and pays Python/guard overhead per bucket
BUCKET_SIZES = (8, 4, 2, 1)
#: on CPU, one parameter a call: inductor's C++ build grows with the graph (adamw_8bit,
#: 8 tensors: 49 s cold in buckets of 8, 16 s one by one; 11 tensors: 66 s for the
#: 8, 2 and 1 graphs) and the steps are no slower (64 tensors: 56 ms a step, not 69)
CPU_BUCKET_SIZES = (1,)


#: how a bucket is stepped (``Optimizer(execution=...)`` picks one per bucket, or "auto")
MODES = ("eager", "compiled", "native", "triton")


class Executor:
    """Runs buckets of parameter steps: eagerly, through cached compiled graphs, or natively."""

    def __init__(self) -> None:
        self._eager: dict[StepConfig, StepFn] = {}
        self._compiled: dict[StepConfig, Callable[..., None]] = {}
        self._traced: set[tuple] = set()
        self._compile_failed = False

    def run(self, mode: str, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        eager = self._eager.get(config)
        if eager is None:
            eager = self._eager[config] = make_step(
                config.rule, config.codecs, dict(config.flags), config.param_dtype, config.kahan, config.norm
            )
        if mode == "native":
            # the kernel (which advances their step counters itself) takes gradients of the parameter's dtype;
            # the others (e.g. fp32 gradients of bf16 parameters) step eagerly below
            _run_native(config, [item for item in items if item.g.dtype == item.p.dtype], hp)
            items, mode = [item for item in items if item.g.dtype != item.p.dtype], "eager"
            if not items:
                return
        if mode == "triton":  # the kernel advances counters itself; what it cannot take as is steps eagerly
            taken = [triton_step.accepts(item) for item in items]
            triton_step.run(config, [item for item, ok in zip(items, taken) if ok], hp)
            self._write_back([item for item, ok in zip(items, taken) if ok])
            items, mode = [item for item, ok in zip(items, taken) if not ok], "eager"
            if not items:
                return
        # every parameter's counter advances once, here, before its step (or its row chunks) runs
        torch._foreach_add_([item.state["step"] for item in items], 1)
        if config.rule.elementwise:
            items = [chunk for item in items for chunk in row_chunks(item)]
        start = 0
        if mode == "compiled":
            bucket_fn = self._compiled.get(config)
            if bucket_fn is None:
                bucket_fn = self._compiled[config] = _compile_buckets(eager)
            for size in CPU_BUCKET_SIZES if items and items[0].p.device.type == "cpu" else BUCKET_SIZES:
                while len(items) - start >= size and self._call_compiled(bucket_fn, items[start : start + size], hp):
                    start += size
        for item in items[start:]:  # eager, or what a failed compilation left
            eager(item.p, item.g, item.state, hp)
        self._write_back(items)

    @staticmethod
    def _write_back(items: list[StepItem]) -> None:
        for item in items:  # (row chunks never have a writeback)
            if item.writeback is not None:
                item.writeback.copy_(item.p.view_as(item.writeback))

    def _call_compiled(self, bucket_fn, chunk: list[StepItem], hp: dict[str, Tensor]) -> bool:
        """Run one compiled bucket; False (and nothing run) once compilation has failed."""
        if self._compile_failed:
            return False
        ps, gs, states = [i.p for i in chunk], [i.g for i in chunk], [i.state for i in chunk]
        # what makes dynamo trace anew: the bucket size and size-1 (specialized) tensors
        signature = (id(bucket_fn), tuple((p.dim(), p.numel() == 1) for p in ps))
        try:
            if signature in self._traced:
                bucket_fn(ps, gs, states, hp)
            else:  # the settings cost ~40 us to enter: only where a trace can happen
                with _compile_settings():
                    bucket_fn(ps, gs, states, hp)
                self._traced.add(signature)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            # compilation fails before anything runs: fall back for good, with one warning
            self._compile_failed = True
            warn_user(
                f"hf_optim: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                "running the eager step instead, which is slower but identical.",
                RuntimeWarning,
            )
            return False
        return True


def _run_native(config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
    """One kernel call per distinct step count (usually one): the coefficients depend on it. The kernel
    advances each parameter's counter; the coefficients take the advanced count."""
    flags = dict(config.flags)
    by_step: dict[float, list[StepItem]] = {}
    for item in items:
        by_step.setdefault(item.state["step"].item() + 1, []).append(item)
    storage = [native.storage_code(buffer, codec) for buffer, codec in config.codecs]
    keys = [key for buffer, codec in config.codecs for key in codec.keys(buffer)]
    for count, group in by_step.items():
        c = config.rule.coefficients(hp, torch.tensor(count), flags)
        params = [item.p for item in group]
        # the operator's body, without its per-tensor dispatch (~8 us a tensor); parameters are
        # still version-bumped, as in-place ops would, so autograd sees they changed
        native.step(
            params,
            [item.g.contiguous() for item in group],
            [item.state[key] for item in group for key in keys],
            [item.state[KAHAN_KEY] for item in group] if config.kahan else [],
            torch.stack([c[name] for name in native.KERNELS[config.rule.name].coefficients]),
            config.rule.name,
            storage,
            native.flag_bits(config.rule, flags, config.kahan),
            [item.state["step"] for item in group],
        )
        torch.autograd.graph.increment_version(params)


def _compile_buckets(step_fn: StepFn) -> Callable[..., None]:
    def bucket_step(ps: list[Tensor], gs: list[Tensor], states: list[dict[str, Tensor]], hp: dict[str, Tensor]):
        for p, g, state in zip(ps, gs, states):
            step_fn(p, g, state, hp)

    # a private code object per configuration: dynamo keeps its graph cache (and
    # recompile limit) per code object, and every configuration's bucket_step
    # would otherwise share one
    fresh = types.FunctionType(
        bucket_step.__code__.replace(), bucket_step.__globals__, bucket_step.__name__, None, bucket_step.__closure__
    )
    return torch.compile(fresh, dynamic=True, fullgraph=True)


@contextlib.contextmanager
def _compile_settings() -> Iterator[None]:
    # equal sizes must not become one symbol: the next bucket's sizes would break that
    # equality guard and recompile. And inductor would fuse a bucket's parameters
    # horizontally into one C++ kernel that it leaves single-threaded; one loop nest per
    # parameter keeps every loop parallel. (Patched around each call, not passed as
    # torch.compile options: with the FX graph cache on, those options are dropped.)
    with torch.fx.experimental._config.patch(use_duck_shape=False), torch._inductor.config.patch(
        {"cpp.max_horizontal_fusion_size": 1, "cpp.min_chunk_size": 1}
    ):
        yield


#: process-wide: compiled graphs are shared by every optimizer instance
EXECUTOR = Executor()


def compiler_available() -> bool:
    """Whether torch.compile can build kernels here (a C++ compiler on CPU)."""
    import shutil

    return shutil.which("gcc") is not None or shutil.which("cc") is not None or torch.cuda.is_available()
