"""TRL with hf_optim's optimizers and schedules: ``from hf_optim.trl import SFTConfig, SFTTrainer``.

The public import path; the classes live with the other framework glue in
:mod:`hf_optim.integrations.trl`. Importing this module imports TRL.
"""

from .integrations.trl import SFTConfig, SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
