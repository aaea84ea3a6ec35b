"""The device check of the CUDA (Triton) step: one script, at most 8 minutes on one GPU.

    python benchmarks/gpu_check.py              # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run    # the same code on CPU at tiny sizes (Triton's interpreter)

1. cold start: the first step's extra wall time (kernel compiles, fresh Triton cache) for the configurations
   a 1B Llama with 8-bit state needs.
2. parity with the eager step on the device: every rule x (fp32 state; bf16 params with Kahan; 8-bit state),
   ragged and whole-block tensors, 5 steps: every state tensor bit-identical, params within fp32 rounding
   (bf16: a bf16 ulp).
3. paged == non-paged, bit for bit (AdamW and Lion, fp32 and 8-bit, budget 0: every state streamed).
4. a CPU-saved state dict (``torch.save`` / ``weights_only=True`` load) loading into a CUDA optimizer: the
   state arrives unchanged, then 3 lockstep steps against the CPU optimizer.
5. peak device memory of paged state over a budget of 0 vs on-device state: the drop as a share of the
   state bytes.
6. speed: every rule with fp32 and 8-bit state on 1B parameters in one tensor and on a 1B Llama's parameter
   list (shapes from ``LlamaConfig``), CUDA-event medians, against ``torch.optim.AdamW(fused=True)`` and
   torchao's and bitsandbytes' 8-bit AdamW where importable, and the floor: bytes moved (param, grad and
   state read and written) over the device's measured copy bandwidth (and over 4.3 TB/s, an H200's).

Each section prints its own verdict and goes on when one fails; what is not importable is skipped and said
so; the timing table is printed last. hf_optim is imported from this checkout without its Trainer
integration, so transformers need not be installed (Llama shapes then come from the published config).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
if "--keep-triton-cache" not in sys.argv:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hf_optim_triton_")  # a cold start is cold

import importlib  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_hf_optim():
    """``hf_optim.optimizers`` and ``hf_optim.state`` without ``hf_optim/__init__`` (which imports transformers,
    which a GPU machine may not have)."""
    if "hf_optim" not in sys.modules:
        package = types.ModuleType("hf_optim")
        package.__path__ = [str(ROOT / "hf_optim")]
        sys.modules["hf_optim"] = package
    return importlib.import_module("hf_optim.optimizers"), importlib.import_module("hf_optim.state")


optimizers, state_pkg = load_hf_optim()
DEV = torch.device("cpu" if DRY else "cuda")
NOMINAL_BANDWIDTH = 4.3e12  # bytes/s, an H200's HBM3e
HP = {
    "AdamW": {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
    "Lion": {"lr": 1e-4, "betas": (0.9, 0.98), "weight_decay": 0.1},
    "SGD": {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    "Adan": {"lr": 1e-3, "betas": (0.9, 0.9, 0.98), "weight_decay": 0.02},
    "Ranger": {"lr": 1e-3, "betas": (0.85, 0.98), "k": 2, "alpha": 0.6},
    "LAMB": {"lr": 1e-3, "betas": (0.8, 0.99), "weight_decay": 0.1},
    "LARS": {"lr": 0.5, "momentum": 0.8, "weight_decay": 1e-3, "trust_coefficient": 2e-3},
    "StableAdamW": {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
}
RULES = list(HP)
SKIPPED: list[str] = []
START = time.perf_counter()


def remaining(limit: float) -> float:
    return limit - (time.perf_counter() - START)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def make_params(shapes, dtype=torch.float32, seed=0, device=DEV):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, seed) -> None:
    gen = torch.Generator(device=params[0].device).manual_seed(1000 + seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, device=p.device) * 1e-2).to(p.dtype)


def build(rule, params, **options):
    return getattr(optimizers, rule)(params, **{**HP[rule], **options})


def stepped(rule, shapes, steps, dtype=torch.float32, **options):
    params = make_params(shapes, dtype)
    opt = build(rule, params, **options)
    for i in range(steps):
        set_grads(params, i)
        opt.step()
    sync()
    return params, opt


def state_diff(a, b) -> str:
    """'' when every state tensor of ``a`` equals ``b``'s exactly, else what differs first."""
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        sa, sb = a.state[pa], b.state[pb]
        if sa.keys() != sb.keys():
            return f"keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            if not torch.equal(sa[key].cpu(), sb[key].cpu()):
                return f"{key} ({(sa[key].cpu().float() - sb[key].cpu().float()).abs().max():.3g})"
    return ""


