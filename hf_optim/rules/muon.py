"""Muon: momentum orthogonalized by Newton–Schulz, for the 2-D weight matrices of hidden layers.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024,
https://kellerjordan.github.io/posts/muon/); the ``match_rms_adamw`` scaling is from Liu et al.
(Moonshot AI), "Muon is Scalable for LLM Training" (2025, arXiv:2502.16982). The semantics are
``torch.optim.Muon``'s (torch 2.13). With gradient G of an A x B matrix, momentum mu, step t::

    B  <- mu * B + (1 - mu) * G                       # momentum buffer (an EMA, as torch)
    U  <- (1 - mu) * G + mu * B  if nesterov  else  B
    O  <- NS_k^(a,b,c)(U; eps)                        # ~ the orthogonal factor of U (U = USV^T -> ~UV^T)
    p  <- p * (1 - lr * wd)                           # decoupled decay, with the unadjusted lr
    p  <- p - lr * s(A, B) * O

``NS`` runs ``k = ns_steps`` quintic Newton–Schulz iterations in bfloat16 on ``X = U / max(||U||_F, eps)``
(on its transpose when A > B, so the Gram matrix is the small one)::

    X <- a X + (b (X X^T) + c (X X^T)^2) X           # (a, b, c) = ns_coefficients

and ``s`` is ``adjust_lr_fn``: ``None``/``"original"`` (Keller Jordan's) ``sqrt(max(1, A / B))``;
``"match_rms_adamw"`` (Moonlight's) ``0.2 * sqrt(max(A, B))``, which gives the update AdamW's RMS so
that AdamW's learning rate and weight decay carry over.

Muon is for hidden matrices only. Every other parameter goes to AdamW inside the same optimizer
(``other``): tensors that are not 2-D (biases, norm weights, conv kernels) and 2-D ones named like
embeddings, the output head or norms (``param_names``; an unnamed 2-D tensor counts as hidden, so pass
``model.named_parameters()`` or ``create_optimizer``'s model). AdamW's hyperparameters are the
``adamw_*`` keys: ``adamw_lr`` and ``adamw_weight_decay`` default to None, meaning Muon's ``lr`` and
``weight_decay`` (right with ``adjust_lr_fn="match_rms_adamw"``, where one lr serves both; with the
original scaling Muon's lr is usually 10-100x AdamW's, so set ``adamw_lr``); a number given as
``adamw_lr`` follows the same LR schedule; ``adamw_betas`` (0.9, 0.999), ``adamw_eps`` 1e-8 and
the AdamW flags are ``torch.optim.AdamW``'s defaults.

Defaults are ``torch.optim.Muon``'s: lr 1e-3, weight decay 0.1, momentum 0.95, Nesterov on, (a, b, c) =
(3.4445, -4.775, 2.0315), eps 1e-7, 5 steps. When it helps: training from scratch (the nanoGPT and
CIFAR-10 speed runs, Moonlight's 3B/16B pretraining: ~2x AdamW's compute efficiency); fine-tuning a model
pretrained with AdamW is not known to gain (Moonlight saw the mismatch cost). Under FSDP2 a matrix
sharded over ranks is refused at the first step (the orthogonalization needs the whole matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .adamw import AdamW
from .base import (
    Buffer,
    NormFn,
    ParamInfo,
    Relation,
    UpdateRule,
    check_eps,
    check_flag,
    check_lr,
    check_unit_interval,
    check_weight_decay,
    namespaced,
)
from .param_names import EMBEDDING_AND_HEAD_PATTERNS, NORM_PATTERNS, matches_any

#: the values ``adjust_lr_fn`` takes (None: the original scaling, as torch)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: 2-D parameters with these names are AdamW's, not Muon's
ADAMW_NAME_PATTERNS = (*EMBEDDING_AND_HEAD_PATTERNS, *NORM_PATTERNS)
#: torch.optim.Muon refuses 100+ Newton–Schulz steps (cost without benefit)
MAX_NS_STEPS = 99


class Muon(UpdateRule):
    name = "muon"
    description = ("Muon: Newton-Schulz orthogonalized momentum for 2-D hidden matrices, AdamW for the rest; "
                   "for training from scratch")
    defaults = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.95,
        "nesterov": True,
        "ns_coefficients": (3.4445, -4.775, 2.0315),
        "eps": 1e-7,
        "ns_steps": 5,
        "adjust_lr_fn": None,
        **namespaced(AdamW, lr=None, weight_decay=None),
    }
    # the iteration's polynomial and count, and the lr scaling, shape the graph (Python numbers in it)
    flag_names = frozenset({"nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"})
    param_fields = frozenset({"shape"})
    needs_whole_tensor = True
    rounds_inside = True  # the bfloat16 iteration: compiled must round where eager (and torch) do
    other = AdamW
    relation = Relation(
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
    )
    example = {
        "lr": 2e-2, "weight_decay": 0.05, "momentum": 0.9, "eps": 1e-2, "ns_steps": 4,  # eps large enough to matter
        "ns_coefficients": (1.875, -1.25, 0.375), "adjust_lr_fn": "match_rms_adamw",  # the classic quintic
        "adamw_lr": 3e-3, "adamw_betas": (0.85, 0.98), "adamw_eps": 1e-3, "adamw_weight_decay": 0.02,
    }

    @classmethod
    def takes(cls, param: ParamInfo) -> bool:
        return param.ndim == 2 and not matches_any(param.name, ADAMW_NAME_PATTERNS)

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return (Buffer("momentum_buffer", "signed"),)  # torch.optim.Muon's key

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        check_weight_decay(group["weight_decay"])
        check_unit_interval("momentum", group["momentum"], closed=False)
        check_eps(group["eps"])
        check_flag("nesterov", group["nesterov"])
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_NS_STEPS:
            raise ValueError(f"Invalid ns_steps value: {steps!r} (allowed: an int from 1 to {MAX_NS_STEPS})")
        coefficients = group["ns_coefficients"]
        if (not isinstance(coefficients, tuple | list) or len(coefficients) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                           for v in coefficients)):
            raise ValueError(f"Invalid ns_coefficients value: {coefficients!r} (allowed: a tuple of 3 finite "
                             f"numbers (a, b, c), e.g. {cls.defaults['ns_coefficients']})")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Invalid adjust_lr_fn value: {group['adjust_lr_fn']!r} "
                             f"(allowed: {', '.join(map(repr, ADJUST_LR_FNS))})")
        cls.validate_other(group)

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        lr, momentum = hp["lr"], hp["momentum"]
        return {
            "lr": lr,
            "decay": 1 - lr * hp["weight_decay"],
            "momentum": momentum,
            "one_minus_momentum": 1 - momentum,
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
        shape = param.shape
        assert shape is not None and len(shape) == 2, "Muon steps 2-D parameters only (takes)"
        buf = state["momentum_buffer"].view(shape)  # the working layout is contiguous: a view writes through
        grad = g.reshape(shape)
        buf.lerp_(grad, c["one_minus_momentum"])
        direction = grad.lerp(buf, c["momentum"]) if flags["nesterov"] else buf
        ortho = newton_schulz(direction, tuple(flags["ns_coefficients"]), flags["ns_steps"], c["eps"])
        p.mul_(c["decay"])
        scale = lr_scale(flags["adjust_lr_fn"], shape)
        p.sub_(ortho.reshape(p.shape).to(p.dtype) * (c["lr"] * scale))


def newton_schulz(u: Tensor, coefficients: tuple[float, float, float], steps: int, eps: Tensor | float) -> Tensor:
    """``steps`` quintic Newton–Schulz iterations towards the orthogonal factor of the matrix ``u``, in bfloat16.

    bfloat16 as torch.optim.Muon and the paper: the iteration is robust to it and its matmuls are the cost.
    A tall matrix is iterated transposed, so ``X X^T`` is the smaller Gram matrix.
    """
    a, b, c = (float(v) for v in coefficients)
    x = u.bfloat16()
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.addmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.T if tall else x


def lr_scale(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """The factor ``adjust_lr_fn`` puts on the learning rate of an A x B matrix (see the module docstring)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))

