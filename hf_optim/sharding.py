"""FSDP2 (DTensor) parameters as the engine sees them: the local shard, and global norms over the mesh.

Elementwise rules step the local shard of a sharded parameter as if it were
the whole tensor; layer-wise rules (LAMB, LARS, StableAdamW) need the norm of
the whole parameter, which ``norm_for`` provides by an all-reduce of the
shard's sum of squares. Nothing here knows about rules or storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .execution import local_norm


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def is_sharded(t: Tensor) -> bool:
    return any(placement.is_shard() for placement in getattr(t, "placements", ()))


def split_over_ranks(t: Tensor) -> bool:
    """Whether a DTensor's local shard is less than the whole (sharded on a mesh dimension of 2+ ranks)."""
    mesh = getattr(t, "device_mesh", None)
    return mesh is not None and any(placement.is_shard() and mesh.size(dim) > 1
                                    for dim, placement in enumerate(t.placements))


def to_local(param_state: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded per-parameter state with DTensors (from DCP) turned into local shards."""
    return {k: local(v) if isinstance(v, Tensor) else v for k, v in param_state.items()}


class ShardedNorm:
    """The L2 norm of a whole DTensor parameter from its local shard (FSDP2).

    Rules call ``norm(t)`` on the local shard's 1-D view; this all-reduces the
    shard's sum of squares over the mesh dimensions the parameter is sharded
    on, so LAMB/LARS trust ratios use global norms. Hashable by its process
    groups, so parameters on one mesh share one step configuration.
    """

    def __init__(self, groups: tuple[Any, ...]) -> None:
        self.groups = groups

    def __call__(self, t: Tensor) -> Tensor:
        from torch.distributed import _functional_collectives as funcol

        squares = t.float().square().sum()
        for group in self.groups:
            squares = funcol.all_reduce(squares, "sum", group)
        return squares.sqrt()

    def batch(self, norms: Tensor) -> Tensor:
        """The global norms of many parameters from their local shards' norms (any shape): one all-reduce of
        all their squares, the sums ``__call__`` makes one parameter at a time (``kernels.layerwise``)."""
        from torch.distributed import _functional_collectives as funcol

        squares = norms.float().square().contiguous()
        for group in self.groups:
            squares = funcol.all_reduce(squares, "sum", group)
        return squares.sqrt()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardedNorm) and self.groups == other.groups

    def __hash__(self) -> int:
        return hash(self.groups)


def norm_for(p: Tensor) -> Any:
    """``local_norm``, or a ``ShardedNorm`` for a DTensor sharded over some mesh dimension."""
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", ())
    dims = [dim for dim, placement in enumerate(placements) if placement.is_shard()]
    if mesh is None or not dims or mesh.size() == 1:
        return local_norm
    return ShardedNorm(tuple(mesh.get_group(dim) for dim in dims))
