"""The native step's bucket cache: a parameter group's kernel calls built once, checked cheaply every step.

With thousands of small parameters, the per-parameter Python of an ordinary step (state look-ups, step items,
the plan's checks, the kernel's row array) costs more than the kernel. Once the engine has stepped a group
whose every bucket ran natively, ``NativeBuckets.remember`` keeps each bucket's ``native.KernelCall`` (one per
bucket and step count) with the tensors its rows point into. The next step reuses them after checks that are
a handful of C-level passes (``map`` over tensor methods) over the group, no Python per parameter:

- the group is the same dict with the same parameters in it, the same ones having gradients, and the same
  options (storage, Kahan, flags);
- every parameter and gradient is a plain, contiguous, aligned CPU tensor of the dtype and size it had. The
  gradients are new tensors every step under ``zero_grad(set_to_none=True)``, and ``p.data = ...`` moves a
  parameter: their addresses are read and written into the rows every step;
- every parameter's state is the same dict holding the same tensors (identity), none changed in place since
  (``_version``: in-place ops, ``set_``, ``resize_``, ``t_``), each at the same address (``t.data = ...``
  changes neither identity nor version) in the storage the rows were built on, which the cache holds;
- the optimizer's ``state`` is the same mapping (``load_state_dict`` replaces it).

Anything else (a changed option, a replaced or edited state tensor, a missing or strided gradient, paged
placement, a sharded parameter) and the engine takes its ordinary path, which steps the group and hands its
buckets back here to be rebuilt: the kernel never gets a pointer that was not checked this step. The step
counters are advanced by the kernel itself (an fp32 ``+= 1``, as the plan's ``_foreach_add_``), which leaves
their ``_version`` as it was, so a counter changed by anyone else also sends the group down the ordinary path.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterable, Mapping
from functools import reduce
from itertools import repeat
from operator import attrgetter, is_, itemgetter, or_
from typing import Any

import torch
from torch import Tensor

from .execution import KAHAN_KEY, StepConfig, StepItem, local_norm, scalar_coefficients
from .kernels import native
from .plan import native_layout
from .rules.base import UpdateRule

_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_IS_CPU = attrgetter("is_cpu")
_VERSION = attrgetter("_version")
#: parameter types whose tensor methods are the plain ones (a subclass may dispatch them elsewhere)
_PLAIN_PARAMS = (Tensor, torch.nn.Parameter)
#: what the engine builds per bucket: (config, mode, step items, their parameters)
Bucket = tuple[StepConfig, str, list[StepItem], list[Tensor]]
HyperparametersFor = Callable[[torch.device], dict[str, Tensor]]


class _Held:
    """Tensors a kernel call's rows point into, as they were when the rows were built.

    Their storages are held too, so the memory the rows point into stays allocated whatever happens to the
    tensors (``t.data = ...`` frees a storage that nothing else holds): no other tensor can be allocated at those
    addresses, and a tensor still at its address is still in that storage. Identity, version and address then say
    that the rows are the tensors' (the size and dtype were checked when the rows were built).
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        self.storages = list(map(Tensor.untyped_storage, tensors))
        self.versions = list(map(_VERSION, tensors))
        self.pointers = list(map(Tensor.data_ptr, tensors))

    def unchanged(self, current: list[Tensor]) -> bool:
        return (all(map(is_, current, self.tensors)) and list(map(_VERSION, current)) == self.versions
                and list(map(Tensor.data_ptr, current)) == self.pointers)


def _dense(tensors: list[Tensor], dtype: torch.dtype, numels: list[int]) -> bool:
    """Contiguous CPU tensors of ``dtype`` and these element counts (alignment: checked on their addresses)."""
    return (all(map(is_, map(_DTYPE, tensors), repeat(dtype))) and list(map(Tensor.numel, tensors)) == numels
            and all(map(Tensor.is_contiguous, tensors)) and all(map(_IS_CPU, tensors)))


