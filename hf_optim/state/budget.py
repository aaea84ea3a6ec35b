"""The paged placement's budget: how many bytes of state may stay beside their parameters.

``paged_budget`` is bytes (a number > 1, or ``"2GiB"``), a fraction of the memory free when the first state is
placed (``0.25`` or ``"25%"``), or ``None``/``"auto"`` (= ``AUTO_FRACTION``); ``0`` pages everything.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..parsing.sizes import parse_size

#: fraction of free memory the automatic budget lets states keep beside their parameters
AUTO_FRACTION = 0.5
_ALLOWED = (
    "bytes (a number > 1 or a size such as '2GiB'), a fraction of free memory in (0, 1] "
    "(0.25 or '25%'), 0 (page everything) or 'auto'"
)


def parse_budget(value: Any) -> tuple[str, float]:
    """``("fraction", f)`` or ``("bytes", n)`` for a ``paged_budget`` value; ValueError if invalid."""

    def fail() -> ValueError:
        return ValueError(f"Invalid paged_budget: {value!r} (allowed: {_ALLOWED})")

    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "fraction", AUTO_FRACTION
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise fail() from None
            if not 0 < percent <= 100:
                raise fail()
            return "fraction", percent / 100
        size = parse_size(text)
        if size is None:
            raise fail()
        return "bytes", float(size)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise fail()
    if isinstance(value, float) and 0 < value <= 1:
        return "fraction", float(value)
    return "bytes", float(int(value))


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fs_type(path: str) -> str:
    """Filesystem type of ``path`` from /proc/mounts ("" when unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind
