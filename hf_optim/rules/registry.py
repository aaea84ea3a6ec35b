"""The registered update rules: the built-in ones, ``register_rule`` at run time, and plugins.

Everything that lists rules (the ``optim=`` grammar, the public optimizer classes,
``hf-optim list``, ``translate_hparams``, the test tables) reads them from here, so a
rule is one file: its class declares its name, defaults, description, guidance
relation and example hyperparameters, and registering the class is all it takes::

    import hf_optim
    hf_optim.register_rule(MyRule)      # now optim="my_rule", "my_rule_8bit", "paged_my_rule", ...

A package registers its rules through the ``hf_optim.rules`` entry-point group, one
entry point per rule, named as the rule::

    [project.entry-points."hf_optim.rules"]
    signum = "my_package.signum:Signum"

Entry points are listed by name only; one is imported the first time its name is
asked for (or when every rule is listed), once per process. A plugin that fails to
import or to validate raises ``RulePluginError`` naming the entry point when its name
is used, and is skipped with a warning when all rules are listed, so one broken
package never breaks ``import hf_optim`` or the other names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from .base import Buffer, Relation, UpdateRule

ENTRY_POINT_GROUP = "hf_optim.rules"
#: a rule name: lower-case words joined by single underscores (``adamw``, ``stable_adamw``)
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
#: state keys the engine writes beside a rule's buffers
RESERVED_BUFFER_NAMES = frozenset({"step", "kahan_comp"})
BUFFER_KINDS = ("signed", "unsigned", "param")

R = TypeVar("R", bound=type[UpdateRule])


class RulePluginError(ValueError):
    """An ``hf_optim.rules`` entry point that could not be imported or is not a valid rule."""


#: name -> rule, in registration order (the built-in ones first)
_rules: dict[str, type[UpdateRule]] = {}
#: entry-point name -> why it could not be registered (so it is tried once)
_broken_plugins: dict[str, RulePluginError] = {}


def _registered() -> dict[str, type[UpdateRule]]:
    if not _rules:
        from . import BUILTIN_RULES  # here, not at import: the package imports this module

        for rule in BUILTIN_RULES:
            check_rule(rule, builtin=True)
            _rules[rule.name] = rule
    return _rules


def builtin_rules() -> tuple[type[UpdateRule], ...]:
    """The rules that ship with hf_optim."""
    from . import BUILTIN_RULES

    return tuple(BUILTIN_RULES)


def register_rule(rule: R) -> R:
    """Register an update rule class; returns it, so it can decorate the class.

    The rule gets every composed name (``<name>``, ``<name>_8bit``, ``paged_<name>``,
    ``paged_<name>_8bit``, ...), a public optimizer class ``hf_optim.optimizers.<ClassName>``,
    compiled execution and ``TrainingArguments(optim=...)`` acceptance. Registering the same
    class again does nothing; anything wrong with the class raises ``TypeError`` or
    ``ValueError`` saying what.
    """
    rules = _registered()
    if rules.get(getattr(rule, "name", None)) is rule:
        return rule
    check_rule(rule)
    rules[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Remove a rule registered at run time (built-in rules cannot be removed)."""
    rules = _registered()
    if name not in rules:
        raise ValueError(f"no rule {name!r} is registered; registered: {', '.join(rules)}")
    if rules[name] in builtin_rules():
        raise ValueError(f"{name!r} is a built-in rule and cannot be unregistered")
    rule = rules.pop(name)
    import sys

    optimizers = sys.modules.get("hf_optim.optimizers")
    if optimizers is not None:  # its generated class goes too, so the name is free again
        optimizers.forget(rule)


def get_rule(name: str) -> type[UpdateRule] | None:
    """The rule registered as ``name`` (importing its plugin if one has that name), or None."""
    rules = _registered()
    if name in rules:
        return rules[name]
    if name in _plugin_entry_points():
        _load_plugin(name)
        return rules[name]
    return None


