"""The native CPU step: ``cpu_step.c``, built once with the system C compiler.

``execution="native"`` (and ``"auto"`` on CPU, where it applies) steps a bucket
of parameters with one call into ``cpu_step.c``: decode -> rule -> encode per
block of 256 elements, all blocks of all parameters in one OpenMP loop. The
kernel covers the rules in ``KERNELS`` (AdamW, Lion, SGD, Adan, Ranger, and the
layer-wise LAMB, LARS and StableAdamW: a norm pass, then the update) with fp32
or 8-bit state and fp32 or bf16 parameters; anything else runs compiled or
eagerly. Where the compiler targets AVX-512 or AVX2 (+FMA) the quantizer runs
on vectors; elsewhere (aarch64) its plain C loop, which the compiler vectorizes.

The shared library is built on first use with ``-O3 -march=native`` (under a
second) and cached under ``$HF_OPTIM_CACHE`` (default ``~/.cache/hf_optim``)
by a hash of the source, flags, compiler and CPU, so it matches the machine it
runs on; it is loaded with ctypes and links the OpenMP runtime torch already
loaded. ``$HF_OPTIM_NATIVE_FLAGS`` adds compiler flags (e.g. ``-mno-avx512f``
for the AVX2 path on a machine that has AVX-512, ``-mno-avx512f -mno-avx2``
for the portable C loop; ``vector_path()`` says which one a build has). ``step`` is the whole
interface. It is also registered as the torch operator
``torch.ops.hf_optim.cpu_step`` (with a fake implementation), so a compiled
graph or other torch code can hold it; the engine calls ``step`` directly,
skipping the operator's per-tensor dispatch.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..rules.base import Buffer, UpdateRule
from ..state.base import StateCodec
from ..state.blockwise import BLOCK, BlockwiseCodec
from ..state.dense import DenseCodec
from . import layerwise
from .layerwise import ItemCoefficients, NormFn

SOURCE = Path(__file__).with_name("cpu_step.c")
#: -ffp-contract=off: no fused multiply-adds, so each operation rounds as torch's does
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
         "-shared", "-fPIC")
#: x86: 512-bit vectors where the CPU has them (gcc defaults to 256 even on AVX-512 parts)
X86_FLAGS = ("-mprefer-vector-width=512",)


class NativeKernel:
    """A rule's kernel in ``cpu_step.c``: its index there and its coefficient names in order.

    A layer-wise rule's kernel has a norm pass: ``item_coefficients`` (``hf_optim.kernels.layerwise``) turns its
    per-parameter sums of squares into the floats each parameter's update pass reads.
    """

    def __init__(self, index: int, coefficients: tuple[str, ...], flags: Mapping[str, int],
                 item_coefficients: ItemCoefficients | None = None) -> None:
        self.index = index
        self.coefficients = coefficients
        self.flags = flags  # rule flag name -> bit (0: a flag the kernel handles without one)
        self.item_coefficients = item_coefficients


#: rule name -> kernel (the C side documents the same orders)
KERNELS: dict[str, NativeKernel] = {
    "adamw": NativeKernel(
        0,
        ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "inv_bias_correction2_sqrt",
         "eps"),
        {"maximize": 1, "amsgrad": 2},
    ),
    "lion": NativeKernel(1, ("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"), {}),
    "sgd": NativeKernel(
        2, ("lr", "weight_decay", "momentum", "one_minus_dampening", "first", "has_momentum"),
        {"maximize": 1, "nesterov": 8},
    ),
    "adan": NativeKernel(
        3,
        ("lr", "inv_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3", "one_minus_beta3",
         "inv_bias_correction1", "diff_scale", "inv_bias_correction3_sqrt", "has_prev", "eps"),
        {},
    ),
    "ranger": NativeKernel(
        4,
        ("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
         "inv_bias_correction2_sqrt", "rectify", "rect", "eps", "sync", "alpha"),
        {},
    ),
    # layer-wise rules: a norm pass, then the update (param_ndim and exclude_bias_and_norm set _PLAIN_FLAG)
    "lamb": NativeKernel(
        5,
        ("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
         "inv_bias_correction2_sqrt", "inv_bias_correction2", "eps"),
        {"bias_correction": 0, "exclude_bias_and_norm": 0, "param_ndim": 0},
        layerwise.lamb,
    ),
    "lars": NativeKernel(
        6,
        ("lr", "weight_decay", "momentum", "one_minus_dampening", "has_momentum", "trust_coefficient"),
        {"nesterov": 8, "exclude_bias_and_norm": 0, "param_ndim": 0},
        layerwise.lars,
    ),
    "stable_adamw": NativeKernel(
        7,
        ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1", "inv_bias_correction2",
         "inv_bias_correction2_sqrt", "eps", "eps_sq", "lr", "weight_decay"),
        {},
        layerwise.stable_adamw,
    ),
}
_KAHAN_FLAG = 4
_PLAIN_FLAG = 16  # cpu_step.c's FLAG_PLAIN
_STORE_FP32, _STORE_SIGNED_8BIT, _STORE_UNSIGNED_8BIT = 0, 1, 2
_PARAM_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_BUFFERS = 4  # cpu_step.c's MAX_BUFFERS


def storage_code(buffer: Buffer, codec: StateCodec) -> int | None:
    """How ``cpu_step.c`` stores this buffer, or None if it cannot."""
    if isinstance(codec, DenseCodec) and codec.dtype == torch.float32:
        return _STORE_FP32
    if isinstance(codec, BlockwiseCodec):
        cmap = codec.code_map(buffer)
        if cmap.signed and cmap.power == 2:
            return _STORE_SIGNED_8BIT
        if not cmap.signed and cmap.power == 4:
            return _STORE_UNSIGNED_8BIT
    return None


def unsupported(rule: type[UpdateRule], codecs: Sequence[tuple[Buffer, StateCodec]], flags: Mapping[str, object],
                param_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this configuration cannot run natively, or None when it can."""
    if device.type != "cpu":
        return f"the native kernel runs on CPU, not {device.type}"
    why = rule_unsupported(rule)
    if why:
        return why
    kernel = KERNELS[rule.name]
    extra = sorted(name for name, value in flags.items() if value and name not in kernel.flags)
    if extra:
        return f"the native {rule.name} kernel has no {', '.join(extra)}"
    if param_dtype not in _PARAM_DTYPES:
        return f"native kernels take fp32 or bf16 parameters, not {param_dtype}"
    for buffer, codec in codecs:
        if storage_code(buffer, codec) is None:
            return f"native kernels store state as fp32 or 8bit, not {codec.name} ({buffer.name})"
    return None


