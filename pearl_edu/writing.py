"""Safetensors shards, written front to back past the page cache.

`ShardedWriter` writes the merged tensors into safetensors shards whose headers are known
before the first tensor is merged (the plan gives every shape and dtype: `layout_shards`),
so each tensor goes to disk as soon as it exists, past the page cache where the file system
allows (`SequentialFile`). A shard is written as ``<file>.tmp`` and renamed when complete: a
shard file that exists is a complete shard.

Writing past the page cache is Linux's (``O_DIRECT``, turned off on an open file with
``fcntl``). It is looked up once, when this module is imported; where it is missing (macOS
lacks ``O_DIRECT``, Windows has neither) files are written through the page cache, and they
hold the same bytes. Every file is opened in binary mode (``os.O_BINARY`` where it exists,
as `pearl_edu.reading` opens them), without which Windows would translate line endings
inside the weights.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pearl_edu import page_cache
from pearl_edu.errors import OutputError
from pearl_edu.headers import SAFETENSORS_INDEX, SAFETENSORS_NAMES, SAFETENSORS_SINGLE
from pearl_edu.page_cache import DIRECT_ALIGNMENT
from pearl_edu.reading import O_BINARY

# Direct writes go through a staging buffer of this size, aligned for the device.
STAGING_BYTES = 32 * 1024**2

# --------------------------------------------------------------------------------------
# What this system offers, looked up once (tests hide features before importing this)
# --------------------------------------------------------------------------------------

try:
    import fcntl  # absent on Windows
except ImportError:
    fcntl = None

# Writes past the page cache: Linux's O_DIRECT, which `SequentialFile` can also turn off
# on an open file (with fcntl) when a file system refuses a direct write.
O_DIRECT: int | None = page_cache.O_DIRECT if fcntl is not None else None


# --------------------------------------------------------------------------------------
# Writing safetensors shards whose layout is known in advance
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    """Name, shape and dtype of one tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file: its name, its tensors in file order, and its exact header bytes."""

    file_name: str
    tensors: tuple[OutputTensor, ...]
    header: bytes = field(repr=False)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """Size of the finished file: the 8-byte length, the header, the data."""
        return 8 + len(self.header) + self.data_bytes


def layout_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` of data.

    A tensor larger than the limit gets a shard of its own. One shard is named
    ``model.safetensors``; several ``model-00001-of-0000N.safetensors``, as HF names them.
    """
    groups: list[list[OutputTensor]] = [[]]
    for tensor in tensors:
        current = sum(t.nbytes for t in groups[-1])
        if groups[-1] and current + tensor.nbytes > max_shard_bytes:
            groups.append([])
        groups[-1].append(tensor)
    if len(groups) == 1:
        names = [SAFETENSORS_SINGLE]
    else:
        names = [
            f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)
        ]
    return [
        Shard(name, tuple(group), safetensors_header(group))
        for name, group in zip(names, groups, strict=True)
    ]


