"""Option values as users write them (``optim_args``, ``lr_scheduler_kwargs``, the CLI): often strings.

The readers every option coercer needs; each returns None for what it does not accept, so the caller
raises with its own key and owner in the message.
"""

from __future__ import annotations

import math
from typing import Any

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def as_bool(value: Any) -> bool | None:
    """A bool, 0 or 1, or true/false/yes/no/1/0 in any case; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _BOOLS.get(value.lower())
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def as_number(value: Any) -> float | None:
    """A finite-or-infinite number from an int, float or numeric string (not a bool, not NaN); None otherwise."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    """``as_number`` when it is a whole number, as an int; None otherwise."""
    number = as_number(value)
    return int(number) if number is not None and number.is_integer() else None
