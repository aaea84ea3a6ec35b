"""The public optimizer classes: one per update rule, storage and placement as options."""

from __future__ import annotations

from . import rules
from .engine import Optimizer


class AdamW(Optimizer):
    __doc__ = rules.AdamW.__doc__
    rule = rules.AdamW


class Lion(Optimizer):
    __doc__ = rules.Lion.__doc__
    rule = rules.Lion


class LAMB(Optimizer):
    __doc__ = rules.LAMB.__doc__
    rule = rules.LAMB


class LARS(Optimizer):
    __doc__ = rules.LARS.__doc__
    rule = rules.LARS


class StableAdamW(Optimizer):
    __doc__ = rules.StableAdamW.__doc__
    rule = rules.StableAdamW


class Adan(Optimizer):
    __doc__ = rules.Adan.__doc__
    rule = rules.Adan


class Ranger(Optimizer):
    __doc__ = rules.Ranger.__doc__
    rule = rules.Ranger


class SGD(Optimizer):
    __doc__ = rules.SGD.__doc__
    rule = rules.SGD
