"""Adan: adaptive Nesterov momentum.

Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", TPAMI 2024 (arXiv:2208.06677), Algorithm 1, with bias
correction as in the authors' code. With gradient g_t and d = g_t - g_{t-1}
(0 on the first step)::

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * d                  # gradient-difference momentum
    n <- beta3 * n + (1 - beta3) * (g + beta2 * d)^2
    p <- p - lr * (m^ + beta2 * v^) / (sqrt(n^) + eps)   # ^: divided by 1 - beta^t
    p <- p / (1 + lr * wd)                              # the paper's proximal decay

Beta convention: the paper writes the *new* value's weight as beta (its
defaults 0.02, 0.08, 0.01); here, as in optimi, timm and the authors' code,
each beta is the *old* value's weight, Adam-style: betas = (0.98, 0.92, 0.99)
are the paper's (1 - 0.02, 1 - 0.08, 1 - 0.01). Passing the paper's numbers
(``betas=(0.02, 0.08, 0.01)``) would make the averages nearly memoryless, a
mix-up that has bitten users.

Weight decay is the paper's (and optimi's default) form, dividing by
``1 + lr * wd`` after the step, which equals ``1 - lr * wd`` to first order.
Defaults: lr 1e-3, betas (0.98, 0.92, 0.99), eps 1e-8 (the paper's), weight
decay 0.02 (the paper's ViT/ResNet setting). State is torch-style biased
averages plus ``prev_grad`` (the last gradient); optimi keeps corrected
averages and the negated last gradient, the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import Buffer, NormFn, ParamInfo, Relation, UpdateRule, moment_coefficients
from .native_binding import NativeBinding


class Adan(UpdateRule):
    elementwise = True
    name = "adan"
    description = "Adan: Nesterov-style momentum with gradient differences; three betas (old-value weights)"
    defaults = {"lr": 1e-3, "betas": (0.98, 0.92, 0.99), "eps": 1e-8, "weight_decay": 0.02}
    relation = Relation(
        1.0,
        2.0,
        "sqrt",
        "Adan works with AdamW-sized learning rates (the paper often uses ~1.5x larger at large batch) and "
        "somewhat stronger weight decay (its default 0.02 vs AdamW's 0.01; here x2). Its three betas are "
        "old-value weights, (0.98, 0.92, 0.99) -- not the paper's (0.02, 0.08, 0.01).",
        {"betas": (0.98, 0.92, 0.99)},
    )
    example = {"lr": 1e-2, "betas": (0.95, 0.9, 0.98), "eps": 1e-3, "weight_decay": 0.1}

    native = NativeBinding(
        kernel="adan",
        coefficients=("lr", "inv_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3",
                      "one_minus_beta3", "inv_bias_correction1", "diff_scale", "inv_bias_correction3_sqrt", "has_prev",
                      "eps"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (
            Buffer("exp_avg", "signed"),
            Buffer("exp_avg_diff", "signed"),
            Buffer("exp_avg_sq", "unsigned"),
            Buffer("prev_grad", "signed"),
        )

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, beta1, beta2, beta3 = hp["lr"], hp["beta1"], hp["beta2"], hp["beta3"]
        return {
            "lr": lr,
            "inv_decay": 1 / (1 + lr * hp["weight_decay"]),
            **moment_coefficients(beta1, beta2),
            "beta3": beta3,
            "one_minus_beta3": 1 - beta3,
            "inv_bias_correction1": 1 / (1 - beta1**step),
            "diff_scale": beta2 / (1 - beta2**step),
            "inv_bias_correction3_sqrt": (1 - beta3**step).rsqrt(),
            "has_prev": (step > 1).float(),
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
        m, v, n, prev = state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state["prev_grad"]
        diff = (g - prev) * c["has_prev"]
        m.mul_(c["beta1"]).add_(g * c["one_minus_beta1"])
        v.mul_(c["beta2"]).add_(diff * c["one_minus_beta2"])
        u = g + diff * c["beta2"]
        n.mul_(c["beta3"]).add_(u * u * c["one_minus_beta3"])
        prev.copy_(g)
        denom = n.sqrt() * c["inv_bias_correction3_sqrt"] + c["eps"]
        p.sub_((m * c["inv_bias_correction1"] + v * c["diff_scale"]) / denom * c["lr"]).mul_(c["inv_decay"])
