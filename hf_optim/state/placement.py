"""Placement: where a parameter's state tensors live between steps (one axis of an optimizer).

A placement is an object the engine calls at fixed points of a step and of a
state-dict load; it never sees the rule's math or the storage codec. The base
class ``Placement`` is the protocol *and* the null object: every method is a
no-op or a direct call, which is exactly the ``device`` placement (state
beside the parameter, nothing to do), so the engine never tests for "no
placement". Another placement (``paged``, ``hf_optim.state.paged``) overrides
what it needs. A new one (a CPU offload, say) is one file: a ``Placement``
subclass with a ``name`` and its ``options``, and one ``register_placement``
call; the ``placement=`` option, the registry's name checks and the
constructor's valid keywords then know it.

The calls, in the order the engine makes them:

- ``prepare(states, makers)``: at the start of ``step``, before any update.
  ``makers`` yields ``(param, maker)`` for each parameter about to step;
  ``maker(allocate=fn)`` builds the parameter's new state, ``fn`` receiving it
  on the meta device and returning it allocated where it lives. A placement
  that creates states here must do so all or nothing. The null object leaves
  state creation to the engine (``maker`` is never called).
- ``place(param, state)``: a parameter's state was just created or loaded.
- ``run(params, items, step, states, with_state)``: one bucket's update:
  ``step(items)`` must run once over every item (in any batches), where an
  item whose state the placement moved is first rebuilt by
  ``with_state(item, flat_state_dict)``.
- ``end_step()``: after every bucket of a step.
- ``transaction()``: a context manager around a whole load: inside it
  ``place`` calls are all or nothing.
- ``export(state_dict)``: the state dict about to be handed out, with any
  tensor the placement owns copied into a plain CPU tensor.
- ``stats()``: telemetry for ``Optimizer.paging_stats()`` (``{}``: none).

Options: a placement declares its constructor options with their defaults in
``options``; the engine takes them from every registered placement, and one
passed (with a non-default value) to another placement is an error naming the
key, the value and the placement that takes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar

from torch import Tensor


class Placement:
    """The placement protocol, whose default behaviour is the ``device`` placement (the null object)."""

    #: the ``placement=`` value that picks it
    name: ClassVar[str] = "device"
    #: constructor options and their defaults (a default value is "not given")
    options: ClassVar[Mapping[str, Any]] = {}
    #: how the error for an option given to another placement suggests picking this one
    hint: ClassVar[str] = ""
    #: True only where ``run`` is the plain call and state never moves between steps: the engine may then
    #: step a group from its cached native kernel calls without calling ``run`` (``hf_optim.buckets``)
    reuses_kernel_calls: ClassVar[bool] = False

    def prepare(self, states: MutableMapping[Tensor, dict[str, Tensor]],
                makers: Iterable[tuple[Tensor, Callable[..., dict[str, Tensor]]]]) -> None:
        """Before any update of a step (the engine creates missing states itself unless this does)."""

    def place(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """``state`` (just created or loaded) belongs to ``param``: move it where it lives."""

    def run(self, params: Sequence[Tensor], items: Sequence[Any], step: Callable[[list[Any]], None],
            states: Mapping[Tensor, dict[str, Tensor]], with_state: Callable[[Any, Mapping[str, Tensor]], Any]) -> None:
        """Update one bucket: ``step`` over every item, each with its state where the update can read it."""
        step(items if isinstance(items, list) else list(items))

    def end_step(self) -> None:
        """After the whole step."""

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """``place`` calls inside are all or nothing."""
        return contextlib.nullcontext()

    def export(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the tensors this placement owns copied into plain CPU tensors."""
        return state_dict

    def stats(self) -> dict[str, float]:
        """Telemetry (``Optimizer.paging_stats``); the device placement has none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DevicePlacement(Placement):
    """State beside its parameter: the null object (the base class's behaviour, by name)."""

    reuses_kernel_calls = True


#: placement name -> its class (``register_placement`` adds to it)
PLACEMENTS: dict[str, type[Placement]] = {}


def register_placement(cls: type[Placement]) -> type[Placement]:
    """Make ``placement=cls.name`` (and its ``options``) valid everywhere; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Placement)):
        raise TypeError(f"register_placement takes a Placement subclass, not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Invalid placement name: {name!r} (allowed: an identifier)")
    if name in PLACEMENTS and PLACEMENTS[name] is not cls:
        raise ValueError(f"placement {name!r} is already registered ({PLACEMENTS[name].__qualname__})")
    for key, other in placement_options().items():
        if key in cls.options and PLACEMENTS[other] is not cls:
            raise ValueError(f"placement {name!r} declares option {key!r}, which placement {other!r} already takes")
    PLACEMENTS[name] = cls
    return cls


def placement_options() -> dict[str, str]:
    """Every registered placement's option name -> the placement that takes it."""
    return {key: name for name, cls in PLACEMENTS.items() for key in cls.options}


def option_defaults() -> dict[str, Any]:
    """Every registered placement's options with their defaults (the engine's extra keywords)."""
    return {key: value for cls in PLACEMENTS.values() for key, value in cls.options.items()}


def build_placement(name: str, **options: Any) -> Placement:
    """The placement object for ``name`` with its ``options`` (any registered placement's option names).

    An option with a non-default value that ``name`` does not take is an error naming the key, the value and
    the placement that takes it, never ignored; an unknown option name is a ``TypeError``.
    """
    cls = PLACEMENTS.get(name)
    if cls is None:
        raise ValueError(f"Invalid placement: {name!r} (allowed: {', '.join(PLACEMENTS)})")
    owners = placement_options()
    taken = {}
    for key, value in options.items():
        owner = owners.get(key)
        if owner is None:
            raise TypeError(f"unknown placement option {key!r} (placement options: {', '.join(sorted(owners))})")
        if owner == name:
            taken[key] = value
        elif value != PLACEMENTS[owner].options[key]:
            hint = PLACEMENTS[owner].hint or f"pass placement={owner!r}"
            raise ValueError(f"{key}={value!r} only applies to placement={owner!r} (got placement={name!r}); {hint}")
    return cls(**taken)


register_placement(DevicePlacement)
# the built-in paged placement registers itself (it subclasses ``Placement``, so it is imported last)
from . import paged as _paged  # noqa: E402, F401
