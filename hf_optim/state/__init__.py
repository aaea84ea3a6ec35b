"""State storage: codecs that store optimizer buffers (dense fp32/bf16, block-wise 8-bit).

``CODECS`` maps a ``state_precision`` name to its codec; ``codec_for`` picks the
codec one parameter gets, which is where per-parameter policies (keep small
tensors, embeddings and norms in fp32) live.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..rules.base import Buffer
from ..rules.param_names import EMBEDDING_AND_HEAD_PATTERNS, NORM_PATTERNS
from .base import StateCodec
from .blockwise import EIGHT_BIT, BlockwiseCodec
from .dense import BF16, FP32, FP64, DenseCodec

CODECS: dict[str, StateCodec] = {codec.name: codec for codec in (FP32, BF16, EIGHT_BIT)}

#: quantized codecs keep tensors smaller than this in fp32 (group option ``min_8bit_size``)
MIN_8BIT_SIZE = 4096
#: parameter-name patterns (``re.search``, case-insensitive) whose state stays fp32 under a quantized codec
#: (group option ``fp32_patterns``): embeddings, the output head and norms are sensitive
#: to state error and small or sparse-gradient enough that quantizing them saves little
FP32_PATTERNS: tuple[str, ...] = (*EMBEDDING_AND_HEAD_PATTERNS, *NORM_PATTERNS)


def codec_for(
    precision: str,
    param_name: str | None,
    global_numel: int,
    min_8bit_size: int = MIN_8BIT_SIZE,
    fp32_patterns: Sequence[str] | None = None,
) -> StateCodec:
    """The codec for one parameter's state under a group's ``state_precision``.

    A quantized precision applies only to tensors of at least ``min_8bit_size``
    elements (the *global* count, so every shard of a tensor decides alike)
    whose name matches none of ``fp32_patterns`` (default ``FP32_PATTERNS``);
    the rest keep fp32 state.
    """
    codec = CODECS[precision]
    if not isinstance(codec, BlockwiseCodec):
        return codec
    if global_numel < min_8bit_size:
        return FP32
    patterns = FP32_PATTERNS if fp32_patterns is None else fp32_patterns
    if param_name is not None and any(re.search(pattern, param_name, re.IGNORECASE) for pattern in patterns):
        return FP32
    return codec


def layout(
    group: Mapping[str, Any], param_name: str | None, global_numel: int, buffers: Sequence[Buffer],
    param_dtype: torch.dtype = torch.float32,
) -> tuple[tuple[Buffer, StateCodec], ...]:
    """Each state buffer of one parameter with the codec that stores it, under a group's options.

    Copies of the parameter (``param`` buffers: Lookahead's slow weights) stay
    fp32 under a quantized codec: the parameter is reset to them, so quantizing
    them would put the weights themselves on the 8-bit grid. A float64 parameter
    computes in float64, so its ``fp32`` state is float64 (as torch.optim keeps it);
    quantized state cannot hold float64 values (``float64_unsupported``).
    """
    codec = codec_for(
        group["state_precision"], param_name, global_numel,
        group.get("min_8bit_size", MIN_8BIT_SIZE), group.get("fp32_patterns"),
    )
    quantized = isinstance(codec, BlockwiseCodec)
    full = FP64 if param_dtype == torch.float64 else FP32
    return tuple(
        (buffer, full if (quantized and buffer.kind == "param") or codec is FP32 else codec) for buffer in buffers
    )


def float64_unsupported(group: Mapping[str, Any], param_name: str | None, global_numel: int) -> str | None:
    """Why a float64 parameter cannot have this group's state storage (quantized state), or None."""
    codec = codec_for(
        group["state_precision"], param_name, global_numel,
        group.get("min_8bit_size", MIN_8BIT_SIZE), group.get("fp32_patterns"),
    )
    if isinstance(codec, BlockwiseCodec):
        return (
            f"state_precision={group['state_precision']!r} stores state in 8 bits and computes in fp32, "
            f"but {param_name} is float64 (its math and state are float64, as in torch.optim); use "
            "state_precision='fp32' for this parameter's group, or cast the parameter to float32"
        )
    return None


def keeps_kahan(group: Mapping[str, Any], dtype: torch.dtype) -> bool:
    """Whether a parameter keeps a Kahan compensation buffer: low-precision params in a ``kahan_sum`` group."""
    return bool(group.get("kahan_sum")) and dtype in (torch.bfloat16, torch.float16)


#: bytes of the per-parameter ``step`` counter (a 0-d fp32 tensor)
STEP_BYTES = 4


def planned_bytes(
    rule: Any, group: Mapping[str, Any], name: str | None, numel: int, dtype: torch.dtype, *, step_counter: bool = True
) -> int:
    """Exact state bytes of one parameter under ``rule`` and a param group's options, before any exist."""
    flags = {k: group[k] for k in rule.flag_names}
    total = sum(codec.nbytes(numel) for _, codec in layout(group, name, numel, rule.buffers(flags), dtype))
    if step_counter:
        total += STEP_BYTES
    if keeps_kahan(group, dtype):
        total += numel * dtype.itemsize
    return total


def validate_policy(group: Mapping[str, Any]) -> None:
    """Check a param group's ``min_8bit_size`` and ``fp32_patterns`` options."""
    size = group.get("min_8bit_size", MIN_8BIT_SIZE)
    patterns = group.get("fp32_patterns")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (allowed: an int >= 0)")
    if patterns is not None:
        if isinstance(patterns, str) or not isinstance(patterns, Sequence):
            raise ValueError(f"Invalid fp32_patterns: {patterns!r} (allowed: None or a list of regex strings)")
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"Invalid fp32_patterns entry: {pattern!r} (allowed: regex strings)")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"Invalid fp32_patterns entry: {pattern!r} is not a regex ({err})") from None
    if not isinstance(CODECS.get(group.get("state_precision", "fp32")), BlockwiseCodec):
        for key, value, default in (("min_8bit_size", size, MIN_8BIT_SIZE), ("fp32_patterns", patterns, None)):
            if value != default:  # never accept an option and ignore it
                raise ValueError(
                    f"{key}={value!r} only applies to quantized state; this group's state_precision is "
                    f"{group.get('state_precision')!r} (use state_precision='8bit' or drop {key})"
                )


__all__ = [
    "CODECS",
    "FP32_PATTERNS",
    "MIN_8BIT_SIZE",
    "BlockwiseCodec",
    "DenseCodec",
    "StateCodec",
    "codec_for",
    "float64_unsupported",
    "layout",
    "validate_policy",
]
