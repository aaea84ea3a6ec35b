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
- ``update(p, g, state, c, flags, norm, param)``: the tensor math, using the
  coefficients ``c``; ``param`` (a ``ParamInfo``) says what the rule declared
  it needs to know of the parameter itself (``param_fields``: its original
  ``ndim`` or ``shape``), the rest ``None``.

A rule may step only some parameters (``takes``) and hand the others to a
companion rule (``other``) in the same optimizer: Muon orthogonalizes 2-D
hidden matrices and leaves embeddings, the head, norms and biases to AdamW.
The companion's hyperparameters live in the rule's ``defaults`` under its
name as prefix (``adamw_lr``, ``adamw_betas``, ...; ``other_group``).

Hyperparameters are tensors, so changing them never recompiles; structural
options (booleans such as ``amsgrad``) arrive in ``flags``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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


#: the ``ParamInfo`` fields a rule may declare in ``param_fields``
PARAM_FIELDS = frozenset({"ndim", "shape"})


@dataclass(frozen=True)
class ParamInfo:
    """What a rule may know of the parameter it steps besides its (flattened) values.

    ``shape`` is the parameter's original, global shape (a DTensor's, not its shard's), ``ndim`` its length,
    ``name`` the parameter's name in the model when the optimizer was given names. ``takes`` sees all of it;
    ``update`` sees only the fields the rule lists in ``param_fields`` (the others are None), because those
    are part of the step configuration: one configuration, and one compiled graph, per distinct value.
    """

    ndim: int | None = None
    shape: tuple[int, ...] | None = None
    name: str | None = None

    @classmethod
    def of(cls, p: Tensor, name: str | None = None) -> ParamInfo:
        return cls(ndim=p.dim(), shape=tuple(p.shape), name=name)

    def only(self, fields: frozenset[str]) -> ParamInfo:
        """This info with every field not in ``fields`` set to None (``name`` never stays)."""
        return replace(self, **{f: None for f in ("ndim", "shape", "name") if f not in fields})


#: the ``ParamInfo`` of a rule that declares no ``param_fields``: one for every parameter
NO_PARAM_INFO = ParamInfo()


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
    #: the ``ParamInfo`` fields ``update`` reads (``"ndim"``: LAMB/LARS treat biases and norm weights,
    #: ``ndim <= 1``, differently; ``"shape"``: a matrix rule); each distinct value is its own configuration
    #: and compiled graph, so an elementwise rule declares none and one graph serves every tensor
    param_fields: ClassVar[frozenset[str]] = frozenset()
    #: True when ``update`` needs the whole parameter, not an FSDP2 shard of it (a matrix function): the
    #: engine refuses a parameter sharded over more than one rank with an error that says so
    needs_whole_tensor: ClassVar[bool] = False
    #: True when ``update`` rounds to a lower precision on purpose (Muon's bfloat16 Newton–Schulz): compiled
    #: execution then emulates each rounding as eager makes it, instead of keeping fp32 intermediates
    rounds_inside: ClassVar[bool] = False
    #: the rule that steps the parameters this one does not ``take``, or None (this one takes all)
    other: ClassVar[type[UpdateRule] | None] = None
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
        cls.validate_other(group)

    @classmethod
    def validate_other(cls, group: Mapping[str, Any]) -> None:
        """Validate the companion rule's namespaced hyperparameters (as ``adamw_lr``, not ``lr``)."""
        if cls.other is None:
            return
        prefix = cls.other_prefix()
        try:
            cls.other.validate(cls.other_group(group))
        except ValueError as err:  # name the key as the user wrote it
            raise ValueError(f"{err} (a {cls.other.name} hyperparameter of {cls.name}: the "
                             f"{prefix}* keys)") from None

    @classmethod
    def takes(cls, param: ParamInfo) -> bool:
        """Whether this rule steps ``param`` (``other`` steps it otherwise); every field of ``param`` is set,
        ``name`` where the optimizer was given names."""
        return True

    @classmethod
    def rule_for(cls, param: ParamInfo) -> type[UpdateRule]:
        """The rule that steps ``param`` in this rule's optimizer: this one, or ``other``."""
        return cls if cls.other is None or cls.takes(param) else cls.other

    @classmethod
    def other_prefix(cls) -> str:
        assert cls.other is not None
        return f"{cls.other.name}_"

    @classmethod
    def other_group(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        """A param group as ``other`` sees it: each namespaced hyperparameter (``adamw_betas``) under its own
        name (``betas``), everything else (storage options, names) as it is.

        A namespaced value of None takes this rule's value of the same key (``adamw_weight_decay=None``:
        the group's ``weight_decay``). A namespaced ``lr`` given as a number follows the group's schedule: it is
        scaled by ``lr / initial_lr`` (a torch LR scheduler records ``initial_lr``; without one the factor is 1),
        so one scheduler drives both rules.
        """
        assert cls.other is not None
        prefix, out = cls.other_prefix(), dict(group)
        for key in cls.other.defaults:
            value = group[prefix + key]
            if value is None:
                value = group[key]
            elif key == "lr" and "initial_lr" in group and group["initial_lr"]:
                value = value * (group["lr"] / group["initial_lr"])
            out[key] = value
        return out

    @classmethod
    def scalars(cls, group: Mapping[str, Any]) -> dict[str, float]:
        """The group's numeric hyperparameters as named floats (tuples split)."""
        out: dict[str, float] = {}
        companion = cls.other_prefix() if cls.other is not None else None
        for key, value in group.items():
            if key not in cls.defaults or key in cls.flag_names:
                continue
            if companion is not None and key.startswith(companion):
                continue  # the companion's: its own scalars come from ``other_group``
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
        param: ParamInfo,
    ) -> None:
        """Advance ``p`` and ``state`` by one step, in place (fp32, in the working layout: 1-D or rows of a
        block; ``param.shape``, when declared, gives the parameter's own shape to view them in)."""
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


def namespaced(rule: type[UpdateRule], **overrides: Any) -> dict[str, Any]:
    """``rule``'s defaults under its name as prefix (``adamw_lr``...), for a rule whose ``other`` it is."""
    return {f"{rule.name}_{key}": overrides.get(key, value) for key, value in rule.defaults.items()}


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
