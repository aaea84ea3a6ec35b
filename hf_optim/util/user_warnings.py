"""Warnings that point at the user's line, however deep inside hf_optim (or torch) they were raised.

A warning with a ``cause`` is advice about a configuration: it is given once per
process and cause (a Trainer validates its param groups several times; two groups
share one mistake), and only by the main process of a distributed job, so eight
ranks print one line, not eight.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

#: frames in these folders are not the user's: a warning points past them
_LIBRARY_DIRS = tuple(  # hf_optim's root (this module is in hf_optim/util/) and torch's
    str(Path(module).resolve().parent) + os.sep
    for module in (Path(__file__).parent.parent / "__init__.py", torch.__file__)
)

#: causes already warned about in this process
_GIVEN: set[str] = set()


def is_main_process() -> bool:
    """Rank 0 of an initialized process group, else what the launcher's ``RANK`` says (no launcher: True)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def warn_user(message: str, category: type[Warning] = UserWarning, *, cause: str | None = None) -> bool:
    """Warn at the first caller outside hf_optim and torch (construction, ``add_param_group``,
    ``load_state_dict``, a step inside ``Trainer``).

    With ``cause``: once per process and cause, on the main process only.
    Returns whether the warning was given.
    """
    if cause is not None:
        if cause in _GIVEN or not is_main_process():
            return False
        _GIVEN.add(cause)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
    return True


def forget_warnings() -> None:
    """Warn again about causes already given (for tests, or a new run in the same process)."""
    _GIVEN.clear()
