"""Dense storage: one tensor per buffer, in fp32 or bf16, under torch's key names."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

from ..rules.base import Buffer
from .base import StateCodec


class DenseCodec(StateCodec):
    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name  # type: ignore[misc]
        self.dtype = dtype

    def keys(self, buffer: Buffer) -> tuple[str, ...]:
        return (buffer.name,)

    def allocate(self, buffer: Buffer, like: Tensor) -> dict[str, Tensor]:
        # param-shaped, as torch.optim stores them, so state dicts interoperate
        return {buffer.name: torch.zeros(like.shape, dtype=self.dtype, device=like.device)}

    def decode(self, stored: Mapping[str, Tensor], buffer: Buffer, numel: int) -> Tensor:
        tensor = stored[buffer.name]  # the engine passes it flattened
        return tensor.float()  # fp32: the tensor itself, updated in place

    def encode(self, value: Tensor, stored: MutableMapping[str, Tensor], buffer: Buffer) -> None:
        target = stored[buffer.name]
        if value is not target:  # fp32 storage decodes to itself and was updated in place
            target.copy_(value)

    def nbytes(self, numel: int) -> int:
        return numel * self.dtype.itemsize

    def holds(self, stored: Mapping[str, Tensor], buffer: Buffer) -> bool:
        tensor = stored.get(buffer.name)
        return tensor is not None and tensor.dtype == self.dtype


FP32 = DenseCodec("fp32", torch.float32)
BF16 = DenseCodec("bf16", torch.bfloat16)
