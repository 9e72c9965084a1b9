"""The CPU math's helper thread, and torch's thread settings around it.

SLERP's CPU backend (`pearl_edu.backends.cpu.cosine`) takes two tensors' norms side by side,
one on the calling thread and one on a helper thread; the helper lives as long as the
block that needs it (a merge, or one call) and no longer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import torch


class HelperThread:
    """One background thread for arithmetic beside the calling thread's, started at first use.

    It runs torch with one intra-op thread (`use_one_math_thread`): a second team of OpenMP
    threads would spin between operations and slow the calling thread's own operations
    about twofold. `close` stops it; `helper_thread` does, at the end of its block.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``function(*args)`` on the thread (started now if need be)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="pearl-edu-math", initializer=use_one_math_thread
            )
        return self._executor.submit(function, *args)

    def close(self) -> None:
        """Wait for the work submitted, then stop the thread (if it was started)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# The helper thread of the enclosing `helper_thread` block, if any.
_HELPER: ContextVar[HelperThread | None] = ContextVar("pearl_edu_helper_thread", default=None)


@contextlib.contextmanager
def helper_thread() -> Iterator[HelperThread]:
    """The helper thread for the block: the enclosing block's, or one stopped at its end.

    A merge opens one block for all its tensors (`pearl_edu.process_settings.math_threads`), so
    its helper thread is started once, at the first tensor that needs it, and stopped when
    the merge ends; a `slerp` called on its own starts and stops one for its call. Either
    way no thread outlives the call that needed it.
    """
    current = _HELPER.get()
    if current is not None:
        yield current
        return
    helper = HelperThread()
    token = _HELPER.set(helper)
    try:
        yield helper
    finally:
        _HELPER.reset(token)
        helper.close()


def use_one_math_thread() -> None:
    """Give the calling thread one torch thread, and leave every other thread's as it was.

    `torch.set_num_threads` sets the calling thread's OpenMP setting, and also the number
    that each thread started afterwards takes on its first torch operation: set here
    alone, it would give every later thread of the process one thread. So the number new
    threads take is read first, and put back afterwards from a short-lived thread of its
    own (which leaves this thread's setting at one).
    """
    for_new_threads = torch.get_num_threads()  # a new thread's first call: what they get
    torch.set_num_threads(1)
    set_threads_for_new_threads(for_new_threads)


def threads_for_new_threads() -> int:
    """The number of torch threads that a thread started now would have."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def set_threads_for_new_threads(count: int) -> None:
    """Make threads started from now on use ``count`` torch threads; this thread's stays.

    torch keeps one process-wide number that new threads take, and sets it on every
    `torch.set_num_threads`; calling that from a throwaway thread changes only this number.
    """
    thread = threading.Thread(target=torch.set_num_threads, args=(count,))
    thread.start()
    thread.join()
