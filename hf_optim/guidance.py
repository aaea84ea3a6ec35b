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

Every rule is related to AdamW by a factor on lr and on weight decay; a
translation goes through AdamW (``lion -> adamw -> lamb``). ``batch_size``
with ``from_batch_size`` also rescales lr for a batch-size change (square
root for the Adam family, linear for LARS/SGD-style rules). LARS and SGD have
no AdamW equivalent lr (LARS's lr multiplies a trust ratio; SGD's scale
depends on the gradient's), so translating to or from them is an error that
says what to do instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: lr is divided and weight decay multiplied by this for Lion (the paper: 3-10x)
LION_FACTOR = 5.0


@dataclass(frozen=True)
class _Relation:
    """How one rule's hyperparameters relate to AdamW's."""

    lr_factor: float
    wd_factor: float
    batch_scaling: str  # "sqrt" or "linear"
    note: str
    extra: dict[str, Any] = field(default_factory=dict)


_RELATIONS: dict[str, _Relation] = {
    "adamw": _Relation(1.0, 1.0, "sqrt", "AdamW is the reference point."),
    "lion": _Relation(
        1 / LION_FACTOR,
        LION_FACTOR,
        "sqrt",
        "Lion's update is a sign, so every weight moves by the full lr each step and the update norm is "
        "larger than Adam's: the Lion paper uses an lr 3-10x smaller than AdamW's (here /"
        f"{LION_FACTOR:g}). Decoupled decay per step is lr*wd, so weight decay goes up by the same "
        f"factor (x{LION_FACTOR:g}) to keep the effective decay unchanged. betas (0.9, 0.99) are the "
        "paper's; (0.95, 0.98) steadies unstable runs.",
        {"betas": (0.9, 0.99)},
    ),
    "lamb": _Relation(
        1.0,
        1.0,
        "sqrt",
        "LAMB scales each layer's Adam step by ||w||/||update||, so lr becomes a relative step size and "
        "LAMB tolerates higher values than AdamW (2-10x is common at large batch sizes); start from AdamW's "
        "lr and raise it as the batch grows (square-root scaling, as the LAMB paper does for BERT). "
        "Weight decay carries over; biases and norms are excluded from decay and the trust ratio.",
    ),
    "stable_adamw": _Relation(
        1.0,
        1.0,
        "sqrt",
        "StableAdamW is AdamW with per-tensor update clipping: lr and weight decay carry over unchanged; "
        "drop gradient clipping (max_grad_norm=0), which the update clipping replaces, and use "
        "beta2 0.99 so the second moment follows recent gradients.",
        {"betas": (0.9, 0.99)},
    ),
    "adan": _Relation(
        1.0,
        2.0,
        "sqrt",
        "Adan works with AdamW-sized learning rates (the paper often uses ~1.5x larger at large batch) and "
        "somewhat stronger weight decay (its default 0.02 vs AdamW's 0.01; here x2). Its three betas are "
        "old-value weights, (0.98, 0.92, 0.99) -- not the paper's (0.02, 0.08, 0.01).",
        {"betas": (0.98, 0.92, 0.99)},
    ),
    "ranger": _Relation(
        1.0,
        1.0,
        "sqrt",
        "Ranger (RAdam + Lookahead) takes AdamW's lr and weight decay; RAdam's rectification is a built-in "
        "warmup, so lr warmup can be shortened or dropped. Lookahead k=6, alpha=0.5.",
        {"betas": (0.9, 0.99)},
    ),
    "muon": _Relation(
        1.0,
        1.0,
        "sqrt",
        "Muon with adjust_lr_fn='match_rms_adamw' scales each matrix's orthogonalized update to AdamW's RMS "
        "(lr x 0.2*sqrt(max(rows, cols))), so AdamW's lr and weight decay carry over (Liu et al. 2025, Moonlight); "
        "the AdamW part (embeddings, lm_head, norms, biases) takes the same values unless adamw_lr / "
        "adamw_weight_decay are set. (With the original scaling Muon's lr is ~0.02, 10-100x AdamW's.) Known to "
        "help when training hidden matrices from scratch (pretraining: ~2x AdamW's compute efficiency in "
        "Moonlight, the nanoGPT and CIFAR-10 speed records); fine-tuning a model pretrained with AdamW is not "
        "known to gain (Moonlight saw a mismatch cost), so keep AdamW there.",
        {"adjust_lr_fn": "match_rms_adamw"},
    ),
}

_NO_EQUIVALENT = {
    "lars": "LARS's lr multiplies a layer-wise trust ratio (each matrix moves ~lr*trust_coefficient of its "
    "norm per step), so there is no AdamW-equivalent value: start from lr ~0.3 x batch/256 with "
    "trust_coefficient 1e-3 and weight decay 1e-6..1e-4 (SimCLR's recipe) and tune.",
    "sgd": "SGD's step scales with the raw gradient while Adam's is normalized, so there is no AdamW-"
    "equivalent lr: for CNNs start from lr 0.1 x batch/256, momentum 0.9, weight decay 5e-4 (coupled) "
    "with a cosine schedule, and tune.",
}


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


def _relation(name: str, role: str) -> _Relation:
    if name in _NO_EQUIVALENT:
        raise ValueError(f"cannot translate {role}={name!r}: {_NO_EQUIVALENT[name]}")
    if name not in _RELATIONS:
        known = sorted([*_RELATIONS, *_NO_EQUIVALENT])
        raise ValueError(f"Unknown {role} {name!r}; known rules: {', '.join(known)}")
    return _RELATIONS[name]


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
    from .registry import parse

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
