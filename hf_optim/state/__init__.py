"""State storage: codecs that store optimizer buffers (dense fp32/bf16, block-wise 8-bit).

``CODECS`` maps a ``state_precision`` name to its codec; ``codec_for`` picks the
codec one parameter gets, which is where per-parameter policies (keep small
tensors, embeddings and norms in fp32) live.
"""

from __future__ import annotations

from .base import StateCodec
from .dense import BF16, FP32, DenseCodec

CODECS: dict[str, StateCodec] = {codec.name: codec for codec in (FP32, BF16)}


def codec_for(precision: str, param_name: str | None, global_numel: int) -> StateCodec:
    """The codec for one parameter's state under a group's ``state_precision``."""
    return CODECS[precision]


__all__ = ["CODECS", "DenseCodec", "StateCodec", "codec_for"]
