"""The streaming pipeline: inputs read ahead, outputs written behind, buffers reused.

`pearl_edu.merge` runs one loop, a tensor at a time; this module keeps it fed and drained:

- `read_ahead`: a background thread prepares the next tensor's inputs while the current
  one is merged (on the CPU it maps them in place from the page cache; on the GPU path it
  reads them into two sets of pinned buffers), never more than `READ_AHEAD_BYTES` ahead,
  so the embeddings of a 7B model are not held twice.
- `OutputBuffers`: the result goes into one of two reused output buffers (`aligned_view`
  places it as its bytes will lie on disk), and `WriteBehind`, another thread, writes it
  past the page cache (`pearl_edu.writing.SequentialFile`) while the next one is merged.
- `math_threads`: the CPU math gets torch's threads, as mergekit's does, and a helper
  thread (`pearl_edu.backends.cpu.helper_thread`) that lives as long as the merge.
- `CudaTransfers`: on a GPU, inputs go up and results come down on copy streams of their
  own, ordered by events, so the merging thread never waits for a copy: it queues the
  math, and the writer waits for each result's download before writing it.

Fresh memory and the page cache are avoided because on the machines measured (see the
book's performance appendix) touching new pages cost as much as the arithmetic.

A merge leaves the process as it found it: its threads are stopped, torch's thread
settings restored, and glibc's allocator left alone (the ``pearl-edu`` command tunes it
for its own process: `return_freed_memory_to_the_system`).
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from pearl_edu.backends.cpu import (
    helper_thread,
    set_threads_for_new_threads,
    threads_for_new_threads,
)
from pearl_edu.errors import ConfigError
from pearl_edu.output import output_error
from pearl_edu.reading import ModelReader
from pearl_edu.tensor_plan import TensorPlan
from pearl_edu.writing import DIRECT_ALIGNMENT, ShardedWriter

# Read ahead at most this many bytes of inputs while the current tensor is merged.
READ_AHEAD_BYTES = 512 * 1024**2
# Merged tensors up to this size get buffers of their own rather than kept ones.
SMALL_OUTPUT_BYTES = 16 * 1024**2


# The most CPU threads a merge may be given (torch's own setting overflows far beyond).
MAX_THREADS = 4096


def check_threads(threads: int | None) -> None:
    """Refuse a number of CPU threads that is not a whole number from 1 to `MAX_THREADS`."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(
            f"threads: expected a whole number from 1 to {MAX_THREADS}, got {threads!r}"
        )


