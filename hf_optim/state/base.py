"""The contract of a state codec: how one state buffer is stored.

A codec owns the stored form of a buffer (one or more plain tensors in the
optimizer's state dict, under keys it names) and converts between that form
and the fp32 working value an update rule operates on. Codecs know nothing of
any particular rule: they only see a buffer's name and its kind
(``signed``/``unsigned``/``param``).

All working values are 1-D, and ``decode``/``encode`` receive every stored
tensor already flattened to 1-D by the engine: views taken inside the compiled
step keep inductor from parallelizing the loop, so codecs take none on input.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import ClassVar

from torch import Tensor

from ..rules.base import Buffer


class StateCodec:
    #: the name users pick it by (``state_precision="fp32"``)
    name: ClassVar[str]

    def keys(self, buffer: Buffer) -> tuple[str, ...]:
        """State-dict keys this codec stores ``buffer`` under."""
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
