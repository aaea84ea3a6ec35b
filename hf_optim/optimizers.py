"""The public optimizer classes: one per registered update rule, generated from the rule.

``hf_optim.AdamW`` is ``Optimizer`` with ``rule=rules.AdamW`` (docstring: the rule module's,
formula and paper), storage and placement as options. The class is named as the rule class
and lives in this module (``__module__``/``__qualname__`` set), so it pickles by reference and
IDEs find it: the built-in rules' classes are made at import, a rule registered later
(``hf_optim.register_rule``, an ``hf_optim.rules`` plugin) gets its class on first use,
also when an unpickler asks this module for it by name.
"""

from __future__ import annotations

from typing import Any

from .engine import Optimizer
from .rules import BUILTIN_RULES, registry
from .rules.base import UpdateRule

#: rule -> its generated optimizer class (one class per rule, so isinstance checks hold)
_CLASSES: dict[type[UpdateRule], type[Optimizer]] = {}


def optimizer_class(rule: type[UpdateRule]) -> type[Optimizer]:
    """The public optimizer class of a registered rule (made once)."""
    cls = _CLASSES.get(rule)
    if cls is None:
        if registry.get_rule(rule.name) is not rule:
            raise ValueError(f"rule {rule.__qualname__} ({rule.name!r}) is not registered; "
                             "call hf_optim.register_rule first")
        namespace = {"__module__": __name__, "__qualname__": rule.__name__}
        cls = type(rule.__name__, (Optimizer,), namespace, rule=rule)
        _CLASSES[rule] = cls
        globals()[rule.__name__] = cls
    return cls


def forget(rule: type[UpdateRule]) -> None:
    """Drop an unregistered rule's class (``hf_optim.rules.registry.unregister_rule``)."""
    cls = _CLASSES.pop(rule, None)
    if cls is not None and globals().get(rule.__name__) is cls:
        del globals()[rule.__name__]


def __getattr__(name: str) -> Any:
    rule = registry.rule_for_class_name(name) if name[:1].isupper() else None
    if rule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return optimizer_class(rule)


for _rule in BUILTIN_RULES:
    optimizer_class(_rule)
del _rule
