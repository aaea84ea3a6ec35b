"""Optimizer state memory, measured: real bytes of every state tensor per parameter.

    python benchmarks/state_memory.py            # bytes/param: ours vs bitsandbytes, torchao, torch
    python benchmarks/state_memory.py --maps     # code-map error table (the choice in blockwise.py)

Sums ``untyped_storage().nbytes()`` of every plain tensor reachable from the
optimizer state, and for tensor subclasses (torchao's ``OptimState8bit``) the
plain tensors inside them (``__tensor_flatten__``): their own
``numel() * element_size()`` reports the dequantized size, not what is held.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_optim
from hf_optim.rules.base import Buffer
from hf_optim.state.blockwise import EIGHT_BIT, BlockwiseCodec


def real_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the storages behind ``obj`` (tensors, subclasses, containers), each counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, dict):
        return sum(real_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(real_bytes(v, seen) for v in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(real_bytes(getattr(obj, name), seen) for name in names)
    storage = obj.untyped_storage()
    key = storage.data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def _peer(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


CANDIDATES = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "hf_optim adamw_8bit": lambda ps: hf_optim.AdamW(ps, state_precision="8bit", execution="eager"),
    "hf_optim lion_8bit": lambda ps: hf_optim.Lion(ps, state_precision="8bit", execution="eager"),
    "bnb AdamW8bit": lambda ps: _peer("bitsandbytes.optim", "AdamW8bit")(ps, lr=1e-3),
    "bnb Lion8bit": lambda ps: _peer("bitsandbytes.optim", "Lion8bit")(ps, lr=1e-4),
    "torchao AdamW8bit": lambda ps: _peer("torchao.optim", "AdamW8bit")(ps, lr=1e-3),
}


def memory(shapes: list[tuple[int, ...]]) -> None:
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{numel / 1e6:.2f}M params in {len(shapes)} tensors")
    print(f"  {'candidate':24s} {'state bytes':>12s} {'bytes/param':>12s}")
    for name, make in CANDIDATES.items():
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        try:
            opt = make(params)
        except (ImportError, AttributeError) as err:
            print(f"  skip {name}: {err}")
            continue
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        nbytes = real_bytes([opt.state[p] for p in params])
        print(f"  {name:24s} {nbytes:12d} {nbytes / numel:12.4f}")


def map_errors(codec: BlockwiseCodec | None, steps: int = 50, spread: float = 0.0) -> tuple[float, ...]:
    """randn round trip (signed map) and AdamW per-step re-sync errors vs fp32 for one code map.

    ``spread``: per-element gradient scales are ``exp(spread * randn)`` (0: iid gradients), as
    real layers have, which widens the second moment's range inside a block.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024 * 1024, generator=gen)
    if codec is None:  # bitsandbytes' dynamic map with its own blockwise quantizer
        import bitsandbytes.functional as F

        q, state = F.quantize_blockwise(x, blocksize=256)
        y = F.dequantize_blockwise(q, state)
    else:
        buffer = Buffer("m", "signed")
        stored = codec.allocate(buffer, x)
        codec.encode(x, stored, buffer)
        y = codec.decode(stored, buffer, x.numel())
    err = (y - x).abs()
    rt_abs, rt_rel = err.mean().item(), (err / (x.abs() + 1e-8)).mean().item()
    shape = (16, 4096)
    p32 = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
    p8 = torch.nn.Parameter(p32.detach().clone())
    hp = dict(lr=1e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1)
    ref = torch.optim.AdamW([p32], **hp)
    scales = torch.exp(spread * torch.randn(shape, generator=gen))
    step = _peer("bitsandbytes.optim", "AdamW8bit")([p8], **hp).step if codec is None else _codec_adamw(p8, codec, hp)
    abs_e = rel_e = 0.0
    for _ in range(steps):
        g = torch.randn(shape, generator=gen) * 0.01 * scales
        p32.grad, p8.grad = g.clone(), g.clone()
        ref.step()
        step()
        e = (p32 - p8).abs()
        abs_e += e.mean().item() / steps
        rel_e += (e / (p32.abs() + 1e-8)).mean().item() / steps
        with torch.no_grad():
            p8.copy_(p32)
    return rt_abs, rt_rel, abs_e, rel_e


def _codec_adamw(p: torch.nn.Parameter, codec: BlockwiseCodec, hp: dict):
    """hf_optim's eager AdamW step on ``p`` with its state in ``codec``, registered under its own name."""
    import hf_optim
    from hf_optim import state

    if state.CODECS.setdefault(codec.name, codec) is not codec:
        raise ValueError(f"another codec is already registered as {codec.name!r}")
    return hf_optim.AdamW([p], state_precision=codec.name, execution="eager", **hp).step


def maps() -> None:
    heads = " ".join(f"{h:>10s}" for h in ("randn abs", "randn rel", "AdamW abs", "AdamW rel", "spread abs",
                                           "spread rel"))
    print(f"  {'map (signed / unsigned)':34s} {heads}")
    variants = {
        "bitsandbytes dynamic / dynamic": None,
        "square / fourth power (chosen)": EIGHT_BIT,
        "square / square": BlockwiseCodec("8bit-square-square", 2, 2),
        "cube / fourth power": BlockwiseCodec("8bit-cube-fourth", 3, 4),
        "linear / fourth power": BlockwiseCodec("8bit-linear-fourth", 1, 4),
    }
    for name, codec in variants.items():
        try:
            row = map_errors(codec) + map_errors(codec, spread=2.0)[2:]
        except ImportError as err:
            print(f"  skip {name}: {err}")
            continue
        print(f"  {name:34s} " + " ".join(f"{v:10.3g}" for v in row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", action="store_true", help="print the code-map error table instead")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.maps:
        maps()
        return 0
    for shapes in ([(256, 256)] * 16, [(1024, 1024)] * 4):
        memory(shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
