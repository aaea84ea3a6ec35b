"""Warnings that point at the user's line, however deep inside hf_optim (or torch) they were raised."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

#: frames in these folders are not the user's: a warning points past them
_LIBRARY_DIRS = tuple(
    str(Path(module).resolve().parent) + os.sep for module in (Path(__file__).parent / "__init__.py", torch.__file__)
)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the first caller outside hf_optim and torch (construction, ``add_param_group``,
    ``load_state_dict``, a step inside ``Trainer``)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
