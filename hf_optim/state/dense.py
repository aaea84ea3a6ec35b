"""Dense storage: one tensor per buffer, in fp32 or bf16, under torch's key names."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

from ..rules.base import Buffer
from .base import StateCodec
from .layouts import ELEMENT, TensorLayout


class DenseCodec(StateCodec):
    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name  # type: ignore[misc]
        self.dtype = dtype

    def keys(self, buffer: Buffer) -> tuple[str, ...]:
        return (buffer.name,)

    def layouts(self, buffer: Buffer) -> dict[str, TensorLayout]:
        return {buffer.name: ELEMENT}

    def allocate(self, buffer: Buffer, like: Tensor) -> dict[str, Tensor]:
        # param-shaped, as torch.optim stores them, so state dicts interoperate
        return {buffer.name: torch.zeros(like.shape, dtype=self.dtype, device=like.device)}

    def decode(self, stored: Mapping[str, Tensor], buffer: Buffer, numel: int) -> Tensor:
        tensor = stored[buffer.name]  # the engine passes it flattened
        # fp32 (and float64) storage decodes to the tensor itself, updated in place
        return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()

    def encode(self, value: Tensor, stored: MutableMapping[str, Tensor], buffer: Buffer) -> None:
        target = stored[buffer.name]
        if value is not target:  # fp32 storage decodes to itself and was updated in place
            target.copy_(value)

    def nbytes(self, numel: int) -> int:
        return numel * self.dtype.itemsize

    def holds(self, stored: Mapping[str, Tensor], buffer: Buffer) -> bool:
        # any floating tensor under the buffer's name: loading copies (converts) it into this dtype
        tensor = stored.get(buffer.name)
        return isinstance(tensor, Tensor) and tensor.is_floating_point()


FP32 = DenseCodec("fp32", torch.float32)
BF16 = DenseCodec("bf16", torch.bfloat16)
#: what ``fp32`` state becomes for a float64 parameter: float64, as torch.optim keeps it (never chosen by name)
FP64 = DenseCodec("fp64", torch.float64)