def safetensors_header(tensors: Iterable[OutputTensor]) -> bytes:
    """The JSON header of a safetensors file holding ``tensors`` back to back, in order.

    Padded with spaces to a multiple of 8 bytes, as the safetensors library does, so that
    the data that follows stays aligned.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": SAFETENSORS_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


class ShardedWriter:
    """Streams tensors into the shards of a precomputed layout, one finished file at a time.

    Tensors must arrive in layout order. The first tensor of a shard opens
    ``<file>.tmp`` and writes the header; the last one flushes it to disk and renames it to
    ``<file>``. Shards listed in ``done`` (finished by an earlier, interrupted run) are
    expected to be skipped by the caller. ``direct=True`` writes past the page cache where
    the file system allows it (see `SequentialFile`).
    """

    def __init__(
        self,
        folder: Path,
        shards: Sequence[Shard],
        done: Iterable[str] = (),
        *,
        direct: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.direct = direct
        self.shards = list(shards)
        self.done = set(done)
        self._position = {
            t.name: (index, slot)
            for index, shard in enumerate(self.shards)
            for slot, t in enumerate(shard.tensors)
        }
        self._file_offset = {}
        for shard in self.shards:
            offset = 8 + len(shard.header)
            for t in shard.tensors:
                self._file_offset[t.name] = offset
                offset += t.nbytes
        self._file = None
        self._shard_index: int | None = None
        self._next_slot = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (on the CPU, of the layout's shape and dtype) to its shard."""
        index, slot = self._position[name]
        shard = self.shards[index]
        expected = shard.tensors[slot]
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise OutputError(
                f"{name}: merged tensor is {tuple(tensor.shape)} {tensor.dtype}, the layout "
                f"expects {expected.shape} {expected.dtype}"
            )
        if index != self._shard_index:
            self._open(index)
        if slot != self._next_slot:
            raise OutputError(f"{name}: written out of order in {shard.file_name}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data).cast("B"), address=data.ctypes.data)
        self._next_slot += 1
        if self._next_slot == len(shard.tensors):
            self._finish()

    def file_offset(self, name: str) -> int:
        """Where the bytes of tensor ``name`` start in its shard file."""
        return self._file_offset[name]

    def close(self) -> None:
        """Abandon an unfinished shard (its ``.tmp`` stays for inspection; reruns rewrite it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def index(self) -> dict:
        """The ``model.safetensors.index.json`` contents for this layout."""
        weight_map = {t.name: s.file_name for s in self.shards for t in s.tensors}
        total = sum(s.data_bytes for s in self.shards)
        return {"metadata": {"total_size": total}, "weight_map": weight_map}

    def write_index(self) -> Path | None:
        """Write the index json when there are several shards (one file needs none)."""
        if len(self.shards) < 2:
            return None
        path = self.folder / SAFETENSORS_INDEX
        text = json.dumps(self.index(), indent=2, sort_keys=True) + "\n"
        path.write_text(text, encoding="utf-8", newline="\n")  # "\n" on Windows too
        return path

    def _open(self, index: int) -> None:
        if self._file is not None:
            raise OutputError(
                f"{self.shards[self._shard_index].file_name}: started "
                f"{self.shards[index].file_name} before finishing it"
            )
        shard = self.shards[index]
        self._shard_index, self._next_slot = index, 0
        self._file = SequentialFile(self.folder / f"{shard.file_name}.tmp", direct=self.direct)
        self._file.write(struct.pack("<Q", len(shard.header)))
        self._file.write(shard.header)

    def _finish(self) -> None:
        shard = self.shards[self._shard_index]
        self._file.finish()  # on disk before the name says "complete"
        self._file = None
        os.replace(self.folder / f"{shard.file_name}.tmp", self.folder / shard.file_name)
        self.done.add(shard.file_name)


class SequentialFile:
    """A file written front to back, past the page cache where the file system allows it.

    A merge writes each byte once and never reads it back, so caching the output only
    costs: the kernel must find, zero and account a fresh page for every 4 KiB written, and
    on the machine of the book's performance appendix that made writing 1.4 GB take 3 to
    6 s, against 1 s for the same bytes written with ``O_DIRECT``. Direct writes need
    aligned memory, sizes and offsets, so the bytes are gathered in an aligned staging
    buffer and written out whenever it is full; the last, partial block is padded and the
    file cut back to its true length. Where ``O_DIRECT`` is refused (tmpfs, some network
    file systems) or missing (macOS, Windows) the file is written through the page cache.
    `finish` makes the file durable (``fsync``) before it returns.
    """

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        self.size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY
        self.fd = -1
        if direct and O_DIRECT is not None:
            try:
                self.fd = os.open(self.path, flags | O_DIRECT, 0o644)
            except OSError:
                self.fd = -1
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(self.path, flags, 0o644)
        self._staging = mmap.mmap(-1, STAGING_BYTES) if self.direct else None
        self._fill = 0
        self._direct_now = self.direct  # False once the file system refused a direct write

    def write(self, data: bytes | memoryview, *, address: int | None = None) -> None:
        """Append ``data`` to the file.

        ``address``, the memory address of ``data``'s first byte, allows writing a large
        piece without copying it: when the byte that falls on a block boundary of the file
        also lies on one in memory, everything from there to the last whole block goes to
        the disk straight from ``data`` (the engine places its output buffers so that it
        does). The few bytes around it go through the staging buffer.
        """
        view = memoryview(data).cast("B")
        self.size += len(view)
        if not self.direct:
            self._write_all(view)
            return
        if address is not None and self._direct_now:
            view = self._write_in_place(view, address)
        self._stage(view)

    def _write_in_place(self, view: memoryview, address: int) -> memoryview:
        """Write the block-aligned middle of ``view`` from its memory; return what is left."""
        start = self.size - len(view)  # where view[0] goes in the file
        head = -start % DIRECT_ALIGNMENT
        body = (len(view) - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        if body <= 0 or (address + head) % DIRECT_ALIGNMENT:
            return view
        self._stage(view[:head])  # completes the staged bytes up to a block boundary
        if self._fill:
            self._write_staging(self._fill)
        done = 0
        while done < body and self._direct_now:
            try:
                written = os.write(self.fd, view[head + done : head + body])
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                break  # this memory cannot be written directly: stage the rest
            done += written
            if written % DIRECT_ALIGNMENT:
                self._buffered_from_now_on()
        return view[head + done :]

    def _stage(self, view: memoryview) -> None:
        """Copy ``view`` into the staging buffer, writing it out whenever it is full."""
        while len(view):
            n = min(len(view), STAGING_BYTES - self._fill)
            self._staging[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == STAGING_BYTES:
                self._write_staging(STAGING_BYTES)

    def finish(self) -> None:
        """Write what is staged, cut the padding, flush to disk and close."""
        try:
            if self.direct and self._fill:
                padded = -(-self._fill // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
                self._staging[self._fill : padded] = bytes(padded - self._fill)
                self._write_staging(padded)
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        """Close without flushing (an abandoned file; safe to call twice)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _write_staging(self, nbytes: int) -> None:
        view = memoryview(self._staging)[:nbytes]
        try:
            self._write_all(view)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            # The file system opened the file for direct I/O but refuses this write (which
            # wrote nothing): write through the page cache from here on.
            self._buffered_from_now_on()
            self._write_all(view)
        finally:
            view.release()
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            written = os.write(self.fd, view[done:])
            done += written
            if self._direct_now and written % DIRECT_ALIGNMENT:
                # A short, unaligned direct write (rare): the rest cannot be direct.
                self._buffered_from_now_on()

    def _buffered_from_now_on(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self._direct_now = False
