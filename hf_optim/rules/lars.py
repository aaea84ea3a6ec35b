"""LARS: SGD with momentum and a layer-wise trust ratio.

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks"
(arXiv:1708.03888), Algorithm 1, in the form used by SimCLR/BYOL and
pytorch_optimizer. With gradient g, trust coefficient eta::

    trust <- eta * ||p|| / (||g|| + wd * ||p||)    (1 where ||p|| or that denominator is 0)
    d <- (g + wd * p) * trust
    b <- momentum * b + (1 - dampening) * d
    p <- p - lr * (d + momentum * b  if nesterov  else  b)   (p - lr * d with momentum 0)

The norms are of the whole parameter (global under FSDP2, via the engine's
``norm``). Weight decay is an L2 term inside the ratio, as in the paper; no
gradient clipping is hidden in the step. With ``exclude_bias_and_norm``
(default True) tensors with ``ndim <= 1`` (biases, norm weights) take a plain
momentum-SGD step: no weight decay, no trust ratio. The rule learns the
parameter's original ndim from the engine (``param_fields``).

Defaults: eta 1e-3 (the paper's), momentum 0.9, no weight decay, lr 1.0:
``lr`` multiplies the trust ratio, so a matrix moves about ``lr * eta`` of its
norm per step (0.1% at the defaults). Large-batch recipes scale lr with the
batch (e.g. 0.3 x batch/256 in SimCLR, with weight decay 1e-6..1e-4);
remember biases and norms then take SGD steps of size lr.
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
    check_non_negative,
    check_unit_interval,
    trust_ratio,
)
from .native_binding import NativeBinding


class LARS(UpdateRule):
    name = "lars"
    description = "LARS: momentum SGD with a layer-wise trust ratio, for large-batch CNN training"
    defaults = {
        "lr": 1.0,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "trust_coefficient": 1e-3,
        "nesterov": False,
        "exclude_bias_and_norm": True,
    }
    flag_names = frozenset({"nesterov", "exclude_bias_and_norm"})
    param_fields = frozenset({"ndim"})
    relation = Relation.no_equivalent(
        "LARS's lr multiplies a layer-wise trust ratio (each matrix moves ~lr*trust_coefficient of its "
        "norm per step), so there is no AdamW-equivalent value: start from lr ~0.3 x batch/256 with "
        "trust_coefficient 1e-3 and weight decay 1e-6..1e-4 (SimCLR's recipe) and tune."
    )
    example = {"lr": 0.5, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.1, "trust_coefficient": 0.02}

    native = NativeBinding(
        kernel="lars",
        coefficients=("lr", "weight_decay", "momentum", "one_minus_dampening", "has_momentum", "trust_coefficient"),
        flags=("nesterov",), folded_flags=("exclude_bias_and_norm",),
        layerwise="lars", per_parameter=("trust",),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("momentum_buffer", "signed"),)

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        super().validate(group)
        check_unit_interval("momentum", group["momentum"])
        check_unit_interval("dampening", group["dampening"])
        check_non_negative("trust_coefficient", group["trust_coefficient"])

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            "lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            "trust_coefficient": hp["trust_coefficient"],
            "momentum": hp["momentum"],
            "one_minus_dampening": 1 - hp["dampening"],
            "has_momentum": (hp["momentum"] > 0).float(),
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
        if not (flags["exclude_bias_and_norm"] and param.ndim <= 1):
            p_norm = norm(p)
            denominator = norm(g) + c["weight_decay"] * p_norm
            g = (g + p * c["weight_decay"]) * trust_ratio(p_norm, denominator, c["trust_coefficient"])
        buf = state["momentum_buffer"]
        buf.mul_(c["momentum"]).add_(g * c["one_minus_dampening"])
        direction = g + buf * c["momentum"] if flags["nesterov"] else buf
        p.sub_(torch.where(c["has_momentum"] > 0, direction, g) * c["lr"])
