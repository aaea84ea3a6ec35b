"""The native kernel's arithmetic floor: its step on data that never leaves cache, against fused AdamW.

    python benchmarks/kernel_floor.py            # ~1 min
    HF_OPTIM_NATIVE_FLAGS=-mno-avx512f python benchmarks/kernel_floor.py   # the AVX2 path on an AVX-512 CPU

Whether a step can beat torch's fused fp32 AdamW by moving fewer bytes depends on
whether it is memory-bound. A C driver, built with the kernel's own flags, calls
``hf_optim_step`` (2 threads) on one parameter of

- ``cache``: 256K elements, under 1.3 MiB per thread with the state, so each
  thread's share stays in its core's L2 between steps: arithmetic only;
- ``16.8M``: the step-time benchmark's size.

``torch.optim.AdamW(fused=True)`` steps 16.8M parameters (8 tensors) in the same
run; the three are timed in turns, several rounds, medians. Prints ns per
parameter and the ratio to fused AdamW at 16.8M: a ``cache`` ratio above a
speed target means no memory layout can reach that target with this arithmetic.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_optim.kernels import native

DRIVER = r"""
#include "%(source)s"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
/* driver RULE EIGHT_BIT NUMEL REPS: mean ns per parameter over REPS steps, after 5 warm-up steps */
int main(int argc, char **argv) {
  const int rule = atoi(argv[1]), eight_bit = atoi(argv[2]), reps = atoi(argv[4]);
  const int64_t n = atoll(argv[3]), blocks = (n + BLOCK - 1) / BLOCK;
  const int n_buffers = rule == RULE_ADAMW ? 2 : 1;
  float *p = aligned_alloc(64, n * 4), *g = aligned_alloc(64, n * 4), step = 0.0f;
  srand(1);
  for (int64_t i = 0; i < n; ++i)
    p[i] = rand() / (float)RAND_MAX - 0.5f, g[i] = (rand() / (float)RAND_MAX - 0.5f) * 1e-2f;
  item_t item = { n, (int64_t)p, (int64_t)g, 0, (int64_t)&step, { 0 }, { 0 } };
  int storage[2];
  for (int k = 0; k < n_buffers; ++k) {
    item.state[k] = (int64_t)aligned_alloc(64, n * 4), item.absmax[k] = (int64_t)aligned_alloc(64, blocks * 4);
    memset((void *)item.state[k], 0, n * 4), memset((void *)item.absmax[k], 0, blocks * 4);
    storage[k] = eight_bit ? (k == 0 ? STORE_SIGNED_8BIT : STORE_UNSIGNED_8BIT) : STORE_FP32;
  }
  const int64_t first_block[2] = { 0, blocks };
  /* KERNELS order (native.py): AdamW decay, beta1, 1-beta1, beta2, 1-beta2, step_size, 1/sqrt(bc2), eps; Lion lr,
     decay, beta1, 1-beta1, beta2, 1-beta2 */
  const float adamw[8] = { 0.99999f, 0.9f, 0.1f, 0.999f, 0.001f, 1e-3f, 1.0f, 1e-8f };
  const float lion[6] = { 1e-4f, 0.99999f, 0.9f, 0.1f, 0.99f, 0.01f };
  const float *c = rule == RULE_ADAMW ? adamw : lion;
  for (int r = 0; r < 5; ++r) hf_optim_step(rule, &item, 1, first_block, c, n_buffers, storage, PARAM_FP32, 0, 2);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int r = 0; r < reps; ++r) hf_optim_step(rule, &item, 1, first_block, c, n_buffers, storage, PARAM_FP32, 0, 2);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%%.6f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / reps / n);
  return 0;
}
"""

#: (label, rule, 8-bit state)
KERNELS = [("adamw_8bit", 0, 1), ("lion_8bit", 1, 1), ("adamw", 0, 0)]
SIZES = {"cache": (1 << 18, 2000), "16.8M": (1 << 24, 20)}  # elements, steps per timing
ROUNDS = 5


def fused_adamw_ns(params: list[torch.Tensor], opt: torch.optim.Optimizer, steps: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps / sum(p.numel() for p in params) * 1e9


def main() -> int:
    cc = native.compiler()
    if cc is None:
        print("no C compiler: nothing to measure")
        return 1
    torch.set_num_threads(2)
    params = [torch.randn(1 << 21).requires_grad_() for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    fused_adamw_ns(params, fused, steps=3)
    times: dict[str, list[float]] = {"fused AdamW 16.8M": []}
    with tempfile.TemporaryDirectory() as tmp:
        driver, exe = Path(tmp) / "driver.c", Path(tmp) / "driver"
        driver.write_text(DRIVER % {"source": native.SOURCE})
        flags = native.driver_flags(Path(tmp))  # build flags and the generated header
        subprocess.run([cc, *flags, str(driver), "-o", str(exe), "-lm"], check=True)
        for _ in range(ROUNDS):
            times["fused AdamW 16.8M"].append(fused_adamw_ns(params, fused))
            for label, rule, eight_bit in KERNELS:
                for size, (numel, reps) in SIZES.items():
                    out = subprocess.run([str(exe), str(rule), str(eight_bit), str(numel), str(reps)], check=True,
                                         capture_output=True, text=True).stdout
                    times.setdefault(f"{label} native {size}", []).append(float(out))
    base = statistics.median(times["fused AdamW 16.8M"])
    extra = os.environ.get("HF_OPTIM_NATIVE_FLAGS", "")
    built_with = f" (HF_OPTIM_NATIVE_FLAGS={extra!r})" if extra else ""
    print(f"native kernel vector path: {native.vector_path()}{built_with}")
    print(f"{'candidate (2 threads)':<28} {'ns/param':>9} {'x fused 16.8M':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:9.3f} {median / base:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