def param_error(params, ref) -> float:
    """Largest |a - b| / max(|b|, 1e-3) over all parameters (0 when identical)."""
    worst = 0.0
    for a, b in zip(params, ref):
        a, b = a.detach().cpu().float(), b.detach().cpu().float()
        worst = max(worst, ((a - b).abs() / b.abs().clamp(min=1e-3)).max().item())
    return worst


# --- 1. cold start ------------------------------------------------------------------------------------------


def cold_start(llama_shapes) -> bool:
    print("\n[1] cold start: first step's extra wall time (fresh Triton cache unless --keep-triton-cache)")
    ok = True
    for label, options, dtype in (("adamw_8bit, Llama list", {"state_precision": "8bit"}, torch.float32),
                                  ("adamw fp32 state, bf16 params", {}, torch.bfloat16)):
        named = list(zip([n for n, _ in llama_shapes], make_params([s for _, s in llama_shapes], dtype)))
        opt = build("AdamW", named, execution="triton", **options)
        params = [p for _, p in named]
        set_grads(params, 0)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        first = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            opt.step()
            sync()
            warm.append(time.perf_counter() - t0)
        extra = first - statistics.median(warm)
        configs = len({id(k) for k in opt._modes})
        ok &= DRY or extra <= 5.0
        print(f"  {label}: {extra:.2f} s over a warm step ({configs} kernel configurations)"
              + (" (interpreter: nothing compiles)" if DRY else ""))
        del opt, params, named
    print(f"  verdict: {'PASS' if ok else 'FAIL'} (goal: <= 5 s)")
    return ok


# --- 2. parity ----------------------------------------------------------------------------------------------


def parity(shapes, steps) -> bool:
    print(f"\n[2] triton vs eager on {DEV.type}: {steps} steps, shapes {shapes}")
    print(f"  {'rule':12s} {'case':22s} {'state':>10s} {'param err':>10s}")
    ok = True
    cases = (("fp32 state", {}, torch.float32), ("bf16 params + Kahan", {}, torch.bfloat16),
             ("8-bit state", {"state_precision": "8bit", "min_8bit_size": 1024}, torch.float32))
    for rule in RULES:
        for label, options, dtype in cases:
            ours = stepped(rule, shapes, steps, dtype, execution="triton", **options)
            ref = stepped(rule, shapes, steps, dtype, execution="eager", **options)
            modes = set(ours[1]._modes.values())
            diff = state_diff(ours[1], ref[1])
            err = param_error(ours[0], ref[0])
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            good = modes == {"triton"} and not diff and err <= tolerance
            ok &= good
            print(f"  {rule:12s} {label:22s} {diff or 'equal':>10s} {err:10.2e}" + ("" if good else f"  FAIL {modes}"))
    print(f"  verdict: {'PASS' if ok else 'FAIL'} (state bit-exact, params within fp32 rounding / a bf16 ulp)")
    return ok


# --- 3. paged == non-paged ----------------------------------------------------------------------------------


