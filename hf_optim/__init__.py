"""hf_optim: optimizers for HuggingFace Trainer, chosen by ``optim=`` name.

    from hf_optim import Trainer, TrainingArguments
    args = TrainingArguments("out", optim="adamw_8bit", lr_scheduler_type="warmup_cosine")

or, in plain PyTorch, ``hf_optim.create_optimizer("lion", model, lr=3e-5)``.
"""

from .engine import Optimizer
from .integrations.transformers import HfOptimMixin, Trainer, TrainingArguments
from .optimizers import AdamW
from .registry import OptimizerSpec, create_optimizer, get_spec, hf_optim_names, resolve

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "HfOptimMixin",
    "Optimizer",
    "OptimizerSpec",
    "Trainer",
    "TrainingArguments",
    "create_optimizer",
    "get_spec",
    "hf_optim_names",
    "resolve",
]
