"""The native quantizer of each vector path (avx512, avx2, portable, aarch64) against the exact nearest code.

    python benchmarks/quantizer_paths.py                  # every path this machine can build and run, ~1 min
    python benchmarks/quantizer_paths.py --stride 1       # every fp32 code unit (slow under qemu)

A C driver includes ``cpu_step.c`` and quantizes, per map (signed square, unsigned
fourth power): every ``stride``-th fp32 bit pattern in [0, top] (stride 1 is every
value), the 9 floats around every level and every midpoint, their negatives
(signed), NaN, +-Inf and -0, on whole blocks (the vector path) and on ragged blocks
(the plain C loop). Each code is compared with the count of float64 midpoints
strictly below ``|x|`` (ties go down; NaN and Inf -> 0, ``blockwise.NAN_INF_POLICY``).

Paths: the build's own flags; ``-mno-avx512f`` (AVX2) and ``-mno-avx2 -mno-avx512f``
(portable) where the CPU has more; and, where ``aarch64-linux-gnu-gcc`` and
``qemu-aarch64`` are installed (Debian: ``gcc-aarch64-linux-gnu``, ``qemu-user``), an
aarch64 build (NEON, then SVE) run through qemu. Prints one line per path and map;
exits 1 on any mismatch. ``tests/test_vector_paths.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_optim.kernels import native

DRIVER = r"""
#include "%(source)s"
#include <stdio.h>
#include <stdlib.h>

static double mid[255];
static int n_codes;

/* the exact nearest code of |x| (NaN and Inf -> 0: blockwise.NAN_INF_POLICY), signed where asked */
static int exact(float x, int is_signed) {
  double u = fabs((double)x);
  if (u != u || u == INFINITY) return 0;
  int c = 0;
  while (c < n_codes && mid[c] < u) ++c;
  return is_signed && signbit(x) ? -c : c;
}

static long bad_whole, bad_ragged, values;
static float batch[BLOCK] __attribute__((aligned(64)));
static int filled;

/* quantize a full batch (scale = top, so u = |x|) both ways and compare */
static void flush(int is_signed, float top) {
  if (!filled) return;
  for (int i = filled; i < BLOCK; ++i) batch[i] = 0.0f;
  uint8_t whole[BLOCK], ragged[BLOCK];
  encode(BLOCK, batch, top, whole, is_signed);
  encode(BLOCK - 1, batch, top, ragged, is_signed);
  encode(1, batch + BLOCK - 1, top, ragged + BLOCK - 1, is_signed);
  for (int i = 0; i < filled; ++i) {
    int want = exact(batch[i], is_signed);
    int w = is_signed ? (int8_t)whole[i] : whole[i], r = is_signed ? (int8_t)ragged[i] : ragged[i];
    if (w != want && bad_whole < 3) printf("  whole: x=%%a code %%d, want %%d\n", batch[i], w, want);
    bad_whole += w != want, bad_ragged += r != want;
  }
  values += filled;
  filled = 0;
}

static void add(float x, int is_signed, float top) {
  batch[filled++] = x;
  if (filled == BLOCK) flush(is_signed, top);
}

int main(int argc, char **argv) {
  const uint32_t stride = argc > 1 ? (uint32_t)atol(argv[1]) : 1;
  int failed = 0;
  for (int is_signed = 1; is_signed >= 0; --is_signed) {
    const float top = is_signed ? SIGNED_TOP : UNSIGNED_TOP;
    const int k = is_signed ? 2 : 4;
    n_codes = is_signed ? 127 : 255;
    for (int c = 0; c < n_codes; ++c) {
      double a = pow(c, k), b = pow(c + 1, k);
      mid[c] = (a + b) / 2;
    }
    bad_whole = bad_ragged = values = 0;
    const uint32_t end = to_bits(top);
    for (uint64_t bits = 0; bits <= end; bits += stride) add(from_bits((uint32_t)bits), is_signed, top);
    for (int c = 0; c <= n_codes; ++c) { /* around every level and every midpoint */
      float centers[2] = { (float)pow(c, k), c < n_codes ? (float)mid[c] : top };
      for (int j = 0; j < 2; ++j)
        for (int d = -4; d <= 4; ++d) {
          float x = from_bits(to_bits(centers[j]) + d);
          if (x <= top) add(x, is_signed, top);
          if (is_signed && x <= top) add(-x, is_signed, top);
        }
    }
    const float special[] = { NAN, -NAN, INFINITY, -INFINITY, -0.0f, 0.0f, top, -top };
    for (int i = 0; i < 8; ++i) add(special[i], is_signed, top);
    flush(is_signed, top);
    printf("%%s %%s: %%ld values, whole-block mismatches %%ld, ragged-block mismatches %%ld\n", hf_optim_vector_path(),
           is_signed ? "signed" : "unsigned", values, bad_whole, bad_ragged);
    failed |= bad_whole || bad_ragged;
  }
  return failed;
}
"""

X86_PATHS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma")}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()}


def paths() -> list[tuple[str, list[str], list[str], list[str]]]:
    """(name, compiler command, flags, runner prefix) for every path buildable and runnable here."""
    cc = native.compiler()
    out = []
    base = [f for f in native.build_flags() if f not in ("-shared", "-fPIC")]
    if cc is not None:
        out.append(("default", [cc], base, []))
        if platform.machine().lower() in ("x86_64", "amd64"):
            cpu = _cpu_flags()
            if "avx512f" in cpu:
                out.append(("avx2", [cc], [*base, "-mno-avx512f"], []))
            if "avx2" in cpu:
                out.append(("portable", [cc], [*base, "-mno-avx512f", "-mno-avx2"], []))
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cross and qemu and platform.machine().lower() not in ("aarch64", "arm64"):
        arm = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-static"]
        out.append(("aarch64 neon", [cross], [*arm, "-march=armv8.2-a"], [qemu]))
        sve = [qemu, "-cpu", "max,sve-default-vector-length=32"]  # 256-bit SVE vectors
        out.append(("aarch64 sve", [cross], [*arm, "-march=armv8.2-a+sve"], sve))
    return out


def check(name: str, cc: list[str], flags: list[str], runner: list[str], stride: int, tmp: Path) -> tuple[bool, str]:
    """Build the driver for one path and run it; (passed, what it printed)."""
    driver, exe = tmp / "driver.c", tmp / f"driver-{name.replace(' ', '-')}"
    driver.write_text(DRIVER % {"source": native.SOURCE})
    (tmp / native.HEADER).write_text(native.coefficient_header())  # the generated header cpu_step.c includes
    build = subprocess.run([*cc, *flags, "-I", str(tmp), str(driver), "-o", str(exe), "-lm"], capture_output=True,
                           text=True)
    if build.returncode:
        return False, f"{name}: build failed: {build.stderr[-2000:]}"
    run = subprocess.run([*runner, str(exe), str(stride)], capture_output=True, text=True)
    return run.returncode == 0, f"{name}:\n{run.stdout}{run.stderr[-2000:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=0, help="fp32 bit-pattern stride (default 97 native, 4099 qemu)")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, cc, flags, runner in paths():
            stride = args.stride or (4099 if runner else 97)
            passed, text = check(name, cc, flags, runner, stride, Path(tmp))
            print(text, end="", flush=True)
            ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
