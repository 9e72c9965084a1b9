"""Reading ahead: the next tensor's inputs are read while the current one is merged.

- `read_ahead`: a background thread prepares the next tensor's inputs while the current
  one is merged (on the CPU it maps them in place from the page cache, or reads those that
  are not cached past it into reused buffers, `load_input`; on the GPU path it reads them
  into two sets of reused pinned buffers, `BufferSet`), never more than `READ_AHEAD_BYTES`
  ahead (`InFlightBytes`), so the embeddings of a 7B model are not held twice.
- `CudaTransfers`: on a GPU, inputs go up and results come down on copy streams of their
  own, ordered by events, so the merging thread never waits for a copy: it queues the
  math, and the writer (`pearl_edu.write_behind.WriteBehind`) waits for each result's
  download before writing it.

Fresh memory is avoided because on the machines measured (see the book's performance
appendix) touching new pages cost as much as the arithmetic. The reader thread is
stopped before `read_ahead`'s iteration ends, however it ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from pearl_edu.page_cache import DIRECT_SLACK
from pearl_edu.reading import ModelReader
from pearl_edu.tensor_plan import TensorPlan

# Read ahead at most this many bytes of inputs while the current tensor is merged.
READ_AHEAD_BYTES = 512 * 1024**2


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
    keep_bytes = max((n for job in ordinary for n in input_bytes(job)), default=0) + DIRECT_SLACK
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
            for index, job in enumerate(jobs):
                # The job after this one: its bytes start coming from the disk now, while
                # this one's are read (from a cold disk, the two reads then overlap).
                for later in jobs[index + 1 : index + 2]:
                    for i in later.inputs:
                        if not past_cache(readers[i.model], i.tensor, device, transfers):
                            readers[i.model].prefetch(i.tensor)
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
    no copy, and no buffer; one that is not cached is read past the cache into its buffer
    (`past_cache`). Otherwise (pickle checkpoints, the GPU path, whose copies are
    faster from pinned memory) it is read into its reused buffer; with ``transfers`` it is
    uploaded on their stream (`CudaTransfers.upload`), cast on the device. ``host`` is
    the tensor as read, in host memory, when the tensor for the math lies elsewhere (SLERP
    sums its cosine from it: `pearl_edu.backends.cpu.host_copies`), else None.
    """
    nbytes = reader.header.tensors[name].nbytes
    if past_cache(reader, name, device, transfers):
        tensor = reader.read_past_cache(name, buffers.buffer(index, nbytes + DIRECT_SLACK))
    elif device.type == "cpu" and transfers is None and reader.can_map(name):
        tensor = reader.map(name, populate=True)
    else:
        tensor = reader.read(name, out=buffers.buffer(index, nbytes))
    if transfers is not None:
        moved = transfers.upload(tensor, dtype)
    else:
        moved = tensor.to(device=device, dtype=dtype or tensor.dtype, non_blocking=True)
    if moved.device != tensor.device:
        # SLERP sums its cosine on the CPU: from this copy, rather than one back from the GPU.
        return moved, tensor
    return moved, None


def past_cache(
    reader: ModelReader, name: str, device: torch.device, transfers: CudaTransfers | None
) -> bool:
    """Whether a CPU merge reads tensor ``name`` from the disk past the page cache.

    A safetensors tensor the CPU math would map in place (`load_input`) but whose bytes are
    mostly not cached (`ModelReader.cached`) is read with ``O_DIRECT`` into a reused buffer
    instead (`pearl_edu.page_cache`), and is not prefetched into the cache. On a cold 7B
    pair this halved the merge's CPU time and shortened it by about a quarter (the book's
    performance appendix).
    """
    return (
        device.type == "cpu"
        and transfers is None
        and reader.can_map(name)
        and not reader.cached(name)
    )


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