def rule_unsupported(rule: type[UpdateRule]) -> str | None:
    """Why ``rule`` has no usable native kernel here (none written, or no library), or None."""
    if rule.name not in KERNELS:
        return f"no native kernel for {rule.name}"
    return library_error()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def cache_dir() -> Path:
    return Path(os.environ.get("HF_OPTIM_CACHE") or Path.home() / ".cache" / "hf_optim")


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, or why it could not be built (a string)."""
    cc = compiler()
    if cc is None:
        return "no C compiler (gcc or cc) found"
    flags = build_flags()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"{cc} does not run: {err}"
    # -march=native: a build is only good for this CPU (a shared home directory may serve several kinds)
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version, _cpu_signature()]).encode())
    target = cache_dir() / f"cpu_step-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: processes launched together (DDP ranks) may race here
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        build = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if build.returncode != 0:
            os.unlink(tmp)
            return f"building {SOURCE.name} failed: {build.stderr.strip()[:500]}"
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    return lib


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
    return flags + tuple(shlex.split(os.environ.get("HF_OPTIM_NATIVE_FLAGS", "")))


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


def step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Tensor],
    kahans: Sequence[Tensor],
    coefficients: Tensor,
    rule: str,
    storage: Sequence[int],
    flags: int,
    counters: Sequence[Tensor] = (),
    norm: NormFn | None = None,
) -> None:
    """One step of ``rule`` for every parameter, in place (the body of ``torch.ops.hf_optim.cpu_step``).

    ``states`` holds each parameter's buffers in rule order, item after item:
    one fp32 tensor per fp32 buffer, codes then block scales per 8-bit one.
    ``kahans`` is empty or one compensation buffer per (bf16) parameter;
    ``counters`` is empty or one fp32 scalar step count per parameter, which the
    kernel advances by one. Every tensor must be contiguous; a parameter and its
    gradient share dtype and size. A layer-wise rule (LAMB, LARS, StableAdamW)
    takes its global norms through ``norm`` (the rule's: an FSDP2 shard's
    all-reduces), None for the local norm.
    """
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"hf_optim native kernel unavailable: {lib}")
    kernel = KERNELS[rule]
    if len(storage) > _MAX_BUFFERS:
        raise ValueError(f"cpu_step: at most {_MAX_BUFFERS} state buffers, got {len(storage)}")
    per_item = sum(1 if code == _STORE_FP32 else 2 for code in storage)
    if (len(states) != per_item * len(params) or len(grads) != len(params) or len(kahans) not in (0, len(params))
            or len(counters) not in (0, len(params))):
        raise ValueError("cpu_step: params, grads, states, kahans and counters do not line up")
    if any(c.dtype != torch.float32 or c.numel() != 1 for c in counters):
        raise ValueError("cpu_step: step counters must be fp32 scalars")
    # one pass over the parameters (thousands of small ones: this loop is a good part of the call)
    numels = [p.numel() for p in params]
    if any(p.dtype != g.dtype or n != g.numel() or not (p.is_contiguous() and g.is_contiguous())
           for p, g, n in zip(params, grads, numels)):
        raise ValueError("cpu_step: parameters and gradients must be contiguous and alike")
    if coefficients.dtype != torch.float32 or coefficients.numel() != len(kernel.coefficients):
        raise ValueError(f"cpu_step: {rule} takes {len(kernel.coefficients)} fp32 coefficients "
                         f"({', '.join(kernel.coefficients)}), got {coefficients.numel()} {coefficients.dtype}")
    # cpu_step.c's item_t, one row per parameter: numel, param, grad, kahan, counter, state[MAX_BUFFERS],
    # absmax[MAX_BUFFERS]; filled a column at a time (one pass over the tensors each: per-tensor Python is
    # most of this call's cost for many small parameters)
    none = [0] * len(params)
    columns = [numels, _pointers(params), _pointers(grads), _pointers(kahans) or none, _pointers(counters) or none]
    data, scales = [none] * _MAX_BUFFERS, [none] * _MAX_BUFFERS
    k = 0
    for i, code in enumerate(storage):
        data[i] = _pointers(states[k::per_item])
        if code != _STORE_FP32:
            scales[i] = _pointers(states[k + 1 :: per_item])
        k += 1 if code == _STORE_FP32 else 2
    columns += data + scales
    rows = array.array("q", bytes(8 * len(columns) * len(params)))
    for j, column in enumerate(columns):
        rows[j :: len(columns)] = array.array("q", column)
    first_block = array.array("q", itertools.accumulate((-(-n // BLOCK) for n in numels), initial=0))
    codes = (ctypes.c_int * max(len(storage), 1))(*storage)
    c = coefficients.contiguous()
    dtype = _PARAM_DTYPES[params[0].dtype] if params else 0
    bucket = (kernel.index, rows.buffer_info()[0], len(params), first_block.buffer_info()[0], c.data_ptr())
    layout = (len(storage), codes, dtype, flags, torch.get_num_threads())
    if kernel.item_coefficients is None:
        status = lib.hf_optim_step(*bucket, *layout)
    else:
        # the norm pass over the whole bucket, then the update pass: two parallel loops a step (per group of
        # ~1M elements instead, to find the group in cache again, measured no faster, and every extra parallel
        # region costs a barrier, which a busy machine stretches to milliseconds)
        per_param = _item_coefficients(lib, kernel, bucket, layout, c, numels, flags, norm)
        status = lib.hf_optim_step_items(*bucket, per_param.data_ptr(), per_param.shape[1], *layout)
    if status:
        raise RuntimeError(f"cpu_step: the kernel rejected rule {rule!r} with {len(storage)} buffers")


def _item_coefficients(lib: ctypes.CDLL, kernel: NativeKernel, bucket: tuple, layout: tuple, c: Tensor,
                       numels: list[int], flags: int, norm: NormFn | None) -> Tensor:
    """A layer-wise rule's per-parameter floats: its norm pass's sums made global norms, then the rule's math."""
    named = dict(zip(kernel.coefficients, c))
    sums = None
    if not flags & _PLAIN_FLAG:  # the plain step needs no norm
        sums = torch.empty(len(numels), 2, dtype=torch.float64)
        status = lib.hf_optim_norms(*bucket, *layout, sums.data_ptr())
        if status:
            raise RuntimeError(f"cpu_step: the norm pass failed (status {status})")
    return kernel.item_coefficients(named, sums, torch.tensor(numels, dtype=torch.float64), norm).contiguous()


