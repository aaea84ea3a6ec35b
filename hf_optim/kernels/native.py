"""The native CPU step: ``cpu_step.c``, built once with the system C compiler.

``execution="native"`` (and ``"auto"`` on CPU, where it applies) steps a bucket
of parameters with one call into ``cpu_step.c``: decode -> rule -> encode per
block of 256 elements, all blocks of all parameters in one OpenMP loop. The
kernel covers the rules in ``KERNELS`` (AdamW, Lion, SGD, Adan, Ranger, and the
layer-wise LAMB, LARS and StableAdamW: a norm pass, then the update) with fp32
or 8-bit state and fp32 or bf16 parameters; anything else runs compiled or
eagerly. ``KERNELS`` is built from the built-in rules' ``native`` bindings
(``hf_optim.rules.native_binding``): each names the coefficients its kernel
reads and the flags it takes, and the build generates ``hf_optim_coefficients.h``
from them, so C reads ``c[ADAMW_EPS]``, never a position kept by hand. Where
the compiler targets AVX-512 or AVX2 (+FMA) the quantizer runs on vectors;
elsewhere (aarch64) its plain C loop, which the compiler vectorizes. The C
source is split by concern: ``cpu_step.c`` (blocks, loops, entry points) and
the headers ``cpu_quantize.h``, ``cpu_rules.h``, ``cpu_layerwise.h``.

The shared library is built on first use with ``-O3 -march=native`` (under a
second) and cached under ``$HF_OPTIM_CACHE`` (default ``~/.cache/hf_optim``)
by a hash of the sources (the generated header too), flags, compiler and CPU, so it matches the machine it
runs on; it is loaded with ctypes and links the OpenMP runtime torch already
loaded. ``hf_optim.kernels.build`` keeps that cache private, builds
atomically and verifies what it loads; a library is also checked against
``torch.optim.AdamW`` once per process before it steps anything (``_self_check``).
``$HF_OPTIM_NATIVE_FLAGS`` adds compiler flags (e.g. ``-mno-avx512f``
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
import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..rules.base import Buffer, UpdateRule
from ..state.base import StateCodec
from ..state.blockwise import BLOCK, BlockwiseCodec
from ..state.dense import DenseCodec
from .bindings import (  # noqa: F401 (re-exported: native.KERNELS, native.flag_bits, ... are this module's API)
    _KAHAN_FLAG,
    _PLAIN_FLAG,
    ENGINE_FLAGS,
    FLAG_BITS,
    HEADER,
    KERNELS,
    NativeKernel,
    _flag_bits,
    _kernels,
    coefficient_header,
    flag_bits,
)
from .build import cache_dir, compiler  # noqa: F401 (this module's API)
from .layerwise import NormFn
from .library import (  # noqa: F401 (re-exported: native.SOURCE, native.build_flags, ... are this module's API)
    FLAGS,
    SOURCE,
    SOURCES,
    X86_FLAGS,
    _library,
    build_flags,
    driver_flags,
    library_error,
    vector_path,
)

_STORE_FP32, _STORE_SIGNED_8BIT, _STORE_UNSIGNED_8BIT = 0, 1, 2
_PARAM_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_BUFFERS = 4  # cpu_step.c's MAX_BUFFERS


def storage_code(buffer: Buffer, codec: StateCodec) -> int | None:
    """How ``cpu_step.c`` stores this buffer, or None if it cannot."""
    if isinstance(codec, DenseCodec) and codec.dtype == torch.float32:
        return _STORE_FP32
    if isinstance(codec, BlockwiseCodec) and codec.block == BLOCK:  # cpu_step.c's blocks are BLOCK elements
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
    library: ctypes.CDLL | None = None,
    *,
    checked: bool = False,
) -> None:
    """One step of ``rule`` for every parameter, in place (the body of ``torch.ops.hf_optim.cpu_step``).

    ``states`` holds each parameter's buffers in rule order, item after item:
    one fp32 tensor per fp32 buffer, codes then block scales per 8-bit one.
    ``kahans`` is empty or one compensation buffer per (bf16) parameter;
    ``counters`` is empty or one fp32 scalar step count per parameter, which the
    kernel advances by one. Every tensor is checked (``item_unsupported``: dtype, size,
    contiguity, alignment, device) and a bad one is a ``ValueError``, never a crash;
    ``checked=True`` skips that per-tensor pass for a caller that has just run
    ``item_unsupported`` on every parameter of this call (the step plan's native backend).
    A layer-wise rule (LAMB, LARS, StableAdamW) takes its global norms through ``norm`` (the
    rule's: an FSDP2 shard's all-reduces), None for the local norm. ``library``: the self-check's,
    before the process uses it.
    """
    KernelCall(params, grads, states, kahans, rule, storage, flags, counters, norm, library, checked=checked).run(
        coefficients)


class KernelCall:
    """One call into ``cpu_step.c`` with its item rows (the C ``item_t`` array), block offsets and layout built.

    ``step`` builds one and runs it. The native bucket cache (``hf_optim.buckets``) keeps one across steps, since
    building the rows is most of a small tensor's step: it rewrites only the parameter and gradient columns each
    step (``refresh``), and must itself make sure every other tensor is still the one (same memory, same size)
    that the rows point into: the kernel trusts every pointer.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[Tensor],
        kahans: Sequence[Tensor],
        rule: str,
        storage: Sequence[int],
        flags: int,
        counters: Sequence[Tensor] = (),
        norm: NormFn | None = None,
        library: ctypes.CDLL | None = None,
        *,
        checked: bool = False,
    ) -> None:
        lib = _library() if library is None else library
        if isinstance(lib, str):
            raise RuntimeError(f"hf_optim native kernel unavailable: {lib}")
        kernel = KERNELS[rule]
        if len(storage) > _MAX_BUFFERS:
            raise ValueError(f"cpu_step: at most {_MAX_BUFFERS} state buffers, got {len(storage)}")
        per_item = sum(1 if code == _STORE_FP32 else 2 for code in storage)
        if (len(states) != per_item * len(params) or len(grads) != len(params)
                or len(kahans) not in (0, len(params)) or len(counters) not in (0, len(params))):
            raise ValueError("cpu_step: params, grads, states, kahans and counters do not line up")
        if any(p.dtype != params[0].dtype for p in params):
            raise ValueError("cpu_step: one call takes parameters of one dtype")
        # the kernel trusts every pointer and size: each tensor is checked here, so a bad one is an error, never a
        # crash
        for i, (p, g) in enumerate(zip(params, grads) if not checked else ()):
            why = item_unsupported(
                p, g, states[i * per_item : (i + 1) * per_item], kahans[i] if kahans else None,
                counters[i] if counters else None, storage,
            )
            if why:
                raise ValueError(f"cpu_step: parameter {i}: {why}")
        self.rule, self.n_buffers = rule, len(storage)
        self._lib, self._kernel, self._flags, self._norm = lib, kernel, flags, norm
        self._numels = [p.numel() for p in params]
        self._numels_tensor: Tensor | None = None  # the layer-wise rules' element counts, made once
        # cpu_step.c's item_t, one row per parameter: numel, param, grad, kahan, counter, state[MAX_BUFFERS],
        # absmax[MAX_BUFFERS]; filled a column at a time (one pass over the tensors each: per-tensor Python is
        # most of this call's cost for many small parameters)
        none = [0] * len(params)
        columns = [self._numels, _pointers(params), _pointers(grads), _pointers(kahans) or none,
                   _pointers(counters) or none]
        data, scales = [none] * _MAX_BUFFERS, [none] * _MAX_BUFFERS
        k = 0
        for i, code in enumerate(storage):
            data[i] = _pointers(states[k::per_item])
            if code != _STORE_FP32:
                scales[i] = _pointers(states[k + 1 :: per_item])
            k += 1 if code == _STORE_FP32 else 2
        columns += data + scales
        self._width = len(columns)
        self._rows = array.array("q", bytes(8 * self._width * len(params)))
        for j, column in enumerate(columns):
            self._rows[j :: self._width] = array.array("q", column)
        self._first_block = array.array(
            "q", itertools.accumulate((-(-n // BLOCK) for n in self._numels), initial=0))
        self._codes = (ctypes.c_int * max(len(storage), 1))(*storage)
        self._dtype = _PARAM_DTYPES[params[0].dtype] if params else 0

    def refresh(self, param_pointers: array.array, grad_pointers: array.array) -> None:
        """New addresses for the parameters and gradients (``array("q")``, one per row, in row order)."""
        self._rows[1 :: self._width] = param_pointers
        self._rows[2 :: self._width] = grad_pointers

    def run(self, coefficients: Tensor) -> None:
        """The step: ``coefficients`` are the rule's, fp32, in ``KERNELS[rule].coefficients`` order."""
        kernel = self._kernel
        if coefficients.dtype != torch.float32 or coefficients.numel() != len(kernel.coefficients):
            raise ValueError(f"cpu_step: {self.rule} takes {len(kernel.coefficients)} fp32 coefficients "
                             f"({', '.join(kernel.coefficients)}), got {coefficients.numel()} {coefficients.dtype}")
        c = coefficients.contiguous()
        bucket = (kernel.index, self._rows.buffer_info()[0], len(self._numels), self._first_block.buffer_info()[0],
                  c.data_ptr())
        layout = (self.n_buffers, self._codes, self._dtype, self._flags, torch.get_num_threads())
        if kernel.item_coefficients is None:
            status = self._lib.hf_optim_step(*bucket, *layout)
        else:
            # the norm pass over the whole bucket, then the update pass: two parallel loops a step (per group of
            # ~1M elements instead, to find the group in cache again, measured no faster, and every extra
            # parallel region costs a barrier, which a busy machine stretches to milliseconds)
            if self._numels_tensor is None:
                self._numels_tensor = torch.tensor(self._numels, dtype=torch.float64)
            per_param = _item_coefficients(self._lib, kernel, bucket, layout, c, self._numels_tensor, self._flags,
                                           self._norm)
            status = self._lib.hf_optim_step_items(*bucket, per_param.data_ptr(), per_param.shape[1], *layout)
        if status:
            raise RuntimeError(f"cpu_step: the kernel rejected rule {self.rule!r} with {self.n_buffers} buffers")


#: the dtype each storage code's tensors must have: element buffer, then block scales (8-bit only)
_STORAGE_DTYPES = {
    _STORE_FP32: (torch.float32,),
    _STORE_SIGNED_8BIT: (torch.int8, torch.float32),
    _STORE_UNSIGNED_8BIT: (torch.uint8, torch.float32),
}


def item_unsupported(
    p: Tensor, g: Tensor, states: Sequence[Tensor], kahan: Tensor | None, counter: Tensor | None,
    storage: Sequence[int],
) -> str | None:
    """Why the kernel must not receive this parameter's tensors, or None when it may.

    ``cpu_step.c`` reads and writes raw memory: every tensor must be a dense CPU tensor of the
    dtype and element count its role implies (state buffers: one element per parameter element,
    block scales one per block of 256), aligned to its element size. ``states`` are this
    parameter's buffers in rule order (codes then block scales for an 8-bit one).
    (Called for every parameter every step: kept to cheap attribute reads.)
    """
    numel = p.numel()
    dtype = p.dtype
    if dtype not in _PARAM_DTYPES:
        return f"parameter dtype {dtype} (allowed: float32, bfloat16)"
    if not dense_cpu(p, dtype, numel):
        return f"the parameter is not a contiguous, aligned CPU tensor of {numel} elements"
    if not dense_cpu(g, dtype, numel):
        return f"the gradient ({g.dtype}, {g.numel()} elements) is not a contiguous, aligned CPU {dtype} tensor " \
               f"of {numel} elements"
    blocks = -(-numel // BLOCK)
    k = 0
    for index, code in enumerate(storage):
        dtypes = _STORAGE_DTYPES.get(code)
        if dtypes is None:
            return f"unknown storage code {code}"
        if k + len(dtypes) > len(states):
            return "fewer state tensors than its storage needs"
        t = states[k]
        if not dense_cpu(t, dtypes[0], numel):
            return f"state buffer {index} is {t.dtype} x {t.numel()}, the kernel needs a contiguous, aligned " \
                   f"CPU {dtypes[0]} x {numel}"
        if len(dtypes) == 2 and not dense_cpu(states[k + 1], torch.float32, blocks):
            t = states[k + 1]
            return f"the block scales of state buffer {index} are {t.dtype} x {t.numel()}, the kernel needs a " \
                   f"contiguous, aligned CPU float32 x {blocks}"
        k += len(dtypes)
    if k != len(states):
        return "more state tensors than its storage needs"
    if kahan is not None and not dense_cpu(kahan, dtype, numel):
        return f"the Kahan compensation is {kahan.dtype} x {kahan.numel()}, the kernel needs {dtype} x {numel}"
    if counter is not None and not dense_cpu(counter, torch.float32, 1):
        return "the step counter is not a CPU float32 scalar"
    return None


def dense_cpu(t: Tensor, dtype: torch.dtype, numel: int) -> bool:
    """``t`` is a contiguous CPU tensor of ``dtype`` and ``numel`` elements, aligned to its element size."""
    return (t.dtype == dtype and t.numel() == numel and t.is_cpu and t.is_contiguous()
            and t.data_ptr() % t.element_size() == 0)


def _item_coefficients(lib: ctypes.CDLL, kernel: NativeKernel, bucket: tuple, layout: tuple, c: Tensor,
                       numels: Tensor, flags: int, norm: NormFn | None) -> Tensor:
    """A layer-wise rule's per-parameter floats: its norm pass's sums made global norms, then the rule's math."""
    named = dict(zip(kernel.coefficients, c))
    sums = None
    if not flags & _PLAIN_FLAG:  # the plain step needs no norm
        sums = torch.empty(len(numels), 2, dtype=torch.float64)
        status = lib.hf_optim_norms(*bucket, *layout, sums.data_ptr())
        if status:
            raise RuntimeError(f"cpu_step: the norm pass failed (status {status})")
    out = kernel.item_coefficients(named, sums, numels, norm).contiguous()
    if out.shape != (len(numels), len(kernel.per_parameter)):  # the binding names each column the C side reads
        raise RuntimeError(f"cpu_step: {kernel.binding.layerwise} returned {tuple(out.shape)} per-parameter floats, "
                           f"the binding names {len(kernel.per_parameter)} ({', '.join(kernel.per_parameter)})")
    return out


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
