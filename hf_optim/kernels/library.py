"""The native kernel's shared library: its sources and flags, the build (``hf_optim.kernels.build``), loading
with ctypes, the entry points' signatures and the once-per-process check against ``torch.optim.AdamW``.

``hf_optim.kernels.native`` is the interface (``step``, ``KernelCall``, the applicability checks); this module
only makes sure there is a library for this machine, or says why not.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import subprocess
from pathlib import Path

import torch

from ..state.blockwise import BLOCK
from .bindings import HEADER, KERNELS, coefficient_header
from .build import compiler, env_flags, load

SOURCE = Path(__file__).with_name("cpu_step.c")
#: every file the build reads: the entry points' source and the headers it includes
SOURCES = (SOURCE, *sorted(Path(__file__).parent.glob("cpu_*.h")))
#: -ffp-contract=off: no fused multiply-adds, so each operation rounds as torch's does
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
         "-shared", "-fPIC")
#: x86: 512-bit vectors where the CPU has them (gcc defaults to 256 even on AVX-512 parts)
X86_FLAGS = ("-mprefer-vector-width=512",)


def driver_flags(directory: Path) -> list[str]:
    """Compiler flags for a C program that includes ``cpu_step.c`` (benchmarks' and tests' drivers): this machine's
    build flags, no ``-shared``, and the generated header, written into ``directory``."""
    (directory / HEADER).write_text(coefficient_header())
    return [f for f in build_flags() if f not in ("-shared", "-fPIC")] + ["-I", str(directory)]


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded, self-checked kernel library, or why there is none (a string)."""
    cc = compiler()
    if cc is None:
        return "no C compiler (gcc or cc) found"
    try:
        flags = build_flags()
    except ValueError as err:
        return str(err)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"{cc} does not run: {err}"
    # -march=native: a build is only good for this CPU (a shared home directory may serve several kinds)
    return load(SOURCES, [cc, *flags, str(SOURCE)], [version, _cpu_signature()], _declare, _self_check,
                generated={HEADER: coefficient_header()})



def _self_check(lib: ctypes.CDLL) -> str | None:
    """None if ``lib`` steps AdamW (fp32 state, 3 blocks and a ragged tail, non-default hyperparameters)
    as ``torch.optim.AdamW`` does, else what differs: a wrong library never steps silently."""
    from ..rules.adamw import AdamW

    gen = torch.Generator().manual_seed(0)
    numel = 3 * BLOCK + 17
    param, grad = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    hp = {"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1}
    reference = param.clone().requires_grad_()
    reference.grad = grad.clone()
    torch.optim.AdamW([reference], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                      weight_decay=hp["weight_decay"]).step()
    states, counter = [torch.zeros(numel), torch.zeros(numel)], torch.zeros(())
    c = AdamW.coefficients({k: torch.tensor(v) for k, v in hp.items()}, torch.tensor(1.0), {})
    from .native import _STORE_FP32, step  # the interface this library serves

    try:
        step([param], [grad], states, [], torch.stack([c[name] for name in KERNELS["adamw"].coefficients]),
             "adamw", [_STORE_FP32, _STORE_FP32], 0, [counter], library=lib)
    except RuntimeError as err:
        return str(err)
    if not torch.allclose(param, reference.detach(), rtol=1e-5, atol=1e-6):
        worst = (param - reference.detach()).abs().max().item()
        return f"one AdamW step differs from torch.optim.AdamW by up to {worst:.3g}"
    if counter.item() != 1.0:
        return f"the step counter is {counter.item()} after one step, not 1"
    return None


def _declare(lib: ctypes.CDLL) -> None:
    """cpu_step.c's entry points' signatures: a bucket (rule, items, count, first blocks, coefficients), then its
    layout (buffers, storage codes, parameter dtype, flags, threads)."""
    bucket = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    layout = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    for name, args in (("hf_optim_step", bucket + layout),
                       ("hf_optim_step_items", [*bucket, ctypes.c_void_p, ctypes.c_int, *layout]),
                       ("hf_optim_norms", [*bucket, *layout, ctypes.c_void_p])):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = args


def build_flags() -> tuple[str, ...]:
    """The compiler flags of this machine's build (``$HF_OPTIM_NATIVE_FLAGS`` last)."""
    flags = FLAGS + (X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ())
    return flags + env_flags()  # ValueError naming $HF_OPTIM_NATIVE_FLAGS if it does not split


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and arm64 spellings
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def library_error() -> str | None:
    """None when the kernel library is built and loaded, else why not."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def vector_path() -> str:
    """Which quantizer the loaded build has: ``avx512``, ``avx2`` or ``portable`` (or why there is no build)."""
    lib = _library()
    if isinstance(lib, str):
        return f"none ({lib})"
    lib.hf_optim_vector_path.restype = ctypes.c_char_p
    return lib.hf_optim_vector_path().decode()