def _pointers(tensors: Sequence[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


@torch.library.custom_op(
    "hf_optim::cpu_step", mutates_args=("params", "states", "kahans", "counters"), device_types="cpu"
)
def cpu_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Tensor],
    kahans: list[Tensor],
    coefficients: Tensor,
    rule: str,
    storage: list[int],
    flags: int,
    counters: list[Tensor],
) -> None:
    """``step`` as a torch operator: traceable (its fake does nothing) and version-counted."""
    step(params, grads, states, kahans, coefficients, rule, storage, flags, counters)


@cpu_step.register_fake
def _(params, grads, states, kahans, coefficients, rule, storage, flags, counters) -> None:
    return None


def flag_bits(rule: type[UpdateRule], flags: Mapping[str, object], kahan: bool) -> int:
    kernel = KERNELS[rule.name]
    bits = sum(bit for name, bit in kernel.flags.items() if flags.get(name))
    # LAMB's and LARS's biases and norms: the plain step, no trust ratio (the rules' own condition)
    if flags.get("exclude_bias_and_norm") and flags.get("param_ndim", 2) <= 1:  # type: ignore[operator]
        bits |= _PLAIN_FLAG
    return bits | (_KAHAN_FLAG if kahan else 0)


def vector_path() -> str:
    """Which quantizer the loaded build has: ``avx512``, ``avx2`` or ``portable`` (or why there is no build)."""
    lib = _library()
    if isinstance(lib, str):
        return f"none ({lib})"
    lib.hf_optim_vector_path.restype = ctypes.c_char_p
    return lib.hf_optim_vector_path().decode()
