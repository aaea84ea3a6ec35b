"""The contract of a state codec: how one state buffer is stored.

A codec owns the stored form of a buffer (one or more plain tensors in the
optimizer's state dict, under keys it names) and converts between that form
and the fp32 working value an update rule operates on. Codecs know nothing of
any particular rule: they only see a buffer's name and its kind
(``signed``/``unsigned``/``param``).

Each codec declares the layout of every tensor it stores (``layouts``: per
element, per block of its own block size, or packed; ``hf_optim.state.layouts``),
and everything that reshapes or slices state reads that declaration. Working
values are 1-D, or (rows, block) matrices when a codec's block tiles the
parameter (``StateLayout.working_shape``). ``decode``/``encode`` receive every
stored tensor already in that layout (element tensors 1-D or (rows, block),
per-block ones 1-D or (rows, 1), packed ones 1-D or (rows, block / n)): views
taken inside the compiled step keep inductor from parallelizing the loop, so
codecs take none on input.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import ClassVar

from torch import Tensor

from ..rules.base import Buffer
from .layouts import TensorLayout


class StateCodec:
    #: the name users pick it by (``state_precision="fp32"``)
    name: ClassVar[str]
    #: elements per block for a block-wise codec (an instance's own): a parameter whose size is a
    #: multiple of it is stepped as a (rows, block) matrix, so per-block reductions need no reshapes
    block: int | None = None

    def keys(self, buffer: Buffer) -> tuple[str, ...]:
        """State-dict keys this codec stores ``buffer`` under."""
        return tuple(self.layouts(buffer))

    def layouts(self, buffer: Buffer) -> dict[str, TensorLayout]:
        """Each stored tensor's key and layout, in ``keys`` order (``hf_optim.state.layouts``)."""
        raise NotImplementedError

    def allocate(self, buffer: Buffer, like: Tensor) -> dict[str, Tensor]:
        """Zero-valued storage for a buffer shaped like the (local) parameter ``like``."""
        raise NotImplementedError

    def decode(self, stored: Mapping[str, Tensor], buffer: Buffer, numel: int) -> Tensor:
        """The fp32 working value (1-D, ``numel`` elements). May alias storage."""
        raise NotImplementedError

    def encode(self, value: Tensor, stored: MutableMapping[str, Tensor], buffer: Buffer) -> None:
        """Write the fp32 working value back into ``stored``, in place."""
        raise NotImplementedError

    def nbytes(self, numel: int) -> int:
        """Exact bytes one buffer of ``numel`` elements occupies (memory model)."""
        raise NotImplementedError

    def holds(self, stored: Mapping[str, Tensor], buffer: Buffer) -> bool:
        """Whether ``stored`` is in exactly this codec's layout (for loading)."""
        return all(key in stored for key in self.keys(buffer))
