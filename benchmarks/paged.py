"""Paged placement on CPU: the memory it saves from the first step, and what paging costs.

    python benchmarks/paged.py                              # quick: 16.8M params in 64 tensors
    python benchmarks/paged.py --numel 200M --tensors 50 --memory-only   # the issue's 200M case

1. Memory (one fresh process per placement, so each has its own peak): RSS
   from /proc/self/status (``RssAnon``, ``RssFile``, ``VmHWM``) with the
   parameters and gradients allocated, then after the first step and after
   the last, for the non-paged optimizer and for ``paged_budget=0`` (states in
   the spill file in ``--dir``). Reported: the growth of anonymous memory from
   before the first step (acceptance: <= 10% of the paged state), the spill
   mappings' resident pages, and the peak (``VmHWM``) of paged against non-paged
   (acceptance: lower by >= 80% of the state bytes). Each process also times
   its steps and ``torch.optim.AdamW(fused=True)``'s on the same tensors
   afterwards (medians; ratios within one process).
2. Timing (unless ``--memory-only``): paged vs non-paged, over budget and within
   budget (automatic: nothing is paged), interleaved in one run (shuffled order
   each round), medians, with ``torch.optim.AdamW(fused=True)`` as the common
   reference. Target within budget: <= 1.05x.

Only same-run ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_optim
from hf_optim.engine import EXECUTIONS
from hf_optim.guide.bench import BASELINE, Factory, make_shapes, measure
from hf_optim.guide.memory import parse_count
from hf_optim.state.arena import malloc_trim

MiB = 2**20


def status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def spill_rss(directory: str) -> int:
    """Resident bytes of the mappings of files in ``directory`` (the paged state's pages in this process)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):
                inside = f" {directory}/" in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def timed_steps(opt, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def measure_memory(args: argparse.Namespace) -> None:
    """The child: one placement, memory before / after the first / after the last step, as JSON."""
    torch.set_num_threads(args.threads)
    shapes = make_shapes(parse_count(args.numel), args.tensors)
    params = make_params(shapes)
    paged = args.measure == "paged"
    options = {"placement": "paged", "paged_budget": 0, "paged_dir": args.dir} if paged else {}
    opt = hf_optim.AdamW(params, lr=1e-3, weight_decay=0.1, execution=args.execution, **options)
    malloc_trim()  # both placements start from the same clean heap (making the gradients left garbage)
    report = {"before": status()}
    t0 = time.perf_counter()
    opt.step()
    report["first_step_s"] = time.perf_counter() - t0
    report["first"] = {**status(), "spill": spill_rss(args.dir)}
    report["steps_s"] = timed_steps(opt, args.memory_steps)
    report["last"] = {**status(), "spill": spill_rss(args.dir)}
    report["state"] = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
    del opt
    fused = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    fused.step()
    report["fused_s"] = timed_steps(fused, args.memory_steps)
    print(json.dumps(report))


def memory_section(args: argparse.Namespace) -> None:
    reports = {}
    for placement in ("non-paged", "paged"):
        command = [sys.executable, __file__, "--measure", placement, "--numel", args.numel, "--tensors",
                   str(args.tensors), "--threads", str(args.threads), "--execution", args.execution, "--dir", args.dir,
                   "--memory-steps", str(args.memory_steps)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        reports[placement] = json.loads(out.stdout.strip().splitlines()[-1])
    state = reports["paged"]["state"]
    print(f"\n1. memory from the first step (fresh process each; state {state / MiB:.0f} MiB, "
          f"{args.memory_steps + 1} steps)")
    print(f"  {'':10s} {'RssAnon growth':>15s} {'RssFile':>9s} {'spill RSS':>10s} {'VmHWM':>9s} "
          f"{'first step':>10s} {'step (median)':>13s} {'x fused':>8s}")
    for placement, r in reports.items():
        for when in ("first", "last"):
            growth = r[when]["RssAnon"] - r["before"]["RssAnon"]
            step = statistics.median(r["steps_s"])
            print(f"  {placement + ' ' + when:16s} {growth / MiB:9.1f} MiB {r[when]['RssFile'] / MiB:6.0f} MiB "
                  f"{r[when]['spill'] / MiB:7.1f} MiB {r[when]['VmHWM'] / MiB:6.0f} MiB "
                  f"{r['first_step_s'] * 1e3:8.0f} ms {step * 1e3:10.1f} ms "
                  f"{step / statistics.median(r['fused_s']):7.2f}x")
    paged, plain = reports["paged"], reports["non-paged"]
    print(f"  before the first step: RssAnon {paged['before']['RssAnon'] / MiB:.0f} MiB (parameters and gradients), "
          f"VmHWM {paged['before']['VmHWM'] / MiB:.0f} MiB")
    growth = max(paged[w]["RssAnon"] for w in ("first", "last")) - paged["before"]["RssAnon"]
    saved = plain["last"]["VmHWM"] - paged["last"]["VmHWM"]
    print(f"  paged anonymous growth: {growth / MiB:.1f} MiB = {growth / state:.1%} of the state (acceptance: <= 10%)")
    print(f"  peak saved by paging: {saved / MiB:.0f} MiB = {saved / state:.0%} of the state (acceptance: >= 80%)")


def medians(factories: dict[str, Factory], shapes, steps: int, warmup: int) -> dict[str, float]:
    """Median step seconds per candidate, interleaved (``hf_optim.guide.bench.measure``); a failure is an error."""
    rows = measure(factories, shapes, steps, warmup, progress=False)
    failed = [f"{row['candidate']}: {row['note']}" for row in rows if row["median_ms"] is None]
    if failed:
        raise RuntimeError("; ".join(failed))
    return {row["candidate"]: row["median_ms"] / 1e3 for row in rows}


def timing_section(args: argparse.Namespace, shapes) -> None:
    ex = args.execution
    paged = {"placement": "paged", "paged_dir": args.dir}
    for title, budget in (("2a. over budget (paged_budget=0: states file-backed)", {"paged_budget": 0}),
                          ("2b. within budget (automatic budget: nothing paged)", {})):
        factories = {
            BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            "non-paged": lambda ps: hf_optim.AdamW(ps, execution=ex),
            "paged": lambda ps, b=budget: hf_optim.AdamW(ps, execution=ex, **paged, **b),
        }
        times = medians(factories, shapes, args.steps, args.warmup)
        base, fused = times["non-paged"], times[BASELINE]
        print(f"\n{title}")
        for name, t in times.items():
            print(f"  {name:22s} {t * 1e3:9.2f} ms  {t / base:6.3f}x non-paged  {t / fused:6.3f}x torch fused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", default="16.8M")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=4, help="steps after the first in the memory section")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--execution", default="auto", choices=EXECUTIONS)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="spill directory for paged states")
    parser.add_argument("--memory-only", action="store_true", help="skip the timing section")
    parser.add_argument("--measure", choices=("paged", "non-paged"), help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    args.dir = str(Path(args.dir).resolve())
    if args.measure:
        measure_memory(args)
        return 0
    torch.set_num_threads(args.threads)
    shapes = make_shapes(parse_count(args.numel), args.tensors)
    numel = sum(r * c for r, c in shapes)
    print(f"torch {torch.__version__}, {args.threads} threads, {numel / 1e6:.1f}M params in {args.tensors} tensors, "
          f"hf_optim adamw execution={args.execution}, spill dir {args.dir}")
    memory_section(args)
    if not args.memory_only:
        timing_section(args, shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
