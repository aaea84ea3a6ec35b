"""The optimizer registry: ``optim=`` names to hf_optim optimizers, by grammar.

A name is composed, not enumerated::

    [paged_]<rule>[_8bit|_32bit]

``<rule>`` is a registered update rule (``adamw``, ``lion``, ``lamb``, ...);
``_8bit`` selects block-wise 8-bit state storage, ``_32bit`` (or nothing) fp32;
``paged_`` selects the paged placement. So ``paged_lamb_8bit`` exists as soon
as LAMB, 8-bit storage and paging each exist. ``ALIASES`` maps the
transformers names that mean the same thing onto this grammar; every other
transformers name (``adamw_torch_fused``, ``adafactor``, ``galore_*``...)
passes through to transformers unchanged. Third-party optimizers register
through the ``hf_optim.optimizers`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any

import torch

from .optim_args import coerce_optim_args

#: rule name -> "module:Class" of its optimizer (imported lazily)
RULES: dict[str, str] = {
    "adamw": "hf_optim.optimizers:AdamW",
    "lion": "hf_optim.optimizers:Lion",
    "lamb": "hf_optim.optimizers:LAMB",
    "lars": "hf_optim.optimizers:LARS",
    "stable_adamw": "hf_optim.optimizers:StableAdamW",
    "adan": "hf_optim.optimizers:Adan",
    "ranger": "hf_optim.optimizers:Ranger",
    "sgd": "hf_optim.optimizers:SGD",  # takes over transformers' "sgd" (torch.optim.SGD): same math, same defaults
}

#: transformers (or common) names -> the hf_optim name that means the same thing
ALIASES: dict[str, str] = {
    "adamw_bnb_8bit": "adamw_8bit",
}

#: modifier -> (engine option, value); availability is checked against the engine
STORAGE_SUFFIXES = {"_8bit": "8bit", "_32bit": "fp32"}
PAGED_PREFIX = "paged_"
ENTRY_POINT_GROUP = "hf_optim.optimizers"


@dataclass(frozen=True)
class OptimizerSpec:
    """One resolved ``optim=`` name: which class, which storage and placement."""

    name: str
    rule: str
    target: str  # "module:Class", or a class registered by a plugin
    state_precision: str = "fp32"
    placement: str = "device"
    plugin_class: Any = field(default=None, compare=False)

    def load_class(self) -> type[torch.optim.Optimizer]:
        if self.plugin_class is not None:
            return self.plugin_class
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def is_hf_optim(self) -> bool:
        from .engine import Optimizer

        return issubclass(self.load_class(), Optimizer)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every hyperparameter this optimizer accepts, with its default."""
        cls = self.load_class()
        if not self.is_hf_optim:
            import inspect

            return {
                k: p.default
                for k, p in inspect.signature(cls).parameters.items()
                if k != "params" and p.default is not inspect.Parameter.empty
            }
        from .engine import ENGINE_DEFAULTS, constructor_options

        return {**cls.rule.defaults, **ENGINE_DEFAULTS, **constructor_options(), **self.fixed_kwargs()}

    @property
    def description(self) -> str:
        cls = self.load_class()
        rule = getattr(cls, "rule", None)
        text = rule.description if rule is not None else (cls.__doc__ or "").strip().split("\n")[0]
        if self.state_precision == "8bit":
            text += "; block-wise 8-bit state"
        if self.placement == "paged":
            text += "; paged state"
        return text

    def fixed_kwargs(self) -> dict[str, Any]:
        """The options the name itself fixes (storage, placement)."""
        if not self.is_hf_optim:
            return {}
        kwargs: dict[str, Any] = {"state_precision": self.state_precision}
        if self.placement != "device":
            kwargs["placement"] = self.placement
        return kwargs

    def check_kwargs(self, kwargs: Mapping[str, Any], source: str = "optim_args") -> dict[str, Any]:
        """Type-check user hyperparameters against this optimizer's signature (``source`` names them in errors)."""
        fixed = self.fixed_kwargs()
        clash = sorted(k for k in kwargs if k in fixed and kwargs[k] != fixed[k])
        if clash:
            raise ValueError(
                f"{self.name!r} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; "
                "pick another optimizer name instead of overriding it"
            )
        out = coerce_optim_args(kwargs, self.defaults, f"optimizer {self.name!r}", source)
        if self.is_hf_optim:  # placement options: checked now, and only with the placement that takes them
            from .state.placement import build_placement, placement_options

            options = {k: out[k] for k in placement_options() if k in out}
            build_placement(out.get("placement", fixed.get("placement", "device")), **options)
        return out

    def build(
        self, params: Iterable[Any], source: str = "optim_args", **hyperparameters: Any
    ) -> torch.optim.Optimizer:
        checked = self.check_kwargs(hyperparameters, source)
        return self.load_class()(params, **{**self.fixed_kwargs(), **checked})


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@cache
def _plugin_spec(name: str) -> OptimizerSpec | None:
    ep = _plugins().get(name)
    if ep is None:
        return None
    cls = ep.load()
    return OptimizerSpec(name=name, rule=name, target=ep.value, plugin_class=cls)


