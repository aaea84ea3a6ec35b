"""The public optimizer classes: one per update rule (docstring: the rule's), storage and placement as options."""

from __future__ import annotations

from . import rules
from .engine import Optimizer


class AdamW(Optimizer, rule=rules.AdamW): ...


class Lion(Optimizer, rule=rules.Lion): ...


class LAMB(Optimizer, rule=rules.LAMB): ...


class LARS(Optimizer, rule=rules.LARS): ...


class StableAdamW(Optimizer, rule=rules.StableAdamW): ...


class Adan(Optimizer, rule=rules.Adan): ...


class Ranger(Optimizer, rule=rules.Ranger): ...


class SGD(Optimizer, rule=rules.SGD): ...


class Muon(Optimizer, rule=rules.Muon): ...