def registered_rules() -> dict[str, type[UpdateRule]]:
    """Every rule: the built-in ones, those registered at run time, and every loadable plugin."""
    for name in _plugin_entry_points():
        try:
            get_rule(name)
        except RulePluginError as err:
            warnings.warn(f"{err}; its names are left out", RuntimeWarning, stacklevel=2)
    return dict(_registered())


def rule_for_class_name(class_name: str) -> type[UpdateRule] | None:
    """The registered rule whose class is called ``class_name`` (the public optimizer class's name)."""
    for rule in registered_rules().values():
        if rule.__name__ == class_name:
            return rule
    return None


def _hashable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_hashable(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


# --- plugins --------------------------------------------------------------------------------


@cache
def _plugin_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    source = f" from {dist.name} {dist.version}" if dist is not None else ""
    where = f"entry point '{ep.name} = {ep.value}' in group {ENTRY_POINT_GROUP!r}{source}"
    return f"hf_optim rule plugin {ep.name!r} ({where})"


def _load_plugin(name: str) -> None:
    if name in _broken_plugins:
        raise _broken_plugins[name]
    ep = _plugin_entry_points()[name]
    try:
        rule = ep.load()
    except Exception as err:  # whatever the plugin's import does wrong, a clear error instead of a crash
        error = RulePluginError(f"{_describe(ep)} failed to import: {type(err).__name__}: {err}")
        _broken_plugins[name] = error
        raise error from err
    try:
        if getattr(rule, "name", None) != name:
            raise ValueError(f"the entry point is named {name!r} but the rule it loads is named "
                             f"{getattr(rule, 'name', None)!r}; an entry point is named as its rule")
        register_rule(rule)
    except (TypeError, ValueError) as err:
        error = RulePluginError(f"{_describe(ep)} is not a valid rule: {err}")
        _broken_plugins[name] = error
        raise error from err


# --- what a rule class must declare -------------------------------------------------------------


def check_rule(rule: Any, *, builtin: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming what is wrong with ``rule`` as an update rule."""
    if not (isinstance(rule, type) and issubclass(rule, UpdateRule)) or rule is UpdateRule:
        raise TypeError(f"register_rule expects a subclass of hf_optim.rules.UpdateRule, got {rule!r}")
    where = f"{rule.__module__}.{rule.__qualname__}"
    name = getattr(rule, "name", None)
    _check_name(where, name, rule, builtin)
    defaults = getattr(rule, "defaults", None)
    if not isinstance(defaults, Mapping) or "lr" not in defaults:
        raise ValueError(f"{where}.defaults must be a mapping of every hyperparameter to its default, "
                         f"including 'lr'; got {defaults!r}")
    flags = rule.flag_names
    if not (isinstance(flags, frozenset | set) and flags <= set(defaults)):
        raise ValueError(f"{where}.flag_names must be a set of keys of defaults; got {flags!r}")
    # flags are structural (part of the step configuration's key and the compiled graph): hashable values
    unhashable = sorted(f for f in flags if not _hashable(defaults[f]))
    if unhashable:
        raise ValueError(f"{where}: the flags {unhashable} need hashable defaults (True/False, a number, a string, "
                         "None or a tuple of them)")
    if not isinstance(rule.description, str) or not rule.description.strip():
        raise ValueError(f"{where}.description must be a one-line description (for hf-optim list)")
    if rule.update is UpdateRule.update:
        raise ValueError(f"{where} must implement update(p, g, state, c, flags, norm, param)")
    _check_buffers(where, rule, {f: defaults[f] for f in flags})
    if rule.relation is not None and not isinstance(rule.relation, Relation):
        raise ValueError(f"{where}.relation must be an hf_optim.rules.Relation or None; got {rule.relation!r}")
    _check_example(where, rule, defaults)


def _check_name(where: str, name: Any, rule: type[UpdateRule], builtin: bool) -> None:
    from .. import registry  # the optim= grammar; imported here because it imports this package's rules

    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}.name must be lower-case words joined by '_' (like 'stable_adamw'); got {name!r}")
    modifiers = [registry.PAGED_PREFIX, *registry.STORAGE_SUFFIXES]
    if name.startswith(registry.PAGED_PREFIX) or name.endswith(tuple(registry.STORAGE_SUFFIXES)):
        raise ValueError(f"{where}.name {name!r} carries a modifier ({', '.join(modifiers)}); those are added "
                         "to every rule's name by the registry")
    taken = _rules.get(name)
    if taken is not None and taken is not rule:
        raise ValueError(f"rule name {name!r} ({where}) is already registered by "
                         f"{taken.__module__}.{taken.__qualname__}")
    if name in registry.ALIASES:
        raise ValueError(f"rule name {name!r} ({where}) is an alias of {registry.ALIASES[name]!r}")
    class_name = rule.__name__
    if not class_name.isidentifier() or class_name == "Optimizer":
        raise ValueError(f"{where}: the class name {class_name!r} names its public optimizer class; pick another")
    twin = next((r for r in _rules.values() if r.__name__ == class_name and r is not rule), None)
    if twin is not None:
        raise ValueError(f"{where}: the class name {class_name!r} is taken by the registered rule {twin.name!r} "
                         f"({twin.__module__}.{twin.__qualname__}); it names the public optimizer class, so it "
                         "must be unique")
    if builtin or rule.takes_over_transformers_name:
        return  # the built-in rules' clashes are checked by a test, so plain-PyTorch use never imports transformers
    composed = {prefix + name + suffix for prefix in ("", registry.PAGED_PREFIX)
                for suffix in ("", *registry.STORAGE_SUFFIXES)}
    clash = sorted(composed & set(registry.transformers_names()))
    if clash:
        raise ValueError(f"rule name {name!r} ({where}) would take over the transformers optimizer name(s) "
                         f"{', '.join(map(repr, clash))}; pick another name, or set takes_over_transformers_name "
                         "= True if the rule is the same optimizer")


def _check_buffers(where: str, rule: type[UpdateRule], flags: dict[str, Any]) -> None:
    try:
        buffers = rule.buffers(flags)
    except Exception as err:
        raise ValueError(f"{where}.buffers({flags}) raised {type(err).__name__}: {err}; a rule declares "
                         "its state buffers (hf_optim.rules.Buffer) for its default flags") from err
    if not isinstance(buffers, tuple) or not all(isinstance(b, Buffer) for b in buffers):
        raise ValueError(f"{where}.buffers(...) must return a tuple of hf_optim.rules.Buffer; got {buffers!r}")
    names = [b.name for b in buffers]
    bad = sorted({n for n in names if names.count(n) > 1 or n in RESERVED_BUFFER_NAMES or not n.isidentifier()})
    if bad:
        raise ValueError(f"{where}.buffers(...): buffer names {bad} are repeated, reserved "
                         f"({', '.join(sorted(RESERVED_BUFFER_NAMES))}) or not identifiers")
    kinds = sorted({b.kind for b in buffers} - set(BUFFER_KINDS))
    if kinds:
        raise ValueError(f"{where}.buffers(...): unknown buffer kind(s) {kinds}; allowed: {', '.join(BUFFER_KINDS)}")


def _check_example(where: str, rule: type[UpdateRule], defaults: Mapping[str, Any]) -> None:
    example = rule.example
    if not isinstance(example, Mapping):
        raise ValueError(f"{where}.example must be a mapping of hyperparameters; got {example!r}")
    unknown = sorted(set(example) - set(defaults))
    if unknown:
        raise ValueError(f"{where}.example has keys {unknown} that are not in defaults ({', '.join(defaults)})")
    try:
        rule.validate({**defaults, **example})
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}.example is not valid for the rule: {err}") from err
