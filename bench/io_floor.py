"""The I/O floor of a two-model merge: read both inputs, write one output, no math.

    python bench/io_floor.py MODEL_A MODEL_B OUTPUT_DIR [--buffered] [--pipelined]

Every merge must at least read each input tensor once and write each output tensor once.
This script does exactly that and nothing else: for every tensor of model A it reads A's
bytes and B's bytes into two reused buffers with positioned reads, and writes A's bytes
into an output file of the same layout. By default it reads and writes the fastest way
this machine allows, the way pearl_edu does: a tensor whose bytes are in the page cache
is read from it, one that is not is read past it (``O_DIRECT``, `pearl_edu.page_cache`),
and the output is written past it (`pearl_edu.writing.SequentialFile`: ``O_DIRECT`` where
the file system takes it, flushed to disk when complete). ``--buffered`` reads and writes
through the page cache and leaves flushing to the kernel, as mergekit does.

By default each step waits for the one before: read A, read B, write, next tensor.
``--pipelined`` overlaps them as the engine does: a thread of its own reads the next
tensor's inputs (into the second of two buffer pairs) while the current one is written.
Which of the two is faster depends on the disk (on some, reads and writes in flight at
once slow each other down; on others, a disk never left idle is faster), so a merge is
compared with the faster of the two. The time it takes is what a merge costs with
infinitely fast math.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import shutil
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pearl_edu.page_cache import DIRECT_SLACK, DirectReads, cached_share  # noqa: E402
from pearl_edu.reading import read_header  # noqa: E402  (no reader: reads are below)
from pearl_edu.writing import SequentialFile  # noqa: E402


def copy_through(
    model_a: Path, model_b: Path, out_dir: Path, *, buffered: bool = False, pipelined: bool = False
) -> int:
    """Read every tensor of both models and write A's layout to ``out_dir``; return bytes written."""
    header_a, header_b = read_header(model_a), read_header(model_b)
    out_dir.mkdir(parents=True, exist_ok=False)
    largest = max(meta.nbytes for meta in header_a.tensors.values()) + DIRECT_SLACK
    direct = None if buffered else DirectReads()
    jobs = [
        (meta_a, header_b.tensors[meta_a.name])
        for file in header_a.files
        for meta_a in header_a.tensors.values()
        if meta_a.file == file
    ]
    reads = (read_in_thread if pipelined else read_in_turn)(jobs, largest, direct)
    written = 0
    for file in header_a.files:
        count = sum(meta_a.file == file for meta_a, _ in jobs)
        with open(file, "rb") as source:
            prefix = file_header(source)
        out = open(out_dir / file.name, "wb") if buffered else SequentialFile(out_dir / file.name)
        out.write(prefix)
        for _ in range(count):
            view_a = next(reads)
            out.write(view_a)
            written += len(view_a)
        if buffered:
            out.close()
        else:
            out.finish()
    # The small files that make the output a model folder: the same as A's.
    for name in ("config.json", "model.safetensors.index.json"):
        if (model_a / name).is_file():
            shutil.copyfile(model_a / name, out_dir / name)
    return written


def read_in_turn(jobs, largest: int, direct: DirectReads | None) -> Iterator[memoryview]:
    """A's bytes of each job, after reading both inputs; one buffer pair, reused."""
    buffer_a, buffer_b = bytearray(largest), bytearray(largest)
    for meta_a, meta_b in jobs:
        view_a = read_tensor(meta_a, buffer_a, direct)
        read_tensor(meta_b, buffer_b, direct)
        yield view_a


def read_in_thread(jobs, largest: int, direct: DirectReads | None) -> Iterator[memoryview]:
    """The same, read by a thread of its own one job ahead, into two buffer pairs in turn.

    A pair is handed back to the thread when the next job is asked for, that is once the
    caller has written the previous one.
    """
    free: queue.Queue[tuple[bytearray, bytearray]] = queue.Queue()
    for _ in range(2):
        free.put((bytearray(largest), bytearray(largest)))
    ready: queue.Queue = queue.Queue()

    def read_all() -> None:
        try:
            for meta_a, meta_b in jobs:
                pair = free.get()
                view_a = read_tensor(meta_a, pair[0], direct)
                read_tensor(meta_b, pair[1], direct)
                ready.put((view_a, pair))
        except BaseException as err:  # raised in the writing thread
            ready.put((err, None))

    threading.Thread(target=read_all, name="floor-reader", daemon=True).start()
    for _ in jobs:
        view_a, pair = ready.get()
        if isinstance(view_a, BaseException):
            raise view_a
        yield view_a
        free.put(pair)


def file_header(source) -> bytes:
    """The 8-byte length and the JSON header of an open safetensors file."""
    prefix = source.read(8)
    (length,) = struct.unpack("<Q", prefix)
    return prefix + source.read(length)


_open_files: dict[Path, int] = {}


def read_tensor(meta, buffer: bytearray, direct: DirectReads | None) -> memoryview:
    """A tensor's bytes, read into ``buffer``: past the page cache unless they are cached."""
    if direct is not None and cached_share(_fd(meta.file), meta.offset, meta.nbytes) < 0.5:
        raw = direct.read(
            meta.file, meta.offset, meta.nbytes, torch.frombuffer(buffer, dtype=torch.uint8)
        )
        if raw is not None:
            return memoryview(raw.numpy())
    view = memoryview(buffer)[: meta.nbytes]
    pread_exactly(meta.file, meta.offset, view)
    return view


def _fd(file: Path) -> int:
    fd = _open_files.get(file)
    if fd is None:
        fd = _open_files[file] = os.open(file, os.O_RDONLY)
    return fd


def pread_exactly(file: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes of ``file`` from ``offset`` (positioned reads)."""
    fd = _fd(file)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{file}: ends before byte {offset + len(view)}")
        done += got


def main() -> None:
    gc.freeze()  # as `pearl-edu` does: no final sweep of torch's objects at exit
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_b", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--buffered", action="store_true", help="read and write through the page cache, no fsync"
    )
    parser.add_argument(
        "--pipelined", action="store_true", help="read the next tensor while writing this one"
    )
    args = parser.parse_args()
    written = copy_through(
        args.model_a, args.model_b, args.out_dir, buffered=args.buffered, pipelined=args.pipelined
    )
    print(f"wrote {written / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