def paged_equality(shapes, steps) -> bool:
    print("\n[3] paged (budget 0) == on-device state, triton step, bit for bit")
    ok = True
    for rule in ("AdamW", "Lion"):
        for precision in ("fp32", "8bit"):
            plain = stepped(rule, shapes, steps, execution="triton", state_precision=precision)
            paged = stepped(rule, shapes, steps, execution="triton", state_precision=precision, placement="paged",
                            paged_budget=0)
            same = all(torch.equal(a, b) for a, b in zip(plain[0], paged[0]))
            diff = state_diff(plain[1], paged[1])
            streamed = paged[1].paging_stats()["paged_params"]
            good = same and not diff and streamed > 0
            ok &= good
            print(f"  {rule:6s} {precision:5s}: params {'equal' if same else 'DIFFER'}, state {diff or 'equal'}, "
                  f"{streamed} params paged")
    print(f"  verdict: {'PASS' if ok else 'FAIL'}")
    return ok


# --- 4. a CPU-saved state dict on CUDA ----------------------------------------------------------------------


def cpu_state_dict_on_device(shapes) -> bool:
    print(f"\n[4] CPU-saved state dict -> {DEV.type} triton optimizer, then 3 lockstep steps")
    ok = True
    for precision in ("fp32", "8bit"):
        cpu_params = make_params(shapes, device=torch.device("cpu"))
        cpu = build("AdamW", cpu_params, execution="eager", state_precision=precision)
        for i in range(3):
            set_grads(cpu_params, i)
            cpu.step()
        buffer = io.BytesIO()
        torch.save(cpu.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        params = [p.detach().to(DEV).requires_grad_() for p in cpu_params]
        opt = build("AdamW", params, execution="triton", state_precision=precision)
        opt.load_state_dict(saved)
        loaded = not state_diff(cpu, opt) and all(
            t.device.type == DEV.type for s in opt.state.values() for t in s.values() if t.dim())
        for i in range(3, 6):
            set_grads(cpu_params, i)
            for p, src in zip(params, cpu_params):
                p.grad = src.grad.to(DEV)
            cpu.step()
            opt.step()
        sync()
        err = param_error(params, cpu_params)
        good = loaded and err <= 1e-5
        ok &= good
        print(f"  {precision:5s}: loaded state {'equal' if loaded else 'DIFFERS'} on {DEV.type}; after 3 steps "
              f"param err {err:.2e} vs CPU eager, state {state_diff(cpu, opt) or 'equal'}")
    print(f"  verdict: {'PASS' if ok else 'FAIL'} (state loaded exactly; params within 1e-5 after 3 steps)")
    return ok


# --- 5. paged state cuts peak device memory -----------------------------------------------------------------


def paged_memory(shapes) -> bool:
    print(f"\n[5] peak device memory the optimizer adds, on-device vs paged (budget 0), {len(shapes)} x {shapes[0]}")
    ok = True
    for precision in ("fp32", "8bit"):
        peaks = {}
        for placement in ("device", "paged"):
            params = make_params(shapes)
            set_grads(params, 0)
            sync()
            options = {"placement": "paged", "paged_budget": 0} if placement == "paged" else {}
            opt = build("AdamW", params, execution="triton", state_precision=precision, **options)
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                opt.step()
            sync()
            peaks[placement] = torch.cuda.max_memory_allocated() - base if DEV.type == "cuda" else 0
            state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim())
            del opt, params
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
        drop = (peaks["device"] - peaks["paged"]) / state_bytes
        ok &= DRY or drop >= 0.9
        print(f"  adamw {precision:5s}: state {state_bytes / 2**30:.3f} GiB; peak added on-device "
              f"{peaks['device'] / 2**30:.3f} GiB, paged {peaks['paged'] / 2**30:.3f} GiB: drop = {drop:.0%} of the "
              "state" + (" (CPU: no device memory to measure)" if DRY else ""))
    print(f"  verdict: {'PASS' if ok else 'FAIL'} (goal: >= 90% of the state bytes)")
    return ok


# --- 6. speed -----------------------------------------------------------------------------------------------


