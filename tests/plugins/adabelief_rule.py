"""AdaBelief: Adam whose second moment is the belief in the gradient, a rule defined outside hf_optim.

Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
NeurIPS 2020 (arXiv:2010.07468), Algorithm 2, with decoupled weight decay (the authors'
``weight_decouple=True``) and without rectification. With gradient g and step t::

    p <- p * (1 - lr * wd)                               # decoupled decay, before the step
    m <- beta1 * m + (1 - beta1) * g
    s <- beta2 * s + (1 - beta2) * (g - m)^2 + eps       # the residual's variance, not g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(s / (1 - beta2^t)) + eps)

Where the gradient agrees with its average (small residual) the step is large; where it
is noisy the step is small. Defaults are the authors' v0.2 ones: lr 1e-3, betas (0.9, 0.999),
eps 1e-16, no weight decay.

This file is the whole rule: ``hf_optim.register_rule(AdaBelief)`` (or the ``hf_optim.rules``
entry point ``adabelief = adabelief_rule:AdaBelief``) gives ``adabelief``, ``adabelief_8bit``,
``paged_adabelief_8bit``, ... with no other code (tests/test_register_rule.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hf_optim.rules import Buffer, Relation, UpdateRule


class AdaBelief(UpdateRule):
    name = "adabelief"
    description = "AdaBelief: Adam with the variance of the gradient's residual as second moment"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0}
    elementwise = True
    relation = Relation(
        1.0, 1.0, "sqrt",
        "AdaBelief takes AdamW's lr and weight decay (its authors fine-tune transformers at Adam's values); "
        "its eps sits inside the second moment, so keep it tiny (1e-16) unless updates get too large.",
        {"eps": 1e-16},
    )
    example = {"lr": 2e-3, "betas": (0.85, 0.98), "eps": 1e-10, "weight_decay": 0.05}

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("exp_avg", "signed"), Buffer("exp_avg_var", "unsigned"))

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        return {
            "decay": 1 - lr * hp["weight_decay"],
            "beta1": beta1,
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "step_size": lr / (1 - beta1**step),
            "inv_bias_correction2_sqrt": (1 - beta2**step).rsqrt(),
            "eps": hp["eps"],
        }

    @staticmethod
    def update(p: Tensor, g: Tensor, state: dict[str, Tensor], c: Mapping[str, Tensor],
               flags: Mapping[str, Any], norm: Any, param: Any) -> None:
        m, s = state["exp_avg"], state["exp_avg_var"]
        p.mul_(c["decay"])
        m.mul_(c["beta1"]).add_(g * c["one_minus_beta1"])
        residual = g - m
        s.mul_(c["beta2"]).add_(residual * residual * c["one_minus_beta2"]).add_(c["eps"])
        p.sub_(m / (s.sqrt() * c["inv_bias_correction2_sqrt"] + c["eps"]) * c["step_size"])
