"""The step plan: which backend steps which parameter, and the steps every backend shares.

The engine builds one ``StepItem`` per parameter (its working tensors, state
views and, for a strided parameter, the original to write back) and hands a
bucket of items sharing one ``StepConfig`` to ``Executor.run`` with the mode
the engine chose for that configuration. The run is always the same, whatever
the backend:

1. every item's step counter advances by one (here and only here);
2. each item goes to the mode's backend if ``backend.accepts(config, item)``
   returns None, else to the eager backend (the reference, which takes any
   item); the reasons are never silent for ``execution="native"`` (the engine
   raises where a whole configuration cannot run natively);
3. each backend's ``run(config, items, hp)`` updates its items in place;
4. items with a ``writeback`` target (a parameter stepped as a contiguous copy)
   are copied back, after any backend.

A group whose every bucket ran natively on plain tensors skips all this on later steps: the engine steps it from
the kernel calls ``hf_optim.buckets`` kept (the same kernel, coefficients and counter advance; checked every step
with a few C-level passes over the group instead of Python per parameter), and comes back here when a check fails.

A backend (the ``Backend`` protocol) is small on purpose, so new ones (a CUDA
kernel, more native rules) plug in by registering in ``BACKENDS``:

- ``name``: the mode it serves (``"eager"``, ``"compiled"``, ``"native"``, ...);
- ``accepts(config, item) -> str | None``: why it cannot take this item, or
  None. It must check every tensor property its code relies on (dtype, element
  count, contiguity, alignment, device): the backend receives nothing else;
- ``run(config, items, hp)``: update the items in place. The counters are
  already advanced (the coefficients take ``item.state["step"]``); the
  hyperparameters ``hp`` are float64 0-d tensors on the items' device, and the
  scalar math is rounded once to ``config.compute_dtype``
  (``execution.scalar_coefficients``). It must compute what the eager backend
  computes, within the rounding of its own fused arithmetic.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from .execution import (
    KAHAN_KEY,
    StepConfig,
    StepFn,
    StepItem,
    local_norm,
    make_step,
    row_chunks,
    scalar_coefficients,
    state_layout,
    working_item,
    working_layout,
)
from .kernels import native, triton_step
from .state.layouts import StateLayout
from .util.user_warnings import warn_user

#: how a bucket is stepped (``Optimizer(execution=...)`` picks one per configuration, or "auto")
MODES = ("eager", "compiled", "native", "triton")

#: compiled calls take buckets of these sizes (largest first), so a group of any
#: size needs at most this many graphs and pays Python/guard overhead per bucket
BUCKET_SIZES = (8, 4, 2, 1)
#: on CPU, one parameter a call: inductor's C++ build grows with the graph (adamw_8bit,
#: 8 tensors: 49 s cold in buckets of 8, 16 s one by one; 11 tensors: 66 s for the
#: 8, 2 and 1 graphs) and the steps are no slower (64 tensors: 56 ms a step, not 69)
CPU_BUCKET_SIZES = (1,)


class Backend(Protocol):
    name: str

    def accepts(self, config: StepConfig, item: StepItem) -> str | None: ...

    def run(self, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None: ...


class EagerBackend:
    """The reference: ``make_step``'s function called per item. Takes every item."""

    name = "eager"

    def __init__(self) -> None:
        self._steps: dict[StepConfig, StepFn] = {}

    def step_fn(self, config: StepConfig) -> StepFn:
        fn = self._steps.get(config)
        if fn is None:
            fn = self._steps[config] = make_step(
                config.rule, config.codecs, dict(config.flags), config.param_dtype, config.kahan, config.norm,
                config.param,
            )
        return fn

    def accepts(self, config: StepConfig, item: StepItem) -> str | None:
        return None

    def run(self, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        fn = self.step_fn(config)
        for item in _chunked(config, items):
            fn(item.p, item.g, item.state, hp)


class CompiledBackend:
    """The eager step function under ``torch.compile``; what a failed compilation leaves runs eagerly."""

    name = "compiled"

    def __init__(self, eager: EagerBackend) -> None:
        self._eager = eager
        self._compiled: dict[StepConfig, Callable[..., None]] = {}
        self._traced: set[tuple] = set()
        self._compile_failed = False

    def accepts(self, config: StepConfig, item: StepItem) -> str | None:
        return None

    def run(self, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        items = _chunked(config, items)
        bucket_fn = self._compiled.get(config)
        if bucket_fn is None:
            bucket_fn = self._compiled[config] = _compile_buckets(self._eager.step_fn(config))
        start = 0
        for size in CPU_BUCKET_SIZES if items and items[0].p.device.type == "cpu" else BUCKET_SIZES:
            while len(items) - start >= size and self._call(bucket_fn, items[start : start + size], hp,
                                                            config.rule.rounds_inside):
                start += size
        fn = self._eager.step_fn(config)
        for item in items[start:]:  # what a failed compilation left
            fn(item.p, item.g, item.state, hp)

    def _call(self, bucket_fn, chunk: list[StepItem], hp: dict[str, Tensor], rounds_inside: bool = False) -> bool:
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
                with compile_settings(emulate_casts=rounds_inside or ps[0].dtype in (torch.bfloat16, torch.float16)):
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


class NativeBackend:
    """``cpu_step.c`` (``hf_optim.kernels.native``): one kernel call per bucket and step count.

    Takes an item only when every tensor it hands the kernel has the dtype, size, contiguity,
    alignment and device the kernel assumes (``native.item_unsupported``).
    """

    name = "native"

    def __init__(self) -> None:
        # id(state dict) -> (its tensors as last checked, their ``_version``s, the parameter's numel, dtype and
        # config, its step counter): a state passes again without its per-tensor checks (most of a small
        # tensor's step) until a tensor is replaced or changed in place (resize_, set_, t_ bump ``_version``);
        # the parameter and gradient are checked every step
        self._checked: dict[int, tuple] = {}

    def accepts(self, config: StepConfig, item: StepItem) -> str | None:
        storage, keys = native_layout(config)
        if storage is None:
            return "the configuration has no native kernel"
        state = item.state
        try:
            states = [state[key] for key in keys]
            kahan = state[KAHAN_KEY] if config.kahan else None
        except KeyError as err:
            return f"its state lacks {err.args[0]!r}"
        p, g, counter = item.p, item.g, state["step"]
        tensors = (*states, kahan) if kahan is not None else tuple(states)
        versions = tuple(t._version for t in tensors)  # (the counter's moves every step: identity only)
        numel = p.numel()
        signature = (numel, p.dtype, id(config))
        cached = self._checked.get(id(state))
        if (cached is not None and cached[1] == versions and cached[2] == signature
                and cached[3] is counter and all(a is b for a, b in zip(cached[0], tensors))
                and native.dense_cpu(p, p.dtype, numel) and native.dense_cpu(g, p.dtype, numel)):
            return None
        why = native.item_unsupported(p, g, states, kahan, counter, storage)
        if why is None:
            if len(self._checked) > 65536:  # states of deleted parameters: start over rather than grow
                self._checked.clear()
            self._checked[id(state)] = (tensors, versions, signature, counter)
        return why

    def run(self, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        """One kernel call per distinct step count (usually one): the coefficients depend on it."""
        flags = dict(config.flags)
        storage, keys = native_layout(config)
        by_step: dict[float, list[StepItem]] = {}
        for item in items:
            by_step.setdefault(item.state["step"].item(), []).append(item)
        names = native.KERNELS[config.rule.name].coefficients
        for count, group in by_step.items():
            c = scalar_coefficients(config.rule, hp, torch.tensor(count), flags, torch.float32)
            params = [item.p for item in group]
            # the operator's body, without its per-tensor dispatch (~8 us a tensor); parameters are
            # still version-bumped, as in-place ops would, so autograd sees they changed
            native.step(
                params,
                [item.g for item in group],
                [item.state[key] for item in group for key in keys],
                [item.state[KAHAN_KEY] for item in group] if config.kahan else [],
                torch.stack([c[name] for name in names]),
                config.rule.name,
                storage,
                native.flag_bits(config.rule, flags, config.kahan, config.param),
                norm=None if config.norm is local_norm else config.norm,  # layer-wise rules: global norms
                checked=True,  # every item passed accepts() in this run
            )
            torch.autograd.graph.increment_version(params)


class TritonBackend:
    """The CUDA step (``hf_optim.kernels.triton_step``): one multi-tensor launch per bucket (two for LAMB and
    StableAdamW's norms). Takes an item whose tensors are contiguous, aligned and on the parameter's device."""

    name = "triton"

    def accepts(self, config: StepConfig, item: StepItem) -> str | None:
        if triton_step.accepts(item):
            return None
        return "a tensor is not contiguous and aligned on the parameter's device, or its gradient dtype is not taken"

    def run(self, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        triton_step.run(config, items, hp)


#: id(config) -> (config, storage codes, state keys): by id, as a StepConfig hashes its nested tuples on every
#: lookup (accepts runs per parameter per step); the config is kept so its id stays its own
_NATIVE_LAYOUTS: dict[int, tuple[StepConfig, list[int] | None, list[str]]] = {}


def native_layout(config: StepConfig) -> tuple[list[int] | None, list[str]]:
    """The kernel's storage codes and the state keys in kernel order (None: no native storage)."""
    cached = _NATIVE_LAYOUTS.get(id(config))
    if cached is None or cached[0] is not config:
        codes = [native.storage_code(buffer, codec) for buffer, codec in config.codecs]
        keys = [key for buffer, codec in config.codecs for key in codec.keys(buffer)]
        ok = config.rule.name in native.KERNELS and all(code is not None for code in codes)
        cached = _NATIVE_LAYOUTS[id(config)] = (config, codes if ok else None, keys)  # type: ignore[assignment]
    return cached[1], cached[2]


def _chunked(config: StepConfig, items: list[StepItem]) -> list[StepItem]:
    if not config.rule.elementwise:
        return items
    layout = state_layout(config)
    return [chunk for item in items for chunk in row_chunks(item, layout)]


class Executor:
    """Runs one bucket of items through the plan above."""

    def __init__(self) -> None:
        self.eager = EagerBackend()
        self.backends: dict[str, Backend] = {
            "eager": self.eager, "compiled": CompiledBackend(self.eager), "native": NativeBackend(),
            "triton": TritonBackend(),
        }

    def run(self, mode: str, config: StepConfig, items: list[StepItem], hp: dict[str, Tensor]) -> None:
        # every parameter's counter advances once, here, before its step (or its row chunks) runs
        torch._foreach_add_([item.state["step"] for item in items], 1)
        backend = self.backends[mode]
        taken, rest = (items, []) if mode == "eager" else _split(backend, config, items)
        if taken:
            backend.run(config, taken, hp)
        if rest:  # raw items (built for the kernel) take the working layout first
            self.eager.run(config, [_as_working(item, state_layout(config)) for item in rest], hp)
        for item in items:
            if item.writeback is not None:
                item.writeback.copy_(item.p.view_as(item.writeback))

    @property
    def _compile_failed(self) -> bool:
        return self.backends["compiled"]._compile_failed  # type: ignore[attr-defined]


def _as_working(item: StepItem, layout: StateLayout) -> StepItem:
    """A raw item (the kernel's: parameter-shaped, the state dict itself) in the eager step's working layout.
    A state tensor the kernel refused for its strides is made contiguous in place in the state dict (the
    same values): the working layout is views of it."""
    if tuple(item.p.shape) == working_layout(item.p, layout):
        return item
    for key, value in item.state.items():
        if not value.is_contiguous():
            item.state[key] = value.contiguous()
    return working_item(item.p, item.g, item.state, layout)


def _split(backend: Backend, config: StepConfig, items: list[StepItem]) -> tuple[list[StepItem], list[StepItem]]:
    taken, rest = [], []
    for item in items:
        (rest if backend.accepts(config, item) else taken).append(item)
    return taken, rest


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
def compile_settings(emulate_casts: bool = False) -> Iterator[None]:
    # equal sizes must not become one symbol: the next bucket's sizes would break that
    # equality guard and recompile. And inductor would fuse a bucket's parameters
    # horizontally into one C++ kernel that it leaves single-threaded; one loop nest per
    # parameter keeps every loop parallel. emulate_casts (bf16/fp16 parameters): without
    # emulate_precision_casts inductor keeps a bf16 rounding in fp32 registers, folding Kahan's
    # ``p32 - p32.to(bf16).float()`` to 0; fp32 parameters round nothing they re-read, and keep
    # the default. (Patched around each call, not passed as torch.compile options: with the FX
    # graph cache on, those options are dropped; the settings are part of that cache's key.)
    with torch.fx.experimental._config.patch(use_duck_shape=False), torch._inductor.config.patch(
        {"cpp.max_horizontal_fusion_size": 1, "cpp.min_chunk_size": 1, "emulate_precision_casts": emulate_casts}
    ):
        yield


#: process-wide: compiled graphs are shared by every optimizer instance
EXECUTOR = Executor()


def choose_mode(execution: str, config: StepConfig, device: torch.device, fallback: str, owner: str) -> str:
    """How a bucket steps under ``execution`` (``"auto"`` or a mode) on ``device``.

    ``"eager"``/``"compiled"`` as asked; ``"triton"`` (and ``"auto"`` on CUDA) and ``"native"`` (``"auto"``
    elsewhere) where the kernel takes the configuration, else ``fallback`` under ``"auto"`` and a ``ValueError``
    saying why when the mode was asked for by name (``owner``: the optimizer class, for the message).
    """
    if execution in ("eager", "compiled"):
        return execution
    flags = dict(config.flags)
    if execution == "triton" or (execution == "auto" and device.type == "cuda"):
        why = triton_step.unsupported(config.rule, config.codecs, flags, config.param_dtype, device)
        if why is not None and execution == "triton":
            raise ValueError(f"Invalid execution: 'triton' for {owner}: {why}")
        return "triton" if why is None else fallback
    why = native.unsupported(config.rule, config.codecs, flags, config.param_dtype, device)
    if why is not None and execution == "native":
        raise ValueError(native_error(owner, why))
    return "native" if why is None else fallback


def native_error(owner: str, why: str) -> str:
    return (f"Invalid execution: 'native' for {owner}: {why} "
            f"(native kernels: {', '.join(native.KERNELS)}; 'auto' falls back to compiled or eager)")


def compiler_available() -> bool:
    """Whether torch.compile can build kernels here (a C++ compiler on CPU)."""
    import shutil

    return shutil.which("gcc") is not None or shutil.which("cc") is not None or torch.cuda.is_available()
