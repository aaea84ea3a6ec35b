"""The optimizer engine: a ``torch.optim.Optimizer`` that runs any update rule.

An hf_optim optimizer is update rule x state storage x placement x execution.
This module owns the parts every rule shares: param groups and their
validation, lazy state, per-step 0-d hyperparameter tensors, dispatch to the
eager or compiled step (``hf_optim.execution``), and a state dict of plain
tensors that loads across storages. Rules (``hf_optim.rules``) only do math;
codecs (``hf_optim.state``) only store.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .execution import EXECUTOR, KAHAN_KEY, compiler_available, local_norm, make_step
from .rules.base import Buffer, UpdateRule
from .state import CODECS, StateCodec, codec_for
from .state.placement import PLACEMENTS

#: version of the state-dict layout, stored in every saved param group
FORMAT_VERSION = 1
_FORMAT_KEY = "hf_optim_format"

#: options every optimizer takes on top of its rule's hyperparameters
ENGINE_DEFAULTS: dict[str, Any] = {
    "state_precision": "fp32",  # a codec name: fp32, bf16, 8bit (per group)
    "kahan_sum": True,  # compensate rounding of bf16/fp16 params (no effect on fp32 ones)
}
EXECUTIONS = ("auto", "eager", "compiled")
#: ``execution="auto"`` compiles once the model is big enough to repay compile time
AUTO_COMPILE_MIN_NUMEL = 1 << 20


class Optimizer(torch.optim.Optimizer):
    """Base of every hf_optim optimizer; a subclass only names its ``rule``.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts, as torch.optim takes.
        execution: ``"eager"`` (reference), ``"compiled"`` (torch.compile, one fused
            kernel per parameter) or ``"auto"`` (compiled for models of 1M+ elements
            when a compiler is present).
        placement: where state lives between steps: ``"device"`` (beside the parameter)
            or another registered placement (``"paged"``).
        state_precision: storage of the state buffers, ``"fp32"`` or ``"bf16"``
            (``"8bit"`` once registered); settable per param group.
        kahan_sum: keep a compensation buffer for bf16/fp16 params so small updates
            are not lost to rounding; settable per param group.
        **hyperparameters: the rule's own (``lr``, ``betas``, ...); anything else is an error.
    """

    rule: ClassVar[type[UpdateRule]]

    def __init__(
        self,
        params: Iterable[Any],
        *,
        execution: str = "auto",
        placement: str = "device",
        **hyperparameters: Any,
    ) -> None:
        cls_name = type(self).__name__
        allowed = {**self.rule.defaults, **ENGINE_DEFAULTS}
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            raise TypeError(
                f"{cls_name} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(sorted([*allowed, 'execution', 'placement']))}"
            )
        if placement not in PLACEMENTS:
            raise ValueError(f"Invalid placement: {placement!r} (allowed: {', '.join(PLACEMENTS)})")
        if execution not in EXECUTIONS:
            raise ValueError(f"Invalid execution: {execution!r} (allowed: {', '.join(EXECUTIONS)})")
        defaults = {**allowed, **hyperparameters}
        for key in self.rule.defaults:  # tuples stay tuples, as torch.optim keeps them
            if isinstance(self.rule.defaults[key], tuple) and isinstance(defaults[key], list):
                defaults[key] = tuple(defaults[key])
        self.execution = execution
        self.placement = placement
        super().__init__(params, defaults)
        if execution == "compiled" and not compiler_available():
            warnings.warn("hf_optim: no C++ compiler or GPU found; the compiled step runs eagerly.", stacklevel=2)
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        self._compiled = execution == "compiled" or (
            execution == "auto" and total >= AUTO_COMPILE_MIN_NUMEL and compiler_available()
        )

    # --- param groups -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        self._validate_group(group)

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        self.rule.validate(group)
        if group["state_precision"] not in CODECS:
            raise ValueError(
                f"Invalid state_precision: {group['state_precision']!r} "
                f"(allowed: {', '.join(sorted(CODECS))})"
            )
        for name, p in self._named(group):
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters: {name} is {p.dtype}; "
                    "optimize torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__} can only optimize floating-point tensors: {name} is {p.dtype}"
                )

    @staticmethod
    def _named(group: Mapping[str, Any]) -> Iterable[tuple[str, Tensor]]:
        names = group.get("param_names") or [f"param {i}" for i in range(len(group["params"]))]
        return zip(names, group["params"], strict=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("execution", "auto")
        self.__dict__.setdefault("placement", "device")
        self.__dict__.setdefault("_compiled", False)
        for group in self.param_groups:  # back-fill options added after a checkpoint was pickled
            for key, value in {**self.rule.defaults, **ENGINE_DEFAULTS}.items():
                group.setdefault(key, value)

    # --- state ------------------------------------------------------------------------

    def _flags(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {key: group[key] for key in sorted(self.rule.flag_names)}

    def _layout(self, p: Tensor, name: str | None, group: Mapping[str, Any]) -> tuple[tuple[Buffer, StateCodec], ...]:
        codec = codec_for(group["state_precision"], name, p.numel())
        return tuple((buffer, codec) for buffer in self.rule.buffers(self._flags(group)))

    def _kahan(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return bool(group["kahan_sum"]) and p.dtype in (torch.bfloat16, torch.float16)

    def _new_state(self, p: Tensor, name: str | None, group: Mapping[str, Any]) -> dict[str, Tensor]:
        local = _local(p)
        state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=local.device)}
        for buffer, codec in self._layout(p, name, group):
            state.update(codec.allocate(buffer, local))
            if buffer.kind == "param":  # starts as a copy of the parameter
                codec.encode(local.detach().reshape(-1).float(), state, buffer)
        if self._kahan(p, group):
            state[KAHAN_KEY] = torch.zeros_like(local, memory_format=torch.contiguous_format)
        return state

    # --- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scalars = self.rule.scalars(group)
            hp_by_device: dict[torch.device, dict[str, Tensor]] = {}
            for name, p in self._named(group):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name})")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p, name, group))
                local, grad = _local(p), _local(p.grad)
                hp = hp_by_device.get(local.device)
                if hp is None:
                    hp = hp_by_device[local.device] = _as_tensors(scalars, local.device)
                if local.is_contiguous():
                    self._step_fn(p, name, group)(*_flat(local, grad, state), hp)
                else:
                    self._step_strided(p, name, group, local, grad, state, hp)
        return loss

    def _step_fn(self, p: Tensor, name: str | None, group: Mapping[str, Any]):
        layout = self._layout(p, name, group)
        flags = self._flags(group)
        kahan = self._kahan(p, group)
        key = (self.rule, tuple((b, c.name) for b, c in layout), tuple(flags.items()), p.dtype, kahan)
        build = lambda: make_step(self.rule, layout, flags, p.dtype, kahan, local_norm)  # noqa: E731
        return EXECUTOR.get(self._compiled, key, build)

    def _step_strided(self, p, name, group, local, grad, state, hp) -> None:
        # non-contiguous parameter: step a contiguous copy, then write it back
        flat = local.contiguous()
        self._step_fn(p, name, group)(*_flat(flat, grad, state), hp)
        local.copy_(flat)

    # --- state dict -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group[_FORMAT_KEY] = FORMAT_VERSION
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict, converting storage where it differs; all or nothing.

        Validates group and parameter counts and every buffer's size, naming the
        parameter on a mismatch. State saved in another codec's layout (fp32 vs
        8-bit, or torch.optim's) is decoded and re-encoded into this one's.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        new_groups, new_state = [], {}
        for index, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group {index} of {len(saved_group['params'])} "
                    f"parameters that doesn't match the size of optimizer's group ({len(group['params'])})"
                )
            merged = {k: v for k, v in saved_group.items() if k not in ("params", _FORMAT_KEY)}
            for key, value in {**self.rule.defaults, **ENGINE_DEFAULTS}.items():
                merged.setdefault(key, value)  # a torch.optim or older checkpoint lacks our options
            merged["params"] = group["params"]
            if "param_names" in group:
                merged["param_names"] = group["param_names"]
            if isinstance(merged.get("betas"), list):
                merged["betas"] = tuple(merged["betas"])
            self._validate_group(merged)
            new_groups.append(merged)
            for (name, p), saved_id in zip(self._named(merged), saved_group["params"], strict=True):
                saved = state_dict["state"].get(saved_id)
                if saved:
                    new_state[p] = self._convert(p, name, merged, saved)
        # nothing above touched self: commit only now that everything converted
        self.param_groups = new_groups
        self.state = defaultdict(dict, new_state)

    def _convert(self, p: Tensor, name: str, group: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Tensor]:
        local = _local(p)
        state = self._new_state(p, name, group)
        step = saved.get("step")
        if step is None:
            raise ValueError(f"loaded state for {name} has no 'step'")
        state["step"] = torch.as_tensor(step, dtype=torch.float32).to(local.device).reshape(())
        for buffer, codec in self._layout(p, name, group):
            saved_codec = codec if codec.holds(saved, buffer) else _find_codec(saved, buffer)
            if saved_codec is None:
                raise ValueError(
                    f"loaded state for {name} lacks buffer {buffer.name!r} "
                    f"(has: {', '.join(sorted(saved))})"
                )
            for key in saved_codec.keys(buffer):
                tensor = saved[key]
                if saved_codec is codec and tensor.shape != state[key].shape:
                    raise ValueError(
                        f"loaded state for {name}: {key!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(state[key].shape)}"
                    )
            if saved_codec is codec:  # same layout: keep the exact bits and dtypes
                for key in codec.keys(buffer):
                    state[key] = saved[key].to(local.device).clone()
            else:
                value = saved_codec.decode({k: saved[k].to(local.device) for k in saved}, buffer, local.numel())
                if value.numel() != local.numel():
                    raise ValueError(
                        f"loaded state for {name}: {buffer.name!r} has {value.numel()} elements, "
                        f"the parameter has {local.numel()}"
                    )
                codec.encode(value.clone(), state, buffer)
        if KAHAN_KEY in state and KAHAN_KEY in saved:
            state[KAHAN_KEY] = saved[KAHAN_KEY].to(device=local.device, dtype=local.dtype).clone()
        return state


def _find_codec(saved: Mapping[str, Any], buffer: Buffer) -> StateCodec | None:
    return next((c for c in CODECS.values() if c.holds(saved, buffer)), None)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _flat(p: Tensor, g: Tensor, state: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    # every tensor 1-D: one compiled graph for all shapes (and inductor parallelizes 1-D loops best)
    flat = {k: v if v.dim() == 1 or k == "step" else v.view(-1) for k, v in state.items()}
    return p.view(-1), g.reshape(-1), flat


def _as_tensors(scalars: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {
        key: (value.to(device=device, dtype=torch.float32) if isinstance(value, Tensor) else
              torch.tensor(value, dtype=torch.float32, device=device))
        for key, value in scalars.items()
    }
