"""The streaming merge: config -> plan -> read -> math -> write, one tensor at a time.

The heart of this module is the loop in `merge`::

    for job, inputs in read_ahead(jobs, readers, dtype=..., device=...):
        result = outputs.take(job.nbytes)  # a reused buffer, viewed as the output tensor
        merged = merge_tensor(job.method, inputs, job.base_index, job.params, out=result)
        write_behind.write(job.name, result)  # hands the buffer back once written

Everything else is there to make that loop safe and fast:

- **memory and speed**: a tensor at a time, a background thread prepares the next
  tensor's inputs while the current one is merged (on the CPU it maps them in place from
  the page cache; on the GPU path it reads them into two sets of pinned buffers), never
  more than `READ_AHEAD_BYTES` ahead, so the embeddings of a 7B model are not held twice.
  The result goes into one of two reused output buffers, and another thread writes it to
  disk past the page cache (`pearl_edu.io.SequentialFile`) while the next one is merged.
  Fresh memory and the page cache are avoided because on the machines measured (see the
  book's performance appendix) touching new pages cost as much as the arithmetic.
- **a folder that only looks complete when it is complete**: everything is written into
  a hidden sibling folder ``.<name>.partial`` and renamed to ``<name>`` at the end. A
  write that fails (a full disk, no permission) is a one-line `OutputError` naming the
  file and what to do; the half-written shard is deleted, finished ones are kept.
- **resume**: each shard is written as ``.tmp`` and renamed when complete, and a manifest
  records which merge the partial folder belongs to; rerunning the same merge after an
  interruption (even ``kill -9``) skips the finished shards and produces byte-identical
  files, because the layout is fixed in advance and the math is deterministic.

For testing resume, the internal environment variable ``PEARL_EDU_KILL_AFTER_TENSORS=N``
makes the process kill itself with SIGKILL after writing N tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pearl_edu._version import __version__
from pearl_edu.config import DTYPE_NAMES, MergeConfig, load_config, torch_dtype
from pearl_edu.devices import resolve_device
from pearl_edu.errors import ConfigError, ModelError, OutputError
from pearl_edu.hub import resolve_model
from pearl_edu.io import (
    DIRECT_ALIGNMENT,
    ModelHeader,
    ModelReader,
    OutputTensor,
    Shard,
    ShardedWriter,
    layout_shards,
    read_header,
)
from pearl_edu.methods import (
    METHODS,
    keep_host_copy,
    merge_tensor,
    set_threads_for_new_threads,
    threads_for_new_threads,
)
from pearl_edu.plan import MergePlan, TensorPlan, plan

MANIFEST = ".pearl-edu-merge.json"
# Read ahead at most this many bytes of inputs while the current tensor is merged.
READ_AHEAD_BYTES = 512 * 1024**2
# Merged tensors up to this size get buffers of their own rather than kept ones.
SMALL_OUTPUT_BYTES = 16 * 1024**2
# Files copied from the base model, when present, so the merged folder is usable as is.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class MergeResult:
    """What `merge` did: where the model is, what was written and how long it took."""

    output_dir: Path
    weight_files: tuple[str, ...]
    num_tensors: int
    bytes_written: int
    resumed_tensors: int  # taken from shards finished by an earlier, interrupted run
    device: torch.device
    seconds: float


def merge(
    config: MergeConfig | str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool | None = None,
    threads: int | None = None,
    copy_tokenizer: bool = True,
) -> MergeResult:
    """Merge the models of ``config`` into the Hugging Face model folder ``output_dir``.

    ``config`` is a `MergeConfig`, or anything `load_config` accepts (a YAML path, YAML
    text, a shipped recipe's name). ``progress=None`` shows a progress bar only on a
    terminal; ``False`` never. ``copy_tokenizer=False`` leaves out the base model's
    tokenizer and generation config, as mergekit's ``--no-copy-tokenizer`` does. ``threads`` is how many CPU threads the math may use on the
    CPU; by default torch's, as mergekit (see `math_threads`). Bad input raises a
    `PearlEduError` before anything is written.
    """
    started = time.perf_counter()
    # config -> plan: every mistake is reported here, before anything is written.
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    compute_device = resolve_device(device)
    max_shard_bytes = parse_size(shard_size)
    compute_dtype = (
        torch_dtype(config.dtype, where=config.source, key="dtype") if config.dtype else None
    )
    model_dirs = {ref: resolve_model(ref) for ref in config.models()}
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, model_dirs.values(), force=force)
    headers = {ref: read_header(path) for ref, path in model_dirs.items()}
    merge_plan = plan(config, headers)
    check_input_shapes(merge_plan.tensors, headers)

    # The output files are laid out in advance; an interrupted run may have finished some.
    shards = layout_shards(
        [OutputTensor(job.name, tuple(job.shape), job.dtype) for job in merge_plan.tensors],
        max_shard_bytes,
    )
    partial = partial_dir(output_dir)
    with writing(partial):
        finished = prepare_partial_dir(partial, merge_identity(merge_plan, shards, headers), shards)
    shard_of = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    jobs = [job for job in merge_plan.tensors if shard_of[job.name] not in finished]

    # read -> math -> write, one tensor at a time.
    writer = ShardedWriter(partial, shards, done=finished)
    readers = {ref: ModelReader(header) for ref, header in headers.items()}
    total = sum(shard.data_bytes for shard in shards)
    remaining = sum(job.nbytes for job in jobs)
    bar = progress_bar(total, initial=total - remaining, enabled=progress)
    write_behind = WriteBehind(writer)
    outputs = OutputBuffers(pinned=compute_device.type == "cuda")
    return_freed_memory_to_the_system()
    base_dir = model_dirs[merge_plan.base_model]
    try:
        try:
            with math_threads(threads, compute_device):
                for job, inputs in read_ahead(
                    jobs, readers, dtype=compute_dtype, device=compute_device
                ):
                    buffer = outputs.take(job.nbytes + DIRECT_ALIGNMENT)
                    result = aligned_view(buffer, job, writer.file_offset(job.name))
                    base = inputs[job.base_index]
                    merged = merge_tensor(
                        job.method,
                        inputs,
                        job.base_index,
                        job.params,
                        input_params=job.input_params or None,
                        seed=job.seed,
                        name=job.name,
                        out=result
                        if base.device == result.device and base.dtype == job.dtype
                        else None,
                    )
                    if merged is not result:
                        result.copy_(merged)  # a cast, a copy from the GPU, or an input itself
                    del merged
                    write_behind.write(
                        job.name, result, then=functools.partial(outputs.give, buffer)
                    )
                    bar.update(job.nbytes)
                write_behind.finish()
        finally:
            bar.close()
            write_behind.close()
            with contextlib.suppress(OSError):  # an abandoned shard: the error is raised
                writer.close()
            for reader in readers.values():
                reader.close()
        with writing(partial):
            writer.write_index()
            write_model_files(
                partial, config, merge_plan, base_dir, output_dir.name, copy_tokenizer
            )
            publish(partial, output_dir)
    except OutputError:
        # A failed write (a full disk...) leaves no half-written file behind: the final
        # folder does not exist yet, and the partial one keeps finished shards only.
        discard_unfinished(partial, shards)
        raise
    return MergeResult(
        output_dir=output_dir,
        weight_files=tuple(shard.file_name for shard in shards),
        num_tensors=len(merge_plan.tensors),
        bytes_written=remaining,
        resumed_tensors=len(merge_plan.tensors) - len(jobs),
        device=compute_device,
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def math_threads(threads: int | None, device: torch.device) -> Iterator[int]:
    """Run the CPU math on ``threads`` threads (default: torch's, one per core), then restore.

    The default is the one mergekit runs with, and it matters beyond speed: torch splits
    a float32 sum between its threads, so the number of threads decides the order of the
    additions, and so the last bits of SLERP's cosine. With the same number of threads as
    mergekit on the same machine, the two agree bit for bit; another number can change a
    few elements by one unit in the last place. The reading and writing threads need
    almost no CPU (inputs are used in place from the page cache, outputs are written by
    direct I/O), so the math can have every core. Afterwards both of torch's settings are
    as they were: this thread's, and the one that threads started later take.
    """
    previous = torch.get_num_threads()
    wanted = threads if threads is not None else previous
    if wanted < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    if device.type != "cpu":
        yield previous
        return
    for_new_threads = threads_for_new_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        # Both settings: this thread's, and the one threads started later take (which
        # `torch.set_num_threads` changes too).
        torch.set_num_threads(previous)
        set_threads_for_new_threads(for_new_threads)


def return_freed_memory_to_the_system() -> None:
    """Serve large blocks from their own memory maps, so freeing them returns the memory.

    glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed
    tensors stay in the process's heap and the resident size grows with the model: pinning
    the threshold at 4 MiB keeps the peak at a few tensors. Elsewhere than glibc, nothing.
    """
    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 4 * 1024**2)


# --------------------------------------------------------------------------------------
# Reading ahead: the next tensor's inputs are read while the current one is merged
# --------------------------------------------------------------------------------------


class BufferSet:
    """One reusable uint8 buffer per input of a job, for inputs that are read, not mapped.

    Fresh memory is slow (the kernel zeroes every page on first touch: a 117 MB tensor
    reads about 4x slower into a new buffer than into a reused one), so each buffer is
    allocated once at ``keep_bytes``, the largest ordinary input. Larger tensors (a 7B
    model's embeddings) get a buffer of their own that is dropped after use.
    """

    def __init__(self, keep_bytes: int, pinned: bool) -> None:
        self.keep_bytes = keep_bytes
        self.pinned = pinned
        self.buffers: list[torch.Tensor] = []

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` for input ``index``."""
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        size = self.buffers[index].numel()
        if size < nbytes or size > max(nbytes, self.keep_bytes):
            self.buffers[index] = torch.empty(0, dtype=torch.uint8)  # free before allocating
            new_size = max(nbytes, self.keep_bytes)
            self.buffers[index] = torch.empty(new_size, dtype=torch.uint8, pin_memory=self.pinned)
        return self.buffers[index]


def read_ahead(
    jobs: Sequence[TensorPlan],
    readers: Mapping[str, ModelReader],
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    budget_bytes: int = READ_AHEAD_BYTES,
) -> Iterator[tuple[TensorPlan, list[torch.Tensor]]]:
    """Yield ``(job, inputs)`` in order, reading the next job's inputs in a background thread.

    Inputs are cast to ``dtype`` (the config's ``dtype``) as they are loaded, before any
    arithmetic, and moved to ``device``. They are valid until the next iteration: their
    buffers are then reused. Two buffer sets alternate, and the thread starts reading a
    job early only while the bytes in flight stay within ``budget_bytes``.
    """

    def input_bytes(job: TensorPlan) -> list[int]:
        return [readers[i.model].header.tensors[i.tensor].nbytes for i in job.inputs]

    def job_bytes(job: TensorPlan) -> int:
        return sum(input_bytes(job))

    # Jobs that fit the budget twice over are double-buffered; the largest of their
    # inputs sets the size of the buffers that are kept.
    ordinary = [job for job in jobs if 2 * job_bytes(job) <= budget_bytes]
    keep_bytes = max((n for job in ordinary for n in input_bytes(job)), default=0)
    pinned = device.type == "cuda"
    free_sets: queue.Queue[BufferSet] = queue.Queue()
    for _ in range(2):
        free_sets.put(BufferSet(keep_bytes, pinned))
    ready: queue.Queue[Any] = queue.Queue()
    in_flight = InFlightBytes(budget_bytes)
    stop = threading.Event()
    finished = object()

    def read_all() -> None:
        try:
            for job in jobs:
                buffers = free_sets.get()
                in_flight.acquire(job_bytes(job), stop)
                if stop.is_set():
                    return
                inputs = [
                    load_input(readers[i.model], i.tensor, buffers, k, dtype, device)
                    for k, i in enumerate(job.inputs)
                ]
                ready.put((job, inputs, buffers))
            ready.put(finished)
        except BaseException as err:  # handed to the merging thread, which raises it
            ready.put(err)

    thread = threading.Thread(target=read_all, name="pearl-edu-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            job, inputs, buffers = item
            yield job, inputs
            del inputs  # the caller is done with them: give their memory back
            in_flight.release(job_bytes(job))
            free_sets.put(buffers)
    finally:
        stop.set()
        in_flight.wake()
        free_sets.put(BufferSet(0, pinned))  # unblock a reader waiting for buffers
        thread.join()


def load_input(
    reader: ModelReader,
    name: str,
    buffers: BufferSet,
    index: int,
    dtype: torch.dtype | None,
    device: torch.device,
) -> torch.Tensor:
    """Read one input tensor, then cast it and move it for the math.

    On the CPU a safetensors tensor is used in place, from the page cache (`ModelReader.map`):
    no copy, and no buffer. Otherwise (pickle checkpoints, the GPU path, whose copies are
    faster from pinned memory) it is read into its reused buffer.
    """
    if device.type == "cpu" and reader.can_map(name):
        tensor = reader.map(name, populate=True)
    else:
        nbytes = reader.header.tensors[name].nbytes
        tensor = reader.read(name, out=buffers.buffer(index, nbytes))
    moved = tensor.to(device=device, dtype=dtype or tensor.dtype, non_blocking=True)
    if moved.device != tensor.device:
        # SLERP sums its cosine on the CPU: from this copy, rather than one back from the GPU.
        keep_host_copy(moved, tensor)
    return moved


class InFlightBytes:
    """Counts the input bytes read but not yet merged, and makes the reader wait."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.count = 0
        self.condition = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> None:
        """Wait until ``nbytes`` more fit the budget (a job alone always fits)."""
        with self.condition:
            while self.count and self.count + nbytes > self.budget and not stop.is_set():
                self.condition.wait()
            self.count += nbytes

    def release(self, nbytes: int) -> None:
        with self.condition:
            self.count -= nbytes
            self.condition.notify_all()

    def wake(self) -> None:
        with self.condition:
            self.condition.notify_all()


def aligned_view(buffer: torch.Tensor, job: TensorPlan, file_offset: int) -> torch.Tensor:
    """``job``'s output tensor inside ``buffer``, placed as its bytes will lie on disk.

    The tensor starts at the same offset within a 4 KiB page of memory as within a block
    of its file, so that the writer can send it to the disk without copying it
    (`pearl_edu.io.SequentialFile.write`). ``buffer`` has a block to spare for the shift.
    """
    shift = (file_offset - buffer.data_ptr()) % DIRECT_ALIGNMENT
    if shift % job.dtype.itemsize:
        shift = 0  # an odd offset for this dtype: the writer copies it instead
    return buffer[shift : shift + job.nbytes].view(job.dtype).view(job.shape)


class OutputBuffers:
    """Reusable buffers for merged tensors: one being merged into, others being written.

    Writing into fresh memory costs a page fault per 4 KiB (on the benchmark machine,
    about 0.5 s per GB, as much as the arithmetic of a SLERP pass), so each merged tensor
    is written into one of ``count`` buffers that are kept. `take` waits until the writer
    thread has handed a buffer back with `give`, then picks the smallest free buffer that
    is large enough, or grows the largest one, so the embeddings' size is held by as few
    buffers as the order of the tensors allows. Two buffers (one merged into while the
    other is written) keep the peak memory at two of the largest tensors; a third saved
    about 0.4 s of waiting for the disk on the 4-layer benchmark but added a tensor's worth
    of memory. On the GPU path the buffers are pinned, so results come back at full speed.

    Tensors of at most ``small_bytes`` (norm weights, a model's smaller projections) get
    a fresh buffer of their own instead, dropped once written: their page faults cost
    little, and they no longer hold a large buffer while a large tensor waits for one.
    """

    def __init__(
        self, count: int = 2, *, pinned: bool = False, small_bytes: int = SMALL_OUTPUT_BYTES
    ) -> None:
        self.pinned = pinned
        self.small_bytes = small_bytes
        self.free = [torch.empty(0, dtype=torch.uint8) for _ in range(count)]
        self.condition = threading.Condition()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (waits for a kept one to be free)."""
        if nbytes <= self.small_bytes:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        with self.condition:
            self.condition.wait_for(lambda: self.free)
            sizes = [buffer.numel() for buffer in self.free]
            fitting = [i for i, size in enumerate(sizes) if size >= nbytes]
            if fitting:
                return self.free.pop(min(fitting, key=sizes.__getitem__))
            # None is large enough: replace the largest (freed before allocating).
            del self.free[max(range(len(sizes)), key=sizes.__getitem__)]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buffer: torch.Tensor) -> None:
        """Hand a buffer back once its contents are written (a small one is dropped)."""
        if buffer.numel() <= self.small_bytes:
            return
        with self.condition:
            self.free.append(buffer)
            self.condition.notify()


class WriteBehind:
    """Writes merged tensors to disk in a background thread while the next one is merged.

    At most ``pending`` tensors wait in line, which bounds the memory they hold. An error
    in the thread (a full disk) is raised in the merging thread at its next `write` or
    at `finish`; a failed write (`OSError`: a full disk, no permission) as a one-line
    `OutputError`. Each tensor's ``then`` callback runs once it is written (or dropped
    after an error), to hand its buffer back.
    """

    def __init__(self, writer: ShardedWriter, pending: int = 1) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[str, torch.Tensor, Callable[[], None]] | None] = queue.Queue(
            maxsize=pending
        )
        self.error: BaseException | None = None
        self.written = 0
        self.files = {t.name: writer.folder / s.file_name for s in writer.shards for t in s.tensors}
        self.thread = threading.Thread(target=self._write_all, name="pearl-edu-writer")
        self.thread.start()

    def write(
        self, name: str, tensor: torch.Tensor, then: Callable[[], None] = lambda: None
    ) -> None:
        """Queue ``tensor`` for writing (waits while the line is full)."""
        self._raise_error()
        self.queue.put((name, tensor, then))

    def finish(self) -> None:
        """Wait until every queued tensor is on disk; raise the thread's error if any."""
        self.close()
        self._raise_error()

    def close(self) -> None:
        """Stop the thread after the tensors already queued (safe to call twice)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _write_all(self) -> None:
        while (item := self.queue.get()) is not None:
            name, tensor, then = item
            del item
            try:
                if self.error is None:  # after an error, keep draining: never block the merge
                    self.writer.write(name, tensor)
                    self.written += 1
                    kill_self_if_testing(self.written)
            except OSError as err:  # a full disk: one line, raised in the merging thread
                self.error = output_error(err, self.files[name])
            except BaseException as err:  # raised again in the merging thread
                self.error = err
            finally:
                del tensor
                then()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------------------
# Checks made before anything is written
# --------------------------------------------------------------------------------------


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


def check_output_dir(output_dir: Path, model_dirs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that would overwrite a model (its own input) or someone's files."""
    target = output_dir.resolve()
    for model_dir in model_dirs:
        source = Path(model_dir).resolve()
        if target == source or target.is_relative_to(source):
            raise OutputError(f"output folder {output_dir} is inside input model folder {source}")
        if source.is_relative_to(target):
            raise OutputError(f"output folder {output_dir} contains input model folder {source}")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise OutputError(f"output folder {output_dir} is not empty; pass --force to replace it")


def check_input_shapes(jobs: Sequence[TensorPlan], headers: Mapping[str, ModelHeader]) -> None:
    """Refuse, before reading any weight, to merge tensors whose shapes differ."""
    for job in jobs:
        shapes = {i.model: headers[i.model].tensors[i.tensor].shape for i in job.inputs}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{model} {list(shape)}" for model, shape in shapes.items())
            raise ModelError(
                f"{job.name}: shapes differ ({listed}); merge only models of the same "
                "architecture and size (for different vocabularies, align the tokenizers "
                "and resize the embeddings first)"
            )


# --------------------------------------------------------------------------------------
# The partial folder, resume and publishing
# --------------------------------------------------------------------------------------


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
    merge_plan: MergePlan, shards: Sequence[Shard], headers: Mapping[str, ModelHeader]
) -> str:
    """A hash of everything that determines the output bytes, to recognise a rerun.

    The plan (names, inputs, methods, parameters, dtypes), the shard layout, the
    config, pearl_edu's version and the input weight files (path, size, modification time).
    """
    description = {
        "version": __version__,
        "config": merge_plan.config.raw,
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
        "shards": [[s.file_name, hashlib.sha256(s.header).hexdigest()] for s in shards],
        "inputs": {
            ref: [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in header.files]
            for ref, header in headers.items()
        },
    }
    text = json.dumps(description, sort_keys=True, default=str)
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


# --------------------------------------------------------------------------------------
# The files beside the weights: config, tokenizer, model card
# --------------------------------------------------------------------------------------


def write_model_files(
    folder: Path,
    config: MergeConfig,
    merge_plan: MergePlan,
    base_dir: Path,
    model_name: str,
    copy_tokenizer: bool = True,
) -> None:
    """Write config.json, generation config, tokenizer, README.md and mergekit_config.yml.

    Text files get ``\n`` line endings on every system, so a merge's bytes do not depend on it.
    """
    write_hf_config(folder, base_dir, merge_plan)
    for name in ("generation_config.json", *TOKENIZER_FILES) if copy_tokenizer else ():
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)
    config_yaml = yaml.safe_dump(config.raw, sort_keys=False, default_flow_style=None)
    (folder / "mergekit_config.yml").write_text(config_yaml, encoding="utf-8", newline="\n")
    card = model_card(config, config_yaml, model_name)
    (folder / "README.md").write_text(card, encoding="utf-8", newline="\n")


def write_hf_config(folder: Path, base_dir: Path, merge_plan: MergePlan) -> None:
    """The base model's ``config.json`` with the output dtype and layer count updated."""
    source = base_dir / "config.json"
    hf_config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    dtype_counts = Counter(job.dtype for job in merge_plan.tensors)
    dtype = dtype_counts.most_common(1)[0][0]
    for key in ("torch_dtype", "dtype"):
        hf_config[key] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    hf_config["num_hidden_layers"] = merge_plan.num_layers
    text = json.dumps(hf_config, indent=2) + "\n"
    (folder / "config.json").write_text(text, encoding="utf-8", newline="\n")


def model_card(config: MergeConfig, config_yaml: str, model_name: str) -> str:
    """A README.md in the shape of mergekit's model cards: method, inputs, the YAML."""
    models = config.models()
    front_matter = yaml.safe_dump(
        {
            "base_model": models,
            "library_name": "transformers",
            "tags": ["mergekit", "merge", "pearl-edu"],
        },
        sort_keys=False,
    )
    listed = "\n".join(f"* {model}" for model in models)
    t_note = " (t = 0)" if config.merge_method == "slerp" else ""
    base = f" with {config.base_model} as the base{t_note}" if config.base_model else ""
    seed = (
        f"Random seed: `{config.random_seed}` (each tensor draws from a seed made of this "
        "one and the tensor's name, so the merge is reproducible).\n\n"
        if METHODS[config.merge_method].random
        else ""
    )
    return (
        f"---\n{front_matter}---\n"
        f"# {model_name}\n\n"
        f"This is a merge of pre-trained language models made with pearl_edu {__version__}, "
        "which reads mergekit's configuration format with mergekit's meaning.\n\n"
        "## Merge details\n\n"
        f"Merge method: `{config.merge_method}`{base}.\n\n"
        f"{seed}"
        f"Models merged:\n\n{listed}\n\n"
        "## Configuration\n\n"
        "The following YAML configuration was used to produce this model:\n\n"
        f"```yaml\n{config_yaml}```\n"
    )


# --------------------------------------------------------------------------------------
# Progress and the testing hook
# --------------------------------------------------------------------------------------


def progress_bar(total: int, *, initial: int, enabled: bool | None) -> Any:
    """A tqdm bar over bytes merged; ``None`` shows it only on a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=None if enabled is None else not enabled,
    )


def kill_self_if_testing(tensors_written: int) -> None:
    """Simulate ``kill -9`` after N tensors when ``PEARL_EDU_KILL_AFTER_TENSORS=N`` is set."""
    limit = os.environ.get("PEARL_EDU_KILL_AFTER_TENSORS")
    if limit and tensors_written >= int(limit):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows: no SIGKILL
