"""The native kernel's cache (hf_optim.kernels.build): private, atomic, verified; every fault falls back cleanly.

Each case runs in a child process (a bad library could crash it; each process loads its library once),
with its own ``HF_OPTIM_CACHE`` and ``TMPDIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hf_optim.kernels import build, native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")

# steps AdamW with execution="auto" and checks it against torch.optim.AdamW; reports what the kernel cache did
_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch, hf_optim
    from hf_optim.kernels import native
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = native.library_error()
        p = torch.nn.Parameter(torch.linspace(-1, 1, 300)); p.grad = torch.linspace(0.5, -0.2, 300)
        opt = hf_optim.AdamW([p], lr=0.1, betas=(0.8, 0.9), weight_decay=0.1, execution=sys.argv[1])
        ref = torch.nn.Parameter(torch.linspace(-1, 1, 300)); ref.grad = torch.linspace(0.5, -0.2, 300)
        ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.8, 0.9), weight_decay=0.1)
        for _ in range(3):
            opt.step(); ref_opt.step()
    print(json.dumps({
        "error": error,
        "modes": sorted(set(opt._modes.values())),
        "correct": torch.allclose(p, ref, rtol=1e-5, atol=1e-6),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("hf_optim: the ")],
    }))
""")


def run_child(tmp_path: Path, cache: Path, execution: str = "auto", **env: str) -> dict:
    temp = tmp_path / "tmpdir"
    temp.mkdir(exist_ok=True)
    full_env = {**os.environ, "HF_OPTIM_CACHE": str(cache), "TMPDIR": str(temp), **env}
    out = subprocess.run([sys.executable, "-c", _CHILD, execution], env=full_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["stderr"] = out.stderr
    assert not list(temp.glob("hf_optim_kernels_*")), "a temporary kernel directory outlived its process"
    return report


def libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("cpu_step-*.so"))


def fake_compiler(tmp_path: Path, body: str) -> Path:
    """A compiler that answers --version and otherwise runs ``body`` with $out set to the -o target."""
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake-cc 1.0; exit 0; }\n"
                      "for arg; do out=$arg; done\n" + body + "\n")
    script.chmod(0o755)
    return script


def test_fresh_cache_is_private_and_holds_a_verified_library(tmp_path):
    cache = tmp_path / "a" / "cache"
    report = run_child(tmp_path, cache)
    assert report["error"] is None and report["modes"] == ["native"] and report["correct"], report
    assert report["warnings"] == []
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (library,) = libraries(cache)
    assert build.intact(library)
    assert sorted(p.name for p in cache.iterdir()) == [library.name, library.name + ".sha256"]  # no temporaries


