"""The contract every update rule follows.

A rule is the math of one optimizer for one parameter, written once in fp32:
it receives the parameter, its gradient and its state buffers as fp32 tensors
(1-D views, possibly temporaries decoded from 8-bit storage) and updates them
in place. It never sees devices, dtypes, quantization or paging: the engine
(``hf_optim.engine``) and the storage codecs (``hf_optim.state``) own those.

A rule has two halves, both traceable (tensor ops only) because the same
code runs eagerly (the reference) and under ``torch.compile`` (the fast path):

- ``coefficients(hp, step, flags)``: the scalar math of one step (bias
  corrections, step sizes) from the 0-d fp32 hyperparameters ``hp`` and the
  parameter's step count. Computed once per step, never per element.
- ``update(p, g, state, c, flags, norm)``: the elementwise math, using the
  coefficients ``c``.

Hyperparameters are tensors, so changing them never recompiles; structural
options (booleans such as ``amsgrad``) arrive in ``flags``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .native_binding import NativeBinding

#: How a state buffer is distributed, so storage can pick a code map:
#: ``signed`` (a first moment), ``unsigned`` (a second moment, >= 0),
#: ``param`` (a copy of the parameter, e.g. Lookahead's slow weights).
BufferKind = Literal["signed", "unsigned", "param"]

#: Computes the L2 norm of a whole parameter-shaped tensor. Rules with
#: layer-wise norms (LAMB, LARS, StableAdamW) must use it instead of
#: ``torch.linalg.vector_norm`` so a sharded parameter gets its global norm.
NormFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Buffer:
    name: str
    kind: BufferKind


@dataclass(frozen=True)
class Relation:
    """How a rule's hyperparameters relate to AdamW's, for ``hf_optim.translate_hparams``.

    A tuned AdamW ``lr`` times ``lr_factor`` (and weight decay times ``wd_factor``) is this
    rule's starting point; ``batch_scaling`` says how lr follows a batch-size change
    (``"sqrt"`` for the Adam family, ``"linear"`` for SGD-style rules); ``note`` is the reasoning
    shown to the user and ``extra`` values the rule wants besides (its betas, say).
    ``lr_factor=None`` says there is no AdamW-equivalent lr (LARS, SGD): translating to or from
    the rule is then an error whose text is ``note``.
    """

    lr_factor: float | None
    wd_factor: float | None
    batch_scaling: Literal["sqrt", "linear"]
    note: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def no_equivalent(cls, note: str, batch_scaling: Literal["sqrt", "linear"] = "linear") -> Relation:
        """A rule whose lr has no AdamW equivalent; ``note`` says where to start instead."""
        return cls(None, None, batch_scaling, note)

    @property
    def has_equivalent(self) -> bool:
        return self.lr_factor is not None


class UpdateRule:
    """Base class: subclasses set the class attributes and implement ``update``."""

    #: registry name of the rule (``adamw``, ``lion``, ...)
    name: ClassVar[str]
    #: every hyperparameter with its default; the optimizer accepts exactly these
    defaults: ClassVar[Mapping[str, Any]]
    #: hyperparameters that are structural (change the graph): passed in ``flags``
    flag_names: ClassVar[frozenset[str]] = frozenset()
    #: a one-line description for ``hf-optim list``
    description: ClassVar[str] = ""
    #: how its hyperparameters relate to AdamW's (``translate_hparams``); None: no guidance known
    relation: ClassVar[Relation | None] = None
    #: valid, non-default values for every numeric hyperparameter: what the tests and the docs use as
    #: "non-default hyperparameters" (a decay or beta left at its default can hide a bug)
    example: ClassVar[Mapping[str, Any]] = {}
    #: True only where the name is also a transformers ``optim`` value and this rule is the same math
    #: (``sgd``: torch.optim.SGD): hf_optim then takes the name over instead of refusing the clash
    takes_over_transformers_name: ClassVar[bool] = False
    #: opt-in: the engine adds ``param_ndim`` (the parameter's original ``ndim``,
    #: before flattening) to ``flags``, so a rule can treat biases and norm
    #: weights (``ndim <= 1``) differently; one compiled graph per ndim
    wants_param_ndim: ClassVar[bool] = False
    #: True when ``update`` is purely elementwise (no whole-tensor norm): the engine may
    #: then step a large parameter in row chunks that keep the fused step's temporaries in cache
    elementwise: ClassVar[bool] = False

    #: the rule's native CPU kernel by coefficient and flag names (``native_binding``); None: no native kernel
    native: ClassVar[NativeBinding | None] = None

    @classmethod
    def buffers(cls, flags: Mapping[str, Any]) -> tuple[Buffer, ...]:
        """The state buffers one parameter needs under these flags."""
        raise NotImplementedError

    @classmethod
    def validate(cls, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` in PyTorch's wording for an invalid value.

        Checks what every rule shares, as its ``defaults`` and ``flag_names`` declare them
        (lr, eps, betas, weight decay, boolean flags); a rule with more calls this first.
        """
        check_lr(group["lr"])
        if "eps" in cls.defaults:
            check_eps(group["eps"])
        if "betas" in cls.defaults:
            check_betas(group["betas"], count=len(cls.defaults["betas"]))
        if "weight_decay" in cls.defaults:
            check_weight_decay(group["weight_decay"])
        for name in sorted(cls.flag_names):
            check_flag(name, group[name])

    @classmethod
    def scalars(cls, group: Mapping[str, Any]) -> dict[str, float]:
        """The group's numeric hyperparameters as named floats (tuples split)."""
        out: dict[str, float] = {}
        for key, value in group.items():
            if key not in cls.defaults or key in cls.flag_names:
                continue
            if isinstance(value, tuple | list):
                for i, v in enumerate(value, start=1):
                    out[f"{key.rstrip('s')}{i}"] = float(v)  # betas -> beta1, beta2
            else:
                out[key] = value if isinstance(value, Tensor) else float(value)
        return out

    @staticmethod
    def coefficients(hp: Mapping[str, Tensor], step: Tensor, flags: Mapping[str, Any]) -> dict[str, Tensor]:
        """Scalar (0-d) values ``update`` needs this step; ``step`` counts from 1."""
        return dict(hp)

    @staticmethod
    def update(
        p: Tensor,
        g: Tensor,
        state: dict[str, Tensor],
        c: Mapping[str, Tensor],
        flags: Mapping[str, Any],
        norm: NormFn,
    ) -> None:
        """Advance ``p`` and ``state`` by one step, in place (fp32, 1-D)."""
        raise NotImplementedError


