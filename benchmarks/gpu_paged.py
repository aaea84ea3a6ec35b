"""Paged placement on CUDA: one script, a few minutes on one GPU, needs only torch (+ bitsandbytes to compare).

    python benchmarks/gpu_paged.py                    # defaults: 24 x 4096^2 params (403M), eager
    python benchmarks/gpu_paged.py --execution compiled --tensors 12

1. Equality: paged (budget 0: every state streamed from pinned host memory;
   and half the state on the device) vs non-paged, AdamW and Lion, fp32 and
   8-bit, 50 steps with the same gradients: parameters and state dicts
   bit-identical (``torch.equal``). Then a paged state dict (CPU tensors)
   loads into a non-paged CUDA optimizer and back, 10 steps in lockstep.
2. Memory and time at size: peak device memory the optimizer adds over
   params + grads, median step time (synchronized), bytes moved and host
   stall per step, for non-paged / paged (budget 0 and half the state) /
   torch fused AdamW / bitsandbytes AdamW8bit, PagedAdamW8bit, PagedAdamW. "x same" is the
   ratio to the non-paged hf optimizer with the same storage (8-bit rows: to hf adamw_8bit).

Prints tables and a one-line verdict per check; a failing section prints its
error and the script goes on. hf_optim is imported from this checkout without
its Trainer integration, so transformers need not be installed.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_hf_optim():
    """``hf_optim.optimizers`` and ``hf_optim.state`` without ``hf_optim/__init__`` (which imports transformers)."""
    if "hf_optim" not in sys.modules:
        pkg = types.ModuleType("hf_optim")
        pkg.__path__ = [str(ROOT / "hf_optim")]
        sys.modules["hf_optim"] = pkg
    return importlib.import_module("hf_optim.optimizers"), importlib.import_module("hf_optim.state")


optimizers, state_pkg = load_hf_optim()
DEV = torch.device("cuda")
HP = {"AdamW": {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
      "Lion": {"lr": 1e-4, "betas": (0.9, 0.98), "weight_decay": 0.1}}


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def allocated():
    return torch.cuda.memory_allocated() if DEV.type == "cuda" else 0


def make_params(shapes, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=DEV).requires_grad_() for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator(device=DEV).manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=DEV) * 1e-2


def state_bytes(opt):
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)


def sd_equal(a, b):
    for index, state in a["state"].items():
        for key, t in state.items():
            if not torch.equal(t.cpu(), b["state"][index][key].cpu()):
                return f"state {index}/{key} differs"
    return ""


def equality(execution: str, steps: int) -> bool:
    shapes = [(1024, 1024)] * 4 + [(4099,), (333, 777), ()]
    rules = [r for r in ("AdamW", "Lion") if hasattr(optimizers, r)]
    precisions = [p for p in ("fp32", "8bit") if p in state_pkg.CODECS]
    print(f"\n[1] paged == non-paged on CUDA ({execution}, {steps} steps, {len(shapes)} params)")
    print(f"  {'rule':6s} {'state':5s} {'budget':>8s} {'paged':>6s} {'params':>7s} {'state dict':>10s} "
          f"{'moved MB/step':>14s}")
    ok = True
    for rule in rules:
        for precision in precisions:
            ref_params = make_params(shapes)
            ref = getattr(optimizers, rule)(ref_params, execution=execution, state_precision=precision, **HP[rule])
            for i in range(steps):
                set_grads(ref_params, i)
                ref.step()
            ref_sd = ref.state_dict()
            for budget in (0, state_bytes(ref) // 2):
                params = make_params(shapes)
                opt = getattr(optimizers, rule)(params, execution=execution, state_precision=precision,
                                                placement="paged", paged_budget=budget, **HP[rule])
                for i in range(steps):
                    set_grads(params, i)
                    opt.step()
                sync()
                same = all(torch.equal(a, b) for a, b in zip(ref_params, params))
                diff = sd_equal(ref_sd, opt.state_dict())
                stats = opt.paging_stats()
                host = [t for st in opt.state.values() for t in st.values() if t.dim() and t.device != DEV]
                pinned = DEV.type != "cuda" or (bool(host) and all(t.is_pinned() for t in host))
                ok &= same and not diff and stats["paged_params"] > 0 and pinned
                if not pinned:
                    print("  paged states are not in pinned host memory")
                print(f"  {rule:6s} {precision:5s} {budget:8d} {stats['paged_params']:6d} "
                      f"{'equal' if same else 'DIFFER':>7s} {diff or 'equal':>10s} {stats['moved_bytes'] / 1e6:14.1f}")
    # cross-placement state dicts: paged (CPU tensors) -> non-paged CUDA, and back, then lockstep
    a_params, b_params = make_params(shapes), make_params(shapes)
    a = optimizers.AdamW(a_params, execution=execution, placement="paged", paged_budget=0, **HP["AdamW"])
    b = optimizers.AdamW(b_params, execution=execution, **HP["AdamW"])
    for i in range(5):
        for params, opt in ((a_params, a), (b_params, b)):
            set_grads(params, i)
            opt.step()
    loaded = []
    for sd, extra in ((a.state_dict(), {}), (b.state_dict(), {"placement": "paged", "paged_budget": 0})):
        params = make_params(shapes)
        with torch.no_grad():
            for p, src in zip(params, b_params):
                p.copy_(src)
        opt = optimizers.AdamW(params, execution=execution, **HP["AdamW"], **extra)
        opt.load_state_dict(sd)
        loaded.append((params, opt))
    for i in range(10):
        for params, opt in [(b_params, b), *loaded]:
            set_grads(params, 50 + i)
            opt.step()
    for (params, _), what in zip(loaded, ("paged state dict -> non-paged", "non-paged state dict -> paged")):
        same = all(torch.equal(x, y) for x, y in zip(params, b_params))
        ok &= same
        print(f"  {what} CUDA optimizer, 10 lockstep steps: {'equal' if same else 'DIFFER'}")
    print(f"  verdict: {'PASS' if ok else 'FAIL'}")
    return ok


def measure(name, build, shapes, steps, warmup):
    params = make_params(shapes)
    set_grads(params, 0)
    sync()
    base = allocated()
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opt = build(params)
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if DEV.type == "cuda" else 0) - base
    after = allocated() - base
    stats = opt.paging_stats() if hasattr(opt, "paging_stats") else {}
    del opt, params
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "ms": statistics.median(times) * 1e3, "peak": peak, "after": after, **stats}


def at_size(tensors: int, side: int, execution: str, steps: int, warmup: int) -> None:
    shapes = [(side, side)] * tensors
    numel = tensors * side * side
    fp32_state = numel * 8
    ex = execution
    cands = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "hf adamw": lambda ps: optimizers.AdamW(ps, execution=ex),
        "hf paged_adamw budget 0": lambda ps: optimizers.AdamW(ps, execution=ex, placement="paged", paged_budget=0),
        "hf paged_adamw budget 1/2": lambda ps: optimizers.AdamW(ps, execution=ex, placement="paged",
                                                                  paged_budget=fp32_state // 2),
    }
    if "8bit" in state_pkg.CODECS:
        cands["hf adamw_8bit"] = lambda ps: optimizers.AdamW(ps, execution=ex, state_precision="8bit")
        cands["hf paged_adamw_8bit budget 0"] = lambda ps: optimizers.AdamW(
            ps, execution=ex, state_precision="8bit", placement="paged", paged_budget=0)
    try:
        import bitsandbytes as bnb

        cands["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
        cands["bnb PagedAdamW8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3)
        cands["bnb PagedAdamW (32bit)"] = lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-3)
    except ImportError as err:
        print(f"  (bitsandbytes not available: {err})")
    print(f"\n[2] at size: {numel / 1e6:.0f}M params ({tensors} x {side}^2), hf execution={ex}, "
          f"median of {steps} synchronized steps; fp32 Adam state {fp32_state / 2**30:.2f} GiB")
    print(f"  {'optimizer':30s} {'ms/step':>8s} {'x same':>7s} {'x fused':>7s} {'peak GiB':>9s} {'kept GiB':>9s} "
          f"{'GB moved':>9s} {'stall ms':>9s}")
    rows = {}
    for name, build in cands.items():
        try:
            rows[name] = measure(name, build, shapes, steps, warmup)
        except Exception as err:  # report and go on
            print(f"  {name:30s} failed: {type(err).__name__}: {str(err)[:150]}")
    fused = rows.get("torch AdamW fused", {}).get("ms", float("nan"))
    for name, r in rows.items():
        same = rows.get("hf adamw_8bit" if "8bit" in name else "hf adamw", {}).get("ms")
        print(f"  {name:30s} {r['ms']:8.2f} {r['ms'] / same if same else float('nan'):7.3f} {r['ms'] / fused:7.3f} "
              f"{r['peak'] / 2**30:9.3f} {r['after'] / 2**30:9.3f} {r.get('moved_bytes', 0) / 1e9:9.2f} "
              f"{r.get('stall_s', 0) * 1e3:9.2f}")
    plain, paged = rows.get("hf adamw"), rows.get("hf paged_adamw budget 0")
    if plain and paged and plain["peak"] > 0:
        print(f"  peak device memory, paged budget 0 vs non-paged: {paged['peak'] / 2**30:.3f} vs "
              f"{plain['peak'] / 2**30:.3f} GiB ({1 - paged['peak'] / plain['peak']:.0%} less); "
              f"step time {paged['ms'] / plain['ms']:.2f}x; host<->device {paged['moved_bytes'] / 1e9:.2f} GB/step "
              f"= {paged['moved_bytes'] / 1e9 / (paged['ms'] / 1e3):.1f} GB/s")
    ours, bnb_paged = rows.get("hf paged_adamw_8bit budget 0"), rows.get("bnb PagedAdamW8bit")
    if ours and bnb_paged:
        print(f"  hf paged_adamw_8bit (budget 0) vs bnb PagedAdamW8bit: step time {ours['ms'] / bnb_paged['ms']:.2f}x, "
              f"peak device memory {ours['peak'] / 2**30:.3f} vs {bnb_paged['peak'] / 2**30:.3f} GiB "
              "(bnb pages only when the device is oversubscribed)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--execution", default="eager", choices=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--equality-steps", type=int, default=50)
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's logic (file-backed paging)")
    args = parser.parse_args(argv)
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if DEV.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
              f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
    t0 = time.time()
    ok = True
    if not args.skip_equality:
        try:
            ok = equality(args.execution, args.equality_steps)
        except Exception:  # report and go on
            traceback.print_exc()
            ok = False
        print(f"  ({time.time() - t0:.0f} s)")
    try:
        at_size(args.tensors, args.side, args.execution, args.steps, args.warmup)
    except Exception:
        traceback.print_exc()
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
