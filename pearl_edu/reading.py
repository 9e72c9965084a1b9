"""A model folder, read lazily: its header first, then one tensor at a time.

A model folder is described by its **header**: every tensor's name, shape, dtype and where
its bytes lie, read from the files' own headers (`pearl_edu.headers`, a few kilobytes)
without touching a single weight. `ModelReader` then gives one tensor at a time, in one of
two ways, so the memory a merge holds is a few tensors, never a model or a shard:

- `ModelReader.map` maps the bytes of that one tensor from the page cache, with no copy;
  the map is undone when the tensor is freed. (A map of a whole file would be simpler,
  but every page it touches stays in the process's resident memory until the end, and a
  merge touches every page.)
- `ModelReader.read` copies the tensor with positioned reads (``os.preadv``) into a
  buffer the caller can reuse: the GPU path uses it with pinned buffers.

The fast paths are Linux's (``os.preadv``, ``madvise``). Each is looked up once, when this
module is imported; where one is missing (macOS before 11 lacks ``os.preadv``, Windows has
none of them) a portable equivalent takes its place, and the tensors read are the same.
Every file is opened in binary mode (``os.O_BINARY`` where it exists), without which
Windows would translate line endings inside the weights.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

import torch

from pearl_edu.errors import ModelError
from pearl_edu.headers import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorMeta,
    bin_metas,
    files_in_index,
    load_bin,
    os_reason,
    read_config,
    safetensors_metas,
)
from pearl_edu.page_cache import DirectReads, cached_share

# Pages of a memory map stay resident once touched; a pickle checkpoint is mapped afresh
# after this many bytes are read from it, which releases them.
BIN_REMAP_BYTES = 64 * 1024**2

# --------------------------------------------------------------------------------------
# What this system offers, looked up once (tests hide features before importing this)
# --------------------------------------------------------------------------------------

# Binary mode for os.open: 0 except on Windows, whose default (text) mode would turn every
# byte 10 written into 13 10, and stop reading at the first byte 26.
O_BINARY: int = getattr(os, "O_BINARY", 0)
# Advice for a mapped range; None where the mmap module has no madvise (Windows).
# posix_fadvise(2) and its "read this soon"; None where os has no posix_fadvise (macOS,
# Windows).
fadvise = getattr(os, "posix_fadvise", None)
FADV_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None) if fadvise else None
MADV_WILLNEED: int | None = (
    getattr(mmap, "MADV_WILLNEED", None) if hasattr(mmap.mmap, "madvise") else None
)
# madvise(2): map a range's pages now (Linux >= 5.14); Python's mmap module lacks the name,
# and on other systems the number would mean another thing or nothing.
MADV_POPULATE_READ: int | None = (
    22 if MADV_WILLNEED is not None and sys.platform.startswith("linux") else None
)

# Positioned reads, best first: into the caller's memory (preadv), through a bytes object
# (pread, macOS before 11), or by seek and read (Windows), one reader at a time.
_SEEK_LOCK = threading.Lock()


def read_at_preadv(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from byte ``offset`` of ``fd``; the count read (0 at the end)."""
    return os.preadv(fd, [view], offset)


def read_at_pread(fd: int, view: memoryview, offset: int) -> int:
    """`read_at_preadv` where only ``os.pread`` exists: one copy more."""
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def read_at_seek(fd: int, view: memoryview, offset: int) -> int:
    """`read_at_preadv` without positioned reads: seek, then read into ``view``.

    A file position is shared by every thread using the descriptor, so the seek and the
    read happen under a lock.
    """
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        with io.FileIO(fd, "rb", closefd=False) as file:
            return file.readinto(view)


if hasattr(os, "preadv"):
    read_at = read_at_preadv
elif hasattr(os, "pread"):
    read_at = read_at_pread
else:
    read_at = read_at_seek


# --------------------------------------------------------------------------------------
# A model folder's header: what it contains, without reading weights
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelHeader:
    """A model folder's tensors (name -> `TensorMeta`) and its parsed ``config.json``."""

    path: Path
    tensors: dict[str, TensorMeta]
    config: dict
    format: Literal["safetensors", "bin"]

    @property
    def files(self) -> list[Path]:
        """The weight files, in the order their first tensor appears."""
        return list(dict.fromkeys(meta.file for meta in self.tensors.values()))

    @property
    def total_bytes(self) -> int:
        """Bytes of weight data (what a full read of the model costs)."""
        return sum(meta.nbytes for meta in self.tensors.values())


def read_header(model_dir: str | Path) -> ModelHeader:
    """Describe every tensor of a model folder from its headers alone (no weights read).

    Safetensors is preferred when a folder has both formats, as transformers does.
    Raises `ModelError` naming the folder or file when something is missing or damaged.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist (or is not a folder)")
    config = read_config(model_dir)
    fmt, files = find_weight_files(model_dir)
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        metas = safetensors_metas(file) if fmt == "safetensors" else bin_metas(file)
        for meta in metas:
            if meta.name in tensors:
                raise ModelError(
                    f"{file}: tensor {meta.name} is also in {tensors[meta.name].file.name}"
                )
            tensors[meta.name] = meta
    return ModelHeader(path=model_dir, tensors=tensors, config=config, format=fmt)


def find_weight_files(model_dir: Path) -> tuple[Literal["safetensors", "bin"], list[Path]]:
    """The weight files of a folder, found the way transformers finds them.

    An index json lists the shards; otherwise a single ``model.safetensors`` or
    ``pytorch_model.bin``. Other ``.bin`` files (``training_args.bin``) are not weights.
    """
    for fmt, index_name, single_name in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
        ("bin", BIN_INDEX, BIN_SINGLE),
    ):
        index_path = model_dir / index_name
        if index_path.is_file():
            return fmt, files_in_index(index_path)
        if (model_dir / single_name).is_file():
            return fmt, [model_dir / single_name]
    raise ModelError(
        f"{model_dir}: no weights found; expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE} or {BIN_INDEX}"
    )


# --------------------------------------------------------------------------------------
# Reading one tensor at a time
# --------------------------------------------------------------------------------------


class Closing:
    """``with reader:`` closes the reader (its ``close``) on leaving the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelReader(Closing):
    """Reads tensors of one model on demand, into a caller's reusable buffer if given.

    >>> reader = ModelReader(read_header("my-model"))
    >>> w = reader.read("model.norm.weight")

    Safe to use from one background thread while another thread uses the tensors it has
    already returned (positioned reads share no file position).
    """

    def __init__(self, header: ModelHeader) -> None:
        self.header = header
        self._fds: dict[Path, int] = {}
        self._bin_states: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_bytes_read: dict[Path, int] = {}
        self._cached: dict[str, bool] = {}
        self._direct = DirectReads()

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype and shape.

        ``out`` is an optional uint8 buffer of at least the tensor's size; when given, the
        result is a view into it (valid until the buffer is reused).
        """
        meta = self.header.tensors.get(name)
        if meta is None:
            raise ModelError(f"{self.header.path}: has no tensor named {name}")
        if out is None:
            out = torch.empty(meta.nbytes, dtype=torch.uint8)
        if out.dtype != torch.uint8 or out.numel() < meta.nbytes or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 buffer of >= {meta.nbytes} bytes")
        raw = out[: meta.nbytes]
        if meta.offset is not None:
            self._pread_into(meta, raw)
        else:
            self._copy_from_bin(meta, raw)
        return raw.view(meta.dtype).view(meta.shape)

    def can_map(self, name: str) -> bool:
        """Whether `map` can show tensor ``name`` in place (safetensors, aligned)."""
        meta = self.header.tensors.get(name)
        return (
            meta is not None
            and meta.offset is not None
            and meta.nbytes > 0
            and meta.offset % meta.dtype.itemsize == 0
        )

    def cached(self, name: str) -> bool:
        """Whether most of tensor ``name``'s bytes are in the page cache (`cached_share`).

        Asked once per tensor and remembered, so that the engine's reader, which asks before
        it prefetches a tensor and again when it reads it, gets the same answer both times.
        """
        if name not in self._cached:
            meta = self.header.tensors[name]
            if meta.offset is None:
                self._cached[name] = True
            else:
                share = cached_share(self._fd(meta.file), meta.offset, meta.nbytes)
                self._cached[name] = share >= 0.5
        return self._cached[name]

    def read_past_cache(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` read from the disk past the page cache (``O_DIRECT``) into ``out``.

        ``out`` is a uint8 buffer of at least the tensor's size plus `DIRECT_SLACK`; the
        result is a view into it. Where the file cannot be read that way, the usual `read`.
        """
        meta = self.header.tensors[name]
        raw = None
        if meta.offset is not None:
            raw = self._direct.read(meta.file, meta.offset, meta.nbytes, out)
        if raw is None:
            return self.read(name, out=out)
        return raw.view(meta.dtype).view(meta.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor ``name``'s bytes into the page cache, now.

        Advice only (``POSIX_FADV_WILLNEED``, where the system has it): nothing waits for
        the disk, and nothing is read into this process's memory. The engine's reader asks
        for the tensor after the one it reads, so that the disk is never idle between two.
        """
        meta = self.header.tensors.get(name)
        if meta is None or meta.offset is None or fadvise is None or FADV_WILLNEED is None:
            return
        with contextlib.suppress(OSError):  # advice only
            fadvise(self._fd(meta.file), meta.offset, meta.nbytes, FADV_WILLNEED)

    def map(self, name: str, *, populate: bool = False) -> torch.Tensor:
        """Tensor ``name`` read in place from the page cache, through a map of its bytes only.

        No copy is made: the tensor's memory is the file's cached pages, mapped
        copy-on-write (nothing writes to them). The map covers this one tensor and is undone
        when the last view of the tensor is freed, so the pages it holds in the process's
        resident memory are those of the tensors in use, never the whole file. The kernel
        is asked to start reading the bytes at once (``MADV_WILLNEED``), so mapping the
        next tensor ahead of its use also reads it ahead. ``populate=True`` also maps every
        page now (``MADV_POPULATE_READ``), which the engine's reader thread does so that
        the math does not stop at a page fault every 64 KiB. Use `can_map` first.
        """
        meta = self.header.tensors[name]
        fd = self._fd(meta.file)
        end = meta.offset + meta.nbytes
        if os.fstat(fd).st_size < end:
            raise ModelError(
                f"{meta.file}: truncated, tensor {meta.name} needs bytes up to {end}, "
                f"file ends at {os.fstat(fd).st_size}"
            )
        start = meta.offset - meta.offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(fd, end - start, offset=start, access=mmap.ACCESS_COPY)
        if MADV_WILLNEED is not None:
            with contextlib.suppress(OSError):  # advice only
                region.madvise(MADV_WILLNEED)
        if populate and MADV_POPULATE_READ is not None:
            with contextlib.suppress(OSError):  # Linux >= 5.14; elsewhere pages fault in
                region.madvise(MADV_POPULATE_READ)
        raw = torch.frombuffer(
            region, dtype=torch.uint8, count=meta.nbytes, offset=meta.offset - start
        )
        return raw.view(meta.dtype).view(meta.shape)

    def close(self) -> None:
        """Close the open files and drop the memory maps of pickle checkpoints."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._direct.close()
        self._bin_states.clear()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | O_BINARY)
            except OSError as err:
                raise ModelError(f"{file}: cannot open weight file ({os_reason(err)})") from None
        return fd

    def _pread_into(self, meta: TensorMeta, raw: torch.Tensor) -> None:
        fd = self._fd(meta.file)
        view = memoryview(raw.numpy())
        done = 0
        while done < meta.nbytes:  # a positioned read may return fewer bytes than asked
            try:
                got = read_at(fd, view[done:], meta.offset + done)
            except OSError as err:
                raise ModelError(
                    f"{meta.file}: cannot read tensor {meta.name} ({os_reason(err)})"
                ) from None
            if got == 0:
                raise ModelError(
                    f"{meta.file}: truncated, tensor {meta.name} needs bytes up to "
                    f"{meta.offset + meta.nbytes}, file ends at {meta.offset + done}"
                )
            done += got

    def _copy_from_bin(self, meta: TensorMeta, raw: torch.Tensor) -> None:
        if meta.file not in self._bin_states:
            self._bin_states[meta.file] = load_bin(meta.file)
            self._bin_bytes_read[meta.file] = 0
        stored = self._bin_states[meta.file][meta.name]
        raw.view(meta.dtype).view(meta.shape).copy_(stored)
        del stored
        self._bin_bytes_read[meta.file] += meta.nbytes
        if self._bin_bytes_read[meta.file] >= BIN_REMAP_BYTES:
            del self._bin_states[meta.file]  # unmaps the file; the next read maps it again
