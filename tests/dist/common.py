"""Shared by the 2-process workers and the single-process references in tests/test_distributed.py.

The model's weight shapes are chosen so FSDP2's row shards are uneven (63 rows
over 2 ranks: 32 + 31) and 8-bit blocks (256 elements) line up with the
single-process blocks, so 8-bit sharded and unsharded runs quantize the same
elements together and must agree within fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, OUT = 128, 63, 64
BATCH = 8
#: hyperparameters away from the defaults, so a dropped option shows
HYPER = {"lr": 3e-3, "weight_decay": 0.1}


def make_model(seed: int = 0) -> nn.Sequential:
    """Two layers: 63x128 (uneven across 2 ranks, 8064 elements: quantized) and 64x63."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, OUT, generator=g)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def make_optimizer(name: str, model: nn.Module):
    """``name`` is a registry name, stepped eagerly, or ``name@execution`` (``lamb@native``)."""
    import hf_optim

    name, _, execution = name.partition("@")
    return hf_optim.create_optimizer(name, model, execution=execution or "eager", **HYPER)


def single_process_run(name: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: the same model, data and optimizer, unsharded, full batch."""
    model = make_model()
    opt = make_optimizer(name, model)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
