"""Reading and writing model weights one tensor at a time.

A model folder is described by its **header**: every tensor's name, shape, dtype and where
its bytes lie, read from the safetensors headers (a few kilobytes) without touching a
single weight. `ModelReader` then gives one tensor at a time, in one of two ways, so the
memory a merge holds is a few tensors, never a model or a shard:

- `ModelReader.map` maps the bytes of that one tensor from the page cache, with no copy;
  the map is undone when the tensor is freed. (A map of a whole file would be simpler,
  but every page it touches stays in the process's resident memory until the end, and a
  merge touches every page.)
- `ModelReader.read` copies the tensor with positioned reads (``os.preadv``) into a
  buffer the caller can reuse: the GPU path uses it with pinned buffers.

Pickle checkpoints (``pytorch_model*.bin``) are opened with
``torch.load(..., weights_only=True)``, which refuses any pickle that would run code, and
``mmap=True``, which keeps the weights on disk until they are read.

`ShardedWriter` writes the merged tensors into safetensors shards whose headers are known
before the first tensor is merged (the plan gives every shape and dtype), so each tensor
goes to disk as soon as it exists, past the page cache where the file system allows
(`SequentialFile`). A shard is written as ``<file>.tmp`` and renamed when complete: a
shard file that exists is a complete shard.

The fast paths are Linux's (``os.preadv``, ``O_DIRECT``, ``madvise``). Each is looked up
once, when this module is imported; where one is missing (macOS lacks ``O_DIRECT``,
Windows has none of them, nor ``fcntl``) a portable equivalent takes its place, and the
files written hold the same bytes. Every file is opened in binary mode (``os.O_BINARY``
where it exists), without which Windows would translate line endings inside the weights.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pearl_edu.errors import ModelError, OutputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# safetensors' names for torch dtypes (https://github.com/huggingface/safetensors, format.md).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# A safetensors header is JSON; anything above this is not a header but a corrupt file.
MAX_HEADER_BYTES = 100_000_000
# Pages of a memory map stay resident once touched; a pickle checkpoint is mapped afresh
# after this many bytes are read from it, which releases them.
BIN_REMAP_BYTES = 64 * 1024**2
# Direct writes go through a staging buffer of this size, aligned for the device.
STAGING_BYTES = 32 * 1024**2
DIRECT_ALIGNMENT = 4096

# --------------------------------------------------------------------------------------
# What this system offers, looked up once (tests hide features before importing this)
# --------------------------------------------------------------------------------------

try:
    import fcntl  # absent on Windows
except ImportError:
    fcntl = None

# Binary mode for os.open: 0 except on Windows, whose default (text) mode would turn every
# byte 10 written into 13 10, and stop reading at the first byte 26.
O_BINARY: int = getattr(os, "O_BINARY", 0)
# Writes past the page cache: Linux's O_DIRECT, which `SequentialFile` can also turn off
# on an open file (with fcntl) when a file system refuses a direct write.
O_DIRECT: int | None = getattr(os, "O_DIRECT", None) if fcntl is not None else None
# Advice for a mapped range; None where the mmap module has no madvise (Windows).
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
# Headers: what a model folder contains, without reading weights
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: its file, and for safetensors the byte offset of its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int | None  # absolute offset in `file`; None for pickle (.bin) files
    nbytes: int


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


def read_config(model_dir: Path) -> dict:
    """The parsed ``config.json`` of a model folder, or ``{}`` when it has none."""
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, found {json_type(config)}")
    return config


def read_json(path: Path, what: str) -> object:
    """The parsed contents of a json file; `ModelError` naming it when unreadable or invalid."""
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read {what} ({os_reason(err)})") from None
    return parse_json(path, text, what)


def parse_json(path: Path, text: bytes, what: str) -> object:
    """``json.loads`` of ``text``, any failure a one-line `ModelError` naming ``path``.

    Besides malformed JSON, this catches what a hostile file can make the parser raise:
    ``ValueError`` for an integer of more than 4300 digits, ``RecursionError`` for deeply
    nested brackets.
    """
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: {what} is not UTF-8 text ({err.reason})") from None
    except ValueError as err:  # json.JSONDecodeError, or an integer too long to convert
        raise ModelError(f"{path}: {what} is not valid JSON ({first_line(err)})") from None
    except RecursionError:
        raise ModelError(f"{path}: {what} is not valid JSON (nested too deeply)") from None


def json_type(value: object) -> str:
    """How JSON names the type of a parsed value, for messages (``a list``, ``a string``)."""
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in (
        (dict, "an object"),
        (list, "a list"),
        (str, "a string"),
        (int, "an integer"),
        (float, "a number"),
    ):
        if isinstance(value, kind):
            return name
    return "null"


def shown(value: object, limit: int = 60) -> str:
    """A parsed JSON value as JSON, cut to ``limit`` characters, for one-line messages."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_reason(err: OSError) -> str:
    """The operating system's reason for an `OSError`, as one short phrase."""
    return err.strerror or first_line(err)


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