def time_steps(opt, steps: int, warmup: int) -> float:
    """Median step time in ms: CUDA events on a GPU, wall time on CPU."""
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(steps):
        if DEV.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(numel: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), median of 10."""
    src = torch.empty(numel, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[1:])


def moved_bytes(opt) -> int:
    """Bytes one step must read and write: params and state read and written, gradients read."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = sum(t.nbytes for t in opt.state[p].values() if torch.is_tensor(t) and t.dim())
            total += 2 * p.nbytes + p.grad.nbytes + 2 * state
    return total


def peers() -> dict:
    """The importable peers: name -> builder(params)."""
    out = {"torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1,
                                                            fused=True)}
    try:
        import bitsandbytes as bnb

        if DEV.type != "cuda":
            raise ImportError("bitsandbytes 8-bit optimizers need CUDA")
        out["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    except Exception as err:  # any import failure means: skip it, say why
        SKIPPED.append(f"bitsandbytes AdamW8bit: {type(err).__name__}: {str(err)[:100]}")
    try:
        if DRY:
            raise ImportError("torchao compiles each parameter's step with inductor: minutes on CPU")
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW8bit
        out["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    except Exception as err:
        SKIPPED.append(f"torchao AdamW8bit: {type(err).__name__}: {str(err)[:100]}")
    return out


def speed(layouts, steps: int, warmup: int, limit: float) -> list[dict]:
    numel = max(sum(_numel(s) for _, s in shapes) for shapes in layouts.values())
    bandwidth = copy_bandwidth(min(numel, 1 << 28))
    print(f"\n[6] step time, {steps} steps after {warmup} (median); device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    candidates = [(f"hf {rule.lower()}", precision, rule) for rule in RULES for precision in ("fp32", "8bit")]
    peer_builders = peers()
    for layout, named_shapes in layouts.items():
        names = [n for n, _ in named_shapes]
        params = make_params([s for _, s in named_shapes])
        set_grads(params, 0)
        jobs = [(name, "fp32" if "fused" in name else "8bit", builder) for name, builder in peer_builders.items()]
        jobs += [(name, precision, lambda ps, r=rule, pr=precision, nm=names: build(
            r, list(zip(nm, ps)), execution="triton", state_precision=pr)) for name, precision, rule in candidates]
        for name, precision, builder in jobs:
            if remaining(limit) < 20:
                SKIPPED.append(f"{name} {precision} on {layout}: the time limit was near")
                continue
            try:
                opt = builder(params)
                ms = time_steps(opt, steps, warmup)
                rows.append({"name": name, "state": precision, "layout": layout, "ms": ms,
                             "bytes": moved_bytes(opt)})
            except Exception as err:  # one failing candidate must not hide the others
                print(f"  {name} {precision} on {layout} FAILED: {type(err).__name__}: {str(err)[:300]}")
            finally:
                opt = None
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
        del params
    for row in rows:
        fused = next((r["ms"] for r in rows if r["layout"] == row["layout"] and r["name"] == "torch AdamW fused"),
                     None)
        row["x_fused"] = row["ms"] / fused if fused else float("nan")
        row["floor_ms"] = row["bytes"] / bandwidth * 1e3
        row["nominal_floor_ms"] = row["bytes"] / NOMINAL_BANDWIDTH * 1e3
    return rows


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def llama_shapes(tiny: bool) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """A 1B Llama's named parameter shapes (Llama 3.2 1B: tied embeddings), from ``LlamaConfig`` if importable."""
    sizes = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    if tiny:
        sizes.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64)
    try:
        from transformers import LlamaConfig

        config, source = LlamaConfig(**sizes), "transformers.LlamaConfig"
        h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        vocab, tied = config.vocab_size, config.tie_word_embeddings
    except ImportError:
        source = "the Llama 3.2 1B config's numbers (transformers not importable)"
        h, inter, layers = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
        kv = sizes["num_key_value_heads"] * (h // sizes["num_attention_heads"])
        vocab, tied = sizes["vocab_size"], sizes["tie_word_embeddings"]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes += [(prefix + "self_attn.q_proj.weight", (h, h)), (prefix + "self_attn.k_proj.weight", (kv, h)),
                   (prefix + "self_attn.v_proj.weight", (kv, h)), (prefix + "self_attn.o_proj.weight", (h, h)),
                   (prefix + "mlp.gate_proj.weight", (inter, h)), (prefix + "mlp.up_proj.weight", (inter, h)),
                   (prefix + "mlp.down_proj.weight", (h, inter)), (prefix + "input_layernorm.weight", (h,)),
                   (prefix + "post_attention_layernorm.weight", (h,))]
    shapes.append(("model.norm.weight", (h,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes, source


def print_table(rows) -> None:
    print("\n== step time (median ms); x fused: ratio to torch.optim.AdamW(fused=True) on the same layout; "
          "% floor: the floor's time over this step's (bytes moved / measured copy bandwidth)")
    print(f"{'optimizer':22s} {'state':5s} {'layout':14s} {'ms':>9s} {'x fused':>8s} {'floor ms':>9s} "
          f"{'% floor':>8s} {'4.3TB/s ms':>10s}")
    for r in rows:
        print(f"{r['name']:22s} {r['state']:5s} {r['layout']:14s} {r['ms']:9.3f} {r['x_fused']:8.2f} "
              f"{r['floor_ms']:9.3f} {r['floor_ms'] / r['ms']:8.0%} {r['nominal_floor_ms']:10.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    parser.add_argument("--keep-triton-cache", action="store_true", help="reuse compiled kernels (warm start)")
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds; later timings are skipped")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per optimizer")
    args = parser.parse_args(argv)
    if not DRY and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU check")
        return 2
    import triton

    device = "CPU (dry run, TRITON_INTERPRET=1)" if DRY else torch.cuda.get_device_name()
    print(f"hf_optim gpu_check on {device}; torch {torch.__version__}, triton {triton.__version__}")
    llama, source = llama_shapes(tiny=DRY)
    print(f"Llama parameter list: {len(llama)} tensors, {sum(_numel(s) for _, s in llama) / 1e9:.3f}B "
          f"params, from {source}")
    if DRY:
        parity_shapes, paged_shapes, one = [(1100,), (4, 256), (300,)], [(8, 256)] * 2, 1024 + 5
        steps, warmup, parity_steps = args.steps or 1, 1, 2
    else:
        parity_shapes, paged_shapes = [((1 << 20) + 37,), (1024, 999), (4096,), (300,)], [(8192, 8192)] * 8
        one = 1 << 30
        steps, warmup, parity_steps = args.steps or 10, 3, 5
    results = {}
    sections = [
        ("cold start", lambda: cold_start(llama)),
        ("parity", lambda: parity(parity_shapes, parity_steps)),
        ("paged == non-paged", lambda: paged_equality(parity_shapes, parity_steps)),
        ("CPU state dict on device", lambda: cpu_state_dict_on_device(parity_shapes)),
        ("paged peak memory", lambda: paged_memory(paged_shapes)),
    ]
    for name, section in sections:
        started = time.perf_counter()
        try:
            results[name] = section()
            print(f"  ({time.perf_counter() - started:.1f} s)")
        except Exception:  # report and go on: one broken section must not hide the others
            traceback.print_exc()
            results[name] = False
    rows = []
    try:
        rows = speed({"1 tensor": [("weight", (one,))], "Llama list": llama}, steps, warmup, args.time_limit)
    except Exception:
        traceback.print_exc()
        results["speed"] = False
    print("\n== verdicts: " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in results.items()))
    print("skipped: " + ("; ".join(SKIPPED) if SKIPPED else "nothing"))
    print(f"total {time.perf_counter() - START:.0f} s")
    print_table(rows)
    return 0 if all(results.values()) and rows else 1


if __name__ == "__main__":
    sys.exit(main())
