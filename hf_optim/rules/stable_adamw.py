"""StableAdamW: AdamW with per-tensor update clipping (AdaFactor's), no grad clipping needed.

Wortsman et al., "Stable and low-precision training for large-scale
vision-language models", NeurIPS 2023 (arXiv:2304.13013), Algorithm 2, in
optimi's form. With gradient g, step t, and hatted moments bias-corrected::

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    rms <- sqrt(mean(g^2 / max(v^, eps^2)))        # over the whole tensor
    lr_t <- lr / max(1, rms)                        # clip where v^ lags the gradient
    p <- p * (1 - lr_t * wd)
    p <- p - lr_t * m^ / (sqrt(v^) + eps)

When a gradient spikes far above what the second moment has seen, the RMS
grows and the step shrinks for that tensor only; this is what makes loss
spikes rarer without a global gradient clip. The mean is over the whole
parameter, global under FSDP2 (computed through the engine's ``norm``).

Defaults are optimi's: lr 1e-3, betas (0.9, 0.99) (the paper lowers beta2 so
v tracks recent gradients), eps 1e-6, weight decay 1e-2. State is torch's
(biased ``exp_avg``/``exp_avg_sq``, corrected in the step); optimi stores the
corrected averages, the same numbers divided by ``1 - beta^t``.
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
    global_mean_sqrt,
    moment_coefficients,
    update_moments,
)
from .native_binding import NativeBinding


class StableAdamW(UpdateRule):
    name = "stable_adamw"
    description = "StableAdamW: AdamW with per-tensor update-RMS clipping; no gradient clipping needed"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-2}
    relation = Relation(
        1.0,
        1.0,
        "sqrt",
        "StableAdamW is AdamW with per-tensor update clipping: lr and weight decay carry over unchanged; "
        "drop gradient clipping (max_grad_norm=0), which the update clipping replaces, and use "
        "beta2 0.99 so the second moment follows recent gradients.",
        {"betas": (0.9, 0.99)},
    )
    example = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1}
    takes_over_transformers_name = True  # transformers' "stable_adamw" is torch-optimi's: the same algorithm

    native = NativeBinding(
        kernel="stable_adamw",
        coefficients=("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
                      "inv_bias_correction2", "inv_bias_correction2_sqrt", "eps", "eps_sq", "lr", "weight_decay"),
        layerwise="stable_adamw", per_parameter=("lr", "decay"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("exp_avg", "signed"), Buffer("exp_avg_sq", "unsigned"))

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        beta1, beta2, eps = hp["beta1"], hp["beta2"], hp["eps"]
        return {
            "lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            **moment_coefficients(beta1, beta2),
            "inv_bias_correction1": 1 / (1 - beta1**step),
            "inv_bias_correction2": 1 / (1 - beta2**step),
            "inv_bias_correction2_sqrt": (1 - beta2**step).rsqrt(),
            "eps": eps,
            "eps_sq": eps * eps,
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
        v_hat = exp_avg_sq * c["inv_bias_correction2"]
        rms = global_mean_sqrt(g * v_hat.maximum(c["eps_sq"]).rsqrt(), norm)
        lr = c["lr"] / rms.clamp(min=1.0)
        p.mul_(1 - lr * c["weight_decay"])
        # sqrt(v) * rsqrt(bc2), not sqrt(v_hat): reads the stored v instead of a v_hat temporary
        denom = exp_avg_sq.sqrt() * c["inv_bias_correction2_sqrt"] + c["eps"]
        p.sub_(exp_avg * c["inv_bias_correction1"] / denom * lr)
