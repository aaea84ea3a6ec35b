"""``hf-optim bench``: a quick optimizer step-time table on this machine.

Speed claims do not transfer between machines (memory bandwidth decides an
optimizer step), so the command measures here: every candidate gets
parameters of the same shapes, and after warm-up the candidates take turns,
one step each in a shuffled order every round, so machine noise hits them
alike. It prints medians and the ratio to ``torch.optim.AdamW(fused=True)``,
next to the installed peers (optimi, lion_pytorch, pytorch_optimizer,
bitsandbytes) for the same rules. ``benchmarks/step_time.py`` is the long form.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import registry
from ..engine import EXECUTIONS

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
BASELINE = "torch AdamW fused"
DEFAULT_OPTIMS = "adamw,adamw_8bit,lion,lamb"


def _peer(module: str, build: Callable[[Any, list[torch.Tensor]], torch.optim.Optimizer]) -> Factory | None:
    if importlib.util.find_spec(module) is None:
        return None

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build(importlib.import_module(module), params)

    return factory


def peers(rule: str, storage: str) -> dict[str, Factory]:
    """Installed third-party implementations of ``rule`` with ``storage`` (fp32 or 8bit)."""
    table: dict[tuple[str, str], list[tuple[str, Factory | None]]] = {
        ("adamw", "fp32"): [
            ("optimi AdamW", _peer("optimi", lambda m, ps: m.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True))),
        ],
        ("adamw", "8bit"): [
            ("torchao AdamW8bit", _peer("torchao.optim", lambda m, ps: m.AdamW8bit(ps, lr=1e-3))),
        ],
        ("lion", "fp32"): [
            # weight decay 0.1: hf_optim Lion's default, so every row does the same work
            ("lion_pytorch Lion", _peer("lion_pytorch", lambda m, ps: m.Lion(ps, lr=1e-4, weight_decay=0.1))),
            ("optimi Lion", _peer("optimi", lambda m, ps: m.Lion(ps, lr=1e-4, weight_decay=0.1, foreach=True))),
        ],
        ("lamb", "fp32"): [
            ("pytorch_optimizer Lamb", _peer("pytorch_optimizer", lambda m, ps: m.Lamb(ps, lr=1e-3))),
        ],
        ("stable_adamw", "fp32"): [
            ("optimi StableAdamW", _peer("optimi", lambda m, ps: m.StableAdamW(ps, lr=1e-3, foreach=True))),
        ],
        ("adan", "fp32"): [("optimi Adan", _peer("optimi", lambda m, ps: m.Adan(ps, lr=1e-3, foreach=True)))],
        ("ranger", "fp32"): [("optimi Ranger", _peer("optimi", lambda m, ps: m.Ranger(ps, lr=1e-3, foreach=True)))],
    }
    return {name: f for name, f in table.get((rule, storage), []) if f is not None}


def candidates(optims: Sequence[str], execution: str = "auto", with_peers: bool = True) -> dict[str, Factory]:
    out: dict[str, Factory] = {BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
    for name in optims:
        spec = registry.get_spec(name)
        out[f"hf_optim {name} ({execution})"] = lambda ps, spec=spec: spec.build(ps, execution=execution)
        if with_peers:
            out.update(peers(spec.rule, spec.state_precision))
    return out


def measure(
    factories: dict[str, Factory], shapes: Sequence[tuple[int, ...]], steps: int, warmup: int, seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Median step time per candidate, interleaved; the rows in ``factories`` order."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    runs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, factory in factories.items():
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        t0 = time.perf_counter()
        try:
            opt = factory(params)
            for _ in range(warmup):
                opt.step()
        except Exception as err:  # a peer that does not run here (no GPU kernel, ...) is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
            continue
        runs[name] = {"opt": opt, "times": [], "warmup_s": time.perf_counter() - t0}
    order = list(runs)
    rng = random.Random(seed)
    for _ in tqdm(range(steps), desc="hf-optim bench", unit="round", disable=not progress):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name]["opt"].step()
            runs[name]["times"].append(time.perf_counter() - t0)
    base = statistics.median(runs[BASELINE]["times"]) if BASELINE in runs else None
    rows = []
    for name in factories:
        if name in skipped:
            rows.append({"candidate": name, "median_ms": None, "x_fused": None, "warmup_s": None,
                         "note": f"skipped: {skipped[name]}"})
            continue
        med = statistics.median(runs[name]["times"])
        rows.append({"candidate": name, "median_ms": med * 1e3, "x_fused": med / base if base else None,
                     "warmup_s": runs[name]["warmup_s"], "note": ""})
    return rows


def make_shapes(numel: int, tensors: int) -> list[tuple[int, ...]]:
    """``tensors`` equal 2-D shapes (rows of up to 256 columns) adding up to ~``numel``."""
    cols = max(1, min(256, numel // tensors))
    return [(max(1, numel // (tensors * cols)), cols)] * tensors


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optims", default=DEFAULT_OPTIMS, help=f"hf_optim names (default {DEFAULT_OPTIMS})")
    parser.add_argument("--numel", default="4M", help="total parameter count, e.g. 4M (default 4M)")
    parser.add_argument("--tensors", type=int, default=8, help="number of equal tensors (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--execution", choices=EXECUTIONS, default="auto",
                        help="how hf_optim steps (default auto: native where it applies, else compiled for 1M+ "
                             "elements, else eager)")
    parser.add_argument("--no-peers", action="store_true", help="only torch fused AdamW and hf_optim")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cli_run(args: argparse.Namespace) -> int:
    from .cli import print_table
    from .memory import parse_count

    numel = parse_count(args.numel)
    if args.tensors < 1 or args.steps < 1 or numel < args.tensors:
        raise SystemExit("hf-optim bench: --tensors and --steps must be >= 1 and --numel >= --tensors")
    shapes = make_shapes(numel, args.tensors)
    optims = [n.strip() for n in args.optims.split(",") if n.strip()]
    rows = measure(candidates(optims, args.execution, not args.no_peers), shapes, args.steps, args.warmup)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    total = sum(r * c for r, c in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {total / 1e6:.2f}M params in "
          f"{args.tensors} tensors, {args.steps} interleaved rounds; medians (only same-run ratios mean anything)")
    print_table(
        [
            {
                "candidate": r["candidate"],
                "median ms": "" if r["median_ms"] is None else f"{r['median_ms']:.2f}",
                "x torch fused": "" if r["x_fused"] is None else f"{r['x_fused']:.2f}",
                "warm-up s": "" if r["warmup_s"] is None else f"{r['warmup_s']:.1f}",
                "note": r["note"],
            }
            for r in rows
        ],
        ["candidate", "median ms", "x torch fused", "warm-up s", "note"],
    )
    return 0
