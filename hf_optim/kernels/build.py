"""Building, caching and loading the native kernel library, so that the cache can neither break nor hijack a step.

The library is compiled once per source, flags, compiler and CPU and kept in
``$HF_OPTIM_CACHE`` (default ``~/.cache/hf_optim``). What ``load`` guarantees:

- **Private**: the cache directory is created 0700 and checked as ssh and
  ccache check theirs: it must be a directory owned by this user and not
  group- or world-writable, and so must each library in it; anything else is
  never loaded. An unusable cache (someone else's, writable by others, a file,
  read-only, full) falls back to a private temporary directory with one warning.
- **Atomic**: a build goes to a temporary file named after the building
  process and is renamed into place only once it is a complete library; it is
  removed on any failure, and temporaries of processes that died mid-build
  (SIGKILL) are removed by the next build. An empty "library" (``CC=/bin/true``)
  is a build error, never cached.
- **Verified**: each library has a SHA-256 beside it, written by the build; a
  library that does not match (truncated, replaced) is rebuilt before it is
  ever mapped (a truncated one would SIGBUS the process). After loading, the
  caller's known-answer self-check runs once per process; a library that fails
  to load or to pass it is rebuilt once, and if it still fails the reason is
  returned (the step falls back to the next execution) with one clear warning.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..util.pids import alive
from ..util.user_warnings import warn_user

#: extra compiler flags for the native build (e.g. ``-mno-avx512f``)
FLAGS_VARIABLE = "HF_OPTIM_NATIVE_FLAGS"
#: where built libraries are kept
CACHE_VARIABLE = "HF_OPTIM_CACHE"
_TEMPORARY = re.compile(r"\.[\w.-]+-(\d+)-\w+\.tmp$")
#: what builds before this module left behind when killed (no building process recorded: by age)
_OLD_TEMPORARY = re.compile(r"tmp\w{8}\.so$")
_OLD_AGE_S = 600
_FREE_FOR_A_BUILD = 4 * 2**20


class CacheUnusable(Exception):
    """The cache directory cannot hold a library (its reason is the message)."""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "hf_optim")


def env_flags() -> tuple[str, ...]:
    """``$HF_OPTIM_NATIVE_FLAGS`` split as a shell would; ValueError naming the variable if it cannot be."""
    raw = os.environ.get(FLAGS_VARIABLE, "")
    try:
        flags = tuple(shlex.split(raw))
    except ValueError as err:
        raise ValueError(
            f"Invalid {FLAGS_VARIABLE}={raw!r}: {err} (allowed: compiler flags, quoted as in a shell)"
        ) from None
    bad = [flag for flag in flags if not flag.startswith("-")]
    if bad:
        raise ValueError(f"Invalid {FLAGS_VARIABLE}={raw!r}: {bad[0]!r} is not a flag (allowed: compiler flags "
                         "starting with '-', e.g. -mno-avx512f)")
    return flags


def private_directory(path: Path) -> Path:
    """``path`` as a directory only this user can write (created 0700); CacheUnusable saying why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(path)
    except OSError as err:
        raise CacheUnusable(f"cannot create {path}: {err.strerror or err}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CacheUnusable(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise CacheUnusable(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
    if info.st_mode & 0o022:
        raise CacheUnusable(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}; "
                            f"chmod go-w {path} to use it)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheUnusable(f"{path} is not writable")
    return path


def load(sources: Path | Sequence[Path], command: Sequence[str], identity: Sequence[str],
         configure: Callable[[ctypes.CDLL], None], check: Callable[[ctypes.CDLL], str | None],
         generated: Mapping[str, str] | None = None) -> ctypes.CDLL | str:
    """The library built from ``sources`` by ``command`` (which ``-o PATH`` completes), or why there is none.

    Every source's text, the ``generated`` headers' (file name -> text: written for the build into a private
    directory that ``-I`` puts on the include path), ``command`` and ``identity`` (e.g. the compiler's version,
    the CPU) name the cached file; the first source names it too. ``configure`` sets the loaded library's
    signatures (AttributeError: a symbol is missing) and ``check`` is the known-answer self-check (None when
    the library computes what it should).
    """
    sources = [sources] if isinstance(sources, Path) else list(sources)
    generated = dict(generated or {})
    texts = [path.read_text() for path in sources] + [f"{name}\0{text}" for name, text in sorted(generated.items())]
    digest = hashlib.sha256("\0".join([*texts, *command, *identity]).encode()).hexdigest()[:16]
    name = f"{sources[0].stem}-{digest}.so"
    build = functools.partial(_build_and_load, name=name, command=command, configure=configure, check=check,
                              generated=generated)
    try:
        return build(private_directory(cache_dir()))
    except CacheUnusable as err:
        reason = str(err)
    warn_user(f"hf_optim: the kernel cache {str(cache_dir())!r} is not usable ({reason}); building the native kernel "
              f"in a private temporary directory instead (set {CACHE_VARIABLE} to a directory of your own)",
              RuntimeWarning)
    try:
        return build(_temporary_directory())
    except CacheUnusable as err:
        return f"no usable kernel cache: {reason}; temporary directory: {err}"


def _build_and_load(directory: Path, name: str, command: Sequence[str], configure: Callable[[ctypes.CDLL], None],
                    check: Callable[[ctypes.CDLL], str | None], generated: Mapping[str, str]) -> ctypes.CDLL | str:
    target = directory / name
    remove_stale_temporaries(directory)
    why = ""
    for attempt in range(2):
        if not intact(target):
            _discard(target)
            failed = _build(directory, target, command, generated)
            if failed:
                warn_user(f"hf_optim: the native kernel is not used ({failed}): steps run compiled or eagerly "
                          "instead", RuntimeWarning)
                return failed
        try:
            lib = _open(target, fresh_name=attempt > 0)
            configure(lib)
        except (OSError, AttributeError) as err:
            why = f"loading {target} failed: {err}"
        else:
            wrong = check(lib)
            if wrong is None:
                return lib
            why = f"{target} failed its known-answer self-check: {wrong}"
        _discard(target)
    warn_user(f"hf_optim: the native kernel is not used ({why}; rebuilt once, still failing): steps run compiled "
              "or eagerly instead", RuntimeWarning)
    return why


def intact(library: Path) -> bool:
    """Whether ``library`` is this user's own, writable by no one else, and matches the SHA-256 of its build."""
    digest = _digest_path(library)
    try:
        for path in (library, digest):
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
                return False
        return digest.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False


def _build(directory: Path, target: Path, command: Sequence[str], generated: Mapping[str, str]) -> str | None:
    """Build ``target`` atomically: None when built, a reason string when the build failed."""
    includes = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-{os.getpid()}-", suffix=".tmp", dir=directory)
        os.close(fd)
        if generated:  # named like a build temporary: a killed build's is removed with the rest
            includes = tempfile.mkdtemp(prefix=f".{target.stem}-{os.getpid()}-", suffix="h.tmp", dir=directory)
            for header, text in generated.items():
                Path(includes, header).write_text(text)
    except OSError as err:
        raise CacheUnusable(f"cannot write in {directory}: {err.strerror or err}") from None
    try:
        extra = ["-I", includes] if includes else []
        done = subprocess.run([*command, *extra, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            if "No space left" in done.stderr or _free_bytes(directory) < _FREE_FOR_A_BUILD:
                raise CacheUnusable(f"no space left in {directory}")
            flags = os.environ.get(FLAGS_VARIABLE)
            extra = f" (with {FLAGS_VARIABLE}={flags!r})" if flags else ""
            return f"building {target.name}{extra} failed: {done.stderr.strip()[:500]}"
        data = Path(tmp).read_bytes()
        if not data.startswith(b"\x7fELF"):
            return f"{command[0]} produced no shared library ({len(data)} bytes, not ELF); nothing was cached"
        _write_atomically(_digest_path(target), hashlib.sha256(data).hexdigest() + "\n")
        os.replace(tmp, target)
    except OSError as err:
        raise CacheUnusable(f"cannot write in {directory}: {err.strerror or err}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if includes:
            shutil.rmtree(includes, ignore_errors=True)
    return None


def _open(target: Path, fresh_name: bool) -> ctypes.CDLL:
    if not fresh_name:
        return ctypes.CDLL(str(target))
    # the dynamic loader hands back the first load of a path: a rebuilt library is opened by another name
    link = target.with_name(f".{target.stem}-{os.getpid()}-load.tmp")
    if os.path.lexists(link):
        os.unlink(link)
    os.link(target, link)
    try:
        return ctypes.CDLL(str(link))
    finally:
        os.unlink(link)


def _discard(target: Path) -> None:
    for path in (target, _digest_path(target)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise CacheUnusable(f"cannot replace {path}: {err.strerror or err}") from None


def remove_stale_temporaries(directory: Path) -> None:
    """Remove build temporaries whose building process has ended (killed mid-build)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        try:
            stale = not alive(int(match.group(1))) if match else bool(_OLD_TEMPORARY.match(name)) and (
                time.time() - os.lstat(directory / name).st_mtime > _OLD_AGE_S)
            if stale:
                path = directory / name
                if path.is_dir() and not path.is_symlink():  # a killed build's generated headers
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        except OSError:
            pass


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _free_bytes(directory: Path) -> int:
    try:
        info = os.statvfs(directory)
    except OSError:
        return 0
    return info.f_bavail * info.f_frsize


_temporary: list[Path] = []


def _temporary_directory() -> Path:
    """This process's private temporary directory (mode 0700), removed at exit."""
    if not _temporary:
        try:
            path = Path(tempfile.mkdtemp(prefix="hf_optim_kernels_"))
        except OSError as err:
            raise CacheUnusable(f"cannot create a temporary directory: {err.strerror or err}") from None
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _temporary.append(path)
    return private_directory(_temporary[0])
