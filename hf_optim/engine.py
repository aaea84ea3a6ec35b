"""The optimizer engine: a ``torch.optim.Optimizer`` that runs any update rule.

An hf_optim optimizer is update rule x state storage x placement x execution.
This module owns the parts every rule shares: param groups and their
validation, lazy state, per-step 0-d hyperparameter tensors, dispatch to the
eager, compiled or native step (the step plan, ``hf_optim.plan``), and a state dict of plain
tensors that loads across storages. Rules (``hf_optim.rules``) only do math;
codecs (``hf_optim.state``) only store.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import checkpoint
from .buckets import NativeBuckets
from .execution import (
    KAHAN_KEY,
    StepConfig,
    StepItem,
    as_tensors,
    compute_dtype,
    flat_state,
    state_layout,
    with_state,
    working_item,
)
from .kernels import native
from .plan import EXECUTOR, MODES, choose_mode, compiler_available, native_error
from .rules.base import NO_PARAM_INFO, Buffer, ParamInfo, UpdateRule
from .sharding import local as _local  # (under the names the step and configuration code has always used)
from .sharding import norm_for as _norm_for
from .sharding import split_over_ranks
from .state import (
    CODECS,
    MIN_8BIT_SIZE,
    StateCodec,
    float64_unsupported,
    keeps_kahan,
    layout,
    validate_policy,
)
from .state.placement import PLACEMENTS, Placement, build_placement, option_defaults
from .util.user_warnings import warn_user

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
            or another registered placement (``"paged"``: ``hf_optim.state.paged``;
            ``hf_optim.state.placement.register_placement`` adds more).
        paged_budget, paged_dir (and any registered placement's options): the chosen
            placement's options (``paged``: the bytes of state kept beside the parameters,
            the spill directory; see ``hf_optim.state.paged``). Giving one to a placement
            that does not take it is an error naming the placement that does.
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
        **options: Any,
    ) -> None:
        cls_name = type(self).__name__
        allowed = {**self.rule.defaults, **ENGINE_DEFAULTS}
        placing = option_defaults()  # every registered placement's options: the chosen one's go to it
        hyperparameters = {k: v for k, v in options.items() if k not in placing}
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
        # where state lives (hf_optim.state.placement): "device" is the null object, called like any other
        self._placement: Placement = build_placement(placement, **{k: v for k, v in options.items() if k in placing})
        self._configs: dict[tuple, StepConfig] = {}  # per parameter and group setting
        self._interned: dict[StepConfig, StepConfig] = {}  # one object per distinct configuration
        super().__init__(params, defaults)
        if execution == "compiled" and not compiler_available():
            warn_user("hf_optim: no C++ compiler or GPU found; the compiled step runs eagerly.")
        why = native.rule_unsupported(self.rule) if execution == "native" else None
        if why:
            raise ValueError(native_error(type(self).__name__, why))
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
            if self.rule.needs_whole_tensor and split_over_ranks(p) and self._rule_for(p, name).needs_whole_tensor:
                raise ValueError(
                    f"{type(self).__name__}: parameter {name} is sharded over ranks (placements {p.placements}), "
                    f"but the {self.rule.name} update needs the whole matrix and does not gather a sharded one: "
                    "unsupported. Train this model with DDP (replicated parameters), leave its hidden matrices "
                    "unsharded, or use an elementwise optimizer (adamw, lion, ...) under FSDP2"
                )

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
                "_compiled": self._compiled, "_placement": self._placement}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("execution", "auto")
        self.__dict__.setdefault("placement", "device")
        old = self.__dict__.pop("_pager", None)  # pickles before placements were objects: None meant "device"
        if "_placement" not in self.__dict__:
            self.__dict__["_placement"] = old if old is not None else build_placement(self.placement)
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

    def _rule_for(self, p: Tensor, name: str | None) -> type[UpdateRule]:
        """The rule that steps ``p``: the optimizer's, or its companion (``UpdateRule.other``) where the
        optimizer's does not take it (Muon: AdamW for embeddings, the head, norms and biases)."""
        return self.rule if self.rule.other is None else self.rule.rule_for(ParamInfo.of(p, name))

    def _group_for(self, rule: type[UpdateRule], group: Mapping[str, Any]) -> Mapping[str, Any]:
        """``group`` as ``rule`` reads it: the companion's namespaced hyperparameters under their own names."""
        return group if rule is self.rule else self.rule.other_group(group)

    def _flags(self, group: Mapping[str, Any], rule: type[UpdateRule] | None = None) -> dict[str, Any]:
        """``rule``'s (default the optimizer's) structural options from ``group`` as that rule reads it."""
        return {key: group[key] for key in sorted((rule or self.rule).flag_names)}

    def _layout(self, p: Tensor, name: str | None, group: Mapping[str, Any]) -> tuple[tuple[Buffer, StateCodec], ...]:
        """``p``'s state buffers with their codecs, under its own rule (``_rule_for``) and the raw ``group``."""
        rule = self._rule_for(p, name)
        return layout(group, name, p.numel(), rule.buffers(self._flags(self._group_for(rule, group), rule)), p.dtype)

    def _settings(self, rule: type[UpdateRule], group: Mapping[str, Any]) -> tuple[dict[str, Any], dict, tuple]:
        """One rule's scalars, flags and the group settings its step configurations depend on (with the
        parameter, their cache key)."""
        view = self._group_for(rule, group)
        flags = self._flags(view, rule)
        storage = (tuple(v) if isinstance(v, list) else v for v in (view.get(k) for k in STORAGE_OPTIONS))
        return rule.scalars(view), flags, (rule.name, *storage, view["kahan_sum"], tuple(flags.items()))

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
        # every group's new states placed before any update (paged: a full disk changes nothing)
        self._placement.prepare(self.state, ((p, functools.partial(self._new_state, p, name, group))
                                             for group in self.param_groups for name, p in self._named(group)
                                             if p.grad is not None))
        for index, group in enumerate(self.param_groups):
            # per rule stepping this group (the optimizer's, and a companion's): scalars, flags, settings key
            settings = {self.rule: self._settings(self.rule, group)}
            scalars, _, group_key = settings[self.rule]
            hyperparameters = functools.partial(_group_tensors, scalars, self._hp, (index, self.rule.name))
            if self._placement.reuses_kernel_calls and \
                    self._buckets.step(index, group, group_key, self.state, hyperparameters):
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
                    self._placement.place(p, state)  # decide where the new state lives
                local, grad = _local(p), _local(p.grad)
                rule = self.rule if self.rule.other is None else self._rule_for(p, name)
                if rule not in settings:
                    settings[rule] = self._settings(rule, group)
                config = self._config(p, name, group, rule, settings[rule])
                key = (id(config), local.device)
                if key not in buckets:
                    buckets[key] = (config, self._mode(config, local.device), [], [])
                _, mode, items, owners = buckets[key]
                if mode == "native" and local.is_contiguous() and grad.dtype == local.dtype:
                    # the kernel reads raw storage: no working-layout views (nor detached aliases) to build;
                    # the plan checks every tensor before the kernel gets it
                    items.append(StepItem(local, grad.contiguous(), state, None))
                else:
                    items.append(working_item(local, grad, state, state_layout(config)))
                owners.append(p)
            for (_, device), (config, mode, items, owners) in buckets.items():
                scalars = settings[config.rule][0]
                hp = _group_tensors(scalars, self._hp, (index, config.rule.name), device)
                # the placement runs the update (paged: each paged state fetched to the device around it)
                run = lambda chunk, c=config, hp=hp, m=mode: EXECUTOR.run(m, c, chunk, hp)  # noqa: E731
                self._placement.run(owners, items, run, self.state, functools.partial(with_state, state_layout(config)))
            if self._placement.reuses_kernel_calls:  # all-native groups keep their kernel calls for the next step
                self._buckets.remember(index, group, group_key, self.state, buckets.values(), self.rule)
        self._placement.end_step()
        return loss

    def _mode(self, config: StepConfig, device: torch.device) -> str:
        """How one bucket steps under ``self.execution`` (``plan.choose_mode``; cached per configuration, device)."""
        key = (id(config), device)
        mode = self._modes.get(key)
        if mode is None:
            fallback = "compiled" if self._compiled else "eager"
            mode = self._modes[key] = choose_mode(self.execution, config, device, fallback, type(self).__name__)
        return mode

    def _config(self, p: Tensor, name: str | None, group: Mapping[str, Any], rule: type[UpdateRule],
                settings: tuple[dict[str, Any], dict, tuple]) -> StepConfig:
        """The step configuration of one parameter under ``rule`` (cached: computed once per group setting).

        It holds the parameter's ``ParamInfo`` only as far as the rule declared (``param_fields``): an
        elementwise rule's parameters share one configuration whatever their shapes."""
        _, flags, group_key = settings
        cache_key = (id(p), p.dtype, p.numel(), p.dim(), group_key)
        config = self._configs.get(cache_key)
        if config is None:
            info = ParamInfo.of(p, name).only(rule.param_fields) if rule.param_fields else NO_PARAM_INFO
            layout = self._layout(p, name, group)
            config = StepConfig(rule, layout, tuple(flags.items()), p.dtype, self._kahan(p, group), _norm_for(p),
                                info)
            # one object per distinct configuration, so buckets can key on its id
            config = self._configs[cache_key] = self._interned.setdefault(config, config)
        return config

    def paging_stats(self) -> dict[str, float]:
        """Paged placement telemetry (``{}`` when not paged): bytes resident / paged, bytes
        moved, stall seconds and major page faults in the last step, and totals."""
        return self._placement.stats()

    def precision_report(self) -> Any:
        """Every parameter with its state precision and state bytes (``hf_optim.state.report``)."""
        from .state.report import precision_report

        return precision_report(self)

    # --- state dict -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus a format version per group; plain tensors only (``hf_optim.checkpoint``)."""
        return checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict, converting storage where it differs; all or nothing (``hf_optim.checkpoint``).

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
        checkpoint.load_state_dict(self, state_dict)
        self._buckets.clear()  # (they would also fail their checks; this frees the replaced state now)


def constructor_options() -> dict[str, Any]:
    """The options ``Optimizer.__init__`` takes besides hyperparameters (execution, placement and the registered
    placements' options), with defaults."""
    import inspect

    parameters = inspect.signature(Optimizer.__init__).parameters.values()
    named = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**named, **option_defaults()}  # and every registered placement's options


def _group_tensors(scalars: Mapping[str, Any], kept: dict[tuple, dict[str, Tensor]], key: tuple,
                   device: torch.device) -> dict[str, Tensor]:
    """One rule's hyperparameters of one group on ``device`` (``as_tensors``, kept per group, rule and device)."""
    return as_tensors(scalars, kept.setdefault((*key, device), {}), device)


def unwrap(optimizer: Any) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Optimizer) and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer
