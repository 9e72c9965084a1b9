"""The page cache: whether a tensor's bytes are in it, and reading them past it.

A merge reads every input byte once. When the inputs are already in the page cache (a
model just downloaded or merged, the small models of the book), the fastest read is no
read at all: `pearl_edu.reading.ModelReader.map` shows the cached pages in place. When
they are not (a 7B pair read from a cold disk, larger than the memory that could keep
it), going through the cache costs more than it gives: every page is allocated, filled,
mapped, unmapped and later reclaimed again, and on the benchmark machine a cold 7B merge
spent about half its CPU time on that (the book's performance appendix). So the engine
asks, tensor by tensor, whether the bytes are cached (`cached_share`, by ``mincore(2)``,
which reads nothing), and reads a tensor that is not with ``O_DIRECT`` (`DirectReads`):
from the disk straight into a reused buffer, leaving the page cache, and whatever else it
holds, as it was.

Both are Linux's. Elsewhere, or where a file system refuses ``O_DIRECT`` (tmpfs), every
tensor counts as cached and is read as before; the bytes read are the same either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

# Reads and writes past the page cache: Linux's O_DIRECT (None elsewhere). Its transfers
# start and end on this boundary, in the file and in memory.
O_DIRECT: int | None = getattr(os, "O_DIRECT", None) if sys.platform.startswith("linux") else None
DIRECT_ALIGNMENT = 4096
# A buffer for a direct read needs this much room beyond the tensor's bytes: the shift
# that aligns its start, and the blocks the tensor's first and last bytes share.
DIRECT_SLACK = 3 * DIRECT_ALIGNMENT


def _libc() -> ctypes.CDLL | None:
    if O_DIRECT is None or not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    return None


LIBC = _libc()
PAGE = mmap.PAGESIZE
_FAILED = ctypes.c_void_p(-1).value
# mincore's bytes: bit 0 says the page is resident, the other bits are reserved.
_LOW_BIT = bytes(b & 1 for b in range(256))


def cached_share(fd: int, offset: int, nbytes: int) -> float:
    """The share of bytes ``offset`` to ``offset + nbytes`` of ``fd`` in the page cache.

    By ``mincore(2)`` over a map of the range that is never touched, so nothing is read
    and the cache is left as it was. 1.0 where it cannot tell (not Linux, an empty range).
    """
    if LIBC is None or nbytes <= 0:
        return 1.0
    start = offset - offset % PAGE
    length = offset + nbytes - start
    address = LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, _FAILED):
        return 1.0
    try:
        pages = (length + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        if LIBC.mincore(address, length, vector) != 0:
            return 1.0
        return bytes(vector).translate(_LOW_BIT).count(1) / pages
    finally:
        LIBC.munmap(address, length)


class DirectReads:
    """Positioned reads past the page cache (``O_DIRECT``), one descriptor per file.

    `read` fills a caller's buffer and returns the tensor's bytes inside it, or None when
    the file cannot be read that way (no ``O_DIRECT``, a file system that refuses it), in
    which case the caller reads it as usual.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int | None] = {}

    def read(
        self, file: Path, offset: int, nbytes: int, buffer: torch.Tensor
    ) -> torch.Tensor | None:
        """Bytes ``offset`` to ``offset + nbytes`` of ``file``, read into ``buffer`` (uint8,
        at least ``nbytes + DIRECT_SLACK`` long); None when ``O_DIRECT`` is not available."""
        fd = self._fd(file)
        if fd is None:
            return None
        start = offset - offset % DIRECT_ALIGNMENT
        end = offset + nbytes
        span = -(-(end - start) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        shift = -buffer.data_ptr() % DIRECT_ALIGNMENT
        region = buffer[shift : shift + span]
        view = memoryview(region.numpy())
        done = 0
        try:
            while start + done < end:  # the last block may be cut short by the file's end
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:  # a truncated file: the caller's usual read says so
                    return None
                done += got
        except OSError:  # refused after all (an alignment this file system does not take)
            self._fds[file] = None
            os.close(fd)
            return None
        return region[offset - start : offset - start + nbytes]

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def _fd(self, file: Path) -> int | None:
        if file not in self._fds:
            fd = None
            if O_DIRECT is not None:
                with contextlib.suppress(OSError):  # EINVAL: this file system has no O_DIRECT
                    fd = os.open(file, os.O_RDONLY | O_DIRECT)
            self._fds[file] = fd
        return self._fds[file]
