"""Optimizer step time: every candidate measured interleaved in one run.

    python benchmarks/step_time.py --numel 16.8M --tensors 8 128 --only adamw
    python benchmarks/step_time.py --shapes llama-134m 5000x100 --only native
    HF_OPTIM_NATIVE_FLAGS=-mno-avx512f python benchmarks/step_time.py ...   # the AVX2 path on an AVX-512 CPU
    ATEN_CPU_CAPABILITY=avx2 HF_OPTIM_NATIVE_FLAGS=-mno-avx512f python benchmarks/step_time.py ...  # and torch's

For each (numel, tensor count) configuration, every candidate gets its own
parameters with the same shapes; after warm-up (and compilation) the
candidates take turns, one step each, in a shuffled order every round, so
machine noise (this kind of machine's memory bandwidth swings ~2x between
runs) hits them alike. Prints the median step time and its ratio to
``torch.optim.AdamW(fused=True)``. Only same-run ratios mean anything.

``--shapes`` measures real-world parameter lists instead: a 134M Llama's 111
tensors (shapes from a transformers ``LlamaConfig``, no weights) and 5000
tensors of 100 elements. The first lines say which vector path the native
kernel's build has (avx512, avx2 or portable) and which kernels torch's fused
AdamW runs (torch dispatches by CPU: ``ATEN_CPU_CAPABILITY=avx2`` makes an
AVX-512 machine run torch's AVX2 kernels, the honest baseline for our AVX2 build).

Candidates register in ``CANDIDATES``: name -> factory(params) -> optimizer;
a factory whose peer package is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_optim
from hf_optim.guide.bench import BASELINE, Factory, make_shapes, measure  # the loop `hf-optim bench` times with
from hf_optim.guide.memory import parse_count
from hf_optim.kernels import native


def _optimi(name: str) -> Factory:
    def build(params):
        import optimi

        return getattr(optimi, name)(params, lr=1e-3, weight_decay=0.01, foreach=True)

    return build


def _peer(module: str, name: str) -> type[torch.optim.Optimizer]:
    import importlib

    return getattr(importlib.import_module(module), name)


CANDIDATES: dict[str, Factory] = {
    BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "optimi AdamW": _optimi("AdamW"),
    "hf_optim adamw eager": lambda ps: hf_optim.AdamW(ps, lr=1e-3, execution="eager"),
    "hf_optim adamw compiled": lambda ps: hf_optim.AdamW(ps, lr=1e-3, execution="compiled"),
    "hf_optim adamw_8bit compiled": lambda ps: hf_optim.AdamW(
        ps, lr=1e-3, state_precision="8bit", execution="compiled"
    ),
    "hf_optim lion_8bit compiled": lambda ps: hf_optim.Lion(ps, lr=1e-4, state_precision="8bit", execution="compiled"),
    "hf_optim adamw native": lambda ps: hf_optim.AdamW(ps, lr=1e-3, execution="native"),
    "hf_optim adamw_8bit native": lambda ps: hf_optim.AdamW(ps, lr=1e-3, state_precision="8bit", execution="native"),
    "hf_optim lion_8bit native": lambda ps: hf_optim.Lion(ps, lr=1e-4, state_precision="8bit", execution="native"),
    "bnb AdamW8bit": lambda ps: _peer("bitsandbytes.optim", "AdamW8bit")(ps, lr=1e-3),
    "bnb Lion8bit": lambda ps: _peer("bitsandbytes.optim", "Lion8bit")(ps, lr=1e-4),
    "torchao AdamW8bit": lambda ps: _peer("torchao.optim", "AdamW8bit")(ps, lr=1e-3),
}

# issue 4 rules: ours compiled against each rule's peers (same hyperparameters; peers at their fastest CPU path)
CANDIDATES.update({
    "hf_optim lion compiled": lambda ps: hf_optim.Lion(ps, lr=1e-4, weight_decay=0.1, execution="compiled"),
    "hf_optim lion native": lambda ps: hf_optim.Lion(ps, lr=1e-4, weight_decay=0.1, execution="native"),
    "lion_pytorch Lion": lambda ps: _peer("lion_pytorch", "Lion")(ps, lr=1e-4, weight_decay=0.1),
    "optimi Lion": lambda ps: _peer("optimi", "Lion")(ps, lr=1e-4, weight_decay=0.1, foreach=True),
    "hf_optim lamb compiled": lambda ps: hf_optim.LAMB(ps, lr=1e-3, weight_decay=0.01, execution="compiled"),
    "pytorch_optimizer LAMB": lambda ps: _peer("pytorch_optimizer", "Lamb")(ps, lr=1e-3, weight_decay=0.01),
    "bnb LAMB": lambda ps: _peer("bitsandbytes.optim", "LAMB")(ps, lr=1e-3, weight_decay=0.01),
    "hf_optim lars compiled": lambda ps: hf_optim.LARS(ps, lr=1.0, weight_decay=1e-4, execution="compiled"),
    "pytorch_optimizer LARS": lambda ps: _peer("pytorch_optimizer", "LARS")(ps, lr=1.0, weight_decay=1e-4),
    "bnb LARS": lambda ps: _peer("bitsandbytes.optim", "LARS")(ps, lr=1.0, momentum=0.9, weight_decay=1e-4),
    "hf_optim stable_adamw compiled": lambda ps: hf_optim.StableAdamW(ps, lr=1e-3, execution="compiled"),
    "optimi StableAdamW": _optimi("StableAdamW"),
    "hf_optim adan compiled": lambda ps: hf_optim.Adan(ps, lr=1e-3, weight_decay=0.01, execution="compiled"),
    "hf_optim adan native": lambda ps: hf_optim.Adan(ps, lr=1e-3, weight_decay=0.01, execution="native"),
    "optimi Adan": _optimi("Adan"),
    "hf_optim ranger compiled": lambda ps: hf_optim.Ranger(ps, lr=1e-3, weight_decay=0.01, execution="compiled"),
    "hf_optim ranger native": lambda ps: hf_optim.Ranger(ps, lr=1e-3, weight_decay=0.01, execution="native"),
    "optimi Ranger": _optimi("Ranger"),
    "hf_optim lamb native": lambda ps: hf_optim.LAMB(ps, lr=1e-3, weight_decay=0.01, execution="native"),
    "hf_optim lamb_8bit native": lambda ps: hf_optim.LAMB(ps, lr=1e-3, weight_decay=0.01, state_precision="8bit",
                                                          execution="native"),
    "hf_optim lars native": lambda ps: hf_optim.LARS(ps, lr=1.0, weight_decay=1e-4, execution="native"),
    "hf_optim stable_adamw native": lambda ps: hf_optim.StableAdamW(ps, lr=1e-3, execution="native"),
    "hf_optim stable_adamw_8bit native": lambda ps: hf_optim.StableAdamW(ps, lr=1e-3, state_precision="8bit",
                                                                         execution="native"),
    "hf_optim sgd compiled": lambda ps: hf_optim.SGD(ps, lr=0.1, momentum=0.9, execution="compiled"),
    "hf_optim sgd native": lambda ps: hf_optim.SGD(ps, lr=0.1, momentum=0.9, execution="native"),
    "torch SGD foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
})


def report(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"  {'candidate':34s} {'median ms':>10s} {'x fused':>8s} {'warm-up s':>10s}")
    for row in rows:
        if row["median_ms"] is None:
            print(f"  {row['candidate']:34s} {row['note']}")
        else:
            ratio = row["x_fused"] if row["x_fused"] is not None else float("nan")
            print(f"  {row['candidate']:34s} {row['median_ms']:10.2f} {ratio:8.2f} {row['warmup_s']:10.1f}")


def llama_shapes(name: str = "134m") -> list[tuple[int, ...]]:
    """A Llama's parameter shapes from a transformers ``LlamaConfig`` (built on the meta device: no weights).

    134m: hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, untied head: 134.1M parameters, 111 tensors.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    configs = {"134m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                                   tie_word_embeddings=False)}
    with torch.device("meta"):
        model = LlamaForCausalLM(configs[name])
    return [tuple(p.shape) for p in model.parameters()]


#: real-world parameter lists (``--shapes``), beside the equal-tensor grid of --numel x --tensors
SHAPE_SETS = {
    "llama-134m": lambda: llama_shapes("134m"),
    "5000x100": lambda: [(100,)] * 5000,  # thousands of small tensors: per-tensor overhead
}


def _torch_capability_note() -> str:
    """Which kernels the baseline runs: torch picks them by CPU, so an AVX2 build of ours on an AVX-512 machine is
    compared with torch's AVX2 kernels only under ``ATEN_CPU_CAPABILITY=avx2`` (what an AVX2 machine runs)."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f" (ATEN_CPU_CAPABILITY={forced!r})" if forced else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", nargs="+", default=["16.8M"], help="total parameter counts, e.g. 16.8M 67.1M")
    parser.add_argument("--tensors", nargs="+", type=int, default=[8, 128])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[], help="substrings: keep matching candidates (+ baseline)")
    parser.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPE_SETS),
                        help="real-world parameter lists to measure (instead of the --numel x --tensors grid)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in CANDIDATES if n == BASELINE or not args.only or any(s in n for s in args.only)]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} interleaved steps, medians")
    flags = os.environ.get("HF_OPTIM_NATIVE_FLAGS", "")
    built_with = f" (HF_OPTIM_NATIVE_FLAGS={flags!r})" if flags else ""
    print(f"native kernel vector path: {native.vector_path()}{built_with}; torch's CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}{_torch_capability_note()}")
    if args.shapes:
        sets = [(name, SHAPE_SETS[name]()) for name in args.shapes]
    else:
        sets = [(f"{tensors} tensors", make_shapes(numel, tensors)) for numel in map(parse_count, args.numel)
                for tensors in args.tensors]
    for label, shapes in sets:
        total = sum(math.prod(s) for s in shapes)
        rows = measure({n: CANDIDATES[n] for n in names}, shapes, args.steps, args.warmup, progress=False)
        report(rows, f"{total / 1e6:.1f}M params in {len(shapes)} tensors ({label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
