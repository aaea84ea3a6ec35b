"""LAMB: Adam with a layer-wise trust ratio, for large-batch training.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", ICLR 2020 (arXiv:1904.00962), Algorithm 2. With gradient g, step t::

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    r <- (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * p
    trust <- ||p|| / ||r||      (1 where either norm is zero)
    p <- p - lr * trust * r

The norms are of the whole parameter (global under FSDP2: they go through the
engine's ``norm``). Weight decay sits inside ``r`` as in the paper, so it is
scaled by the trust ratio too; it is still decoupled from the moments. No
gradient clipping is hidden in the step, and the paper's scaling function
``phi`` is the identity (no clamp on ||p||).

Biases and norm weights: with ``exclude_bias_and_norm`` (default True) every
tensor with ``ndim <= 1`` gets neither weight decay nor a trust ratio, i.e. a
plain bias-corrected Adam step, as the paper's BERT setup does. The rule
cannot see names, so it asks the engine for the parameter's original ndim
(``param_fields``). ``bias_correction=False`` drops the ``1 - beta^t``
terms (the paper's v1-v2 form, NVIDIA's ``bias_correction`` switch).

Peers differ: pytorch_optimizer's ``Lamb`` corrects only the first moment,
clamps ||p|| at 10 and adds eps to ||r||; bitsandbytes' ``LAMB`` applies
decay outside the ratio and caps the ratio at 1 (update-norm clipping). The
parity test therefore checks against an independent transcription of
Algorithm 2.

Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-6 (the paper's), weight decay
0.01. Because the trust ratio normalizes each layer's step to about ``lr``
times its weight norm, LAMB tolerates higher learning rates than AdamW
(the paper scales lr with sqrt(batch size)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (
    Buffer,
    NormFn,
    ParamInfo,
    Relation,
    UpdateRule,
    moment_coefficients,
    trust_ratio,
    update_moments,
)
from .native_binding import NativeBinding


class LAMB(UpdateRule):
    name = "lamb"
    description = "LAMB: Adam with a layer-wise trust ratio for large batches; tolerates higher lr"
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 1e-2,
        "bias_correction": True,
        "exclude_bias_and_norm": True,
    }
    flag_names = frozenset({"bias_correction", "exclude_bias_and_norm"})
    param_fields = frozenset({"ndim"})
    relation = Relation(
        1.0,
        1.0,
        "sqrt",
        "LAMB scales each layer's Adam step by ||w||/||update||, so lr becomes a relative step size and "
        "LAMB tolerates higher values than AdamW (2-10x is common at large batch sizes); start from AdamW's "
        "lr and raise it as the batch grows (square-root scaling, as the LAMB paper does for BERT). "
        "Weight decay carries over; biases and norms are excluded from decay and the trust ratio.",
    )
    example = {"lr": 1e-2, "betas": (0.85, 0.99), "eps": 1e-5, "weight_decay": 0.1}

    # a norm pass, then the update; bias_correction changes only coefficients, and exclude_bias_and_norm with
    # ndim <= 1 is the kernel's plain step (FLAG_PLAIN)
    native = NativeBinding(
        kernel="lamb",
        coefficients=("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                      "inv_bias_correction1", "inv_bias_correction2_sqrt", "inv_bias_correction2", "eps"),
        folded_flags=("bias_correction", "exclude_bias_and_norm"),
        layerwise="lamb", per_parameter=("scale",),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("exp_avg", "signed"), Buffer("exp_avg_sq", "unsigned"))

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        beta1, beta2 = hp["beta1"], hp["beta2"]
        one = torch.ones_like(step)
        correct = flags["bias_correction"]
        return {
            "lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            **moment_coefficients(beta1, beta2),
            "inv_bias_correction1": 1 / (1 - beta1**step) if correct else one,
            "inv_bias_correction2_sqrt": (ibc2_sqrt := (1 - beta2**step).rsqrt() if correct else one),
            "inv_bias_correction2": ibc2_sqrt.square(),
            "eps": hp["eps"],
        }

    @staticmethod
    def update(
        p: Tensor,
        g: Tensor,
        state: dict[str, Tensor],
        c: Mapping[str, Tensor],
        flags: Mapping[str, Any],
        norm: NormFn,
        param: ParamInfo,
    ) -> None:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        update_moments(g, exp_avg, exp_avg_sq, c)
        r = exp_avg * c["inv_bias_correction1"] / (exp_avg_sq.sqrt() * c["inv_bias_correction2_sqrt"] + c["eps"])
        if flags["exclude_bias_and_norm"] and param.ndim <= 1:
            p.sub_(r * c["lr"])
            return
        r = r + p * c["weight_decay"]
        scale = trust_ratio(norm(p), norm(r)) * c["lr"]
        # the step recomputes r from m, v, p (written differently so it is not merged with the
        # first r): one more read per element, but no r-sized temporary written, faulted in and read
        denom = (exp_avg_sq * c["inv_bias_correction2"]).sqrt() + c["eps"]
        p.sub_((exp_avg * c["inv_bias_correction1"] / denom + p * c["weight_decay"]) * scale)
