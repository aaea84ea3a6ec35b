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

# eager, because the submodule has the function's name: a lazy attribute would be shadowed by
# the module object as soon as anything imports ``hf_optim.recommend``
from .recommend import Recommendation, recommend

#: public name -> the module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "Optimizer": ".engine",
    "HparamTranslation": ".guidance",
    "translate_hparams": ".guidance",
    "callbacks": ".integrations.callbacks",
    "HfOptimMixin": ".integrations.transformers",
    "Trainer": ".integrations.transformers",
    "TrainingArguments": ".integrations.transformers",
    "with_hf_optim": ".integrations.transformers",
    "memory_table": ".memory",
    "LAMB": ".optimizers",
    "LARS": ".optimizers",
    "SGD": ".optimizers",
    "AdamW": ".optimizers",
    "Adan": ".optimizers",
    "Lion": ".optimizers",
    "Muon": ".optimizers",
    "Ranger": ".optimizers",
    "StableAdamW": ".optimizers",
    "OptimizerSpec": ".registry",
    "create_optimizer": ".registry",
    "get_spec": ".registry",
    "hf_optim_names": ".registry",
    "resolve": ".registry",
    "get_scheduler": ".schedules",
}

__all__ = [
    "LAMB",
    "LARS",
    "SGD",
    "AdamW",
    "Adan",
    "HfOptimMixin",
    "HparamTranslation",
    "Lion",
    "Muon",
    "Optimizer",
    "OptimizerSpec",
    "Ranger",
    "Recommendation",
    "StableAdamW",
    "Trainer",
    "TrainingArguments",
    "callbacks",
    "create_optimizer",
    "get_scheduler",
    "get_spec",
    "hf_optim_names",
    "memory_table",
    "recommend",
    "resolve",
    "translate_hparams",
    "with_hf_optim",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")
    if name == "callbacks":
        value: Any = importlib.import_module(module, __name__)
    else:
        value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .engine import Optimizer
    from .guidance import HparamTranslation, translate_hparams
    from .integrations import callbacks
    from .integrations.transformers import HfOptimMixin, Trainer, TrainingArguments, with_hf_optim
    from .memory import memory_table
    from .optimizers import LAMB, LARS, SGD, AdamW, Adan, Lion, Muon, Ranger, StableAdamW
    from .registry import OptimizerSpec, create_optimizer, get_spec, hf_optim_names, resolve
    from .schedules import get_scheduler
