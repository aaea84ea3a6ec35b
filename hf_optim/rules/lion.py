"""Lion: evolved sign momentum.

Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023
(arXiv:2302.06675). With gradient g, learning rate lr and weight decay wd::

    p <- p * (1 - lr * wd)                              # decoupled decay, before the step
    p <- p - lr * sign(beta1 * m + (1 - beta1) * g)     # interpolate, then take the sign
    m <- beta2 * m + (1 - beta2) * g                    # momentum tracks more slowly

One state buffer (half AdamW's memory), and every coordinate moves by exactly
``lr`` per step, so the update's norm is larger than Adam's: the paper uses an
lr 3-10x smaller than AdamW's and a weight decay 3-10x larger, keeping the
effective decay ``lr * wd`` about the same. Defaults: lr 1e-4, betas
(0.9, 0.99) (the paper's), weight decay 0.1 (10x AdamW's 1e-2 here).
Constructing Lion with an AdamW-sized lr (>= 1e-3) or weight decay (0 < wd <
0.03) warns and says what to use (``hf_optim.translate_hparams`` converts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..util.user_warnings import warn_user
from .base import Buffer, NormFn, ParamInfo, Relation, UpdateRule, _as_float, moment_coefficients
from .native_binding import NativeBinding

#: an lr at or above this is AdamW-sized for Lion
LION_MAX_LR = 1e-3
#: a non-zero weight decay below this is AdamW-sized for Lion
LION_MIN_WEIGHT_DECAY = 0.03
#: translate_hparams divides AdamW's lr and multiplies its weight decay by this (the paper: 3-10x)
LION_FACTOR = 5.0


def adamw_sized_advice(lr: float, wd: float) -> str:
    """What to change when Lion gets AdamW's settings (the paper: lr 3-10x smaller, weight decay 3-10x larger)."""
    decay = (
        f"and a 3-10x larger weight_decay ({wd * 3:.2g}..{wd * 10:.2g})" if wd > 0
        else "(weight_decay is 0, so there is no decay to scale)"
    )
    return (
        f"Lion's sign update moves every weight by the full lr each step: use a 3-10x smaller lr "
        f"({lr / 10:.2g}..{lr / 3:.2g}) {decay}; "
        "hf_optim.translate_hparams(from_='adamw', to='lion', ...) converts both."
    )


class Lion(UpdateRule):
    elementwise = True
    name = "lion"
    description = "Lion: sign of interpolated momentum; one state buffer, lr 3-10x below AdamW's"
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
    relation = Relation(
        1 / LION_FACTOR,
        LION_FACTOR,
        "sqrt",
        "Lion's update is a sign, so every weight moves by the full lr each step and the update norm is "
        "larger than Adam's: the Lion paper uses an lr 3-10x smaller than AdamW's (here /"
        f"{LION_FACTOR:g}). Decoupled decay per step is lr*wd, so weight decay goes up by the same "
        f"factor (x{LION_FACTOR:g}) to keep the effective decay unchanged. betas (0.9, 0.99) are the "
        "paper's; (0.95, 0.98) steadies unstable runs.",
        {"betas": (0.9, 0.99)},
    )
    example = {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.2}
    takes_over_transformers_name = True  # lion_8bit, paged_lion_32bit, ...: bitsandbytes' Lion in transformers

    native = NativeBinding(
        kernel="lion", coefficients=("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"),
    )

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("exp_avg", "signed"),)

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        super().validate(group)
        lr, wd = _as_float(group["lr"]), _as_float(group["weight_decay"])
        if lr >= LION_MAX_LR:
            message = f"Lion got lr={lr:g}, an AdamW-sized learning rate. {adamw_sized_advice(lr, wd)}"
            warn_user(message, cause=message)  # once per value, however many groups or validations
        if 0.0 < wd < LION_MIN_WEIGHT_DECAY:
            warn_user(
                f"Lion got weight_decay={wd:g}, an AdamW-sized value: with Lion's smaller lr the decay "
                f"lr*wd would be 3-10x weaker; use 3-10x more ({wd * 3:.2g}-{wd * 10:.2g}).",
                cause=f"lion weight_decay={wd:g}",
            )

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        return {
            "lr": lr,
            "decay": 1 - lr * hp["weight_decay"],
            **moment_coefficients(beta1, beta2),
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
        exp_avg = state["exp_avg"]
        p.mul_(c["decay"])
        direction = (exp_avg * c["beta1"] + g * c["one_minus_beta1"]).sign()
        p.sub_(direction * c["lr"])
        exp_avg.mul_(c["beta2"]).add_(g * c["one_minus_beta2"])
