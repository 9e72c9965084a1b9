"""The output folder: checked first, written hidden, resumed after a crash, published last.

- **a folder that only looks complete when it is complete**: everything is written into
  a hidden sibling folder ``.<name>.partial`` (`partial_dir`) and renamed to ``<name>`` at
  the end (`publish`). A write that fails (a full disk, no permission) is a one-line
  `OutputError` naming the file and what to do (`output_error`); the half-written shard is
  deleted, finished ones are kept (`discard_unfinished`).
- **resume**: each shard is written as ``.tmp`` and renamed when complete, and a manifest
  records which merge the partial folder belongs to (`merge_identity`); rerunning the same
  merge after an interruption (even ``kill -9``) skips the finished shards and produces
  byte-identical files, because the layout is fixed in advance and the math is
  deterministic (`prepare_partial_dir`). Every option that changes the bits is part of the
  identity, so a rerun with another one starts afresh instead of mixing two merges.
- **one merge per output**: the folder's lock, in `pearl_edu.output_lock`.
- **nothing of the user's deleted**: `--force` replaces only a finished model folder
  (`replaceable_model`); a folder holding anything else is refused. A symlinked output is
  written through its link (`resolve_output`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pearl_edu._version import __version__
from pearl_edu.card import TOKENIZER_FILES
from pearl_edu.errors import ConfigError, OutputError
from pearl_edu.reading import ModelHeader
from pearl_edu.tensor_plan import MergePlan
from pearl_edu.writing import Shard

MANIFEST = ".pearl-edu-merge.json"


def resolve_output(output_dir: str | Path) -> Path:
    """The folder a merge writes ``output_dir`` to: absolute, with every symlink resolved.

    A symlinked output is written through its link, on the disk it points to (the link
    stays as it is); a dangling link is written to the folder it names.
    """
    path = Path(output_dir).expanduser()
    try:
        return Path(os.path.realpath(path.absolute()))
    except (OSError, ValueError) as err:
        raise OutputError(f"output folder {str(output_dir)[:200]}: {_reason(err)}") from None


def check_output_dir(output_dir: Path, model_dirs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that would overwrite a model (its own input) or someone's files.

    An existing folder that is not empty is replaced only with ``force``, and only when it
    is a finished model folder (`replaceable_model`), never one holding anything else.
    """
    try:
        target = output_dir.resolve()
        for model_dir in model_dirs:
            source = Path(model_dir).resolve()
            if target == source:
                raise OutputError(
                    f"output folder {output_dir} is the input model folder {model_dir}; "
                    "choose another folder"
                )
            if target.is_relative_to(source):
                raise OutputError(
                    f"output folder {output_dir} is inside input model folder {source}"
                )
            if source.is_relative_to(target):
                raise OutputError(
                    f"output folder {output_dir} contains input model folder {source}"
                )
        if output_dir.exists() and not output_dir.is_dir():
            raise OutputError(f"output {output_dir} exists and is not a folder")
        if not output_dir.is_dir() or not any(output_dir.iterdir()):
            return
        problem = replaceable_model(output_dir)
        if problem is not None:
            raise OutputError(
                f"output folder {output_dir} is not empty and is not a merged model ({problem}); "
                "choose a new or empty folder (--force replaces only a model folder written "
                "by pearl-edu or mergekit)"
            )
        if not force:
            raise OutputError(
                f"output folder {output_dir} holds a merged model; pass --force to replace it"
            )
    except OSError as err:
        raise OutputError(f"output folder {str(output_dir)[:200]}: {_reason(err)}") from None


