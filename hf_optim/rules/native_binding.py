"""How a rule binds to its kernel in ``hf_optim/kernels/cpu_step*.c``: plain data, by name.

A rule that has a native CPU kernel declares it as a class attribute::

    native = NativeBinding(kernel="adamw", coefficients=("decay", "beta1", ...), flags=("maximize", "amsgrad"))

The names are the keys of the rule's ``coefficients`` (what the kernel reads) and of its ``flag_names``; the kernel
build generates a C header from every binding (``ADAMW_DECAY`` is the index of ``decay`` in the array the kernel
receives, ``FLAG_MAXIMIZE`` its bit), so C reads coefficients by name and no order is kept by hand twice. A rule
without a binding (``native = None``) has no native kernel and runs compiled or eagerly.

This module knows nothing of torch, devices or storage: it is the rule's declaration only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NativeBinding:
    """A rule's native kernel, by name.

    - ``kernel``: the C name of the rule's block function (``static void adamw(RULE_ARGS)``); a layer-wise rule also
      has ``<kernel>_norms``, its norm pass, and ``<KERNEL>_NORM_STREAMS`` / ``<KERNEL>_STORED_UPDATE_STREAMS``, what
      that pass and then the update pass read (``cpu_layerwise.h``).
    - ``coefficients``: the keys of ``rule.coefficients(...)`` the kernel reads, in the order native.py packs them
      (any order: the generated header names each position).
    - ``flags``: the rule's flags the kernel takes as bits (``FLAG_<NAME>`` in C).
    - ``folded_flags``: the rule's flags the kernel handles without a bit of its own (they change the coefficients,
      or select the plain step of a layer-wise rule); any other true flag means no native step.
    - ``layerwise``: for a rule with a norm pass, the name of the function in ``hf_optim.kernels.layerwise`` that
      turns the pass's sums into each parameter's floats; None for an elementwise rule.
    - ``per_parameter``: the names of those floats, in the order that function returns them (``ic`` in C).
    """

    kernel: str
    coefficients: tuple[str, ...]
    flags: tuple[str, ...] = ()
    folded_flags: tuple[str, ...] = ()
    layerwise: str | None = None
    per_parameter: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.kernel.isidentifier():
            raise ValueError(f"Invalid NativeBinding kernel: {self.kernel!r} (allowed: a C identifier)")
        for what, names in (("coefficients", self.coefficients), ("flags", self.flags),
                            ("folded_flags", self.folded_flags), ("per_parameter", self.per_parameter)):
            bad = [name for name in names if not name.isidentifier()]
            if bad:
                raise ValueError(f"Invalid NativeBinding {what}: {bad[0]!r} (allowed: identifiers)")
            if len(set(names)) != len(names):
                raise ValueError(f"Invalid NativeBinding {what}: {names!r} names one twice")
        if (self.layerwise is None) != (not self.per_parameter):
            raise ValueError("Invalid NativeBinding: layerwise and per_parameter go together (a norm pass's "
                             f"function and the floats it returns), got {self.layerwise!r} and {self.per_parameter!r}")
