"""hf_optim: optimizers for HuggingFace Trainer, chosen by ``optim=`` name.

    from hf_optim import Trainer, TrainingArguments
    args = TrainingArguments("out", optim="adamw_8bit", lr_scheduler_type="warmup_cosine")

or, in plain PyTorch, ``hf_optim.create_optimizer("lion", model, lr=3e-5)``.
"""

from .engine import Optimizer
from .guidance import HparamTranslation, translate_hparams
from .integrations import callbacks
from .integrations.transformers import HfOptimMixin, Trainer, TrainingArguments
from .memory import memory_table
from .optimizers import LAMB, LARS, SGD, AdamW, Adan, Lion, Ranger, StableAdamW
from .recommend import Recommendation, recommend
from .registry import OptimizerSpec, create_optimizer, get_spec, hf_optim_names, resolve
from .schedules import get_scheduler

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "LARS",
    "SGD",
    "AdamW",
    "Adan",
    "HfOptimMixin",
    "HparamTranslation",
    "Lion",
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
]
