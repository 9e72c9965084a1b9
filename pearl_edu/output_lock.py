"""One merge per output: the output folder's lock, and the steps that write a folder under it.

A merge holds an exclusive lock on its output for its whole run, resume and publication
included (`output_lock`); a second merge into the same folder is refused in one line
naming the first, and the lock of a killed merge is taken over (the operating system
releases it with the process). `output_transaction` is the whole sequence, shared by
`pearl_edu.engine.merge` and `pearl_edu.moe.build_moe`: lock, check again, resume,
publish, or clean up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pearl_edu.errors import OutputError
from pearl_edu.output import (
    discard_unfinished,
    output_error,
    partial_dir,
    prepare_partial_dir,
    publish,
    writing,
)
from pearl_edu.writing import Shard


@contextlib.contextmanager
def output_transaction(
    output_dir: Path, identity: str, shards: Sequence[Shard], check: Callable[[], None]
) -> Iterator[tuple[Path, set[str]]]:
    """Write a model folder under ``output_dir``'s lock; publish it whole, or leave no trace.

    1. Under the lock (`output_lock`), ``check()`` runs again: no other merge can change
       the folder now.
    2. The partial folder is prepared for ``identity`` (`pearl_edu.output.prepare_partial_dir`:
       the finished shards of the same merge are kept) and ``(partial, finished shard
       names)`` is yielded; the caller writes every other file into ``partial``.
    3. On leaving the block, the partial folder is renamed into place
       (`pearl_edu.output.publish`).

    Whatever stops it (an error, Ctrl-C) leaves no half-written file: the final folder does
    not exist yet, the partial one keeps finished shards only, for a rerun
    (`pearl_edu.output.discard_unfinished`), and the parent folders made for this output
    are removed again if they are empty.
    """
    partial = partial_dir(output_dir)
    new_parents = created_parents(output_dir)
    published = False
    try:
        with output_lock(output_dir):
            check()
            # Outside the clean-up below: a partial folder that is not this merge's is
            # refused here, and must be left as it is.
            with writing(partial):
                finished = prepare_partial_dir(partial, identity, shards)
            try:
                yield partial, finished
                with writing(partial):
                    publish(partial, output_dir)
            except BaseException:
                discard_unfinished(partial, shards)
                raise
            published = True
    finally:
        if not published:  # folders made for this output and left empty go too
            for parent in new_parents:
                with contextlib.suppress(OSError):
                    parent.rmdir()


def lock_path(output_dir: Path) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it."""
    return output_dir.parent / f".{output_dir.name}.lock"


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``output_dir`` (its resolved path) for the whole merge.

    The lock is the operating system's (``flock``) on ``.<name>.lock`` beside the output,
    so it is released when the process ends, however it ends: the lock file a killed merge
    leaves behind is taken over by the next one. A merge that finds the lock held is
    refused at once, in one line naming the merge that holds it (its process id, host and
    start time, written into the lock file). The lock file is removed on release. Yields
    the lock file's path.
    """
    path = lock_path(output_dir)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        with writing(path):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still held: no other merge can be between its open and its lock
        os.close(fd)


def _acquire(path: Path) -> int:
    """Open and lock ``path`` exclusively, or raise a one-line `OutputError` naming the holder."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system (Windows): no lock, one merge per output is on you
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"output folder {path.parent / path.name[1:-5]} is being written by another "
                    f"merge ({_holder(path)}); wait for it to finish, or stop it, then run "
                    "this one again"
                ) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                # A file system without locks: go on unlocked rather than refuse to merge.
                with writing(path):
                    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            raise output_error(err, path) from None
        # The file may have been removed (by the merge that held it, on release) between
        # our open and our lock: then we hold a lock on a file nobody else will see.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    """Who holds the lock, from what the lock file says: 'process 123 on host, since 10:02'."""
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
        return f"process {int(record['pid'])} on {record['host']}, since {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lock is {path}"


def created_parents(folder: Path) -> list[Path]:
    """The ancestors of ``folder`` that do not exist yet, nearest first (to remove if unused)."""
    missing = []
    for parent in folder.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing
