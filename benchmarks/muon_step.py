"""Muon's step time against torch.optim.Muon, as same-run ratios to torch.optim.AdamW(fused=True), medians.

    python benchmarks/muon_step.py --hidden 512 --layers 2 --steps 10

The parameters are a transformer block's hidden matrices (q, k, v, o: hidden x hidden; up: 4h x h; down:
h x 4h) per layer, all Muon's, so the times compare the orthogonalized step itself (five bfloat16
Newton–Schulz iterations a matrix dominate it; AdamW is one elementwise pass). Each optimizer steps the same
parameters with fixed gradients; the table gives the median step in ms and its ratio to fused AdamW's median
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hf_optim


def matrices(hidden: int, layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "up_proj": (4 * hidden, hidden), "down_proj": (hidden, 4 * hidden)}
    out = []
    for layer in range(layers):
        for name, shape in shapes.items():
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            out.append((f"layers.{layer}.{name}.weight", p))
    return out


def median_ms(opt: torch.optim.Optimizer, steps: int, warmup: int) -> float:
    for _ in range(warmup):  # compiles, allocates state
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    named = matrices(args.hidden, args.layers)
    params = [p for _, p in named]
    hp = {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.95}
    candidates = {
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
        "torch.optim.Muon": lambda: torch.optim.Muon(params, **hp),
        "muon eager": lambda: hf_optim.Muon(named, execution="eager", **hp),
        "muon compiled": lambda: hf_optim.Muon(named, execution="compiled", **hp),
        "muon_8bit eager": lambda: hf_optim.create_optimizer("muon_8bit", named, execution="eager", **hp),
        "muon_8bit compiled": lambda: hf_optim.create_optimizer("muon_8bit", named, execution="compiled", **hp),
    }
    numel = sum(p.numel() for p in params)
    print(f"{len(params)} matrices, {numel / 1e6:.1f}M elements, {args.threads} threads, median of {args.steps} steps")
    originals = [p.detach().clone() for p in params]
    results = {}
    for label, build in candidates.items():
        with torch.no_grad():  # every optimizer starts from the same weights
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
        results[label] = median_ms(build(), args.steps, args.warmup)
    base = results["torch AdamW fused"]
    print(f"{'optimizer':20s} {'ms/step':>9s} {'x fused AdamW':>14s}")
    for label, ms in results.items():
        print(f"{label:20s} {ms:9.2f} {ms / base:14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