def threads_used(threads: int | None, device: torch.device) -> int | None:
    """How many threads the CPU math will run on (None off the CPU): it decides the last bits."""
    if device.type != "cpu":
        return None
    return threads if threads is not None else torch.get_num_threads()


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

    The block is also the life of the CPU math's helper thread (on a GPU too, where
    ``--exact`` sums SLERP's cosine on the CPU): started by the first tensor that needs
    it, stopped at the end (`pearl_edu.backends.cpu.helper_thread`).
    """
    check_threads(threads)
    previous = torch.get_num_threads()
    wanted = threads if threads is not None else previous
    if device.type != "cpu":
        with helper_thread():
            yield previous
        return
    for_new_threads = threads_for_new_threads()
    torch.set_num_threads(wanted)
    try:
        with helper_thread():
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

    For the whole process, and for good: glibc's settings cannot be read back, so nothing
    could restore them. The ``pearl-edu merge`` command calls it for its own process
    (`pearl_edu.cli`); `pearl_edu.engine.merge` never does, and leaves a notebook's
    allocator as it is (where the resident size may then grow with the model).
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 4 * 1024**2)
        # Pinning the threshold also pins the heap's trim threshold at 128 KiB: every freed
        # block of a few hundred kB at the heap's top would be handed back to the system and
        # faulted in again at the next allocation (the task-vector methods allocate such
        # blocks per slice). Keep up to 64 MiB of the heap's top instead.
        libc.mallopt(m_trim_threshold, 64 * 1024**2)


# --------------------------------------------------------------------------------------
# Reading ahead: the next tensor's inputs are read while the current one is merged
# --------------------------------------------------------------------------------------


class CudaTransfers:
    """The GPU path's copies: uploads and downloads on streams of their own, with events.

    The reader thread uploads a job's inputs on ``upload_stream`` (``non_blocking``, from
    pinned buffers, the cast to the config's dtype on the device) and marks them with an
    event; the merging thread's stream waits for that event (`use`) instead of the host
    waiting for the copy. A result is downloaded on ``download_stream`` into a pinned
    output buffer (`download`), and the writer waits for that download's event before it
    writes the buffer. Only where torch sees a CUDA GPU (`transfers_for`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.upload_stream = torch.cuda.Stream(device)
        self.download_stream = torch.cuda.Stream(device)

    def upload(self, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """``tensor`` (in pinned host memory) on the device, cast there; queued, not waited for."""
        with torch.cuda.stream(self.upload_stream):
            return tensor.to(device=self.device, dtype=dtype or tensor.dtype, non_blocking=True)

    def mark(self) -> Any:
        """An event that completes once every upload queued so far has."""
        event = torch.cuda.Event()
        event.record(self.upload_stream)
        return event

    def use(self, tensors: Sequence[torch.Tensor], uploaded: Any) -> None:
        """Make the math wait, on the device, for ``tensors``' uploads (marked ``uploaded``)."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(uploaded)
        for tensor in tensors:
            # Allocated on the upload stream, used on this one: the allocator must not hand
            # its memory out again before this stream's work on it is done.
            tensor.record_stream(stream)

    def download(self, tensor: torch.Tensor, host: torch.Tensor) -> Any:
        """Queue the copy of ``tensor`` into ``host``; returns the event of its completion."""
        self.download_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.download_stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.download_stream)
        tensor.record_stream(self.download_stream)
        return done


def transfers_for(device: torch.device) -> CudaTransfers | None:
    """`CudaTransfers` for a CUDA device that torch sees; None elsewhere (plain copies)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaTransfers(device)
    return None


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
        # The event of the last uploads from these buffers (`CudaTransfers.mark`): they are
        # refilled only once it has completed.
        self.uploaded: Any = None

    def wait_for_uploads(self) -> None:
        """Wait until the uploads from these buffers are done, so they may be refilled."""
        if self.uploaded is not None:
            self.uploaded.synchronize()
            self.uploaded = None

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
    transfers: CudaTransfers | None = None,
) -> Iterator[tuple[TensorPlan, list[torch.Tensor], list[torch.Tensor | None]]]:
    """Yield ``(job, inputs, hosts)`` in order, reading the next job's inputs in a thread.

    Inputs are cast to ``dtype`` (the config's ``dtype``) as they are loaded, before any
    arithmetic, and moved to ``device``; ``hosts[i]`` is the host copy of ``inputs[i]``
    when it was moved off the CPU, else None (`load_input`). They are valid until the next
    iteration: their buffers are then reused. Two buffer sets alternate, and the thread
    starts reading a job early only while the bytes in flight stay within
    ``budget_bytes``. With ``transfers`` (`CudaTransfers`), inputs are uploaded on its
    stream, and the math waits for them on the device.
    """

    def input_bytes(job: TensorPlan) -> list[int]:
        return [readers[i.model].header.tensors[i.tensor].nbytes for i in job.inputs]

    def job_bytes(job: TensorPlan) -> int:
        return sum(input_bytes(job))

    # Jobs that fit the budget twice over are double-buffered; the largest of their
    # inputs sets the size of the buffers that are kept.
    ordinary = [job for job in jobs if 2 * job_bytes(job) <= budget_bytes]
    keep_bytes = max((n for job in ordinary for n in input_bytes(job)), default=0)
    pinned = device.type == "cuda" and torch.cuda.is_available()
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
                buffers.wait_for_uploads()
                in_flight.acquire(job_bytes(job), stop)
                if stop.is_set():
                    return
                loaded = [
                    load_input(readers[i.model], i.tensor, buffers, k, dtype, device, transfers)
                    for k, i in enumerate(job.inputs)
                ]
                inputs = [tensor for tensor, _ in loaded]
                hosts = [host for _, host in loaded]
                del loaded
                if transfers is not None:
                    buffers.uploaded = transfers.mark()
                ready.put((job, inputs, hosts, buffers))
            ready.put(finished)
        except BaseException as err:  # handed to the merging thread, which raises it
            ready.put(err)

    thread = threading.Thread(target=read_all, name="pearl-edu-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            job, inputs, hosts, buffers = item
            del item
            if transfers is not None:
                transfers.use(inputs, buffers.uploaded)
            yield job, inputs, hosts
            del inputs, hosts  # the caller is done with them: give their memory back
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
    transfers: CudaTransfers | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read one input tensor, then cast it and move it for the math: ``(tensor, host)``.

    On the CPU a safetensors tensor is used in place, from the page cache (`ModelReader.map`):
    no copy, and no buffer. Otherwise (pickle checkpoints, the GPU path, whose copies are
    faster from pinned memory) it is read into its reused buffer; with ``transfers`` it is
    uploaded on their stream (`CudaTransfers.upload`), cast on the device. ``host`` is
    the tensor as read, in host memory, when the tensor for the math lies elsewhere (SLERP
    sums its cosine from it: `pearl_edu.backends.cpu.host_copies`), else None.
    """
    if device.type == "cpu" and transfers is None and reader.can_map(name):
        tensor = reader.map(name, populate=True)
    else:
        nbytes = reader.header.tensors[name].nbytes
        tensor = reader.read(name, out=buffers.buffer(index, nbytes))
    if transfers is not None:
        moved = transfers.upload(tensor, dtype)
    else:
        moved = tensor.to(device=device, dtype=dtype or tensor.dtype, non_blocking=True)
    if moved.device != tensor.device:
        # SLERP sums its cosine on the CPU: from this copy, rather than one back from the GPU.
        return moved, tensor
    return moved, None


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


# --------------------------------------------------------------------------------------
# Writing behind: merged tensors go to disk while the next one is merged
# --------------------------------------------------------------------------------------


def aligned_view(buffer: torch.Tensor, job: TensorPlan, file_offset: int) -> torch.Tensor:
    """``job``'s output tensor inside ``buffer``, placed as its bytes will lie on disk.

    The tensor starts at the same offset within a 4 KiB page of memory as within a block
    of its file, so that the writer can send it to the disk without copying it
    (`pearl_edu.writing.SequentialFile.write`). ``buffer`` has a block to spare for the shift.
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
        self.queue: queue.Queue[tuple[str, torch.Tensor, Callable[[], None], Any] | None] = (
            queue.Queue(maxsize=pending)
        )
        self.error: BaseException | None = None
        self.files = {t.name: writer.folder / s.file_name for s in writer.shards for t in s.tensors}
        self.thread = threading.Thread(target=self._write_all, name="pearl-edu-writer")
        self.thread.start()

    def write(
        self,
        name: str,
        tensor: torch.Tensor,
        then: Callable[[], None] = lambda: None,
        ready: Any = None,
    ) -> None:
        """Queue ``tensor`` for writing (waits while the line is full).

        ``ready``, an event (`CudaTransfers.download`), completes once ``tensor`` holds its
        values: the writer waits for it before writing.
        """
        self._raise_error()
        self.queue.put((name, tensor, then, ready))

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
            name, tensor, then, ready = item
            del item
            try:
                if ready is not None:
                    ready.synchronize()  # the result's download from the GPU
                if self.error is None:  # after an error, keep draining: never block the merge
                    self.writer.write(name, tensor)
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


def progress_bar(total: int, *, initial: int, enabled: bool | None) -> Any:
    """A tqdm bar over bytes merged; ``None`` shows it only on a terminal.

    Without tqdm's monitor thread, which tqdm starts for any bar, shown or not, and never
    stops: it would outlive the merge. The bar is redrawn as bytes are merged.
    """
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0  # no monitor thread

    return Bar(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=None if enabled is None else not enabled,
    )
