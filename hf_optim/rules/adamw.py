"""AdamW: Adam with decoupled weight decay.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019
(arXiv:1711.05101), on Kingma & Ba, "Adam", ICLR 2015 (arXiv:1412.6980).

With gradient g_t, step t, learning rate lr and weight decay wd::

    p   <- p * (1 - lr * wd)                      # decoupled decay, before the step
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    v^  <- max(v^, v)                             # only with amsgrad
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

Defaults are torch.optim.AdamW's (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 1e-2). For fine-tuning transformers, lr 1e-5..5e-5 with warmup
is the usual start; beta2 0.95..0.98 steadies large or unstable runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import (
    Buffer,
    NormFn,
    ParamInfo,
    Relation,
    UpdateRule,
    moment_coefficients,
    update_moments,
)
from .native_binding import NativeBinding


class AdamW(UpdateRule):
    elementwise = True
    name = "adamw"
    description = "Adam with decoupled weight decay: the default for transformers"
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "amsgrad": False,
        "maximize": False,
    }
    flag_names = frozenset({"amsgrad", "maximize"})
    relation = Relation(1.0, 1.0, "sqrt", "AdamW is the reference point.")
    example = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1}
    takes_over_transformers_name = True  # adamw_8bit, paged_adamw_32bit, ...: bitsandbytes' AdamW in transformers

    native = NativeBinding(
        kernel="adamw",
        coefficients=("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size",
                      "inv_bias_correction2_sqrt", "eps"),
        flags=("maximize", "amsgrad"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        moments = (Buffer("exp_avg", "signed"), Buffer("exp_avg_sq", "unsigned"))
        return moments + ((Buffer("max_exp_avg_sq", "unsigned"),) if flags["amsgrad"] else ())

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        return {
            "decay": 1 - lr * hp["weight_decay"],
            **moment_coefficients(beta1, beta2),
            "step_size": lr / (1 - beta1**step),
            "inv_bias_correction2_sqrt": (1 - beta2**step).rsqrt(),
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
        if flags["maximize"]:
            g = -g
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(c["decay"])
        update_moments(g, exp_avg, exp_avg_sq, c)
        if flags["amsgrad"]:
            state["max_exp_avg_sq"].copy_(state["max_exp_avg_sq"].maximum(exp_avg_sq))
            exp_avg_sq = state["max_exp_avg_sq"]
        denom = exp_avg_sq.sqrt() * c["inv_bias_correction2_sqrt"] + c["eps"]
        p.sub_(exp_avg / denom * c["step_size"])
