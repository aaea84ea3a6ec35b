"""The layer-wise rules' per-parameter scalars for the native kernel: norms in, what each update pass reads out.

LAMB, LARS and StableAdamW need norms of whole parameters before any element
can be updated. ``cpu_step.c``'s norm pass returns each parameter's two local
sums of squares; here they become global norms through the rule's ``norm``
(under FSDP2 a shard's norm all-reduces: one call per parameter; the plain
local norm is one vectorized sqrt per bucket), and then the same scalar math the
rule's ``update`` does in torch, vectorized over the bucket's parameters. The
update pass takes the result as per-parameter floats (``ic`` in ``cpu_step.c``).

Each function takes the step's coefficients by name (0-d tensors), the sums
(float64, (parameters, 2), None when the plain step needs none), the parameters'
element counts and ``norm``; it returns fp32 (parameters, k).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..rules.base import trust_ratio

NormFn = Callable[[Tensor], Tensor]
ItemCoefficients = Callable[[Mapping[str, Tensor], Tensor | None, Tensor, NormFn | None], Tensor]


def global_norms(squares: Tensor, norm: NormFn | None) -> Tensor:
    """fp32 L2 norms from local sums of squares: sqrt, or the rule's ``norm`` of each local norm (a 1-element
    tensor whose square is that sum: a sharded norm sums the squares over its shards, as it would the elements)."""
    local = squares.float().sqrt()
    if norm is None:
        return local
    return torch.stack([norm(x.view(1)).reshape(()) for x in local]) if local.numel() else local


def _unused(sums: Tensor | None, numels: Tensor) -> Tensor:
    return torch.zeros(len(numels), 1)


def lamb(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """scale = trust_ratio(||p||, ||r||) * lr (hf_optim/rules/lamb.py)."""
    if sums is None:
        return _unused(sums, numels)
    scale = trust_ratio(global_norms(sums[:, 0], norm), global_norms(sums[:, 1], norm)) * c["lr"]
    return scale.view(-1, 1)


def lars(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """trust = eta * ||p|| / (||g|| + wd * ||p||) (hf_optim/rules/lars.py)."""
    if sums is None:
        return _unused(sums, numels)
    p_norm = global_norms(sums[:, 0], norm)
    denominator = global_norms(sums[:, 1], norm) + c["weight_decay"] * p_norm
    return trust_ratio(p_norm, denominator, c["trust_coefficient"]).view(-1, 1)


def stable_adamw(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """lr_t = lr / max(1, rms), rms = ||x|| / ||ones|| (global_mean_sqrt), and the decay 1 - lr_t * wd
    (hf_optim/rules/stable_adamw.py)."""
    assert sums is not None
    rms = global_norms(sums[:, 0], norm) / global_norms(numels, norm)
    lr = c["lr"] / rms.clamp(min=1.0)
    return torch.stack([lr, 1 - lr * c["weight_decay"]], dim=1)
