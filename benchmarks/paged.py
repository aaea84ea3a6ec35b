"""Paged placement on CPU: what paging costs when everything fits, and what it saves when it does not.

    python benchmarks/paged.py --numel 16.8M --tensors 64

1. Over budget (``paged_budget=0``, file-backed states in ``--dir``): anonymous
   RSS growth (``RssAnon`` in /proc/self/status) across the timed steps after a
   warm-up step, against the state size, and the step time against the same
   optimizer non-paged. Measured first, so nothing else has touched the heap.
2. Within budget (automatic budget: nothing is paged): paged vs non-paged step
   time, interleaved in one run (shuffled order each round), medians, with
   ``torch.optim.AdamW(fused=True)`` as the common reference. Target: <= 1.05x.

Only same-run ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_optim
from hf_optim.bench import BASELINE, Factory, make_shapes, measure
from hf_optim.engine import EXECUTIONS
from hf_optim.memory import parse_count


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def medians(factories: dict[str, Factory], shapes, steps: int, warmup: int) -> dict[str, float]:
    """Median step seconds per candidate, interleaved (``hf_optim.bench.measure``); a failure is an error."""
    rows = measure(factories, shapes, steps, warmup, progress=False)
    failed = [f"{row['candidate']}: {row['note']}" for row in rows if row["median_ms"] is None]
    if failed:
        raise RuntimeError("; ".join(failed))
    return {row["candidate"]: row["median_ms"] / 1e3 for row in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", default="16.8M")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--execution", default="auto", choices=EXECUTIONS)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="spill directory for paged states")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = make_shapes(parse_count(args.numel), args.tensors)
    numel = sum(r * c for r, c in shapes)
    ex = args.execution
    print(f"torch {torch.__version__}, {args.threads} threads, {numel / 1e6:.1f}M params in {args.tensors} tensors, "
          f"hf_optim adamw {ex}, medians of {args.steps} interleaved steps")

    # 1. over budget: file-backed states
    params = make_params(shapes)
    paged = hf_optim.AdamW(params, execution=ex, placement="paged", paged_budget=0, paged_dir=args.dir)
    paged.step()
    before = rss_anon()
    for _ in range(3):
        paged.step()
    growth = rss_anon() - before
    stats = paged.paging_stats()
    state = stats["paged_bytes"]
    print("\nover budget (paged_budget=0, states file-backed)")
    print(f"  state {state / 2**20:.1f} MiB ({state / numel:.1f} B/param) paged in {stats['paged_params']} mappings;"
          f" RssAnon growth over 3 steps {growth / 2**20:.2f} MiB = {growth / state:.1%} of the state"
          f" (acceptance: < 10%); major faults last step {stats['major_faults']}")
    del paged, params
    factories = {
        "non-paged": lambda ps: hf_optim.AdamW(ps, execution=ex),
        "paged, budget 0": lambda ps: hf_optim.AdamW(ps, execution=ex, placement="paged", paged_budget=0,
                                                     paged_dir=args.dir),
    }
    times = medians(factories, shapes, max(5, args.steps // 2), args.warmup)
    for name, t in times.items():
        print(f"  {name:22s} {t * 1e3:9.2f} ms  {t / times['non-paged']:6.3f}x non-paged")

    # 2. within budget: nothing moves
    factories = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "non-paged": lambda ps: hf_optim.AdamW(ps, execution=ex),
        "paged, budget auto": lambda ps: hf_optim.AdamW(ps, execution=ex, placement="paged"),
    }
    times = medians(factories, shapes, args.steps, args.warmup)
    base, fused = times["non-paged"], times[BASELINE]
    print("\nwithin budget (automatic budget: nothing paged)")
    for name, t in times.items():
        print(f"  {name:22s} {t * 1e3:9.2f} ms  {t / base:6.3f}x non-paged  {t / fused:6.3f}x torch fused")
    print(f"  paged / non-paged = {times['paged, budget auto'] / base:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
