"""Update rules: one module per algorithm, fp32 math only (see ``base``)."""

from .adamw import AdamW
from .adan import Adan
from .base import Buffer, BufferKind, UpdateRule
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .muon import Muon
from .ranger import Ranger
from .sgd import SGD
from .stable_adamw import StableAdamW

__all__ = [
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
    "StableAdamW",
    "UpdateRule",
]
