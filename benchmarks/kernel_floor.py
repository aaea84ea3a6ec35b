"""The native kernel's arithmetic floor: its step on data that never leaves cache, against fused AdamW.

    python benchmarks/kernel_floor.py            # ~1 min
    HF_OPTIM_NATIVE_FLAGS=-mno-avx512f python benchmarks/kernel_floor.py   # the AVX2 path on an AVX-512 CPU

Whether a step can beat torch's fused fp32 AdamW by moving fewer bytes depends on
whether it is memory-bound. A C driver, built with the kernel's own flags, calls
``hf_optim_step`` (a layer-wise rule: its norm pass ``hf_optim_norms``, then
``hf_optim_step_items``; 2 threads) on one parameter of

- ``cache``: 256K elements, under 1.3 MiB per thread with the state, so each
  thread's share stays in its core's L2 between steps: arithmetic only;
- ``16.8M``: the step-time benchmark's size, with a fused-AdamW-sized step of other
  data between timed steps (as ``step_time.py`` interleaves its candidates: a CPU
  whose last-level cache holds one 16.8M step would otherwise time that cache).

and, beside the kernels, ``read K``: a loop that only sums K fp32 streams of 16.8M
(4K bytes a parameter, 2 threads), the memory floor of a step that must read that
much. AdamW reads 4 streams (p, g, m, v); a layer-wise rule reads its norm pass's
streams and then its update pass's: LAMB over fp32 state 4 + 3 (its norm pass stores
the new moments, so the update reads p, m, v), StableAdamW 2 + 4 (g, v; then p, g,
m, v), LARS 2 + 3.

``torch.optim.AdamW(fused=True)`` steps 16.8M parameters (8 tensors) in the same
run; all are timed in turns, several rounds, medians. Prints ns per
parameter and the ratio to fused AdamW at 16.8M: a ``cache`` ratio above a
speed target means no memory layout can reach that target with this arithmetic,
and a ``read K`` ratio above it that no kernel reading that much can.
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

/* a step's coefficients, by the names the rules' native bindings give them (hf_optim_coefficients.h) */
static void coefficients(int rule, float *c) {
  memset(c, 0, 16 * sizeof(float));
  switch (rule) {
    case RULE_ADAMW:
      c[ADAMW_DECAY] = 0.99999f, c[ADAMW_BETA1] = 0.9f, c[ADAMW_ONE_MINUS_BETA1] = 0.1f, c[ADAMW_BETA2] = 0.999f;
      c[ADAMW_ONE_MINUS_BETA2] = 0.001f, c[ADAMW_STEP_SIZE] = 1e-3f, c[ADAMW_INV_BIAS_CORRECTION2_SQRT] = 1.0f;
      c[ADAMW_EPS] = 1e-8f;
      break;
    case RULE_LION:
      c[LION_LR] = 1e-4f, c[LION_DECAY] = 0.99999f, c[LION_BETA1] = 0.9f, c[LION_ONE_MINUS_BETA1] = 0.1f;
      c[LION_BETA2] = 0.99f, c[LION_ONE_MINUS_BETA2] = 0.01f;
      break;
    case RULE_LAMB:
      c[LAMB_LR] = 1e-3f, c[LAMB_WEIGHT_DECAY] = 0.01f, c[LAMB_BETA1] = 0.9f, c[LAMB_ONE_MINUS_BETA1] = 0.1f;
      c[LAMB_BETA2] = 0.999f, c[LAMB_ONE_MINUS_BETA2] = 0.001f, c[LAMB_INV_BIAS_CORRECTION1] = 1.0f;
      c[LAMB_INV_BIAS_CORRECTION2_SQRT] = 1.0f, c[LAMB_INV_BIAS_CORRECTION2] = 1.0f, c[LAMB_EPS] = 1e-6f;
      break;
    case RULE_LARS:
      c[LARS_LR] = 1e-3f, c[LARS_WEIGHT_DECAY] = 1e-4f, c[LARS_MOMENTUM] = 0.9f, c[LARS_ONE_MINUS_DAMPENING] = 1.0f;
      c[LARS_HAS_MOMENTUM] = 1.0f, c[LARS_TRUST_COEFFICIENT] = 1e-3f;
      break;
    default: /* RULE_STABLE_ADAMW */
      c[STABLE_ADAMW_BETA1] = 0.9f, c[STABLE_ADAMW_ONE_MINUS_BETA1] = 0.1f, c[STABLE_ADAMW_BETA2] = 0.99f;
      c[STABLE_ADAMW_ONE_MINUS_BETA2] = 0.01f, c[STABLE_ADAMW_INV_BIAS_CORRECTION1] = 1.0f;
      c[STABLE_ADAMW_INV_BIAS_CORRECTION2] = 1.0f, c[STABLE_ADAMW_INV_BIAS_CORRECTION2_SQRT] = 1.0f;
      c[STABLE_ADAMW_EPS] = 1e-8f, c[STABLE_ADAMW_EPS_SQ] = 1e-16f, c[STABLE_ADAMW_LR] = 1e-3f;
  }
}

/* one step: a layer-wise rule's norm pass, then the update pass (its per-parameter floats fixed: the Python
   between the passes is not what this measures) */
static void one_step(int rule, item_t *item, const int64_t *first_block, const float *c, int n_buffers,
                     const int *storage) {
  static const float per_item[2] = { 1e-3f, 1.0f };
  double sums[2];
  if (NORMS[rule]) {
    hf_optim_norms(rule, item, 1, first_block, c, n_buffers, storage, PARAM_FP32, 0, 2, sums);
    hf_optim_step_items(rule, item, 1, first_block, c, per_item, 2, n_buffers, storage, PARAM_FP32, 0, 2);
  } else {
    hf_optim_step(rule, item, 1, first_block, c, n_buffers, storage, PARAM_FP32, 0, 2);
  }
}

/* the memory floor: sum K fp32 streams of n elements (2 threads), the reads alone, all K at once a block at a time
   as a kernel reads them; returns the sum so that the loop is not removed */
static float read_streams(int k, float *const *streams, int64_t n) {
  float sum = 0.0f;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(2)
  for (int64_t b = 0; b < n; b += BLOCK) {
    for (int s = 0; s < k; ++s) {
      const float *restrict x = streams[s] + b;
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int i = 0; i < BLOCK; ++i) part += x[i];
      sum += part;
    }
  }
  return sum;
}

static float *filled(int64_t n, float scale) {
  float *x = aligned_alloc(64, n * 4);
  for (int64_t i = 0; i < n; ++i) x[i] = (rand() / (float)RAND_MAX - 0.5f) * scale;
  return x;
}

/* Between timed steps at 16.8M, the traffic of another optimizer's step of the same size (fused AdamW's: read 4
   streams, write 3), as step_time.py interleaves its candidates: on a CPU whose last-level cache holds a 16.8M
   step's data, a step timed back to back would measure that cache, not memory. */
static float *other[4];
static void other_step(int64_t n) {
  if (!other[0])
    for (int k = 0; k < 4; ++k) other[k] = filled(n, 1.0f);
  float *restrict p = other[0], *restrict g = other[1], *restrict m = other[2], *restrict v = other[3];
#pragma omp parallel for simd schedule(static) num_threads(2)
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i] * 0.9f + g[i] * 0.1f, vi = v[i] * 0.999f + g[i] * g[i] * 0.001f;
    p[i] -= mi / (sqrtf(vi) + 1e-8f) * 1e-3f, m[i] = mi, v[i] = vi;
  }
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

/* driver RULE EIGHT_BIT NUMEL REPS INTERLEAVE: mean ns per parameter over REPS steps, after 5 warm-up steps, with
   other_step between steps where INTERLEAVE is 1; RULE -K: the K-stream read floor instead */
int main(int argc, char **argv) {
  const int rule = atoi(argv[1]), eight_bit = atoi(argv[2]), reps = atoi(argv[4]), interleave = atoi(argv[5]);
  const int64_t n = atoll(argv[3]), blocks = (n + BLOCK - 1) / BLOCK;
  const int n_buffers = rule == RULE_LION || rule == RULE_LARS ? 1 : 2, streams = rule < 0 ? -rule : 0;
  if (argc != 6 || streams > 8 || n %% BLOCK) return 1;
  srand(1);
  float *p = filled(n, 1.0f), *g = filled(n, 1e-2f), step = 0.0f, c[16], *read[8], sink = 0.0f;
  for (int k = 0; k < streams; ++k) read[k] = filled(n, 1.0f);
  item_t item = { n, (int64_t)p, (int64_t)g, 0, (int64_t)&step, { 0 }, { 0 } };
  int storage[2];
  for (int k = 0; k < n_buffers && !streams; ++k) {
    item.state[k] = (int64_t)aligned_alloc(64, n * 4), item.absmax[k] = (int64_t)aligned_alloc(64, blocks * 4);
    memset((void *)item.state[k], 0, n * 4), memset((void *)item.absmax[k], 0, blocks * 4);
    /* LARS's one buffer is a signed momentum; every second buffer here is a second moment */
    storage[k] = eight_bit ? (k == 0 ? STORE_SIGNED_8BIT : STORE_UNSIGNED_8BIT) : STORE_FP32;
  }
  const int64_t first_block[2] = { 0, blocks };
  if (!streams) coefficients(rule, c);
  double total = 0.0;
  for (int r = -5; r < reps; ++r) {
    if (interleave) other_step(n);
    const double t0 = now_ns();
    if (streams)
      sink += read_streams(streams, read, n);
    else
      one_step(rule, &item, first_block, c, n_buffers, storage);
    if (r >= 0) total += now_ns() - t0;
  }
  printf("%%.6f\n", total / reps / n);
  return sink == 1234.5f;
}
"""

