"""Byte sizes written as text: ``24GB``, ``80GiB``, ``512MB``, ``1.5 GB``, ``4096``.

One grammar for every option that takes a size (``hf-optim recommend
--device-memory``, ``paged_budget``): decimal K/M/G/T (10**3 steps, as GPU spec
sheets count), binary Ki/Mi/Gi/Ti, an optional trailing B, any case.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """The byte count ``text`` names, or None if it is not a size."""
    match = _SIZE.match(text)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
