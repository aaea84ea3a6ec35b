"""The spill arena: one file per paged optimizer, holding every CPU-paged state.

Why one file: a file (and a file descriptor) per paged tensor runs into
``ulimit -n`` at a thousand tensors, so the arena keeps a single descriptor,
grows the file by reserving ranges (``posix_fallocate``) and maps each
parameter's range on its own (``mmap`` through libc: Python's ``mmap`` module
would ``dup`` the descriptor once per mapping).

Why nothing can be left behind: the file is opened with ``O_TMPFILE``, so it
never has a name; where the filesystem cannot do that it is created under a
name carrying the process id and unlinked at once, and every later arena in
that directory removes such files whose process is gone (the only window is a
kill between ``open`` and ``unlink``).

Why a full disk is an error and not a SIGBUS: every range is reserved on disk
before it is mapped, so writes into a mapping never need new space. A range
returns to the arena (its disk space released by punching a hole, so it reads
as zeros again) only when the last tensor viewing its mapping is gone.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import tempfile
import threading
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor

from ..util.pids import alive
from ..util.user_warnings import warn_user
from .budget import fs_type

PAGE = mmap.PAGESIZE
#: alignment of each tensor inside a range (a cache line; SIMD loads)
_ALIGN = 64
_PREFIX = "hf_optim_paged_"
_STALE = re.compile(rf"{_PREFIX}(\d+)_")
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FAILED = ctypes.c_void_p(-1).value
MADV_WILLNEED, MADV_DONTNEED = 3, 4
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and the pages fault in as they are touched
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed step temporaries otherwise)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class _File:
    """The arena's descriptor and free ranges; kept alive by the arena and by every live region."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.end = 0
        self.free: list[tuple[int, int]] = []  # (offset, size) of ranges no mapping uses, zeroed
        self.lock = threading.RLock()  # re-entrant: a region may be released by GC inside allocate
        weakref.finalize(self, os.close, fd).atexit = False

    def release(self, address: int, offset: int, size: int) -> None:
        _libc.munmap(address, size)
        # punch a hole: the disk space is freed and the range reads as zeros, ready for reuse
        if _libc.fallocate(self.fd, _FALLOC_PUNCH_HOLE, offset, size) == 0:
            with self.lock:
                self.free.append((offset, size))


class Region:
    """One mapped range of the arena file; ``tensor(offset, like)`` views it.

    The mapping is unmapped when the region and every tensor viewing it are gone.
    """

    def __init__(self, file: _File, offset: int, size: int, address: int) -> None:
        self.size = size
        self.address = address
        # a ctypes array subclass (weak-referenceable) over the mapping: torch.frombuffer keeps it alive
        self._buffer = type("MappedRange", (ctypes.c_ubyte * size,), {}).from_address(address)
        # never at exit: tensors may still be read by other exit handlers
        weakref.finalize(self._buffer, file.release, address, offset, size).atexit = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._bytes = torch.frombuffer(self._buffer, dtype=torch.uint8)

    def tensor(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        return self._bytes[offset : offset + nbytes].view(dtype).view(shape)

    def advise(self, advice: int) -> None:
        _libc.madvise(self.address, self.size, advice)


class SpillArena:
    """The spill file of one optimizer in ``directory``: ``allocate(nbytes)`` maps a zeroed, reserved range."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._file: _File | None = None
        self._warned_tmpfs = False

    def allocate(self, nbytes: int) -> Region:
        """A zero-filled mapped range of at least ``nbytes``; OSError (nothing changed) if there is no space."""
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        if self._file is None:
            try:
                self._file = _File(open_spill_file(self.directory))
            except OSError as err:
                raise OSError(
                    err.errno, f"hf_optim: cannot create the spill file for paged optimizer state in "
                    f"{self.directory!r} ({err.strerror}); pass paged_dir= a writable directory on a disk"
                ) from None
        file = self._file
        with file.lock:
            reuse = next((i for i, (_, free) in enumerate(file.free) if free >= size), None)
            offset = file.free[reuse][0] if reuse is not None else file.end
            try:
                os.posix_fallocate(file.fd, offset, size)  # reserve the disk now: a full disk errors here, not SIGBUS
            except OSError as err:
                raise OSError(
                    err.errno, f"hf_optim: cannot reserve {size} bytes for paged optimizer state in "
                    f"{self.directory!r} ({err.strerror}); pass paged_dir= a directory with space"
                ) from None
            address = _libc.mmap(None, size, _PROT_RW, mmap.MAP_SHARED, file.fd, offset)
            if address in (None, _MAP_FAILED):
                code = ctypes.get_errno()
                raise OSError(code, f"hf_optim: cannot map paged optimizer state ({os.strerror(code)})")
            if reuse is not None:  # only now that nothing can fail: take the range
                start, free = file.free.pop(reuse)
                if free > size:
                    file.free.append((start + size, free - size))
            else:
                file.end = offset + size
        return Region(file, offset, size, address)

    def map_tensors(self, tensors: Mapping[str, Tensor], fresh: bool) -> tuple[Region, dict[str, Tensor]]:
        """One range holding a tensor like each of ``tensors`` (aligned): zeros (``fresh``: ``tensors`` may be
        on the meta device) or copies, whose pages are then let go until they are next used."""
        if not self._warned_tmpfs and fs_type(os.path.realpath(self.directory)) in ("tmpfs", "ramfs"):
            self._warned_tmpfs = True
            warn_user(
                f"hf_optim: paged_dir {self.directory!r} is in memory ({fs_type(self.directory)}): "
                "paged states will still use RAM; pass paged_dir= (or set TMPDIR to) a disk directory.",
                RuntimeWarning,
            )
        offsets, size = [], 0
        for t in tensors.values():
            offsets.append(size)
            size += -(-t.nbytes // _ALIGN) * _ALIGN
        region = self.allocate(size)  # zero-filled: a fresh state needs no write at all
        moved = {}
        for (key, t), offset in zip(tensors.items(), offsets, strict=True):
            moved[key] = region.tensor(offset, t.shape, t.dtype)
            if not fresh:
                moved[key].copy_(t)
        if not fresh:
            region.advise(MADV_DONTNEED)  # written: its pages may leave the process until the next update
        return region, moved

    @property
    def file_descriptor(self) -> int | None:
        return None if self._file is None else self._file.fd


def open_spill_file(directory: str) -> int:
    """A read-write file in ``directory`` that has no name (or loses it at once), for this process only."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    remove_stale_spill_files(directory)
    fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}_", suffix=".bin", dir=directory)
    os.unlink(path)
    return fd


def remove_stale_spill_files(directory: str) -> list[str]:
    """Remove this user's named spill files whose process has ended (a kill between create and unlink)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _STALE.match(name)
        if match is None or alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed

