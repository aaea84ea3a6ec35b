"""The public optimizer classes: one per update rule, storage and placement as options."""

from __future__ import annotations

from . import rules
from .engine import Optimizer


class AdamW(Optimizer):
    __doc__ = rules.AdamW.__doc__
    rule = rules.AdamW
