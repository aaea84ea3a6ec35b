"""Loading one saved state tensor: checked against this optimizer's layout, then copied into it.

``Optimizer.load_state_dict`` allocates a parameter's state fresh (this optimizer's dtypes, contiguous, on the
parameter's device) and copies every saved tensor into it through ``copy_checked``, so a checkpoint with a wrong
size is an error naming the parameter and the key, and one with other float dtypes, strides or devices is
converted: nothing a file holds reaches a kernel unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def loaded_step(name: str, step: Any, device: torch.device) -> Tensor:
    """A saved step count as this optimizer's 0-d fp32 counter; a missing or non-finite one is an error."""
    if step is None:
        raise ValueError(f"loaded state for {name} has no 'step'")
    if isinstance(step, Tensor):
        ok = step.numel() == 1 and not step.is_complex() and step.dtype != torch.bool
        value = float(step.detach().reshape(()).cpu()) if ok else math.nan
    elif isinstance(step, int | float) and not isinstance(step, bool):
        value = float(step)
    else:
        value = math.nan
    if not (math.isfinite(value) and value >= 0 and value.is_integer() and value <= 2.0**24):
        shown = tuple(step.shape) if isinstance(step, Tensor) and step.numel() != 1 else step
        raise ValueError(
            f"loaded state for {name}: 'step' is {shown!r}; allowed: a whole number of steps from 0 to 2**24 "
            "(a number or a one-element tensor)"
        )
    return torch.tensor(value, dtype=torch.float32, device=device)


def copy_checked(name: str, key: str, saved: Any, target: Tensor) -> None:
    """Copy one saved state tensor into ``target`` (freshly allocated: this layout's dtype, strides,
    device), or raise naming the parameter and the key. Floating values convert between float dtypes;
    integer codes must have exactly the target's dtype."""
    if not isinstance(saved, Tensor):
        raise ValueError(f"loaded state for {name}: {key!r} is a {type(saved).__name__}, expected a tensor")
    # the same shape, or the same elements flattened (state saved 1-D, e.g. by a paged or sharded run)
    flat = saved.numel() == target.numel() and 1 in (saved.dim(), target.dim())
    if tuple(saved.shape) != tuple(target.shape) and not flat:
        raise ValueError(
            f"loaded state for {name}: {key!r} has shape {tuple(saved.shape)}, expected {tuple(target.shape)}"
        )
    convertible = saved.is_floating_point() and target.is_floating_point()
    if saved.dtype != target.dtype and not convertible:
        raise ValueError(f"loaded state for {name}: {key!r} is {saved.dtype}, expected {target.dtype}")
    if saved.layout != torch.strided:
        raise ValueError(f"loaded state for {name}: {key!r} is a {saved.layout} tensor, expected a dense one")
    target.copy_(saved.detach().reshape(target.shape))
