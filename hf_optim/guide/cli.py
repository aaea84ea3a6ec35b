"""``hf-optim``: list, recommend, memory, schedule, bench, compare.

Each subcommand is a ``(name, help, add_arguments, run)`` entry in ``COMMANDS``;
``run(args)`` returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _list_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _list(args: argparse.Namespace) -> int:
    from .. import registry
    from . import memory

    rows = []
    for name in registry.hf_optim_names():
        spec = registry.get_spec(name)
        defaults = {k: v for k, v in spec.defaults.items() if k not in ("execution", "placement", "state_precision")}
        per_param = memory.optimizer_memory(name, 10**9).state_bytes_per_param if spec.is_hf_optim else None
        rows.append({"name": name, "state B/param": per_param, "description": spec.description, "defaults": defaults})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print_table(
        [
            {**r, "defaults": ", ".join(f"{k}={v}" for k, v in r["defaults"].items()),
             "state B/param": "" if r["state B/param"] is None else f"{r['state B/param']:.2f}"}
            for r in rows
        ],
        ["name", "state B/param", "description", "defaults"],
    )
    passthrough = sorted(set(registry.transformers_names()) - set(registry.hf_optim_names()))
    print(f"\nPassed through to transformers: {', '.join(passthrough)}")
    return 0


def _schedule_args(parser: argparse.ArgumentParser) -> None:
    from ..schedules import cli_arguments

    cli_arguments(parser)


def _schedule(args: argparse.Namespace) -> int:
    from ..schedules import cli_run, is_registered

    if args.warmup is None and not is_registered(args.name):
        args.warmup = 0  # transformers' schedules take no default warmup; theirs is 0 steps in TrainingArguments too
    return cli_run(args)


def _lazy(module: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``cli_arguments``/``cli_run`` of an hf_optim module, imported when used."""
    import importlib

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(f"hf_optim.guide.{module}").cli_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"hf_optim.guide.{module}").cli_run(args)

    return add_arguments, run


COMMANDS: list[Command] = [
    ("list", "every optimizer name with what it is for and its defaults", _list_args, _list),
    ("schedule", "print and plot an lr schedule before training with it", _schedule_args, _schedule),
    ("recommend", "which optimizer, schedule and hyperparameters for a model and machine", *_lazy("recommend")),
    ("memory", "exact bytes of weights, gradients and optimizer state per optimizer", *_lazy("memory")),
    ("bench", "quick optimizer step-time table on this machine, against installed peers", *_lazy("bench")),
    ("compare", "run a recipe once per optimizer; report.md with loss, memory and lr plots", *_lazy("compare")),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-optim", description="Optimizers for HuggingFace Trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, help_text, add_arguments, run in COMMANDS:
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        runners[name] = run
    args = parser.parse_args(argv)
    from ..integrations import quiet_imports

    quiet_imports.install()  # the peers' CUDA-less import noise stays out of the output
    try:
        return runners[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, not a traceback
        print(f"hf-optim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