def files_in_index(index_path: Path) -> list[Path]:
    """The shard files an index json names, each checked to exist inside the folder.

    A shard name must be a relative path without ``..``, so that an index cannot bring in
    another folder's weights or open any other file. This is decided on the name alone: a
    shard may be a symbolic link to a file elsewhere, as the Hugging Face cache's
    snapshot folders hold links to its blobs.
    """
    index = read_json(index_path, "index json")
    if not isinstance(index, dict):
        raise ModelError(
            f"{index_path}: index json is {json_type(index)}; expected a JSON object with a "
            "weight_map"
        )
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        found = json_type(weight_map) if "weight_map" in index else "missing"
        raise ModelError(
            f"{index_path}: weight_map is {found}; expected an object of tensor name -> file name"
        )
    files = []
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ModelError(
                f"{index_path}: weight_map[{tensor!r}] is {shown(name)}; expected the "
                "name of a weight file"
            )
        file = index_path.parent / confined_name(index_path, tensor, name)
        if file not in files:
            files.append(file)
    for file in files:
        if not file.is_file():
            raise ModelError(f"{file}: weight file listed in {index_path.name} is missing")
    return files


def confined_name(index_path: Path, tensor: str, name: str) -> str:
    """``name`` when it is a relative path inside the index's folder, else a `ModelError`.

    Both separators are checked, and a drive or UNC prefix, whatever this system is, so
    that an index refused on one system is refused on every one.
    """
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise ModelError(
            f"{index_path}: weight_map[{tensor!r}] is {name!r}, which lies outside the model "
            "folder; expected a file name inside it (no absolute path, no '..')"
        )
    return name