#: (label, rule, 8-bit state); rules by their index in the generated header
_INDEX = {name: kernel.index for name, kernel in native.KERNELS.items()}
KERNELS = [("adamw_8bit", _INDEX["adamw"], 1), ("lion_8bit", _INDEX["lion"], 1), ("adamw", _INDEX["adamw"], 0),
           ("lamb", _INDEX["lamb"], 0), ("lamb_8bit", _INDEX["lamb"], 1), ("stable_adamw", _INDEX["stable_adamw"], 0),
           ("lars", _INDEX["lars"], 0)]
SIZES = {"cache": (1 << 18, 2000), "16.8M": (1 << 24, 20)}  # elements, steps per timing
#: the read floors measured (fp32 streams at 16.8M), and each step's passes in streams read over fp32 state (what
#: cpu_layerwise.h's <RULE>_NORM_STREAMS and <RULE>_STORED_UPDATE_STREAMS name; AdamW's update reads all four)
STREAMS = (2, 3, 4)
PASSES = {"adamw": (4,), "lamb": (4, 3), "stable_adamw": (2, 4), "lars": (2, 3)}
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
                    out = subprocess.run([str(exe), str(rule), str(eight_bit), str(numel), str(reps),
                                          str(int(size != "cache"))], check=True, capture_output=True,
                                         text=True).stdout
                    times.setdefault(f"{label} native {size}", []).append(float(out))
            for k in STREAMS:
                numel, reps = SIZES["16.8M"]
                out = subprocess.run([str(exe), str(-k), "0", str(numel), str(reps), "1"], check=True,
                                     capture_output=True, text=True).stdout
                times.setdefault(f"read {k} 16.8M", []).append(float(out))
    base = statistics.median(times["fused AdamW 16.8M"])
    extra = os.environ.get("HF_OPTIM_NATIVE_FLAGS", "")
    built_with = f" (HF_OPTIM_NATIVE_FLAGS={extra!r})" if extra else ""
    print(f"native kernel vector path: {native.vector_path()}{built_with}; torch's CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'candidate (2 threads)':<28} {'ns/param':>9} {'x fused 16.8M':>14}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:<28} {median:9.3f} {median / base:14.2f}")
    for rule, passes in PASSES.items():  # a step's floor: the sum of its passes' read floors
        floor = sum(medians[f"read {k} 16.8M"] for k in passes)
        label = f"floor {rule} ({' + '.join(map(str, passes))})"
        print(f"{label:<28} {floor:9.3f} {floor / base:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
