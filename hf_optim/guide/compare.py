"""``hf-optim compare``: the same recipe, seed and step budget under several optimizers.

Choosing between optimizers is an experiment, not a lookup: the guide's
advice ("8-bit is ~the same", "Lion needs its own lr") is only true or false on
your task. This runs a training recipe once per optimizer, each in its own
process (a fresh interpreter, so peak memory is that run's own, read with
``os.wait4``), reads the Trainer's ``trainer_state.json`` log history, and
writes ``report.md`` (final loss, eval loss, step time, peak RSS, optimizer
state bytes) with PNG plots of the loss curves, memory and lr schedules.

The recipe must accept ``--output_dir --optim --max_steps --seed
--logging_steps --report_to`` (any script parsing ``hf_optim.TrainingArguments``
with ``HfArgumentParser`` does) and leave ``trainer_state.json`` in its output
directory or a checkpoint (``trainer.save_state()``). State bytes appear when the
recipe uses ``hf_optim.Trainer``, whose callbacks log ``optim/state_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from .memory import format_bytes

#: the recipe ships inside the package, so compare runs from any directory
DEFAULT_RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "train_clm.py")
DEFAULT_OPTIMS = "adamw,adamw_8bit,lion_8bit,lamb"


@dataclass
class RunResult:
    """One recipe run: exit status, peak memory and the Trainer's log history."""

    optim: str
    returncode: int
    wall_s: float
    peak_rss: int  # bytes
    output_dir: Path
    log_path: Path
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(e["step"]), float(e[key])) for e in self.log_history if key in e and "step" in e]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None

    @property
    def final_loss(self) -> float | None:
        return self.last("loss")

    @property
    def eval_loss(self) -> float | None:
        return self.last("eval_loss")

    @property
    def state_bytes(self) -> int | None:
        value = self.last("optim/state_bytes")
        return int(value) if value is not None else None

    @property
    def step_time_s(self) -> float | None:
        summary = next((e for e in reversed(self.log_history) if "train_runtime" in e), None)
        if summary is None or not summary.get("step"):
            return None
        return float(summary["train_runtime"]) / int(summary["step"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "optim": self.optim, "returncode": self.returncode, "wall_s": self.wall_s, "peak_rss": self.peak_rss,
            "final_loss": self.final_loss, "eval_loss": self.eval_loss, "step_time_s": self.step_time_s,
            "state_bytes": self.state_bytes, "output_dir": str(self.output_dir),
        }


def find_trainer_state(output_dir: Path) -> Path | None:
    """``output_dir/trainer_state.json``, else the one in the latest checkpoint."""
    top = output_dir / "trainer_state.json"
    if top.exists():
        return top
    found = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return found[-1] if found else None


def run_recipe(
    recipe: str | Path,
    optim: str,
    out_dir: str | Path,
    *,
    max_steps: int,
    seed: int = 42,
    extra_args: Sequence[str] = (),
    timeout_s: float | None = None,
) -> RunResult:
    """Run ``recipe`` for one optimizer in a subprocess; returns its metrics."""
    run_dir = Path(out_dir) / "runs" / optim
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(out_dir) / "runs" / f"{optim}.log"
    cmd = [
        sys.executable, str(recipe),
        "--output_dir", str(run_dir), "--optim", optim, "--max_steps", str(max_steps), "--seed", str(seed),
        "--logging_steps", "1", "--report_to", "none",
        *extra_args,
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:  # os.wait4 gives this child's own peak RSS
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0)
                log.write(f"\nhf-optim compare: killed after {timeout_s:g} s\n")
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = RunResult(
        optim=optim,
        returncode=proc.returncode,
        wall_s=time.perf_counter() - start,
        peak_rss=rusage.ru_maxrss * 1024,  # KiB on Linux
        output_dir=run_dir,
        log_path=log_path,
    )
    state_file = find_trainer_state(run_dir)
    if state_file is not None:
        result.log_history = json.loads(state_file.read_text()).get("log_history", [])
    return result


def compare(
    optims: Sequence[str],
    *,
    recipe: str | Path = DEFAULT_RECIPE,
    max_steps: int = 50,
    out: str | Path = "compare_out",
    seed: int = 42,
    extra_args: Sequence[str] = (),
    timeout_s: float | None = None,
    progress: bool = True,
    adamw_lr: float | None = None,
    adamw_weight_decay: float = 0.0,
) -> list[RunResult]:
    """Run ``recipe`` once per optimizer (same seed and steps); write ``report.md`` and plots into ``out``.

    With ``adamw_lr`` (an lr tuned for AdamW), each optimizer gets its own lr and
    weight decay from ``translate_hparams`` (Lion 5x smaller lr, ...), as a user
    switching optimizers should; without it every run gets the recipe's lr.
    """
    if not optims:
        raise ValueError("optims: give at least one optimizer name")
    for name in optims:
        registry.resolve(name)  # unknown names fail now, with a did-you-mean, not after the first run
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe {str(recipe)!r} not found")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"Invalid max_steps: {max_steps!r} (allowed: a positive int)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(list(optims), desc="hf-optim compare", unit="run", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        args = [*_translated_args(name, adamw_lr, adamw_weight_decay), *extra_args]
        results.append(run_recipe(recipe, name, out, max_steps=max_steps, seed=seed, extra_args=args,
                                  timeout_s=timeout_s))
    bar.close()
    plots = write_plots(results, out)
    write_report(results, out, recipe=recipe, max_steps=max_steps, seed=seed, extra_args=extra_args, plots=plots)
    (out / "results.json").write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return results


def _translated_args(name: str, adamw_lr: float | None, adamw_weight_decay: float) -> list[str]:
    if adamw_lr is None:
        return []
    from .translate import translate_hparams

    try:
        values = translate_hparams("adamw", name, lr=adamw_lr, weight_decay=adamw_weight_decay).values
    except ValueError:  # no AdamW relation (SGD, LARS, plugins): the AdamW values as given
        values = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
    return ["--learning_rate", repr(values["lr"]), "--weight_decay", repr(values["weight_decay"])]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(
    results: Sequence[RunResult], out: Path, *, recipe: Any, max_steps: int, seed: int, extra_args: Sequence[str],
    plots: Sequence[str] = (),
) -> Path:
    lines = [
        "# hf-optim compare",
        "",
        f"Recipe `{recipe}`, {max_steps} steps, seed {seed}"
        + (f", extra arguments `{' '.join(extra_args)}`" if extra_args else "") + ".",
        "Step time is the Trainer's train_runtime / steps (includes the first step's warm-up); "
        "peak memory is the run's peak RSS (os.wait4); state bytes are the optimizer's tensors (hf_optim.Trainer).",
        "",
        "| optim | final loss | eval loss | step time (ms) | peak RSS | optimizer state | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        step_ms = r.step_time_s * 1e3 if r.step_time_s is not None else None
        state = format_bytes(r.state_bytes) if r.state_bytes is not None else "n/a"
        status = "ok" if r.returncode == 0 else f"exit {r.returncode} (see `{r.log_path.relative_to(out)}`)"
        lines.append(
            f"| {r.optim} | {_fmt(r.final_loss, '.4f')} | {_fmt(r.eval_loss, '.4f')} | {_fmt(step_ms, '.1f')} "
            f"| {format_bytes(r.peak_rss)} | {state} | {status} |"
        )
    lines.append("")
    lines.extend(f"![{Path(p).stem}]({p})" for p in plots)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(results: Sequence[RunResult], out: Path) -> list[str]:
    """loss.png (curves), memory.png (peak RSS and state bytes), lr.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, filename, title, ylabel in (
        ("loss", "loss.png", "training loss", "loss"),
        ("learning_rate", "lr.png", "learning rate", "lr"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in results:
            series = r.series(key)
            if series:
                ax.plot(*zip(*series, strict=True), label=r.optim, marker="." if len(series) < 40 else None)
        evals = [(r, r.series("eval_loss")) for r in results] if key == "loss" else []
        for r, series in evals:
            if series:
                ax.scatter(*zip(*series, strict=True), marker="x", label=f"{r.optim} eval")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if ax.has_data():
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(filename)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    names = [r.optim for r in results]
    ax1.bar(names, [r.peak_rss / 1e6 for r in results], color="tab:blue")
    ax1.set(title="peak RSS", ylabel="MB")
    ax2.bar(names, [(r.state_bytes or 0) / 1e6 for r in results], color="tab:orange")
    ax2.set(title="optimizer state", ylabel="MB")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
    written.append("memory.png")
    return written


# --- command line ----------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optims", default=DEFAULT_OPTIMS, help=f"comma-separated names (default {DEFAULT_OPTIMS})")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help="training script (default: hf_optim's own recipes/train_clm.py)")
    parser.add_argument("--max_steps", type=int, default=50, help="optimizer steps per run (default 50)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="compare_out", help="output directory (default compare_out)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a run is killed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--adamw_lr", type=float, default=None,
                        help="an lr tuned for AdamW: each optimizer gets its translated lr and weight decay")
    parser.add_argument("--adamw_weight_decay", type=float, default=0.0, help="AdamW weight decay to translate")
    parser.add_argument("recipe_args", nargs="*", help="after --: extra arguments for the recipe")


def cli_run(args: argparse.Namespace) -> int:
    optims = [n.strip() for n in args.optims.split(",") if n.strip()]
    extra = [a for a in args.recipe_args if a != "--"]
    results = compare(optims, recipe=args.recipe, max_steps=args.max_steps, out=args.out, seed=args.seed,
                      extra_args=extra, timeout_s=args.timeout, adamw_lr=args.adamw_lr,
                      adamw_weight_decay=args.adamw_weight_decay)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print((Path(args.out) / "report.md").read_text())
        print(f"written: {Path(args.out) / 'report.md'} and loss.png, memory.png, lr.png")
    return 0 if all(r.returncode == 0 for r in results) else 1
