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

import dataclasses
import warnings
from typing import Any

from . import quiet_imports

quiet_imports.install()  # before trl imports transformers, PEFT and their peers

try:
    import trl
except ImportError as err:  # TRL is optional for hf_optim: only this module needs it
    raise ImportError(f"hf_optim.trl needs TRL (pip install trl): {err}") from err

from .transformers import HfOptimMixin, TrainingArguments, with_hf_optim  # noqa: E402

SFTConfig = with_hf_optim(trl.SFTConfig, "SFTConfig", __name__)


class SFTTrainer(HfOptimMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` with hf_optim's optimizers and schedules by name.

    Takes ``hf_optim.trl.SFTConfig``; an ``hf_optim.TrainingArguments`` is
    converted to it here (TRL would rebuild a plain ``trl.SFTConfig``, which knows
    neither hf_optim's names nor its fields).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(given, TrainingArguments) and not isinstance(given, SFTConfig):
            with warnings.catch_warnings():  # copying a deprecated field's value is not the user using it
                warnings.simplefilter("ignore", FutureWarning)
                converted = SFTConfig(**{f.name: getattr(given, f.name) for f in dataclasses.fields(given) if f.init})
            if "args" in kwargs:
                kwargs["args"] = converted
            else:
                args = (args[0], converted, *args[2:])
        super().__init__(*args, **kwargs)


__all__ = ["SFTConfig", "SFTTrainer"]
