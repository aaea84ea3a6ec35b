"""The optimizer engine: a ``torch.optim.Optimizer`` that runs any update rule.

An hf_optim optimizer is update rule x state storage x placement x execution.
This module owns the parts every rule shares: param groups and their
validation, lazy state, per-step 0-d hyperparameter tensors, dispatch to the
eager, compiled or native step (the step plan, ``hf_optim.plan``), and a state dict of plain
tensors that loads across storages. Rules (``hf_optim.rules``) only do math;
codecs (``hf_optim.state``) only store.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .buckets import NativeBuckets
from .execution import (
    KAHAN_KEY,
    StepConfig,
    StepItem,
    compute_dtype,
    flat_state,
    local_norm,
    working_item,
)
from .kernels import native, triton_step
from .plan import EXECUTOR, MODES, compiler_available
from .rules.base import Buffer, UpdateRule
from .state import (
    CODECS,
    MIN_8BIT_SIZE,
    StateCodec,
    float64_unsupported,
    keeps_kahan,
    layout,
    validate_policy,
)
from .state.loading import copy_checked, loaded_step
from .state.placement import PLACEMENTS, build_placement
from .user_warnings import warn_user

#: version of the state-dict layout, stored in every saved param group
FORMAT_VERSION = 1
_FORMAT_KEY = "hf_optim_format"

#: options every optimizer takes on top of its rule's hyperparameters
ENGINE_DEFAULTS: dict[str, Any] = {
    "state_precision": "fp32",  # a codec name: fp32, bf16, 8bit (per group)
    "kahan_sum": True,  # compensate rounding of bf16/fp16 params (no effect on fp32 ones)
    "min_8bit_size": MIN_8BIT_SIZE,  # smaller tensors keep fp32 state under 8bit
    "fp32_patterns": None,  # name regexes kept fp32 under 8bit (None: embeddings, lm_head, norms)
}
#: options that choose how state is stored, not the math: on load, the loading optimizer's win
STORAGE_OPTIONS = ("state_precision", "min_8bit_size", "fp32_patterns")
EXECUTIONS = ("auto", *MODES)
#: ``execution="auto"`` compiles once the model is big enough to repay compile time
AUTO_COMPILE_MIN_NUMEL = 1 << 20


class Optimizer(torch.optim.Optimizer):
    """Base of every hf_optim optimizer; a subclass only names its ``rule`` (``class X(Optimizer, rule=...)``).

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts, as torch.optim takes.
        execution: ``"eager"`` (reference), ``"compiled"`` (torch.compile, one fused
            kernel per parameter), ``"native"`` (the hand-written CPU kernel of
            ``hf_optim.kernels``: AdamW, Lion, SGD, Adan, Ranger; fp32 or 8-bit state, fp32 or bf16
            parameters), ``"triton"`` (the multi-tensor Triton kernel of
            ``hf_optim.kernels.triton_step`` on CUDA: every rule, fp32/bf16/8-bit state, fp32/bf16/fp16
            parameters) or ``"auto"``: triton on CUDA and native on CPU where they apply, else
            compiled for models of 1M+ elements when a compiler is present, else eager.
        placement: where state lives between steps: ``"device"`` (beside the parameter)
            or another registered placement (``"paged"``).
        paged_budget: with ``placement="paged"``: bytes of state kept beside the parameters
            (a number > 1 or ``"2GiB"``), a fraction of the free memory (``0.5`` or ``"50%"``),
            or ``None``/``"auto"`` (half of what is free); the rest is paged. Error otherwise.
        paged_dir: with ``placement="paged"`` on CPU: the spill directory for file-backed
            state (default ``tempfile.gettempdir()``). Error otherwise.
        state_precision: storage of the state buffers, ``"fp32"``, ``"bf16"`` or
            ``"8bit"`` (block-wise, ``hf_optim.state.blockwise``); settable per param group.
            On load, the loading optimizer's storage wins and saved state converts to it.
        min_8bit_size, fp32_patterns: under ``"8bit"``, tensors with fewer elements
            (default 4096) or whose name matches one of the regexes (default: embeddings,
            lm_head, norms) keep fp32 state; settable per param group. See
            ``precision_report()``.
        kahan_sum: keep a compensation buffer for bf16/fp16 params so small updates
            are not lost to rounding; settable per param group.
        **hyperparameters: the rule's own (``lr``, ``betas``, ...); anything else is an error.
    """

    rule: ClassVar[type[UpdateRule]]

    def __init_subclass__(cls, rule: type[UpdateRule] | None = None, **kwargs: Any) -> None:
        """``class AdamW(Optimizer, rule=rules.AdamW)``: the rule, and (unless the class has its own docstring)
        the rule module's docstring, which gives the formula and the paper."""
        super().__init_subclass__(**kwargs)
        if rule is not None:
            cls.rule = rule
            if cls.__doc__ is None:
                cls.__doc__ = (f"{sys.modules[rule.__module__].__doc__}\nOptions beyond the rule's hyperparameters "
                               "(execution, placement, state_precision, ...): see ``hf_optim.Optimizer``.\n")

    def __init__(
        self,
        params: Iterable[Any],
        *,
        execution: str = "auto",
        placement: str = "device",
        paged_budget: float | str | None = None,
        paged_dir: str | None = None,
        **hyperparameters: Any,
    ) -> None:
        cls_name = type(self).__name__
        allowed = {**self.rule.defaults, **ENGINE_DEFAULTS}
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            raise TypeError(
                f"{cls_name} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(sorted([*allowed, *constructor_options()]))}"
            )
        if placement not in PLACEMENTS:
            raise ValueError(f"Invalid placement: {placement!r} (allowed: {', '.join(PLACEMENTS)})")
        if execution not in EXECUTIONS:
            raise ValueError(f"Invalid execution: {execution!r} (allowed: {', '.join(EXECUTIONS)})")
        defaults = {**allowed, **hyperparameters}
        self.execution = execution
        self.placement = placement
        # paged placement (hf_optim.state.paged): None for "device"; paged_* only with "paged"
        self._pager = build_placement(placement, paged_budget=paged_budget, paged_dir=paged_dir)
        self._configs: dict[tuple, StepConfig] = {}  # per parameter and group setting
        self._interned: dict[StepConfig, StepConfig] = {}  # one object per distinct configuration
        super().__init__(params, defaults)
        if execution == "compiled" and not compiler_available():
            warn_user("hf_optim: no C++ compiler or GPU found; the compiled step runs eagerly.")
        why = native.rule_unsupported(self.rule) if execution == "native" else None
        if why:
            raise self._native_error(why)
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        # where "auto" cannot step natively: compiled for large models, eager for small ones (compile time)
        self._compiled = execution == "auto" and total >= AUTO_COMPILE_MIN_NUMEL and compiler_available()
        self._modes: dict[tuple, str] = {}  # (id(config), device) -> how that bucket steps
        self._hp: dict[tuple, dict[str, Tensor]] = {}  # (group index, device) -> its 0-d hyperparameters
        self._buckets = NativeBuckets()  # each group's native kernel calls, reused across steps

    # --- param groups -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _validate_group(self, group: dict[str, Any]) -> None:
        for key, default in self.rule.defaults.items():  # tuples stay tuples, as torch.optim keeps them
            if isinstance(default, tuple) and isinstance(group[key], list):
                group[key] = tuple(group[key])
        self.rule.validate(group)
        if group["state_precision"] not in CODECS:
            raise ValueError(
                f"Invalid state_precision: {group['state_precision']!r} "
                f"(allowed: {', '.join(sorted(CODECS))})"
            )
        validate_policy(group)
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
            why = float64_unsupported(group, name, p.numel()) if p.dtype == torch.float64 else None
            if why:
                raise ValueError(f"Invalid state_precision for {name}: {why}")

    @staticmethod
    def _named(group: Mapping[str, Any]) -> Iterable[tuple[str, Tensor]]:
        names = group.get("param_names") or [f"param {i}" for i in range(len(group["params"]))]
        return zip(names, group["params"], strict=True)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (execution={self.execution!r}, placement={self.placement!r}"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.append(f"    params: {len(group['params'])} tensors")
            lines.extend(f"    {k}: {group[k]}" for k in sorted(group) if k not in ("params", "param_names"))
        return "\n".join(lines) + "\n)"

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "execution": self.execution, "placement": self.placement,
                "_compiled": self._compiled, "_pager": self._pager}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("execution", "auto")
        self.__dict__.setdefault("placement", "device")
        self.__dict__.setdefault("_pager", None)
        self.__dict__["_configs"] = {}  # keyed by id(param): never carried over
        self.__dict__["_interned"] = {}
        self.__dict__["_modes"] = {}
        self.__dict__["_hp"] = {}
        self.__dict__["_buckets"] = NativeBuckets()
        self.__dict__.setdefault("_compiled", False)
        for group in self.param_groups:  # back-fill options added after a checkpoint was pickled
            for key, value in {**self.rule.defaults, **ENGINE_DEFAULTS}.items():
                group.setdefault(key, value)

    # --- state ------------------------------------------------------------------------

    def _flags(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {key: group[key] for key in sorted(self.rule.flag_names)}

    def _layout(self, p: Tensor, name: str | None, group: Mapping[str, Any]) -> tuple[tuple[Buffer, StateCodec], ...]:
        return layout(group, name, p.numel(), self.rule.buffers(self._flags(group)), p.dtype)

    def _kahan(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return keeps_kahan(group, p.dtype)

    def _new_state(self, p: Tensor, name: str | None, group: Mapping[str, Any],
                   allocate: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
        """``allocate`` (the pager's) turns the layout, given on the meta device, into zeros where the state
        lives: paged state is allocated in place, never as a full copy first."""
        local = _local(p)
        like = local if allocate is None else torch.empty(local.shape, dtype=local.dtype, device="meta")
        state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=local.device)}
        for buffer, codec in self._layout(p, name, group):
            state.update(codec.allocate(buffer, like))
        if self._kahan(p, group):
            state[KAHAN_KEY] = torch.zeros_like(like, memory_format=torch.contiguous_format)
        if allocate is not None:
            state = allocate(state)
        for buffer, codec in self._layout(p, name, group):
            if buffer.kind == "param":  # starts as a copy of the parameter
                codec.encode(local.detach().reshape(-1).to(compute_dtype(p.dtype)).clone(), flat_state(state), buffer)
        return state

    # --- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pager is not None:  # every group's new states placed before any update: a full disk changes nothing
            self._pager.prepare(self.state, ((p, functools.partial(self._new_state, p, name, group))
                                             for group in self.param_groups for name, p in self._named(group)
                                             if p.grad is not None))
        for index, group in enumerate(self.param_groups):
            scalars = self.rule.scalars(group)
            flags = self._flags(group)
            # the group settings a step configuration depends on (with the parameter, its cache key)
            storage = (tuple(v) if isinstance(v, list) else v for v in (group.get(k) for k in STORAGE_OPTIONS))
            group_key = (*storage, group["kahan_sum"], tuple(flags.items()))
            hyperparameters = functools.partial(_group_tensors, scalars, self._hp, index)
            if self._pager is None and self._buckets.step(index, group, group_key, self.state, hyperparameters):
                continue  # stepped from the kernel calls cached at an earlier step (hf_optim.buckets)
            # parameters that share a configuration and device run as one bucket:
            # (config, mode, step items, their parameters for the pager), keyed by id(config) and device
            buckets: dict[tuple, tuple[StepConfig, str, list[StepItem], list[Tensor]]] = {}
            for name, p in self._named(group):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name})")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p, name, group))
                    if self._pager is not None:  # paged placement: decide where the new state lives
                        self._pager.place(p, state)
                local, grad = _local(p), _local(p.grad)
                config = self._config(p, name, group, flags, group_key)
                key = (id(config), local.device)
                if key not in buckets:
                    buckets[key] = (config, self._mode(config, local.device), [], [])
                _, mode, items, owners = buckets[key]
                if mode == "native" and local.is_contiguous() and grad.dtype == local.dtype:
                    # the kernel reads raw storage: no working-layout views (nor detached aliases) to build;
                    # the plan checks every tensor before the kernel gets it
                    items.append(StepItem(local, grad.contiguous(), state, None))
                else:
                    items.append(working_item(local, grad, state, config.block))
                owners.append(p)
            for (_, device), (config, mode, items, owners) in buckets.items():
                hp = hyperparameters(device)
                if self._pager is None:
                    EXECUTOR.run(mode, config, items, hp)
                else:  # paged placement: each paged state fetched to the device around its update
                    run = lambda chunk, c=config, hp=hp, m=mode: EXECUTOR.run(m, c, chunk, hp)  # noqa: E731
                    self._pager.run(owners, items, run, self.state)
            if self._pager is None:  # all-native groups keep their kernel calls for the next step
                self._buckets.remember(index, group, group_key, self.state, buckets.values())
        if self._pager is not None:
            self._pager.end_step()
        return loss

    def _mode(self, config: StepConfig, device: torch.device) -> str:
        """How one bucket steps under ``self.execution`` (cached per configuration and device)."""
        key = (id(config), device)
        mode = self._modes.get(key)
        if mode is None:
            if self.execution in ("eager", "compiled"):
                mode = self.execution
            elif self.execution == "triton" or (self.execution == "auto" and device.type == "cuda"):
                why = triton_step.unsupported(config.rule, config.codecs, dict(config.flags), config.param_dtype,
                                              device)
                if why is not None and self.execution == "triton":
                    raise ValueError(f"Invalid execution: 'triton' for {type(self).__name__}: {why}")
                mode = "triton" if why is None else "compiled" if self._compiled else "eager"
            else:
                why = native.unsupported(config.rule, config.codecs, dict(config.flags), config.param_dtype, device)
                if why is None:
                    mode = "native"
                elif self.execution == "native":
                    raise self._native_error(why)
                else:
                    mode = "compiled" if self._compiled else "eager"
            self._modes[key] = mode
        return mode

    def _native_error(self, why: str) -> ValueError:
        return ValueError(f"Invalid execution: 'native' for {type(self).__name__}: {why} "
                          f"(native kernels: {', '.join(native.KERNELS)}; 'auto' falls back to compiled or eager)")

    def _config(self, p: Tensor, name: str | None, group: Mapping[str, Any], flags: dict[str, Any],
                group_key: tuple) -> StepConfig:
        """The step configuration of one parameter (cached: computed once per group setting)."""
        cache_key = (id(p), p.dtype, p.numel(), p.dim(), group_key)
        config = self._configs.get(cache_key)
        if config is None:
            if self.rule.wants_param_ndim:
                flags = dict(flags)  # e.g. LAMB/LARS: biases and norms (ndim <= 1) skip the trust ratio
                flags["param_ndim"] = p.dim()
            layout = self._layout(p, name, group)
            config = StepConfig(self.rule, layout, tuple(flags.items()), p.dtype, self._kahan(p, group), _norm_for(p))
            # one object per distinct configuration, so buckets can key on its id
            config = self._configs[cache_key] = self._interned.setdefault(config, config)
        return config

    def paging_stats(self) -> dict[str, float]:
        """Paged placement telemetry (``{}`` when not paged): bytes resident / paged, bytes
        moved, stall seconds and major page faults in the last step, and totals."""
        return {} if self._pager is None else self._pager.stats()

    def precision_report(self) -> Any:
        """Every parameter with its state precision and state bytes (``hf_optim.state.report``)."""
        from .state.report import precision_report

        return precision_report(self)

    # --- state dict -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            saved[_FORMAT_KEY] = FORMAT_VERSION
            for (name, p), pid in zip(self._named(group), saved["params"]):
                if pid in sd["state"] and _is_sharded(p):
                    sd["state"][pid] = self._global_state(p, name, group)
        if self._pager is not None:  # paged tensors copied out into plain CPU tensors
            sd = self._pager.export(sd)
        return sd

    def _global_state(self, p: Tensor, name: str, group: Mapping[str, Any]) -> dict[str, Tensor]:
        """A sharded (FSDP2) parameter's state as DTensors shaped like the parameter.

        torch.distributed.checkpoint saves plain tensors once (as replicated) but
        DTensors per shard, so each buffer goes out as its fp32 value sharded like
        the parameter; 8-bit codes are decoded (their blocks follow the local
        shard, not the global tensor) and re-encoded on load by the cross-storage
        conversion.
        """
        from torch.distributed.tensor import DTensor

        state, local = self.state[p], _local(p)

        def shard(t: Tensor) -> Tensor:
            return DTensor.from_local(
                t.reshape(local.shape), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )

        out: dict[str, Tensor] = {"step": state["step"]}
        for buffer, codec in self._layout(p, name, group):
            out[buffer.name] = shard(codec.decode(flat_state(state), buffer, local.numel()))
        if KAHAN_KEY in state:
            out[KAHAN_KEY] = shard(state[KAHAN_KEY])
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict, converting storage where it differs; all or nothing.

        Runs torch's hooks (``register_load_state_dict_pre_hook``: may replace the dict;
        ``register_load_state_dict_post_hook``: after loading). Validates group and
        parameter counts and every tensor of every parameter's state (moments, 8-bit
        codes and block scales, Kahan compensation, slow weights, the step count):
        a wrong shape, kind of dtype or a non-finite step is a ``ValueError`` naming the
        parameter and the key; dtype, strides and device are converted to this
        optimizer's layout. State saved in another codec's layout (fp32 vs 8-bit, or
        torch.optim's) is decoded and re-encoded into this one's. On any error the
        optimizer is left exactly as it was.
        """
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list) or \
                not isinstance(state_dict.get("state"), Mapping):
            raise ValueError("loaded state dict must be a mapping with 'state' (a dict) and 'param_groups' (a list)")
        saved_groups = state_dict["param_groups"]
        state_dict = {**state_dict, "state": {k: _to_local(v) for k, v in state_dict["state"].items()}}
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        new_groups, new_state = [], {}
        with self._pager.transaction() if self._pager is not None else contextlib.nullcontext():
            self._convert_all(state_dict, saved_groups, new_groups, new_state)
        # nothing above touched self: commit only now that everything converted
        self.param_groups = new_groups
        self.state = defaultdict(dict, new_state)
        self._buckets.clear()  # (they would also fail their checks; this frees the replaced state now)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _convert_all(self, state_dict: Mapping[str, Any], saved_groups: list, new_groups: list,
                     new_state: dict) -> None:
        for index, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if not isinstance(saved_group, Mapping) or not isinstance(saved_group.get("params"), list | tuple):
                raise ValueError(f"loaded state dict: parameter group {index} is not a dict with a 'params' list")
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group {index} of {len(saved_group['params'])} "
                    f"parameters that doesn't match the size of optimizer's group ({len(group['params'])})"
                )
            merged = {k: v for k, v in saved_group.items() if k not in ("params", _FORMAT_KEY)}
            for key, value in {**self.rule.defaults, **ENGINE_DEFAULTS}.items():
                merged.setdefault(key, value)  # a torch.optim or older checkpoint lacks our options
            for key in STORAGE_OPTIONS:  # storage is this optimizer's choice: saved state converts to it
                merged[key] = group[key]
            merged["params"] = group["params"]
            if "param_names" in group:
                merged["param_names"] = group["param_names"]
            self._validate_group(merged)
            new_groups.append(merged)
            for (name, p), saved_id in zip(self._named(merged), saved_group["params"], strict=True):
                saved = state_dict["state"].get(saved_id)
                if saved:
                    if not isinstance(saved, Mapping):
                        raise ValueError(f"loaded state for {name} is a {type(saved).__name__}, not a dict")
                    new_state[p] = self._convert(p, name, merged, saved)
                    if self._pager is not None:  # off the device now, not after all are converted
                        self._pager.place(p, new_state[p])

    def _convert(self, p: Tensor, name: str, group: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Tensor]:
        """One parameter's saved state in this optimizer's layout: every tensor checked, then copied
        into freshly allocated storage (so dtype, strides and device are always this layout's)."""
        local = _local(p)
        state = self._new_state(p, name, group)
        state["step"] = loaded_step(name, saved.get("step"), local.device)
        for buffer, codec in self._layout(p, name, group):
            saved_codec = codec if codec.holds(saved, buffer) else _find_codec(saved, buffer)
            if saved_codec is None:
                raise ValueError(
                    f"loaded state for {name} lacks buffer {buffer.name!r} "
                    f"(has: {', '.join(sorted(map(str, saved)))})"
                )
            target = state if saved_codec is codec else saved_codec.allocate(buffer, local)
            for key in saved_codec.keys(buffer):
                copy_checked(name, key, saved[key], target[key])
            if saved_codec is not codec:
                value = saved_codec.decode(flat_state(target), buffer, local.numel())
                codec.encode(value.to(compute_dtype(local.dtype)).clone(), flat_state(state), buffer)
        if KAHAN_KEY in state and KAHAN_KEY in saved:
            copy_checked(name, KAHAN_KEY, saved[KAHAN_KEY], state[KAHAN_KEY])
        return state


def constructor_options() -> dict[str, Any]:
    """The options ``Optimizer.__init__`` takes besides hyperparameters (execution, placement, ...), with defaults."""
    import inspect

    parameters = inspect.signature(Optimizer.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _find_codec(saved: Mapping[str, Any], buffer: Buffer) -> StateCodec | None:
    return next((c for c in CODECS.values() if c.holds(saved, buffer)), None)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _is_sharded(t: Tensor) -> bool:
    return any(placement.is_shard() for placement in getattr(t, "placements", ()))


def _to_local(param_state: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded per-parameter state with DTensors (from DCP) turned into local shards."""
    return {k: _local(v) if isinstance(v, Tensor) else v for k, v in param_state.items()}


class _ShardedNorm:
    """The L2 norm of a whole DTensor parameter from its local shard (FSDP2).

    Rules call ``norm(t)`` on the local shard's 1-D view; this all-reduces the
    shard's sum of squares over the mesh dimensions the parameter is sharded
    on, so LAMB/LARS trust ratios use global norms. Hashable by its process
    groups, so parameters on one mesh share one step configuration.
    """

    def __init__(self, groups: tuple[Any, ...]) -> None:
        self.groups = groups

    def __call__(self, t: Tensor) -> Tensor:
        from torch.distributed import _functional_collectives as funcol

        squares = t.float().square().sum()
        for group in self.groups:
            squares = funcol.all_reduce(squares, "sum", group)
        return squares.sqrt()

    def batch(self, norms: Tensor) -> Tensor:
        """The global norms of many parameters from their local shards' norms (any shape): one all-reduce of
        all their squares, the sums ``__call__`` makes one parameter at a time (``kernels.layerwise``)."""
        from torch.distributed import _functional_collectives as funcol

        squares = norms.float().square().contiguous()
        for group in self.groups:
            squares = funcol.all_reduce(squares, "sum", group)
        return squares.sqrt()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ShardedNorm) and self.groups == other.groups

    def __hash__(self) -> int:
        return hash(self.groups)


def _norm_for(p: Tensor) -> Any:
    """``local_norm``, or a ``_ShardedNorm`` for a DTensor sharded over some mesh dimension."""
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", ())
    dims = [dim for dim, placement in enumerate(placements) if placement.is_shard()]
    if mesh is None or not dims or mesh.size() == 1:
        return local_norm
    return _ShardedNorm(tuple(mesh.get_group(dim) for dim in dims))


def _group_tensors(scalars: Mapping[str, Any], kept: dict[tuple, dict[str, Tensor]], index: int,
                   device: torch.device) -> dict[str, Tensor]:
    """Group ``index``'s hyperparameters on ``device`` (``_as_tensors``, kept per group and device)."""
    return _as_tensors(scalars, kept.setdefault((index, device), {}), device)


def _as_tensors(scalars: Mapping[str, Any], kept: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
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


def unwrap(optimizer: Any) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Optimizer) and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer
