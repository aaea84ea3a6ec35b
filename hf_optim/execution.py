"""Execution: one per-parameter step function, run eagerly or compiled.

``make_step`` closes over one configuration (rule, per-buffer codecs, flags,
parameter dtype) and returns a function of tensors only. The eager path calls
it as is; the compiled path hands the very same function to ``torch.compile``
(inductor: C++/OpenMP on CPU, Triton on GPU), which fuses decode -> update ->
encode into one pass over the parameter. Parameters arrive flattened to 1-D
and compilation uses dynamic shapes, so one graph serves every tensor size;
hyperparameters are 0-d tensors, so schedules never recompile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .rules.base import Buffer, NormFn, UpdateRule
from .state.base import StateCodec

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

    ``stored`` is the parameter's state dict (``step`` plus each codec's
    tensors, flattened); ``p`` and ``g`` are 1-D and share a layout.
    """
    low_precision = param_dtype != torch.float32

    def step_fn(p: Tensor, g: Tensor, stored: dict[str, Tensor], hp: dict[str, Tensor]) -> None:
        step = stored["step"]
        step.add_(1)
        p32 = p.float()
        if kahan:
            p32 = p32 + stored[KAHAN_KEY].float()
        c = rule.coefficients(hp, step, flags)
        # one realized buffer: inductor would otherwise recompute the scalar math per element
        c = dict(zip(c, torch.stack(list(c.values())).unbind(0)))
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


class Executor:
    """Caches one step function per configuration, compiled or eager."""

    def __init__(self) -> None:
        self._cache: dict[tuple, StepFn] = {}
        self._compile_failed = False

    def get(self, compiled: bool, key: tuple, build: Callable[[], StepFn]) -> StepFn:
        compiled = compiled and not self._compile_failed
        cache_key = (compiled, key)
        fn = self._cache.get(cache_key)
        if fn is None:
            fn = build()
            if compiled:
                fn = self._guarded(torch.compile(fn, dynamic=True, fullgraph=True), fn)
            self._cache[cache_key] = fn
        return fn

    def _guarded(self, compiled_fn: StepFn, eager_fn: StepFn) -> StepFn:
        """Fall back to eager, with one warning, when no compiler works here."""
        state = {"verified": False}

        def run(*args: Any) -> None:
            if state["verified"]:
                return compiled_fn(*args)
            try:
                compiled_fn(*args)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                self._compile_failed = True
                warnings.warn(
                    f"hf_optim: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                    "running the eager step instead, which is slower but identical.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                eager_fn(*args)
            state["verified"] = True

        return run


#: process-wide: compiled graphs are shared by every optimizer instance
EXECUTOR = Executor()


def compiler_available() -> bool:
    """Whether torch.compile can build kernels here (a C++ compiler on CPU)."""
    import shutil

    return shutil.which("gcc") is not None or shutil.which("cc") is not None or torch.cuda.is_available()
