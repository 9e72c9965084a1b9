"""The headers of a model folder's files, parsed and checked before a weight is read.

Every weight file says what it holds: a safetensors file in a JSON header of a few kilobytes
at its start (`safetensors_metas`), a pickle checkpoint (``pytorch_model*.bin``) in its pickle
(`bin_metas`); an index json names the shards (`files_in_index`) and ``config.json`` the
architecture (`read_config`). Each is checked as the library that writes it reads it, so
that a damaged or crafted file is a one-line `ModelError` naming the file and the tensor,
never a traceback, and that an index cannot bring in a file outside the model folder.
`pearl_edu.reading.read_header` gathers them into the header of a whole model folder.

Pickle checkpoints are opened with ``torch.load(..., weights_only=True)``, which refuses any
pickle that would run code, and ``mmap=True``, which keeps the weights on disk until they
are read.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pearl_edu.errors import ModelError

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


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: its file, and for safetensors the byte offset of its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int | None  # absolute offset in `file`; None for pickle (.bin) files
    nbytes: int


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
