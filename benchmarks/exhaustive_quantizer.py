"""Every fp32 code unit through the quantizer: the exact-nearest claim, checked, not sampled.

    python benchmarks/exhaustive_quantizer.py            # eager (torch) and native (C) quantizers, ~5 min

For each default map (signed square, unsigned fourth power), every fp32 ``u``
in [0, top] is quantized and compared with the nearest exact level ``c ** k``
(the count of float64 midpoints strictly below ``u``: ties go down):

- eager: ``CodeMap.nearest`` (the eager and compiled steps' arithmetic), in
  chunks of 2**24 values;
- native: ``cpu_step.c``'s ``encode`` built into a small C driver with the
  kernel's own flags, on whole blocks (the AVX-512 path where the CPU has it)
  and on ragged blocks (the portable C loop).

Prints the number of values and of mismatches per path; exits 1 on any mismatch.
The tests sample the same comparison (tests/test_blockwise.py, test_native.py).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_optim.kernels import native
from hf_optim.state.blockwise import EIGHT_BIT

DRIVER = r"""
#include "%(source)s"
#include <stdio.h>
static int exact(double u, const double *mid, int n) { int c = 0; while (c < n && mid[c] < u) ++c; return c; }
int main(void) {
  for (int is_signed = 1; is_signed >= 0; --is_signed) {
    const float top = is_signed ? SIGNED_TOP : UNSIGNED_TOP;
    const int k = is_signed ? 2 : 4, n = is_signed ? 127 : 255;
    double mid[255];
    for (int c = 0; c < n; ++c) {
      double a = c, b = c + 1;
      mid[c] = k == 2 ? (a * a + b * b) / 2 : (a * a * a * a + b * b * b * b) / 2;
    }
    float x[BLOCK] __attribute__((aligned(64)));
    uint8_t whole[BLOCK], ragged[BLOCK];
    long values = 0, bad_whole = 0, bad_ragged = 0;
    const uint32_t end = to_bits(top);
    for (uint64_t b0 = 0; b0 <= end; b0 += BLOCK) {
      for (int i = 0; i < BLOCK; ++i) x[i] = from_bits(b0 + i <= end ? (uint32_t)(b0 + i) : end);
      encode(BLOCK, x, top, whole, is_signed);              /* scale = top: u = x */
      encode(BLOCK - 1, x, top, ragged, is_signed);
      encode(1, x + BLOCK - 1, top, ragged + BLOCK - 1, is_signed);
      int c = exact(x[0], mid, n);
      for (int i = 0; i < BLOCK; ++i) {
        while (c < n && mid[c] < x[i]) ++c;  /* x ascends within a block */
        int w = is_signed ? (int8_t)whole[i] : whole[i], r = is_signed ? (int8_t)ragged[i] : ragged[i];
        bad_whole += w != c, bad_ragged += r != c;
      }
      values += BLOCK;
    }
    printf("native %%s: %%ld values, whole-block mismatches %%ld, ragged-block mismatches %%ld\n",
           is_signed ? "signed" : "unsigned", values, bad_whole, bad_ragged);
    if (bad_whole || bad_ragged) return 1;
  }
  return 0;
}
"""


def eager() -> int:
    bad_total = 0
    for cmap in (EIGHT_BIT.signed_map, EIGHT_BIT.unsigned_map):
        top = torch.tensor(cmap.top).view(torch.int32).item()
        codes = torch.arange(0, cmap.levels + 1, dtype=torch.float64)
        mid = (codes[:-1] ** cmap.power + codes[1:] ** cmap.power) / 2
        bad = 0
        for start in range(0, top + 1, 1 << 24):
            u = torch.arange(start, min(start + (1 << 24), top + 1), dtype=torch.int32).view(torch.float32)
            bad += (cmap.nearest(u).long() != torch.searchsorted(mid, u.double())).sum().item()
        print(f"eager {'signed' if cmap.signed else 'unsigned'}: {top + 1} values, mismatches {bad}", flush=True)
        bad_total += bad
    return bad_total


def kernel() -> int:
    cc = native.compiler()
    if cc is None:
        print("native: no C compiler, skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        driver, exe = Path(tmp) / "driver.c", Path(tmp) / "driver"
        driver.write_text(DRIVER % {"source": native.SOURCE})
        flags = native.driver_flags(Path(tmp))  # build flags and the generated header
        subprocess.run([cc, *flags, str(driver), "-o", str(exe), "-lm"], check=True)
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    sys.exit(1 if eager() + kernel() else 0)
