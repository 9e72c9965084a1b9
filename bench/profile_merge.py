"""Where does `pearl-edu merge` spend its time? Times each stage of one merge.

    python bench/profile_merge.py CONFIG [--threads N] [--chunk-elements N]

Runs `pearl_edu.engine.merge` in this process with timers around the stages of the
streaming loop (the two passes of SLERP, reading, writing), then prints the wall time
spent in each, per thread, next to the process's CPU time. Wall time far above CPU time
means a stage waits (for the disk, for another thread, or for cores that other
programs hold). ``--threads`` sets torch's intra-op threads; ``--chunk-elements``
overrides the chunk size of the SLERP arithmetic, to try both without editing the engine.

The stage functions are looked up by name; a stage the engine no longer has is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# (module, object inside it or "", function name, label)
STAGES = (
    ("pearl_edu.backends.cpu", "", "cosine", "slerp: norms and dot product"),
    ("pearl_edu.backends.cpu", "", "weighted_sum", "slerp: weighted sum"),
    ("pearl_edu.read_ahead", "", "load_input", "read: read and cast one input"),
    ("pearl_edu.reading", "ModelReader", "_pread_into", "read: positioned reads"),
    ("pearl_edu.writing", "ShardedWriter", "write", "write: one tensor (with fsync per shard)"),
)

stage_seconds: dict[str, float] = defaultdict(float)


def timed(function, label: str):
    """``function`` wrapped to add its wall time to ``stage_seconds[label (thread)]``."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            thread = threading.current_thread().name
            stage_seconds[f"{label} ({thread})"] += time.perf_counter() - started

    return wrapper


def instrument() -> None:
    """Wrap every stage function that exists in the engine."""
    for module_name, owner_name, function_name, label in STAGES:
        owner = importlib.import_module(module_name)
        if owner_name:
            owner = getattr(owner, owner_name, None)
        if owner is not None and hasattr(owner, function_name):
            setattr(owner, function_name, timed(getattr(owner, function_name), label))
        else:
            print(f"note: {module_name}.{owner_name or ''}{function_name} not found, not timed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="merge config (YAML path)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--chunk-elements", type=int, help="SLERP chunk size, in elements")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_elements:
        # The core's chunk size, which the CPU backend reads at each call.
        importlib.import_module("pearl_edu.core.interpolation").CHUNK_ELEMENTS = args.chunk_elements
    instrument()
    merge = importlib.import_module("pearl_edu.engine").merge
    # As the pearl-edu command does before merging (a library call leaves the allocator be).
    importlib.import_module("pearl_edu.process_settings").return_freed_memory_to_the_system()

    out = Path(tempfile.mkdtemp(prefix="pearl-profile-")) / "merged"
    cpu_started, started = time.process_time(), time.perf_counter()
    try:
        merge(args.config, out, device="cpu", progress=False, threads=args.threads)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    print(f"torch threads: {torch.get_num_threads()}")
    print(f"merge: {wall:.1f} s wall, {cpu:.1f} s CPU (all threads)")
    for label, seconds in sorted(stage_seconds.items(), key=lambda item: -item[1]):
        print(f"  {seconds:7.1f} s  {label}")


if __name__ == "__main__":
    main()
