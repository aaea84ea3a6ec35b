"""Update rules: one module per algorithm, fp32 math only (see ``base``)."""

from .adamw import AdamW
from .base import Buffer, BufferKind, UpdateRule

__all__ = ["AdamW", "Buffer", "BufferKind", "UpdateRule"]