def _planted_library(tmp_path: Path) -> Path:
    """A library that does nothing (and says so when loaded), under the name a real build would have."""
    source = tmp_path / "planted.c"
    source.write_text("#include <unistd.h>\n"
                      '__attribute__((constructor)) static void hi(void) { write(2, "PLANTED\\n", 8); }\n'
                      "int hf_optim_step(void) { return 0; }\n")
    out = tmp_path / "planted.so"
    subprocess.run([native.compiler(), "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out


def test_a_cache_others_can_write_is_never_loaded_from(tmp_path):
    cache = tmp_path / "cache"
    run_child(tmp_path, cache)  # a real build, for the name of the library
    (library,) = libraries(cache)
    planted = _planted_library(tmp_path).read_bytes()
    library.write_bytes(planted)  # planted by someone who can write there, with a matching digest
    library.with_name(library.name + ".sha256").write_text(hashlib.sha256(planted).hexdigest())
    for how, reason in (("world-writable", "writable by others (mode 777"),
                        ("group-writable", "writable by others (mode 770"), ("another-owner", "owned by uid 65534")):
        if how == "another-owner":
            cache.chmod(0o700)
            os.chown(cache, 65534, 65534)
        else:
            cache.chmod(0o777 if how == "world-writable" else 0o770)
        report = run_child(tmp_path, cache)
        assert "PLANTED" not in report["stderr"], how  # never loaded
        assert report["error"] is None and report["modes"] == ["native"] and report["correct"], report
        (warning,) = report["warnings"]
        assert "is not usable" in warning and "private temporary directory" in warning and reason in warning, warning


@pytest.mark.parametrize(("source", "reason"), [
    # every entry point "succeeds" and changes nothing
    ("int hf_optim_step(void) { return 0; }\nint hf_optim_step_items(void) { return 0; }\n"
     "int hf_optim_norms(void) { return 0; }\n", "failed its known-answer self-check"),
    ("int something_else(void) { return 0; }\n", "undefined symbol: hf_optim_step"),  # loads, has no kernel
], ids=["computes-nothing", "no-kernel"])
def test_a_wrong_library_is_rebuilt_once_then_never_steps(source, reason, tmp_path):
    nop = tmp_path / "nop.c"
    nop.write_text(source)
    cc = fake_compiler(tmp_path, f'exec gcc -shared -fPIC {nop} -o "$out"')
    cache = tmp_path / "cache"
    report = run_child(tmp_path, cache, CC=str(cc))
    assert reason in report["error"], report
    assert report["modes"] == ["eager"] and report["correct"], report  # auto fell back, and stepped right
    (warning,) = report["warnings"]  # one warning, after one rebuild
    assert "rebuilt once, still failing" in warning and "compiled or eagerly" in warning
    assert libraries(cache) == []  # the wrong library does not stay cached
    out = subprocess.run([sys.executable, "-c", _CHILD, "native"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_OPTIM_CACHE": str(cache), "CC": str(cc)})
    assert out.returncode != 0 and "Invalid execution: 'native'" in out.stderr and reason in out.stderr


def test_a_truncated_library_is_rebuilt_before_it_is_mapped(tmp_path):
    cache = tmp_path / "cache"
    run_child(tmp_path, cache)
    (library,) = libraries(cache)
    whole = library.read_bytes()
    for size in (len(whole) // 2, 0):  # a SIGBUS (or a dlopen error) if it were mapped
        library.write_bytes(whole[:size])
        report = run_child(tmp_path, cache)
        assert report["error"] is None and report["modes"] == ["native"] and report["correct"], report
        assert report["warnings"] == []
        assert library.read_bytes() == whole


def test_an_empty_library_is_a_build_error_and_never_cached(tmp_path):
    cache = tmp_path / "cache"
    report = run_child(tmp_path, cache, CC="/bin/true")
    assert "produced no shared library (0 bytes" in report["error"], report
    assert report["modes"] == ["eager"] and report["correct"]
    (warning,) = report["warnings"]
    assert "not used" in warning
    assert list(cache.iterdir()) == []
    report = run_child(tmp_path, cache)  # the real compiler then builds, nothing stale in the way
    assert report["error"] is None and report["modes"] == ["native"]


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("how", ["a-file", "read-only", "full"])
def test_an_unusable_cache_falls_back_to_a_private_temporary_directory_with_one_warning(how, tmp_path, mount_tmpfs):
    if how == "a-file":
        cache = tmp_path / "cache"
        cache.write_text("not a directory")
        reason = "cache"
    elif how == "read-only":
        cache = mount_tmpfs("ro", "ro,size=1M") / "cache"
        reason = "Read-only file system"
    else:
        root = mount_tmpfs("full", "size=1M")
        cache = root / "cache"
        cache.mkdir(mode=0o700)
        stat_ = os.statvfs(root)
        (root / "ballast").write_bytes(b"\1" * (stat_.f_bavail * stat_.f_frsize - 8192))
        reason = "no space left"
    report = run_child(tmp_path, cache)
    assert report["error"] is None and report["modes"] == ["native"] and report["correct"], report
    (warning,) = report["warnings"]
    assert "is not usable" in warning and reason in warning and "HF_OPTIM_CACHE" in warning, warning
    if how == "full":
        assert list(cache.iterdir()) == []  # the failed build left nothing behind


def test_a_build_killed_midway_leaves_nothing_for_long(tmp_path):
    # a compiler that writes half a library and hangs: the process is killed mid-build
    cache = tmp_path / "cache"
    cc = fake_compiler(tmp_path, 'printf "\\177ELFhalf" > "$out"; sleep 60')
    child = subprocess.Popen([sys.executable, "-c", _CHILD, "auto"], start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "HF_OPTIM_CACHE": str(cache), "CC": str(cc)})
    deadline = time.time() + 120
    while not (cache.is_dir() and any(p.name.endswith(".tmp") and p.stat().st_size for p in cache.iterdir())):
        assert time.time() < deadline and child.poll() is None, child.communicate()
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # the killed build's temporary ...
    old = cache / "tmpab12cd34.so"  # ... and one from a build before this module, long ago
    old.write_bytes(b"\1")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    report = run_child(tmp_path, cache)  # the next build removes both
    assert report["error"] is None and report["modes"] == ["native"]
    assert sorted(p.name for p in cache.iterdir()) == [libraries(cache)[0].name, libraries(cache)[0].name + ".sha256"]


def test_bad_native_flags_are_errors_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_OPTIM_NATIVE_FLAGS", '-O2 "-march')
    with pytest.raises(ValueError, match=r"Invalid HF_OPTIM_NATIVE_FLAGS='-O2 \"-march': No closing quotation"):
        build.env_flags()
    monkeypatch.setenv("HF_OPTIM_NATIVE_FLAGS", "-O2 extra.c")
    with pytest.raises(ValueError, match=r"Invalid HF_OPTIM_NATIVE_FLAGS='-O2 extra.c': 'extra.c' is not a flag"):
        build.env_flags()
    monkeypatch.setenv("HF_OPTIM_NATIVE_FLAGS", "-mno-avx512f  -O2")
    assert build.env_flags() == ("-mno-avx512f", "-O2")
    report = run_child(tmp_path, tmp_path / "cache", HF_OPTIM_NATIVE_FLAGS="-fno-such-flag-anywhere")
    assert "with HF_OPTIM_NATIVE_FLAGS='-fno-such-flag-anywhere'" in report["error"], report
    assert report["modes"] == ["eager"] and report["correct"]
