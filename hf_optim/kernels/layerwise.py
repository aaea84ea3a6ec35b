"""The layer-wise rules' per-parameter scalars for the native kernel: norms in, what each update pass reads out.

LAMB, LARS and StableAdamW need norms of whole parameters before any element
can be updated. ``cpu_step.c``'s norm pass returns each parameter's two local
sums of squares; here they become global norms through the rule's ``norm``
(under FSDP2 a shard's norm all-reduces: once per bucket for the engine's sharded
norm, which takes a batch; the plain local norm is one vectorized sqrt per bucket), and then the same scalar math the
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
    """fp32 L2 norms from local sums of squares (any shape): sqrt, or the rule's ``norm`` of each local norm (a
    1-element tensor whose square is that sum: a sharded norm sums the squares over its shards, as it would the
    elements). A norm with a ``batch`` method (the engine's sharded norm) takes all of them in one call: one
    all-reduce per bucket instead of one per parameter, with the same sums."""
    local = squares.float().sqrt()
    if norm is None or not local.numel():
        return local
    batch = getattr(norm, "batch", None)
    if batch is not None:
        return batch(local)
    return torch.stack([norm(x.view(1)).reshape(()) for x in local.reshape(-1)]).view(local.shape)


def _unused(sums: Tensor | None, numels: Tensor) -> Tensor:
    return torch.zeros(len(numels), 1)


def lamb(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """scale = trust_ratio(||p||, ||r||) * lr (hf_optim/rules/lamb.py)."""
    if sums is None:
        return _unused(sums, numels)
    norms = global_norms(sums, norm)  # ||p||, ||r|| per parameter: one batch
    scale = trust_ratio(norms[:, 0], norms[:, 1]) * c["lr"]
    return scale.view(-1, 1)


def lars(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """trust = eta * ||p|| / (||g|| + wd * ||p||) (hf_optim/rules/lars.py)."""
    if sums is None:
        return _unused(sums, numels)
    norms = global_norms(sums, norm)  # ||p||, ||g|| per parameter: one batch
    p_norm = norms[:, 0]
    denominator = norms[:, 1] + c["weight_decay"] * p_norm
    return trust_ratio(p_norm, denominator, c["trust_coefficient"]).view(-1, 1)


def stable_adamw(c: Mapping[str, Tensor], sums: Tensor | None, numels: Tensor, norm: NormFn | None) -> Tensor:
    """lr_t = lr / max(1, rms), rms = ||x|| / ||ones|| (global_mean_sqrt), and the decay 1 - lr_t * wd
    (hf_optim/rules/stable_adamw.py)."""
    assert sums is not None
    norms = global_norms(torch.stack([sums[:, 0], numels], dim=1), norm)  # ||x||, ||ones||: one batch
    rms = norms[:, 0] / norms[:, 1]
    lr = c["lr"] / rms.clamp(min=1.0)
    return torch.stack([lr, 1 - lr * c["weight_decay"]], dim=1)
