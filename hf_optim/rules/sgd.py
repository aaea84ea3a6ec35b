"""SGD with momentum and Nesterov momentum, exactly as ``torch.optim.SGD``.

Robbins & Monro (1951); momentum as in Sutskever et al., "On the importance of
initialization and momentum in deep learning", ICML 2013. With gradient g::

    g <- g + wd * p                                   # L2 penalty (coupled, as torch)
    b <- g                          on the first step  # momentum buffer
    b <- momentum * b + (1 - dampening) * g           afterwards
    d <- g + momentum * b  if nesterov  else  b       (d = g when momentum == 0)
    p <- p - lr * d

This takes over transformers' ``optim="sgd"`` (which builds torch.optim.SGD),
so it matches torch's definition and defaults exactly (lr 1e-3, no momentum,
coupled weight decay) and keeps torch's ``momentum_buffer`` state key. For
CNNs, momentum 0.9 with a cosine schedule is the usual recipe. The buffer is
allocated even with momentum 0 (the rule's buffers depend on flags only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Buffer, NormFn, ParamInfo, Relation, UpdateRule, check_non_negative
from .native_binding import NativeBinding


class SGD(UpdateRule):
    elementwise = True
    name = "sgd"
    description = "SGD with (Nesterov) momentum, as torch.optim.SGD; the CNN classic with a cosine schedule"
    defaults = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    flag_names = frozenset({"nesterov", "maximize"})
    relation = Relation.no_equivalent(
        "SGD's step scales with the raw gradient while Adam's is normalized, so there is no AdamW-"
        "equivalent lr: for CNNs start from lr 0.1 x batch/256, momentum 0.9, weight decay 5e-4 (coupled) "
        "with a cosine schedule, and tune."
    )
    example = {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.1}
    takes_over_transformers_name = True  # transformers' "sgd" is torch.optim.SGD: same math, same defaults

    native = NativeBinding(
        kernel="sgd", coefficients=("lr", "weight_decay", "momentum", "one_minus_dampening", "first", "has_momentum"),
        flags=("maximize", "nesterov"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("momentum_buffer", "signed"),)

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        super().validate(group)
        check_non_negative("momentum", group["momentum"])
        if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        momentum = hp["momentum"]
        return {
            "lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            "momentum": momentum,
            "one_minus_dampening": 1 - hp["dampening"],
            "first": (step == 1).float(),
            "has_momentum": (momentum != 0).float(),
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
        if flags["maximize"]:
            g = -g
        g = g + p * c["weight_decay"]
        buf = state["momentum_buffer"]
        buf.copy_(torch.where(c["first"] > 0, g, buf * c["momentum"] + g * c["one_minus_dampening"]))
        direction = g + buf * c["momentum"] if flags["nesterov"] else buf
        p.sub_(torch.where(c["has_momentum"] > 0, direction, g) * c["lr"])
