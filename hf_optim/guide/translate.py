"""Hyperparameter translation between update rules: the values users get wrong.

Switching optimizers while keeping AdamW's numbers is the commonest way to
get a bad run: Lion with AdamW's lr diverges or thrashes (its sign update
moves every weight by lr each step), and with AdamW's weight decay it barely
decays (the effective decay per step is ``lr * wd``). ``translate_hparams``
turns a tuned AdamW (or other) setting into a starting point for another
rule and says why, so the reasoning travels with the numbers::

    >>> t = translate_hparams(from_="adamw", to="lion", lr=3e-4, weight_decay=0.1)
    >>> t.values
    {'lr': 6e-05, 'weight_decay': 0.5, 'betas': (0.9, 0.99)}
    >>> print(t.reasoning)

Every rule is related to AdamW by a factor on lr and on weight decay, which
the rule declares (its ``relation``, an ``hf_optim.rules.Relation``); a
translation goes through AdamW (``lion -> adamw -> lamb``). ``batch_size``
with ``from_batch_size`` also rescales lr for a batch-size change (square
root for the Adam family, linear for LARS/SGD-style rules). LARS and SGD have
no AdamW equivalent lr (LARS's lr multiplies a trust ratio; SGD's scale
depends on the gradient's), so translating to or from them is an error that
says what to do instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..rules.base import Relation
from ..rules.lion import LION_FACTOR as LION_FACTOR  # re-exported: the rule's own number, used by recommend


@dataclass(frozen=True)
class HparamTranslation:
    """The translated hyperparameters (``values``, ready as kwargs) and why."""

    from_: str
    to: str
    values: dict[str, Any]
    reasoning: str

    def __str__(self) -> str:
        pairs = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{self.from_} -> {self.to}: {pairs}\n{self.reasoning}"


def _relation(name: str, role: str) -> Relation:
    from ..rules.registry import get_rule, registered_rules

    rule = get_rule(name)
    if rule is None:
        raise ValueError(f"Unknown {role} {name!r}; known rules: {', '.join(sorted(registered_rules()))}")
    relation = rule.relation
    if relation is None:
        raise ValueError(f"cannot translate {role}={name!r}: the rule declares no relation to AdamW's "
                         "hyperparameters (its class attribute `relation`)")
    if not relation.has_equivalent:
        raise ValueError(f"cannot translate {role}={name!r}: {relation.note}")
    return relation


def _rounded(x: float) -> float:
    return float(f"{x:.3g}")


def translate_hparams(
    from_: str = "adamw",
    to: str = "lion",
    *,
    lr: float,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    from_batch_size: int | None = None,
) -> HparamTranslation:
    """Convert a tuned ``lr``/``weight_decay`` for rule ``from_`` into a start for rule ``to``.

    ``batch_size`` and ``from_batch_size``, when both given, rescale lr for the
    change of batch size (square root for Adam-family rules). Returns the
    values (``lr``, ``weight_decay`` and, where the target's defaults differ
    from AdamW's, ``betas``) with the reasoning as text. Names may carry the
    registry's modifiers (``paged_lion_8bit``); storage does not change them.
    """
    from ..registry import parse

    names = []
    for name in (from_, to):
        parsed = parse(name)
        names.append(parsed[0] if parsed else name)
    src_name, dst_name = names
    src, dst = _relation(src_name, "from_"), _relation(dst_name, "to")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr!r} (expected a positive number)")
    if not (isinstance(weight_decay, int | float) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (expected a number >= 0)")
    assert src.lr_factor and dst.lr_factor and src.wd_factor and dst.wd_factor  # has_equivalent, checked above
    new_lr = lr / src.lr_factor * dst.lr_factor
    new_wd = weight_decay / src.wd_factor * dst.wd_factor
    lines = []
    if src_name != "adamw":
        lines.append(f"From {src_name}: its lr is x{src.lr_factor:g} and weight decay x{src.wd_factor:g} AdamW's.")
    lines.append(dst.note)
    if (batch_size is None) != (from_batch_size is None):
        raise ValueError("give both batch_size and from_batch_size to rescale lr for a batch-size change, or neither")
    if batch_size is not None and from_batch_size is not None:
        if batch_size <= 0 or from_batch_size <= 0:
            raise ValueError(f"Invalid batch sizes: {from_batch_size} -> {batch_size} (expected positive integers)")
        ratio = batch_size / from_batch_size
        scale = math.sqrt(ratio) if dst.batch_scaling == "sqrt" else ratio
        new_lr *= scale
        lines.append(
            f"Batch {from_batch_size} -> {batch_size}: lr x{scale:.3g} ({dst.batch_scaling} scaling, the usual rule "
            "for adaptive optimizers); warm up longer when raising lr this way."
        )
    if weight_decay == 0 and dst_name == "lion":
        lines.append("Weight decay was 0: Lion usually benefits from some decay (0.1-1.0 at Lion's lr).")
    values: dict[str, Any] = {"lr": _rounded(new_lr), "weight_decay": _rounded(new_wd), **dst.extra}
    return HparamTranslation(from_=from_, to=to, values=values, reasoning=" ".join(lines))
