"""Compile the Triton step kernel for an H100/H200 (sm_90) without a GPU and check its PTX.

Run by tests/test_triton.py in a subprocess without TRITON_INTERPRET (the interpreter never compiles).
Each configuration is a rule with its buffers' storage as the engine would pick it; the checks are what
parity and speed on a GPU depend on and the interpreter cannot show: no fused multiply-add (eager rounds
every product), division correctly rounded (``div.rn``, never ``.approx``/``.full``), the update's square roots
``sqrt.rn``,
and 128-bit global loads on the unmasked path. (The quantizer's root guess may be approximate: its bias
covers any error under 2**-13.) Prints one line per kernel and "all kernels compiled".
"""

from __future__ import annotations

import os
import re
import sys
import time

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_optim.kernels import triton_rules  # noqa: E402
from hf_optim.kernels.triton_step import NUM_WARPS, ROWS, RULES  # noqa: E402

SIGNATURE = {"table": "*i64", "tensor_of_program": "*i32", "first_program": "*i32", "coef": "*fp32",
             "n_tensors": "i32", "sums": "*fp32", "scale_signed": "fp32", "scale_unsigned": "fp32",
             "top_signed": "fp32", "top_unsigned": "fp32"}
FP32, BF16, S8, U8 = 1, 2, 3, 4
#: (rule, storage per buffer, param dtype, kahan, F0, F1, pass[, grad dtype if not the param's])
CONFIGS = [
    ("adamw", (FP32, FP32), tl.float32, False, False, False, 0),
    ("adamw", (S8, U8), tl.bfloat16, True, False, False, 0),
    ("adamw", (BF16, BF16, BF16), tl.float32, False, True, True, 0),
    ("adamw", (S8, U8), tl.bfloat16, True, False, False, 0, tl.float32),
    ("lion", (S8,), tl.bfloat16, True, False, False, 0),
    ("lion", (BF16,), tl.float16, True, False, False, 0),
    ("sgd", (S8,), tl.float32, False, True, True, 0),
    ("adan", (S8, S8, U8, S8), tl.bfloat16, True, False, False, 0),
    ("ranger", (S8, U8, FP32), tl.bfloat16, True, False, False, 0),
    ("lamb", (S8, U8), tl.float32, False, True, False, 1),
    ("lamb", (S8, U8), tl.float32, False, True, False, 0),
    ("lars", (S8,), tl.bfloat16, True, False, True, 0),
    ("stable_adamw", (S8, U8), tl.float32, False, False, False, 1),
    ("stable_adamw", (S8, U8), tl.float32, False, False, False, 0),
]


def main() -> int:
    failures = []
    for rule, stores, pdt, kahan, f0, f1, pass_, *gdt in CONFIGS:
        stores = (*stores, *(0,) * (4 - len(stores)))
        gdt = gdt[0] if gdt else pdt
        constants = {"RULE": RULES[rule][0], "S0": stores[0], "S1": stores[1], "S2": stores[2], "S3": stores[3],
                     "PDT": pdt, "GDT": gdt, "KAHAN": kahan, "F0": f0, "F1": f1, "PASS": pass_, "ROWS": ROWS}
        source = ASTSource(fn=triton_rules.step_kernel, signature={**SIGNATURE, **{k: "constexpr" for k in constants}},
                           constexprs=constants)
        start = time.perf_counter()
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
        seconds = time.perf_counter() - start
        ptx = kernel.asm["ptx"]
        counts = {
            "fma": len(re.findall(r"\bfma\.rn\.f32", ptx)),
            "approx div": len(re.findall(r"\b(div|rcp)\.(approx|full)\.", ptx)),
            "sqrt.rn": len(re.findall(r"\bsqrt\.rn\.", ptx)),
            "sqrt.approx": len(re.findall(r"\bsqrt\.approx\.", ptx)),  # the quantizer's root guess only
            "v4 loads": len(re.findall(r"ld\.global[.\w]*\.v4\.", ptx)),
        }
        name = f"{rule} {stores} {pdt} (grads {gdt}) kahan={kahan} flags={f0},{f1} pass={pass_}"
        print(f"{name}: {seconds:.1f}s {counts}")
        needs_sqrt = rule not in ("lion", "sgd", "lars")  # the rules whose math has a square root
        if counts["fma"] or counts["approx div"] or (needs_sqrt and not counts["sqrt.rn"]) or not counts["v4 loads"]:
            failures.append(name)
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        return 1
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