# --- validation helpers, worded as torch.optim words them -------------------------


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= _as_float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps: Any) -> None:
    if not 0.0 <= _as_float(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_weight_decay(weight_decay: Any) -> None:
    if not 0.0 <= _as_float(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_betas(betas: Any, count: int = 2) -> None:
    if not isinstance(betas, tuple | list) or len(betas) != count:
        raise ValueError(f"Invalid betas: {betas!r} (expected a tuple of {count} floats)")
    for i, beta in enumerate(betas):
        value = _as_float(beta)
        if not 0.0 <= value < 1.0 or math.isnan(value):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")


def check_non_negative(name: str, value: Any) -> None:
    """``value >= 0`` (and not NaN), worded as torch.optim words ``weight_decay``."""
    number = _as_float(value)
    if not 0.0 <= number:
        raise ValueError(f"Invalid {name} value: {value}")


def check_unit_interval(name: str, value: Any, *, closed: bool = True) -> None:
    """``0 <= value <= 1`` (``< 1`` when ``closed`` is False)."""
    number = _as_float(value)
    ok = 0.0 <= number <= 1.0 if closed else 0.0 <= number < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Invalid {name} value: {value} (expected a number in {interval})")


def moment_coefficients(beta1: Tensor, beta2: Tensor) -> dict[str, Tensor]:
    """The coefficients ``update_moments`` reads (part of a rule's ``coefficients``)."""
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2}


def update_moments(g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, c: Mapping[str, Tensor]) -> None:
    """Adam's two moments, in place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``."""
    exp_avg.mul_(c["beta1"]).add_(g * c["one_minus_beta1"])
    exp_avg_sq.mul_(c["beta2"]).add_(g * g * c["one_minus_beta2"])


def trust_ratio(numerator: Tensor, denominator: Tensor, coefficient: Tensor | float = 1.0) -> Tensor:
    """LAMB's and LARS's layer-wise ``coefficient * numerator / denominator``, and 1 where either norm is zero."""
    ok = (numerator > 0) & (denominator > 0)
    return torch.where(ok, coefficient * numerator / torch.where(ok, denominator, 1.0), 1.0)


def global_mean_sqrt(x: Tensor, norm: NormFn) -> Tensor:
    """``sqrt(mean(x**2))`` over the whole parameter, shard-safe via ``norm``.

    The element count comes from ``norm`` too (the norm of ones is sqrt(numel)),
    so an FSDP2 shard divides by the parameter's global size, not its own.
    """
    return norm(x) / norm(torch.ones_like(x))
