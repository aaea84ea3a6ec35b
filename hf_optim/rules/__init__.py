"""Update rules: one module per algorithm, fp32 math only (see ``base``), registered in ``registry``.

A built-in rule is its module plus one entry in ``BUILTIN_RULES``; everything else
(names, classes, ``hf-optim list``, guidance, test tables) is built from the registered rules.
"""

from .adamw import AdamW
from .adan import Adan
from .base import Buffer, BufferKind, Relation, UpdateRule
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .muon import Muon
from .ranger import Ranger
from .registry import RulePluginError, get_rule, register_rule, registered_rules
from .sgd import SGD
from .stable_adamw import StableAdamW

#: the rules that ship with hf_optim, in the order ``hf-optim list`` and the docs show them
BUILTIN_RULES = (AdamW, Lion, LAMB, LARS, StableAdamW, Adan, Ranger, Muon, SGD)

__all__ = [
    "BUILTIN_RULES",
    "LAMB",
    "LARS",
    "SGD",
    "AdamW",
    "Adan",
    "Buffer",
    "BufferKind",
    "Lion",
    "Muon",
    "Ranger",
    "Relation",
    "RulePluginError",
    "StableAdamW",
    "UpdateRule",
    "get_rule",
    "register_rule",
    "registered_rules",
]
