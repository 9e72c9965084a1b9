"""Faults the tests inject into a merge: a hook after each tensor written, or a signal.

Nothing in the package stops or kills a merge for a test: the tests replace the writer's
`ShardedWriter.write` instead, in their own process (`after_each_write`) or in a
``python -c`` child that then runs ``pearl-edu`` (`signalled_merge_command`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pearl_edu.writing import ShardedWriter

REPO_ROOT = Path(__file__).resolve().parents[1]


def after_each_write(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None]) -> None:
    """Call ``hook(n)`` once the writer has written its n-th tensor (n = 1, 2, ...).

    It runs in the writer's thread, as a write would: an exception it raises (a
    `KeyboardInterrupt` stands for Ctrl-C) stops the merge as a failed write does.
    """
    write = ShardedWriter.write
    written = 0

    def write_then_hook(self: ShardedWriter, *args, **kwargs):
        nonlocal written
        result = write(self, *args, **kwargs)
        written += 1
        hook(written)
        return result

    monkeypatch.setattr(ShardedWriter, "write", write_then_hook)


# Run as ``python -c SIGNALLED ARGS...``: ``pearl-edu ARGS[2:]`` in this process, which sends
# itself the signal named ARGS[0] (KILL: ``kill -9``; STOP: paused until SIGCONT) once it
# has written ARGS[1] tensors.
SIGNALLED = """\
import os, signal, sys
from pearl_edu import cli
from pearl_edu.writing import ShardedWriter
signum, after = getattr(signal, "SIG" + sys.argv[1]), int(sys.argv[2])
write, written = ShardedWriter.write, 0
def write_then_signal(self, *args, **kwargs):
    global written
    result = write(self, *args, **kwargs)
    written += 1
    if written == after:
        os.kill(os.getpid(), signum)
    return result
ShardedWriter.write = write_then_signal
sys.exit(cli.main(sys.argv[3:]))
"""


def signalled_merge_command(signal_name: str, after: int, args: Sequence[str]) -> list[str]:
    """The command of a ``pearl-edu ARGS`` that signals itself after ``after`` tensors.

    ``signal_name`` is ``"KILL"`` (the merge dies as by ``kill -9``: exit status -9) or
    ``"STOP"`` (it pauses until sent SIGCONT). Run it with the repository as the cwd.
    """
    return [sys.executable, "-c", SIGNALLED, signal_name, str(after), *map(str, args)]