class _Call:
    """One kernel call (a bucket's parameters at one step count) and what must hold for its rows to be reused."""

    def __init__(self, config: StepConfig, params: list[Tensor], dicts: list[dict[str, Tensor]]) -> None:
        storage, keys = native_layout(config)
        assert storage is not None  # the bucket ran natively
        flags = dict(config.flags)
        grads = list(map(_GRAD, params))
        kahans = [d[KAHAN_KEY] for d in dicts] if config.kahan else []
        counters = [d["step"] for d in dicts]
        # checks every tensor as ``native.step`` does: a ValueError leaves this bucket to the ordinary path
        self.kernel = native.KernelCall(
            params, grads, [d[key] for d in dicts for key in keys], kahans, config.rule.name, storage,
            native.flag_bits(config.rule, flags, config.kahan, config.param), counters,
            norm=None if config.norm is local_norm else config.norm,
        )
        self.config, self.flags, self.params, self.dicts = config, flags, params, dicts
        self.names = native.KERNELS[config.rule.name].coefficients
        self.dtype = params[0].dtype
        self.element_size = params[0].element_size()
        self.numels = list(map(Tensor.numel, params))
        # LAMB/LARS: a parameter's ndim is part of its configuration (biases and norms skip the trust ratio)
        self.dims = list(map(Tensor.dim, params)) if "ndim" in config.rule.param_fields else None
        held_keys = [*keys, *([KAHAN_KEY] if config.kahan else []), "step"]
        self.held = [(itemgetter(key), _Held(list(map(itemgetter(key), dicts)))) for key in held_keys]
        self.counter = counters[0]  # all at one count (the engine's buckets are split by it)

    def check(self, state: Mapping[Tensor, Any]) -> tuple[array.array, array.array] | None:
        """The parameters' and gradients' addresses if the rows may be reused this step, else None."""
        params = self.params
        grads = list(map(_GRAD, params))
        if not all(map(is_, map(type, grads), repeat(Tensor))):  # None, or a subclass
            return None
        if not (_dense(params, self.dtype, self.numels) and _dense(grads, self.dtype, self.numels)):
            return None
        if self.dims is not None and list(map(Tensor.dim, params)) != self.dims:
            return None
        param_pointers = array.array("q", map(Tensor.data_ptr, params))
        grad_pointers = array.array("q", map(Tensor.data_ptr, grads))
        if (reduce(or_, param_pointers, 0) | reduce(or_, grad_pointers, 0)) % self.element_size:
            return None
        if not all(map(is_, map(state.__getitem__, params), self.dicts)):
            return None
        if not all(held.unchanged(list(map(get, self.dicts))) for get, held in self.held):
            return None
        return param_pointers, grad_pointers

    def run(self, pointers: tuple[array.array, array.array], hp: dict[str, Tensor]) -> None:
        self.kernel.refresh(*pointers)
        # the count this step takes, as the plan's ``_foreach_add_`` would make it (fp32); the kernel advances
        # every counter of the call by one
        step = self.counter + 1
        c = scalar_coefficients(self.config.rule, hp, step, self.flags, torch.float32)
        self.kernel.run(torch.stack([c[name] for name in self.names]))
        # parameters are version-bumped, as in-place ops would, so autograd sees they changed
        torch.autograd.graph.increment_version(self.params)


class _GroupPlan:
    def __init__(self, group: dict[str, Any], state: Mapping[Tensor, Any], group_key: tuple,
                 calls: list[_Call], without_grad: list[Tensor]) -> None:
        self.group, self.state, self.group_key = group, state, group_key
        self.params = list(group["params"])
        self.calls, self.without_grad = calls, without_grad


class NativeBuckets:
    """Per optimizer: each parameter group's cached native kernel calls (see the module's docstring)."""

    def __init__(self) -> None:
        self._plans: dict[int, _GroupPlan] = {}
        self.hits = 0  # groups stepped from the cache (telemetry; the tests check the cache is used)

    def clear(self) -> None:
        self._plans.clear()

    def step(self, index: int, group: dict[str, Any], group_key: tuple, state: Mapping[Tensor, Any],
             hyperparameters: HyperparametersFor) -> bool:
        """Step group ``index`` from its cached calls and return True, or return False having changed nothing
        (no cache, or something it relies on changed): the engine then steps the group itself."""
        plan = self._plans.get(index)
        if plan is None or plan.group is not group or plan.state is not state or plan.group_key != group_key:
            return False
        params = group["params"]
        if len(params) != len(plan.params) or not all(map(is_, params, plan.params)):
            return False
        try:  # every check before any call runs: a group is stepped whole or not at all
            if not all(map(is_, map(_GRAD, plan.without_grad), repeat(None))):
                return False
            pointers = [call.check(state) for call in plan.calls]
        except Exception:  # a tensor the checks cannot read (sparse, ...): the ordinary path says what is wrong
            return False
        if any(p is None for p in pointers):
            return False
        hp = hyperparameters(torch.device("cpu"))
        for call, addresses in zip(plan.calls, pointers):
            call.run(addresses, hp)  # type: ignore[arg-type]
        self.hits += 1
        return True

    def remember(self, index: int, group: dict[str, Any], group_key: tuple, state: Mapping[Tensor, Any],
                 buckets: Iterable[Bucket], rule: type[UpdateRule]) -> None:
        """After the engine stepped group ``index`` with these buckets: cache their kernel calls if every
        bucket ran natively on the parameters themselves (plain tensors, raw items) under the optimizer's own
        ``rule`` (whose hyperparameters ``step`` is given; a companion's bucket, Muon's AdamW, is not cached),
        else forget the group."""
        self._plans.pop(index, None)
        calls = []
        for config, mode, items, owners in buckets:
            if mode != "native" or config.rule is not rule:
                return
            for item, p in zip(items, owners, strict=True):
                if item.p is not p or item.g is not p.grad or item.writeback is not None or \
                        type(p) not in _PLAIN_PARAMS:
                    return
            by_count: dict[float, list[StepItem]] = {}  # one kernel call per step count, as the plan makes
            for item in items:
                by_count.setdefault(item.state["step"].item(), []).append(item)
            for chunk in by_count.values():
                try:
                    calls.append(_Call(config, [item.p for item in chunk], [item.state for item in chunk]))
                except ValueError:  # a tensor the kernel must not get: the ordinary path takes this group
                    return
        if not calls:
            return
        stepped = {id(p) for call in calls for p in call.params}
        without_grad = [p for p in group["params"] if id(p) not in stepped]
        self._plans[index] = _GroupPlan(group, state, group_key, calls, without_grad)
