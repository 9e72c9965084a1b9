"""The process's settings for a merge: torch's CPU threads, and glibc's allocator.

- `math_threads`: the CPU math gets torch's threads, as mergekit's does, and a helper
  thread (`pearl_edu.backends.threads.helper_thread`) that lives as long as the merge; both
  of torch's thread settings are restored afterwards (`check_threads` refuses a number
  outside 1 to `MAX_THREADS`, `threads_used` says how many the math runs on).
- `return_freed_memory_to_the_system`: glibc's allocator tuned so that freed tensors give
  their memory back; for good, so only the ``pearl-edu`` command calls it, for its own
  process, and a library merge leaves the allocator as it found it.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

from pearl_edu.backends.threads import (
    helper_thread,
    set_threads_for_new_threads,
    threads_for_new_threads,
)
from pearl_edu.errors import ConfigError

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
    almost no CPU (inputs are used in place from the page cache or read past it by direct
    I/O, outputs are written by direct I/O), so the math can have every core. Afterwards
    both of torch's settings are as they were: this thread's, and the one that threads
    started later take.

    The block is also the life of the CPU math's helper thread (on a GPU too, where
    ``--backend cpu`` sums SLERP's cosine on the CPU): started by the first tensor that needs
    it, stopped at the end (`pearl_edu.backends.threads.helper_thread`).
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
