"""The native kernel's binding by name: each rule's ``native`` declaration is the only place its coefficient order
and flag bits live; the C side reads them from a header generated at build time.

- the generated header names every coefficient, per-parameter float and flag as ``native.KERNELS`` packs them;
- the C sources read no coefficient by position;
- a binding whose coefficients are declared in another order builds another library that steps exactly as the
  default one (the C code follows the names, not an order);
- a rule without a binding has no native kernel; a malformed binding is a clear error;
- the generated text is part of the build's hash (a changed header is a new library, never a stale one).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_optim.kernels import build, native
from hf_optim.rules import BUILTIN_RULES
from hf_optim.rules.base import UpdateRule
from hf_optim.rules.native_binding import NativeBinding

KERNEL_DIR = Path(native.__file__).parent


def _defines(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (\w+) (\d+)$", text, re.M)}


def test_the_header_names_every_coefficient_and_flag_as_the_kernels_pack_them():
    defines = _defines(native.coefficient_header())
    bound = [rule for rule in BUILTIN_RULES if rule.native is not None]
    assert sorted(native.KERNELS) == sorted(rule.name for rule in bound)
    for rule in bound:
        kernel = native.KERNELS[rule.name]
        prefix = rule.native.kernel.upper()
        assert defines[f"RULE_{prefix}"] == kernel.index
        assert defines[f"{prefix}_N_COEFFICIENTS"] == len(rule.native.coefficients)
        for i, name in enumerate(rule.native.coefficients):
            assert defines[f"{prefix}_{name.upper()}"] == i
        for i, name in enumerate(rule.native.per_parameter):
            assert defines[f"{prefix}_ITEM_{name.upper()}"] == i
        for name in rule.native.flags:
            assert defines[f"FLAG_{name.upper()}"] == native.FLAG_BITS[name] == kernel.flags[name]
    bits = list(native.FLAG_BITS.values())
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)  # one distinct bit each


def test_the_c_sources_read_no_coefficient_by_position():
    for path in native.SOURCES:
        text = path.read_text()
        assert not re.search(r"\bi?c\[\d+\]", text), f"{path.name} reads a coefficient by position"
        assert not re.search(r"enum \{[^}]*FLAG_", text), f"{path.name} defines flag bits by hand"


def test_every_source_ships_with_the_package():
    pyproject = (KERNEL_DIR.parents[1] / "pyproject.toml").read_text()
    assert '"kernels/*.c", "kernels/*.h"' in pyproject
    assert {p.suffix for p in native.SOURCES} == {".c", ".h"}
    assert all(p.parent == KERNEL_DIR for p in native.SOURCES)


# a child with every built-in binding's coefficients declared in reverse order: a library of its own, stepping
# exactly as the default build does
_REORDERED = textwrap.dedent("""
    import dataclasses, json, sys
    import torch
    import hf_optim
    from hf_optim.kernels import native
    from hf_optim.rules import BUILTIN_RULES
    if sys.argv[1] == "reversed":  # before the library is built: as if the rule modules declared this order
        for rule in BUILTIN_RULES:
            if rule.native is not None:
                rule.native = dataclasses.replace(rule.native, coefficients=rule.native.coefficients[::-1])
        kernels, bits = native._kernels(BUILTIN_RULES)
        native.KERNELS.clear(), native.KERNELS.update(kernels), native.FLAG_BITS.update(bits)
    assert native.library_error() is None, native.library_error()
    out = {"adamw_order": list(native.KERNELS["adamw"].coefficients)}
    cases = [(hf_optim.AdamW, {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
             (hf_optim.Lion, {"lr": 3e-4, "betas": (0.85, 0.97), "weight_decay": 0.2}),
             (hf_optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.01, "maximize": True}),
             (hf_optim.Adan, {"lr": 2e-3, "weight_decay": 0.05}),
             (hf_optim.Ranger, {"lr": 2e-3, "weight_decay": 0.05}),
             (hf_optim.LAMB, {"lr": 2e-3, "weight_decay": 0.05}),
             (hf_optim.LARS, {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.8, "nesterov": True}),
             (hf_optim.StableAdamW, {"lr": 2e-3, "weight_decay": 0.05})]
    for cls, hp in cases:
        for precision in ("fp32", "8bit"):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((300, 257), (77,))]
            eight_bit = {"min_8bit_size": 0} if precision == "8bit" else {}
            opt = cls(params, execution="native", state_precision=precision, **eight_bit, **hp)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            out[f"{cls.__name__} {precision}"] = [p.detach().double().sum().item() for p in params] + [
                t.double().sum().item() for p in params for k, t in sorted(opt.state[p].items()) if k != "step"]
    print(json.dumps(out))
""")


def test_a_binding_declared_in_another_order_steps_exactly_as_before(tmp_path):
    results = {}
    for order in ("declared", "reversed"):
        env = {**os.environ, "HF_OPTIM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", _REORDERED, order], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        results[order] = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    declared, reversed_ = results["declared"], results["reversed"]
    assert declared.pop("adamw_order") == reversed_.pop("adamw_order")[::-1]
    assert len(list((tmp_path / "cache").glob("cpu_step-*.so"))) == 2  # two headers: two libraries
    assert declared == reversed_


def test_a_rule_without_a_binding_has_no_native_kernel():
    class Plain(UpdateRule):
        name = "plain_for_test"
        defaults = {"lr": 1e-3}

    assert Plain.native is None
    assert native.rule_unsupported(Plain) == "no native kernel for plain_for_test"
    kernels, _ = native._kernels([*BUILTIN_RULES, Plain])
    assert "plain_for_test" not in kernels and set(kernels) == set(native.KERNELS)


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel": "adam w", "coefficients": ("lr",)}, "Invalid NativeBinding kernel: 'adam w'"),
    ({"kernel": "k", "coefficients": ("lr", "lr")}, "Invalid NativeBinding coefficients: .* names one twice"),
    ({"kernel": "k", "coefficients": ("1lr",)}, "Invalid NativeBinding coefficients: '1lr'"),
    ({"kernel": "k", "coefficients": ("lr",), "layerwise": "lamb"}, "layerwise and per_parameter go together"),
    ({"kernel": "k", "coefficients": ("lr",), "per_parameter": ("scale",)}, "layerwise and per_parameter go together"),
])
def test_a_malformed_binding_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NativeBinding(**kwargs)


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_the_generated_header_is_part_of_the_build_hash(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "cache"))
    source = tmp_path / "probe.c"
    source.write_text('#include "probe_value.h"\nint probe(void) { return PROBE_VALUE; }\n')
    command = [native.compiler(), "-O1", "-shared", "-fPIC", str(source)]

    def configure(lib: ctypes.CDLL) -> None:
        lib.probe.restype = ctypes.c_int

    values = []
    for value in (7, 11, 7):
        lib = build.load([source], command, ["test"], configure, lambda lib: None,
                         generated={"probe_value.h": f"#define PROBE_VALUE {value}\n"})
        assert not isinstance(lib, str), lib
        values.append(lib.probe())
    assert values == [7, 11, 7]
    assert len(list((tmp_path / "cache").glob("probe-*.so"))) == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]  # headers' directory removed
