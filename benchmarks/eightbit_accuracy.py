"""8-bit state accuracy: trajectories against fp32, and the quantizer's round trip, beside bitsandbytes.

    python benchmarks/eightbit_accuracy.py          # ~1 min on 2 cores

1. Trajectory: a 3-layer MLP (32 -> 128 -> 128 -> 1, GELU) on a fixed regression task (a random teacher
   plus noise), 100 full-batch steps from the same start, 3 seeds. For 8-bit AdamW and 8-bit Lion (hf_optim
   native, hf_optim eager, bitsandbytes) it prints the mean over seeds of ||theta_8bit - theta_fp32|| /
   ||theta_fp32 - theta_0||: how far the 8-bit run ends from the fp32 run, relative to how far fp32 moved.
   The fp32 reference is hf_optim's fp32 step of the same rule (which matches torch.optim.AdamW and
   lion_pytorch, tests/test_rules.py). All 8-bit runs quantize every tensor (min_8bit_size 0).
2. Round trip: 2**20 values of randn and of a heavy-tailed Student-t (2 degrees of freedom) through the
   native kernel's signed codes (an AdamW step with betas 0 stores m = g) decoded by the eager codec, and
   through bitsandbytes' blockwise quantizer (block 256, its dynamic map). Prints mean |x - x'| / mean |x|.

Only numbers from the same run compare; bitsandbytes rows are skipped where it is not installed.
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_optim
from hf_optim.rules.base import Buffer
from hf_optim.state.blockwise import EIGHT_BIT

STEPS, SEEDS = 100, (0, 1, 2)
ADAMW_HP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
LION_HP = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.01}


def task(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=gen)
    teacher = torch.randn(32, 1, generator=gen)
    y = torch.tanh(x @ teacher) + 0.1 * torch.randn(512, 1, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 1))
    return model, x, y


def trajectory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, make) -> torch.Tensor:
    model = copy.deepcopy(model)
    opt = make(list(model.parameters()))
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().view(-1) for p in model.parameters()])


def _bnb(name: str, hp: dict):
    def make(params):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, min_8bit_size=0, **hp)

    return make


def candidates() -> dict[str, tuple[object, dict[str, object]]]:
    """rule -> (fp32 reference factory, {8-bit candidate: factory})"""
    eight = {"state_precision": "8bit", "min_8bit_size": 0}
    return {
        "AdamW": (lambda ps: hf_optim.AdamW(ps, execution="eager", **ADAMW_HP), {
            "hf_optim adamw_8bit native": lambda ps: hf_optim.AdamW(ps, execution="native", **eight, **ADAMW_HP),
            "hf_optim adamw_8bit eager": lambda ps: hf_optim.AdamW(ps, execution="eager", **eight, **ADAMW_HP),
            "bitsandbytes AdamW8bit": _bnb("AdamW8bit", ADAMW_HP),
        }),
        "Lion": (lambda ps: hf_optim.Lion(ps, execution="eager", **LION_HP), {
            "hf_optim lion_8bit native": lambda ps: hf_optim.Lion(ps, execution="native", **eight, **LION_HP),
            "hf_optim lion_8bit eager": lambda ps: hf_optim.Lion(ps, execution="eager", **eight, **LION_HP),
            "bitsandbytes Lion8bit": _bnb("Lion8bit", LION_HP),
        }),
    }


def trajectories() -> None:
    print(f"trajectory distance to fp32 after {STEPS} steps, mean of {len(SEEDS)} seeds "
          "(||theta_8bit - theta_fp32|| / ||theta_fp32 - theta_0||)")
    for rule, (reference, rows) in candidates().items():
        distances: dict[str, list[float]] = {name: [] for name in rows}
        skipped: dict[str, str] = {}
        for seed in SEEDS:
            model, x, y = task(seed)
            start = torch.cat([p.detach().view(-1) for p in model.parameters()])
            fp32 = trajectory(model, x, y, reference)
            for name, make in rows.items():
                try:
                    ours = trajectory(model, x, y, make)
                except Exception as err:  # bitsandbytes missing or without a CPU path
                    skipped[name] = f"{type(err).__name__}: {err}"[:100]
                    continue
                distances[name].append(((ours - fp32).norm() / (fp32 - start).norm()).item())
        for name, values in distances.items():
            text = f"{statistics.mean(values):.3f}" if values else f"skipped ({skipped.get(name)})"
            print(f"  {rule:6s} {name:30s} {text}")


def native_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x through the native kernel's signed 8-bit codes (m = g with betas 0), decoded by the eager codec."""
    p = torch.nn.Parameter(torch.zeros_like(x))
    p.grad = x.clone()
    opt = hf_optim.AdamW([p], execution="native", betas=(0.0, 0.0), state_precision="8bit", min_8bit_size=0)
    opt.step()
    return EIGHT_BIT.decode(opt.state[p], Buffer("exp_avg", "signed"), x.numel())


def bnb_round_trip(x: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    codes, state = F.quantize_blockwise(x, blocksize=256)
    return F.dequantize_blockwise(codes, state)


def round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    data = {
        "randn": torch.randn(1 << 20, generator=gen),
        "student-t(2)": torch.distributions.StudentT(2.0).sample((1 << 20,)),
    }
    print("round-trip error, mean |x - x'| / mean |x| (block 256)")
    for label, x in data.items():
        for name, fn in (("hf_optim native", native_round_trip), ("bitsandbytes blockwise", bnb_round_trip)):
            try:
                error = ((fn(x) - x).abs().mean() / x.abs().mean()).item()
                print(f"  {label:13s} {name:24s} {error:.5f}")
            except Exception as err:
                print(f"  {label:13s} {name:24s} skipped ({type(err).__name__}: {str(err)[:80]})")


if __name__ == "__main__":
    torch.set_num_threads(2)
    trajectories()
    round_trips()