def _available_storages() -> set[str]:
    from .state import CODECS

    return set(CODECS)


def _available_placements() -> set[str]:
    from .state.placement import PLACEMENTS

    return set(PLACEMENTS)


def parse(name: str) -> tuple[str, str, str] | None:
    """``(rule, storage, placement)`` if ``name`` follows the grammar, else None."""
    name = ALIASES.get(name, name)
    placement = "device"
    if name.startswith(PAGED_PREFIX):
        name, placement = name[len(PAGED_PREFIX) :], "paged"
    storage = "fp32"
    for suffix, value in STORAGE_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in RULES:
            name, storage = name[: -len(suffix)], value
            break
    return (name, storage, placement) if name in RULES else None


def resolve(name: str) -> OptimizerSpec | None:
    """The hf_optim spec for ``name``, or None when transformers should handle it.

    Raises ``ValueError`` for a name neither hf_optim nor transformers knows,
    and for a valid name whose storage or placement is not available yet.
    """
    name = str(getattr(name, "value", name))
    parsed = parse(name)
    if parsed is not None:
        rule, storage, placement = parsed
        if storage not in _available_storages():
            raise ValueError(f"optim={name!r}: {storage} state storage is not available yet in hf_optim")
        if placement not in _available_placements():
            raise ValueError(f"optim={name!r}: the {placement} placement is not available yet in hf_optim")
        return OptimizerSpec(name=name, rule=rule, target=RULES[rule], state_precision=storage, placement=placement)
    plugin = _plugin_spec(name)
    if plugin is not None:
        return plugin
    if name in transformers_names():
        return None
    raise ValueError(unknown_name_message(name, "optim", all_names()))


def get_spec(name: str) -> OptimizerSpec:
    """Like ``resolve`` but for hf_optim names only (no pass-through)."""
    spec = resolve(name)
    if spec is None:
        raise ValueError(f"optim={name!r} is a transformers optimizer, not an hf_optim one")
    return spec


def transformers_names() -> list[str]:
    from .integrations import quiet_imports

    quiet_imports.install()
    from transformers.training_args import OptimizerNames

    return [member.value for member in OptimizerNames]


def hf_optim_names() -> list[str]:
    """Every name the grammar and the plugins accept, for the available modifiers."""
    names = []
    storages = [s for s, v in STORAGE_SUFFIXES.items() if v in _available_storages()]
    paged = "paged" in _available_placements()
    for rule in RULES:
        for prefix in ["", PAGED_PREFIX] if paged else [""]:
            names.append(prefix + rule)
            names.extend(prefix + rule + suffix for suffix in storages)
    names.extend(name for name in ALIASES if parse(name) and resolve_quietly(name))
    names.extend(_plugins())
    return sorted(set(names))


def resolve_quietly(name: str) -> bool:
    try:
        return resolve(name) is not None
    except ValueError:
        return False


