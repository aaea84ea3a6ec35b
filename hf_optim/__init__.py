"""hf_optim: optimizers for HuggingFace Trainer, chosen by ``optim=`` name.

    from hf_optim import Trainer, TrainingArguments
    args = TrainingArguments("out", optim="adamw_8bit", lr_scheduler_type="warmup_cosine")

or, in plain PyTorch, ``hf_optim.create_optimizer("lion", model, lr=3e-5)``.

Names are imported on first use (module ``__getattr__``): ``import hf_optim``
costs little more than ``import torch``, and plain-PyTorch use never imports
transformers, accelerate or datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "Optimizer": ".engine",
    "HparamTranslation": ".guide.translate",
    "translate_hparams": ".guide.translate",
    "callbacks": ".integrations.callbacks",
    "HfOptimMixin": ".integrations.transformers",
    "Trainer": ".integrations.transformers",
    "TrainingArguments": ".integrations.transformers",
    "with_hf_optim": ".integrations.transformers",
    "memory_table": ".guide.memory",
    "OptimizerSpec": ".registry",
    "create_optimizer": ".registry",
    "get_spec": ".registry",
    "register_placement": ".state.placement",
    "register_rule": ".rules.registry",
    "hf_optim_names": ".registry",
    "resolve": ".registry",
    "get_scheduler": ".schedules",
    # lazy too: the module is hf_optim.guide.recommend, so no submodule shadows the function
    "Recommendation": ".guide.recommend",
    "recommend": ".guide.recommend",
}

#: the public names besides the built-in rules' optimizer classes (``hf_optim.AdamW``, ...), which
#: ``hf_optim.optimizers`` generates from the rule registry; ``__all__`` adds them on first use
_NAMES = [
    "HfOptimMixin",
    "HparamTranslation",
    "Optimizer",
    "OptimizerSpec",
    "Recommendation",
    "Trainer",
    "TrainingArguments",
    "callbacks",
    "create_optimizer",
    "get_scheduler",
    "get_spec",
    "hf_optim_names",
    "memory_table",
    "recommend",
    "register_placement",
    "register_rule",
    "resolve",
    "translate_hparams",
    "with_hf_optim",
]


def _rule_classes() -> list[str]:
    """The built-in rules' optimizer class names (importing ``hf_optim.rules``: torch, no more)."""
    from .rules import BUILTIN_RULES

    return [rule.__name__ for rule in BUILTIN_RULES]


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = [*_NAMES, *_rule_classes()]
    elif name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name], __name__)
        value = module if name == "callbacks" else getattr(module, name)
    elif name in _rule_classes():
        value = getattr(importlib.import_module(".optimizers", __name__), name)
    else:
        raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_rule_classes()})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .engine import Optimizer
    from .guide.memory import memory_table
    from .guide.recommend import Recommendation, recommend
    from .guide.translate import HparamTranslation, translate_hparams
    from .integrations import callbacks
    from .integrations.transformers import HfOptimMixin, Trainer, TrainingArguments, with_hf_optim

    # generated at import from the registered rules (see optimizers); named here for type checkers only
    from .optimizers import LAMB, LARS, SGD, AdamW, Adan, Lion, Muon, Ranger, StableAdamW
    from .registry import OptimizerSpec, create_optimizer, get_spec, hf_optim_names, resolve
    from .rules.registry import register_rule
    from .schedules import get_scheduler
    from .state.placement import register_placement
