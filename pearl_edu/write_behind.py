"""Writing behind: merged tensors go to disk while the next one is merged.

- `OutputBuffers`: the result goes into one of two reused output buffers (`aligned_view`
  places it as its bytes will lie on disk); tensors up to `SMALL_OUTPUT_BYTES` get fresh
  buffers of their own instead.
- `WriteBehind`: another thread writes each result past the page cache
  (`pearl_edu.writing.SequentialFile`) while the next one is merged, then hands its
  buffer back; its errors are raised in the merging thread.
- `progress_bar`: a tqdm bar over the bytes merged, which starts no thread of its own.

Fresh memory and the page cache are avoided because on the machines measured (see the
book's performance appendix) touching new pages cost as much as the arithmetic.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from pearl_edu.output import output_error
from pearl_edu.tensor_plan import TensorPlan
from pearl_edu.writing import DIRECT_ALIGNMENT, ShardedWriter

# Merged tensors up to this size get buffers of their own rather than kept ones.
SMALL_OUTPUT_BYTES = 16 * 1024**2


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
    after an error, including a tensor refused by `write` because of an earlier error),
    to hand its buffer back.

    The thread is a daemon: the merge always stops it (`close`, in a ``finally``), and
    should a caller forget to, the process can still exit rather than wait for it.
    """

    def __init__(self, writer: ShardedWriter, pending: int = 1) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[str, torch.Tensor, Callable[[], None], Any] | None] = (
            queue.Queue(maxsize=pending)
        )
        self.error: BaseException | None = None
        self.files = {t.name: writer.folder / s.file_name for s in writer.shards for t in s.tensors}
        self.thread = threading.Thread(target=self._write_all, name="pearl-edu-writer", daemon=True)
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
        values: the writer waits for it before writing. After an error in the thread the
        tensor is refused: ``then`` runs at once and the error is raised.
        """
        if self.error is not None:
            then()
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