def all_names() -> list[str]:
    return sorted(set(hf_optim_names()) | set(transformers_names()))


def unknown_name_message(name: str, what: str, valid: list[str]) -> str:
    # a valid name the typo starts with ("adamw_typo" -> "adamw") first, then look-alikes
    prefixes = sorted((v for v in valid if name.startswith(v + "_")), key=len, reverse=True)[:1]
    hint = prefixes + [v for v in difflib.get_close_matches(name, valid, n=3, cutoff=0.5) if v not in prefixes]
    hint = hint[:3]
    suggestion = f" Did you mean {' or '.join(map(repr, hint))}?" if hint else ""
    return f"Unknown {what} {name!r}.{suggestion} Valid names: {', '.join(valid)}"


# --- building from a model ------------------------------------------------------------

#: ``min_8bit_size`` when the model trains adapters (a PEFT model): one 256-element block. LoRA's
#: matrices are r x hidden (8 x 64 = 512 elements), all under the general 4096, where "8-bit" would
#: keep every adapter's state in fp32 and save nothing
ADAPTER_MIN_8BIT_SIZE = 256


def is_adapter_model(model: Any) -> bool:
    """A PEFT model (LoRA, ...), also inside DDP's ``module``."""
    model = getattr(model, "module", model)
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def adapter_defaults(spec: OptimizerSpec, model: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """Options that serve adapter training better than the general defaults (the user's own always win)."""
    if spec.state_precision == "8bit" and "min_8bit_size" not in given and spec.is_hf_optim:
        if is_adapter_model(model):
            return {"min_8bit_size": ADAPTER_MIN_8BIT_SIZE}
    return {}



def decay_groups(
    model: torch.nn.Module, weight_decay: float, decay_names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Two named param groups as transformers makes them: no decay on biases and norms.

    ``decay_names``: the parameters that decay (a Trainer passes its own
    ``get_decay_parameter_names(model)``); default transformers' rule.
    """
    if decay_names is None:
        from .integrations import quiet_imports

        quiet_imports.install()
        from transformers import Trainer

        decay_names = Trainer.get_decay_parameter_names(None, model)  # uses no Trainer state
    decay = set(decay_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(
    name: str, model_or_params: torch.nn.Module | Iterable[Any], **hyperparameters: Any
) -> torch.optim.Optimizer:
    """Build any registered optimizer for plain PyTorch.

    A model gets transformers' weight-decay grouping (``weight_decay`` applies
    to weights, not to biases and norms); an iterable of params or param groups
    is used as given. Transformers-only names are built by transformers.
    """
    spec = resolve(name)
    if spec is None:
        return _create_transformers_optimizer(name, model_or_params, hyperparameters)
    params: Any = model_or_params
    if isinstance(model_or_params, torch.nn.Module):
        hyperparameters = {**adapter_defaults(spec, model_or_params, hyperparameters), **hyperparameters}
        weight_decay = hyperparameters.pop("weight_decay", spec.defaults.get("weight_decay", 0.0))
        params = decay_groups(model_or_params, weight_decay)
    return spec.build(params, source="create_optimizer", **hyperparameters)


def _create_transformers_optimizer(name: str, model_or_params: Any, hyperparameters: dict[str, Any]):
    """transformers' class and defaults for ``name``; ``hyperparameters`` override them as given,
    so the optimizer itself rejects a key it does not take."""
    from .integrations import quiet_imports

    quiet_imports.install()
    from transformers import Trainer, TrainingArguments

    lr = hyperparameters.pop("lr", 1e-3)
    # output_dir is only a path (nothing is created); transformers before 4.50 requires it
    args = TrainingArguments(output_dir="trainer_output", optim=name, learning_rate=lr)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    params = model_or_params
    if isinstance(model_or_params, torch.nn.Module):
        weight_decay = hyperparameters.pop("weight_decay", 0.0)
        params = [{**g, "params": [p for _, p in g["params"]]} for g in decay_groups(model_or_params, weight_decay)]
    return cls(params, **{**kwargs, **hyperparameters})
