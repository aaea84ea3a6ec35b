"""TRL with hf_optim's optimizers and schedules: ``from hf_optim.trl import SFTConfig, SFTTrainer``.

The same one-import swap as ``hf_optim.TrainingArguments``/``hf_optim.Trainer``:
``SFTConfig(optim="lion_8bit", lr_scheduler_type="warmup_cosine")`` is a
``trl.SFTConfig`` (so ``SFTTrainer`` keeps it as it is instead of rebuilding it)
whose ``optim`` and ``lr_scheduler_type`` take every hf_optim name. Any other TRL
trainer works the same way::

    DPOConfig = hf_optim.with_hf_optim(trl.DPOConfig)
    class DPOTrainer(hf_optim.HfOptimMixin, trl.DPOTrainer): ...
"""

from __future__ import annotations

import trl

from .integrations.transformers import HfOptimMixin, with_hf_optim

SFTConfig = with_hf_optim(trl.SFTConfig, "SFTConfig", __name__)


class SFTTrainer(HfOptimMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` with hf_optim's optimizers and schedules by name (use ``hf_optim.trl.SFTConfig``)."""


__all__ = ["SFTConfig", "SFTTrainer"]