def safetensors_metas(file: Path) -> list[TensorMeta]:
    """Parse a safetensors header: 8 bytes of little-endian length, then that much JSON.

    Every entry is checked as the safetensors library checks it (an object with a string
    ``dtype``, a ``shape`` of non-negative integers and two ``data_offsets``, ``end`` not
    before ``begin``; ``__metadata__`` null or an object of strings), and its byte count
    against its shape and dtype, so that a damaged or crafted header is a `ModelError`
    naming the file and the tensor, never a traceback.
    """
    try:
        with open(file, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{file}: truncated, {file_size} bytes is too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise ModelError(
                    f"{file}: not a safetensors file or truncated (header of {header_len} "
                    f"bytes, file of {file_size} bytes)"
                )
            text = f.read(header_len)
    except OSError as err:
        raise ModelError(f"{file}: cannot read weight file ({os_reason(err)})") from None
    header = parse_json(file, text, "safetensors header")
    if not isinstance(header, dict):
        raise ModelError(
            f"{file}: safetensors header is {json_type(header)}; expected a JSON object"
        )

    data_start = 8 + header_len
    metas = []
    for name, entry in header.items():
        if name == "__metadata__":
            check_safetensors_metadata(file, entry)
            continue
        dtype, shape, begin, nbytes = safetensors_entry(file, name, entry)
        metas.append(TensorMeta(name, shape, dtype, file, data_start + begin, nbytes))

    needed = data_start + max((m.offset - data_start + m.nbytes for m in metas), default=0)
    if file_size < needed:
        raise ModelError(f"{file}: truncated, expected {needed} bytes, found {file_size}")
    return metas


def safetensors_entry(
    file: Path, name: str, entry: object
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """The dtype, shape, first byte (after the header) and byte count of one header entry."""
    where = f"{file}: tensor {name if name.isprintable() else repr(name)}"
    if not isinstance(entry, dict):
        raise ModelError(
            f"{where}: entry is {json_type(entry)}; expected an object with dtype, shape "
            "and data_offsets"
        )
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise ModelError(f"{where}: entry has no {', '.join(missing)}")
    raw_dtype, raw_shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(raw_dtype, str):
        raise ModelError(f'{where}: dtype is {shown(raw_dtype)}; expected a string such as "BF16"')
    dtype = SAFETENSORS_DTYPES.get(raw_dtype)
    if dtype is None:
        raise ModelError(f"{where} has unsupported dtype {shown(raw_dtype)}")
    if not isinstance(raw_shape, list) or not all(is_count(n) for n in raw_shape):
        raise ModelError(
            f"{where}: shape is {shown(raw_shape)}; expected a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise ModelError(
            f"{where}: data_offsets is {shown(offsets)}; expected two non-negative "
            "integers [begin, end]"
        )
    begin, end = offsets
    if end < begin:
        raise ModelError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    expected = math.prod(raw_shape) * dtype.itemsize
    if end - begin != expected:
        raise ModelError(
            f"{where} has {end - begin} bytes, expected {expected} for shape "
            f"{shown(raw_shape)} {raw_dtype}"
        )
    return dtype, tuple(raw_shape), begin, expected


def is_count(value: object) -> bool:
    """Whether a parsed JSON value is a non-negative integer (``true`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors_metadata(file: Path, metadata: object) -> None:
    """``__metadata__`` must be null or an object of strings, as the safetensors library reads it."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ModelError(
            f"{file}: __metadata__ is {json_type(metadata)}; expected an object of strings"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ModelError(
                f"{file}: __metadata__[{key!r}] is {json_type(value)}; expected a string"
            )


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """Open a pickle checkpoint safely: tensors only, memory-mapped, no code executed.

    ``weights_only=True`` makes torch's unpickler refuse anything but tensors and plain
    containers, so a checkpoint crafted to run code fails here instead of running it.
    """
    if not file.is_file():
        raise ModelError(f"{file}: weight file is missing")
    check_zip_checkpoint(file)
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        culprit = f" ({found.group(1)})" if found else ""
        raise ModelError(
            f"{file}: refused, the pickle holds objects other than tensors{culprit} that "
            "could run code when loaded; nothing was executed. Use safetensors weights "
            "instead, or convert this file to safetensors if you trust its source"
        ) from None
    except Exception as err:  # torch raises several types for a damaged archive
        raise ModelError(f"{file}: cannot read PyTorch checkpoint ({first_line(err)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ModelError(f"{file}: expected a dict of tensor name -> tensor")
    return state


def check_zip_checkpoint(file: Path) -> None:
    """Refuse, with a reason, a ``.bin`` that is not an intact zip-format checkpoint.

    ``torch.save`` has written zip archives since torch 1.6; only those can be
    memory-mapped. A zip without its closing directory was cut short.
    """
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelError(f"{file}: cannot read weight file ({os_reason(err)})") from None
    if zipfile.is_zipfile(file):
        return
    if magic == b"PK\x03\x04":
        raise ModelError(f"{file}: truncated or damaged (the zip archive has no end record)")
    if magic[:1] == b"\x80":
        raise ModelError(
            f"{file}: a legacy (pre-zip) pickle checkpoint, which cannot be read lazily; "
            "re-save it with torch >= 1.6 or convert it to safetensors"
        )
    raise ModelError(f"{file}: not a PyTorch checkpoint (expected a zip archive)")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def bin_metas(file: Path) -> list[TensorMeta]:
    """Describe the tensors of a pickle checkpoint (memory-mapped, so no weights are read)."""
    state = load_bin(file)
    for name in state:
        if not isinstance(name, str):
            raise ModelError(f"{file}: tensor name {name!r} is not a string")
    return [
        TensorMeta(name, tuple(t.shape), t.dtype, file, None, t.numel() * t.element_size())
        for name, t in state.items()
    ]


# --------------------------------------------------------------------------------------
# Reading one tensor at a time
# --------------------------------------------------------------------------------------


class ModelReader:
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
        self._bin_states.clear()

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