# The files of a finished model folder as pearl-edu and mergekit write them: what --force
# may replace. Anything else in the folder (the merge's own YAML, notes, a subfolder) is
# the user's, and the folder is refused rather than deleted.
MODEL_FOLDER_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "mergekit_config.yml",
        "README.md",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        *TOKENIZER_FILES,
        MANIFEST,  # left by a crash between publishing and removing it
    }
)
MODEL_SHARD = re.compile(r"^(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def replaceable_model(folder: Path) -> str | None:
    """None when ``folder`` is a finished merged model (--force may replace it), else why not.

    A finished model holds ``mergekit_config.yml`` (pearl-edu and mergekit both write it),
    ``config.json`` and weights, and nothing but the files of a model folder.
    """
    entries = sorted(folder.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            return f"{entry.name} is not a model file"
        if entry.name not in MODEL_FOLDER_FILES and not MODEL_SHARD.match(entry.name):
            return f"{entry.name} is not a model file"
    names = {entry.name for entry in entries}
    for needed in ("mergekit_config.yml", "config.json"):
        if needed not in names:
            return f"it has no {needed}"
    if not names.intersection(WEIGHT_FILES) and not any(MODEL_SHARD.match(n) for n in names):
        return "it has no weights"
    return None


def _reason(err: BaseException) -> str:
    """An OS error's reason on one line."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split())


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an `OSError` raised inside into a one-line `OutputError` (see `output_error`)."""
    try:
        yield
    except OSError as err:
        raise output_error(err, Path(err.filename) if err.filename else path) from err


def output_error(err: OSError, path: Path) -> OutputError:
    """A failed write of ``path`` as a one-line error that says what to do about it.

    The final output folder never exists half-written (it appears by renaming the finished
    partial folder), so the advice is only about the cause: space or permissions.
    """
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        advice = (
            "free some space (or choose an output folder on another disk) and run the merge "
            "again; the shards already finished are kept and not rewritten"
        )
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose an output folder you can write to, or change its permissions"
    else:
        advice = "check the output folder's disk and run the merge again"
    reason = " ".join((err.strerror or str(err)).split())
    return OutputError(f"{path}: cannot write the merged model: {reason}; {advice}")


def partial_dir(output_dir: Path) -> Path:
    """The hidden sibling folder the merge is written into: ``.<name>.partial``."""
    return output_dir.parent / f".{output_dir.name}.partial"


def merge_identity(
    merge_plan: MergePlan,
    shards: Sequence[Shard],
    headers: Mapping[str, ModelHeader],
    options: Mapping[str, Any] | None = None,
) -> str:
    """A hash of everything that determines the output bytes, to recognise a rerun.

    The plan (names, inputs, methods, parameters, dtypes), the shard layout, the validated
    config, pearl_edu's version, the input weight files (path, size, modification time)
    and ``options``: every option of `pearl_edu.engine.merge` that can change a bit of the
    output (``fast_trim``, the backend, the device, the number of CPU threads).
    """
    description = {
        "version": __version__,
        "config": merge_plan.config.canonical(),
        "options": dict(options or {}),
        "tensors": [
            [
                job.name,
                job.method,
                sorted(job.params.items()),
                [[i.model, i.tensor] for i in job.inputs],
                job.base_index,
                list(job.shape),
                str(job.dtype),
            ]
            for job in merge_plan.tensors
        ],
    }
    return output_identity(description, shards, headers)


def output_identity(
    description: Mapping[str, Any], shards: Sequence[Shard], headers: Mapping[str, ModelHeader]
) -> str:
    """A hash of ``description`` (what makes the output's bytes), the shard layout and the
    input weight files (path, size, modification time): the identity of an output folder."""
    identity = {
        **description,
        "shards": [[s.file_name, hashlib.sha256(s.header).hexdigest()] for s in shards],
        "inputs": {
            ref: [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in header.files]
            for ref, header in headers.items()
        },
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_partial_dir(partial: Path, identity: str, shards: Sequence[Shard]) -> set[str]:
    """Create (or reopen) the partial folder; return the shard files already finished.

    A partial folder from the same merge is resumed; one from another merge (another
    config, other inputs) is started afresh. A folder of that name not made by
    pearl_edu is refused rather than deleted.
    """
    manifest = partial / MANIFEST
    if partial.exists():
        if manifest.is_file() and read_identity(manifest) == identity:
            for leftover in partial.glob("*.tmp"):
                leftover.unlink()
            return {
                shard.file_name
                for shard in shards
                if (partial / shard.file_name).is_file()
                and (partial / shard.file_name).stat().st_size == shard.file_bytes
            }
        if not manifest.is_file() and any(partial.iterdir()):
            raise OutputError(f"{partial} exists and was not made by pearl-edu; remove it")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    temporary = partial / f"{MANIFEST}.tmp"
    record = {"identity": identity, "shards": [shard.file_name for shard in shards]}
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8", newline="\n")
    os.replace(temporary, manifest)
    return set()


def discard_unfinished(partial: Path, shards: Sequence[Shard]) -> None:
    """Delete what a failed write left half-written: the unfinished shard's ``.tmp``.

    Finished shards stay for the rerun to resume from; a partial folder without any is
    deleted whole.
    """
    with contextlib.suppress(OSError):
        for leftover in partial.glob("*.tmp"):
            leftover.unlink()
        if not any((partial / shard.file_name).is_file() for shard in shards):
            shutil.rmtree(partial)


def read_identity(manifest: Path) -> str | None:
    """The merge identity recorded in a manifest, or None when it cannot be read."""
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("identity")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def publish(partial: Path, output_dir: Path) -> None:
    """Rename the finished partial folder to ``output_dir``, replacing what was there.

    The manifest goes last: a crash just before that leaves a complete model with one
    stray hidden file, never a partial folder that a rerun would not recognise.
    """
    retired = output_dir.parent / f".{output_dir.name}.replaced"
    replacing = output_dir.exists()
    if replacing:
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(output_dir, retired)
    try:
        os.replace(partial, output_dir)
    except OSError:
        if replacing:  # put the old folder back rather than leave none
            os.replace(retired, output_dir)
        raise
    (output_dir / MANIFEST).unlink()
    shutil.rmtree(retired, ignore_errors=True)


SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or text such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    ``KB``/``MB``/``GB`` are powers of 1000 and ``KiB``/``MiB``/``GiB`` powers of 1024,
    as in mergekit.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        number = size
    else:
        match = SIZE_PATTERN.match(str(size))
        if match is None:
            raise ConfigError(
                f"shard size {size!r} is not understood: expected bytes such as 5GB, 500MB, "
                "2GiB or 1000000"
            )
        value, unit = match.group(1), (match.group(2) or "b").lower()
        power = "bkmgt".index(unit[0])  # b = 0, k = 1, m = 2, ...
        base = 1024 if "i" in unit else 1000
        number = int(float(value) * base**power)
    if number <= 0:
        raise ConfigError(f"shard size {size!r} must be more than 0 bytes")
    return number
