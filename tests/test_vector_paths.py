"""Every vector path of the native kernel that this machine can build: AVX-512, AVX2 and portable C (x86), aarch64.

- the quantizer of each path against the exact nearest code on its whole input range (every 97th fp32 code
  unit, 4099th under qemu, and the floats around every level and midpoint: benchmarks/quantizer_paths.py);
  the aarch64 builds (NEON, SVE) run through qemu-user where ``aarch64-linux-gnu-gcc`` and ``qemu-aarch64``
  are installed (``make cross-tools``; skipped otherwise);
- the AVX2 and portable builds (``HF_OPTIM_NATIVE_FLAGS=-mno-avx512f``, ``-mno-avx512f -mno-avx2``) run the
  native tests that compare 8-bit state, bf16 parameters and the layer-wise rules with the eager step.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quantizer_paths  # noqa: E402

from hf_optim.kernels import native  # noqa: E402

pytestmark = pytest.mark.skipif(native.library_error() is not None, reason=f"{native.library_error()}")

PATHS = {name: spec for name, *spec in quantizer_paths.paths()}
X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU = quantizer_paths._cpu_flags()


@pytest.mark.parametrize("name", ["default", "avx2", "portable", "aarch64 neon", "aarch64 sve"])
def test_quantizer_of_each_path_is_the_exact_nearest_code(name, tmp_path):
    if name not in PATHS:
        pytest.skip(f"{name}: not buildable or runnable here (aarch64 needs gcc-aarch64-linux-gnu and qemu-user)")
    cc, flags, runner = PATHS[name]
    passed, text = quantizer_paths.check(name, cc, flags, runner, 4099 if runner else 97, tmp_path)
    assert passed, text
    assert text.count("mismatches 0") == 4, text  # both maps, whole and ragged blocks


HAS_AVX512 = {"avx512f", "avx512bw", "avx512dq"} <= CPU  # what cpu_step.c's AVX-512 path needs
HAS_AVX2 = {"avx2", "fma"} <= CPU
EXPECTED = {"": "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "portable",
            "-mno-avx512f": "avx2", "-mno-avx512f -mno-avx2": "portable"}


@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2"])
def test_reduced_builds_match_the_eager_step(flags, tmp_path):
    if not X86 or not (HAS_AVX512 if flags == "-mno-avx512f" else HAS_AVX2):
        pytest.skip("this build is the default one here (covered by test_native.py)")
    env = {**os.environ, "HF_OPTIM_CACHE": str(tmp_path / "cache"), "HF_OPTIM_NATIVE_FLAGS": flags,
           "HF_HUB_OFFLINE": "1"}
    path = subprocess.run([sys.executable, "-c", "from hf_optim.kernels import native; print(native.vector_path())"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    assert path.stdout.strip() == EXPECTED[flags], path.stderr[-2000:]
    # 8-bit state (the quantizer in every rule's loop), bf16 parameters, the layer-wise kernels
    selection = ("8bit_state_is_bit_identical or kernel_quantizer or (bf16 and AdamW and 8bit) "
                 "or (layerwise_step and 8bit) or lars_8bit")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_native.py",
         "tests/test_native_layerwise.py", "-k", selection],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-4000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]


def test_the_default_build_reports_its_vector_path():
    expected = EXPECTED[""] if X86 else "portable"
    if os.environ.get("HF_OPTIM_NATIVE_FLAGS"):
        pytest.skip("HF_OPTIM_NATIVE_FLAGS changes the default build")
    assert native.vector_path() == expected


def test_cross_tools_are_found_where_installed():
    # the aarch64 checks run wherever both tools exist (not silently skipped there)
    if shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64") and X86:
        assert "aarch64 neon" in PATHS and "aarch64 sve" in PATHS
    else:
        pytest.skip("no aarch64 cross compiler and qemu-aarch64 here")
