"""How each stored tensor relates to its parameter's elements, as its codec declares it.

Every code path that reshapes or slices state (the working layout a step
takes, row chunks of a large parameter, the paged placement's batches, the
memory model) reads these declarations instead of guessing a tensor's role
from its element count:

- ``ELEMENT``: one entry per parameter element (a dense moment, 8-bit codes,
  the Kahan compensation);
- ``per_block(n)``: one entry per ``n`` consecutive elements, the last block
  ragged (a block-wise codec's scales);
- ``packed(n)``: ``n`` elements per entry (two 4-bit codes per byte), the last
  entry ragged.

A parameter is stepped 1-D, or as a (rows, block) matrix when its state has a
block size that tiles it exactly (``StateLayout.working_shape``). In the
matrix form an element tensor is (rows, block), a per-block one (rows, 1) and a
packed one (rows, block / n); in the 1-D form each stays 1-D. The 0-d ``step``
counter is never reshaped or sliced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

#: the per-parameter step counter: 0-d, outside every codec
STEP_KEY = "step"


@dataclass(frozen=True)
class TensorLayout:
    """One stored tensor's relation to the parameter's elements (see the module docstring)."""

    kind: Literal["element", "block", "packed"]
    #: elements per entry: 1 for ``element``, the block size for ``block``, elements per entry for ``packed``
    per: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("element", "block", "packed"):
            raise ValueError(f"Invalid layout kind: {self.kind!r} (allowed: element, block, packed)")
        if isinstance(self.per, bool) or not isinstance(self.per, int) or self.per < 1 or \
                (self.kind == "element" and self.per != 1):
            raise ValueError(f"Invalid elements per entry for a {self.kind} layout: {self.per!r}")

    def count(self, numel: int) -> int:
        """Entries this tensor holds for a parameter of ``numel`` elements."""
        return numel if self.kind == "element" else math.ceil(numel / self.per)

    def row_width(self, block: int) -> int:
        """Entries per row of the (rows, ``block``) working layout."""
        if self.kind == "element":
            return block
        return 1 if self.kind == "block" else block // self.per

    def tiles(self, block: int) -> bool:
        """Whether rows of ``block`` elements hold whole entries of this tensor."""
        return self.kind == "element" or (block % self.per == 0 and (self.kind == "packed" or self.per == block))


ELEMENT = TensorLayout("element")


def per_block(block: int) -> TensorLayout:
    return TensorLayout("block", block)


def packed(elements_per_entry: int) -> TensorLayout:
    return TensorLayout("packed", elements_per_entry)


class StateLayout:
    """The declared layout of every tensor in one configuration's state dicts (besides ``step``).

    Built once per step configuration from its codecs' declarations (and the Kahan buffer when kept);
    ``block`` is the size of the (rows, block) working layout, or None when the state has none (or
    declares blocks that do not share one size, or packing that rows of it would split).
    """

    def __init__(self, tensors: Mapping[str, TensorLayout]) -> None:
        self.tensors = dict(tensors)
        blocks = {t.per for t in self.tensors.values() if t.kind == "block"}
        block = blocks.pop() if len(blocks) == 1 else None
        if block is not None and not all(t.tiles(block) for t in self.tensors.values()):
            block = None
        self.block = block

    @classmethod
    def of(cls, codecs: Iterable[tuple[object, object]], extra: Mapping[str, TensorLayout] = {}) -> StateLayout:
        """From ``(buffer, codec)`` pairs (each codec's ``layouts(buffer)``) plus ``extra`` engine tensors."""
        tensors: dict[str, TensorLayout] = {}
        for buffer, codec in codecs:
            tensors.update(codec.layouts(buffer))  # type: ignore[attr-defined]
        tensors.update(extra)
        return cls(tensors)

    def working_shape(self, numel: int) -> tuple[int, ...]:
        """(rows, block) when the block tiles the parameter exactly, else (numel,): one graph per form."""
        block = self.block
        if block and numel >= block and numel % block == 0:
            return (numel // block, block)
        return (numel,)

    def _layout(self, key: str) -> TensorLayout:
        layout = self.tensors.get(key)
        if layout is None:
            raise KeyError(f"state tensor {key!r} has no declared layout (declared: {', '.join(sorted(self.tensors))})")
        return layout

    def working(self, state: Mapping[str, Tensor], shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Views of a parameter's state in the working layout ``shape`` (from ``working_shape``)."""
        out = {}
        rows = shape[0] if len(shape) == 2 else None
        for key, value in state.items():
            if key == STEP_KEY:
                out[key] = value
                continue
            if rows is None:
                out[key] = value if value.dim() == 1 else value.view(-1)
                continue
            view = (rows, self._layout(key).row_width(shape[1]))
            out[key] = value if value.shape == view else value.view(view)
        return out

    def rows(self, state: Mapping[str, Tensor], rows: slice) -> dict[str, Tensor]:
        """Row slices of a state already in the (rows, block) working layout (every tensor has rows first)."""
        return {key: value if key == STEP_KEY else value[rows] for key, value in state.items()}


def flat_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """1-D views of every state tensor but the 0-d step (codecs' layout for whole-tensor work)."""
    return {k: v if v.dim() == 1 or k == STEP_KEY else v.view(-1) for k, v in state.items()}
