"""Ranger: RAdam with Lookahead.

RAdam: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
ICLR 2020 (arXiv:1908.03265). Lookahead: Zhang et al., "Lookahead Optimizer:
k steps forward, 1 step back", NeurIPS 2019 (arXiv:1907.08610). Ranger
(Wright, 2019) runs the first as the fast optimizer of the second. With
gradient g, step t, rho_inf = 2 / (1 - beta2) - 1::

    p <- p * (1 - lr * wd)                                 # decoupled decay
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    rho_t <- rho_inf - 2 t beta2^t / (1 - beta2^t)
    if rho_t > 5:  p <- p - lr * r_t * m^ / (sqrt(v^) + eps),
                   r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))
    else:          p <- p - lr * m^                        # variance not yet tractable: SGD-momentum step
    every k steps: slow <- slow + alpha * (p - slow);  p <- slow

The slow weights (``slow_param``, initialized from the parameter) are state,
so they are in the state dict and stored like the parameter. The branch on
rho_t is taken with tensor ops (no recompiles, no host sync).

Defaults are optimi's: lr 1e-3, betas (0.9, 0.99), eps 1e-6, weight decay 0,
k 6, alpha 0.5 (Lookahead's paper uses k 5-10, alpha 0.5). RAdam's warm-up
built in, Ranger needs little or no lr warmup; it pairs well with a flat then
cosine/linear-down schedule.
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
    _as_float,
    check_unit_interval,
    moment_coefficients,
    update_moments,
)
from .native_binding import NativeBinding


class Ranger(UpdateRule):
    elementwise = True
    name = "ranger"
    description = "Ranger: RAdam + Lookahead (slow weights every k steps); little warmup needed"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, "k": 6, "alpha": 0.5}
    relation = Relation(
        1.0,
        1.0,
        "sqrt",
        "Ranger (RAdam + Lookahead) takes AdamW's lr and weight decay; RAdam's rectification is a built-in "
        "warmup, so lr warmup can be shortened or dropped. Lookahead k=6, alpha=0.5.",
        {"betas": (0.9, 0.99)},
    )
    example = {"lr": 1e-2, "betas": (0.85, 0.98), "eps": 1e-3, "weight_decay": 0.1, "k": 2, "alpha": 0.6}

    native = NativeBinding(
        kernel="ranger",
        coefficients=("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
                      "inv_bias_correction2_sqrt", "rectify", "rect", "eps", "sync", "alpha"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("exp_avg", "signed"), Buffer("exp_avg_sq", "unsigned"), Buffer("slow_param", "param"))

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        super().validate(group)
        k = group["k"]
        if isinstance(k, bool) or not float(_as_float(k)).is_integer() or _as_float(k) < 1:
            raise ValueError(f"Invalid k value: {k!r} (expected an integer >= 1)")
        check_unit_interval("alpha", group["alpha"])

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho = rho_inf - 2 * step * beta2**step / bias_correction2
        ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        rectify = rho > 5
        return {
            "lr": lr,
            "decay": 1 - lr * hp["weight_decay"],
            **moment_coefficients(beta1, beta2),
            "inv_bias_correction1": 1 / (1 - beta1**step),
            "inv_bias_correction2_sqrt": bias_correction2.rsqrt(),
            "rectify": rectify.float(),
            "rect": torch.where(rectify, ratio.clamp(min=0).sqrt(), 0.0),
            "eps": hp["eps"],
            "sync": (torch.remainder(step, hp["k"]) == 0).float(),
            "alpha": hp["alpha"],
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
        exp_avg, exp_avg_sq, slow = state["exp_avg"], state["exp_avg_sq"], state["slow_param"]
        p.mul_(c["decay"])
        update_moments(g, exp_avg, exp_avg_sq, c)
        m_hat = exp_avg * c["inv_bias_correction1"]
        adaptive = m_hat * c["rect"] / (exp_avg_sq.sqrt() * c["inv_bias_correction2_sqrt"] + c["eps"])
        p.sub_(torch.where(c["rectify"] > 0, adaptive, m_hat) * c["lr"])
        sync = c["sync"] > 0
        slow.copy_(torch.where(sync, slow + (p - slow) * c["alpha"], slow))
        p.copy_(torch.where(sync, slow, p))
