"""Getting a room of laptops ready: train every chapter's models once, then check each laptop.

    python -m pearl_edu.teaching.classroom prepare [--notebooks DIR] [--only 07 08] [--record FILE]
    python -m pearl_edu.teaching.classroom check

``prepare`` runs every chapter top to bottom, in the book's order, without saving anything
into the notebooks: the first run trains the mini-Pearl models the chapters use and keeps
them in the cache (``$PEARL_EDU_CACHE``, by default ``~/.cache/pearl-edu``), so that in class
each chapter runs in seconds. It prints each chapter's time, and with ``--record`` writes
them, with the machine, to a JSON file (the course plan's timings come from such records).
It ends by writing a stamp into the cache that names the chapters prepared.

``check`` takes well under a minute and says, one line per item, whether this laptop is
ready: Python, torch and pearl_edu, cores, memory, free disk, the stamp of ``prepare`` for
this version of pearl_edu, and a merge of two tiny models. It exits with status 0 when
every item is ready, 1 otherwise, so a teacher can run it on every laptop of a room.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STAMP = "classroom.json"
MIN_PYTHON = (3, 10)
MIN_FREE_DISK = 2 * 1000**3  # the cache and a merged mini-Pearl or two
MIN_AVAILABLE_RAM = 3 * 1000**3  # the largest chapter's peak, with room to spare
CELL_TIMEOUT = 600


def cache_root() -> Path:
    """``$PEARL_EDU_CACHE``, by default ``~/.cache/pearl-edu`` (as `minipearl` keeps it)."""
    return Path(os.environ.get("PEARL_EDU_CACHE") or Path.home() / ".cache" / "pearl-edu")


def chapters(notebooks: Path) -> list[Path]:
    """The chapters under ``notebooks`` in the book's order (``_toc.yml`` beside the folder,
    when there is one), else in the order of their names."""
    import yaml

    found = {path.stem: path for path in notebooks.glob("*.ipynb")}
    toc = notebooks.parent / "_toc.yml"
    if not toc.is_file():
        return [found[name] for name in sorted(found)]
    ordered = []
    for part in yaml.safe_load(toc.read_text()).get("parts", []):
        for entry in part.get("chapters", []):
            stem = Path(entry.get("file", "")).name
            if Path(entry.get("file", "")).parent.name == notebooks.name and stem in found:
                ordered.append(found[stem])
    return ordered + [found[n] for n in sorted(found) if found[n] not in ordered]


@dataclass(frozen=True)
class Timing:
    """How long a chapter took: wall-clock seconds, and the CPU seconds of its kernel.

    On a machine shared with other work the wall clock grows while the CPU time barely does,
    so both are kept.
    """

    seconds: float
    cpu_seconds: float


def run_chapter(path: Path) -> Timing:
    """Execute ``path`` top to bottom in a kernel, in its own folder, and time it.

    The notebook file is read, never written. The kernel's CPU time is read from the
    operating system once the kernel has exited (the CPU time of this process's children).
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    before = os.times()
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return Timing(time.perf_counter() - started, cpu)


def machine() -> dict:
    """The machine a timing was taken on: processor, cores, memory, operating system."""
    import psutil

    return {
        "processor": _processor_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1000**3, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare(
    notebooks: Path, only: Sequence[str] = (), record: Path | None = None, echo=print
) -> dict[str, Timing]:
    """Run every chapter once (the ones whose names start with one of ``only``, if given)."""
    import pearl_edu

    selected = [p for p in chapters(notebooks) if not only or p.stem.startswith(tuple(only))]
    if not selected:
        raise SystemExit(f"classroom: no chapter in {notebooks} matches {list(only)}")
    timings, trained = {}, {}
    for path in selected:
        cached = set(cache_root().glob("*/*"))
        timings[path.stem] = timing = run_chapter(path)
        trained[path.stem] = len(set(cache_root().glob("*/*")) - cached)
        made = f", trained {trained[path.stem]} models" if trained[path.stem] else ""
        echo(f"{path.stem}: {timing.seconds:.1f} s ({timing.cpu_seconds:.1f} s of CPU{made})")
    total = sum(t.seconds for t in timings.values())
    echo(f"all {len(timings)} chapters: {total / 60:.1f} min")
    if record is not None:
        save_record(record, timings, trained)
        echo(f"written to {record}")
    stamp = cache_root() / STAMP
    done = json.loads(stamp.read_text()).get("chapters", []) if stamp.is_file() else []
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(
        json.dumps(
            {"pearl_edu": pearl_edu.__version__, "chapters": sorted({*done, *timings})}, indent=1
        )
        + "\n"
    )
    return timings


def save_record(record: Path, timings: dict[str, Timing], trained: dict[str, int]) -> None:
    """Write (or update: other chapters' entries are kept) a record of chapters' timings.

    For each chapter: its wall-clock and CPU seconds, and how many models it trained and
    cached (0 when the cache already held them), with the machine and its load.
    """
    import pearl_edu

    result = json.loads(record.read_text()) if record.is_file() else {}
    result.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "pearl_edu": pearl_edu.__version__,
            "machine": machine(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
    )
    for key, values in (
        ("seconds", {name: round(t.seconds, 1) for name, t in timings.items()}),
        ("cpu_seconds", {name: round(t.cpu_seconds, 1) for name, t in timings.items()}),
        ("trained", trained),
    ):
        result[key] = {**result.get(key, {}), **values}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1) + "\n")


@dataclass(frozen=True)
class Item:
    """One line of `check`: what was checked, whether it is ready, and what was found."""

    what: str
    ok: bool
    found: str

    def __str__(self) -> str:
        return f"{'ready' if self.ok else 'NOT READY':9s}  {self.what}: {self.found}"


def check(expected_chapters: Sequence[str] = ()) -> list[Item]:
    """Whether this laptop can run the course now (see the module's docstring)."""
    items = []
    version = sys.version_info[:3]
    items.append(
        Item("Python", version >= MIN_PYTHON, ".".join(map(str, version)) + " (3.10 or newer)")
    )
    try:
        import psutil
        import torch

        import pearl_edu
    except ImportError as error:
        items.append(
            Item("packages", False, f"{error}; install with pip install pearl-edu[teaching]")
        )
        return items
    items.append(
        Item("packages", True, f"pearl_edu {pearl_edu.__version__}, torch {torch.__version__}")
    )
    cores = os.cpu_count() or 1
    items.append(Item("cores", cores >= 2, f"{cores} (2 or more)"))
    available = psutil.virtual_memory().available
    items.append(
        Item(
            "memory",
            available >= MIN_AVAILABLE_RAM,
            f"{available / 1000**3:.1f} GB available ({MIN_AVAILABLE_RAM / 1000**3:.0f} GB or more)",
        )
    )
    root = cache_root()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    items.append(
        Item(
            "disk",
            free >= MIN_FREE_DISK,
            f"{free / 1000**3:.1f} GB free under {existing} ({MIN_FREE_DISK / 1000**3:.0f} GB or more)",
        )
    )
    items.append(_stamp_item(root / STAMP, pearl_edu.__version__, expected_chapters))
    items.append(_tiny_merge_item())
    return items


def _stamp_item(stamp: Path, version: str, expected: Sequence[str]) -> Item:
    what = "models trained and cached"
    if not stamp.is_file():
        return Item(what, False, f"no {stamp}: run python -m pearl_edu.teaching.classroom prepare")
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return Item(what, False, f"{stamp} cannot be read ({error}): run prepare again")
    if recorded.get("pearl_edu") != version:
        return Item(
            what,
            False,
            f"prepared with pearl_edu {recorded.get('pearl_edu')}, this is {version}: run prepare again",
        )
    missing = sorted(set(expected) - set(recorded.get("chapters", [])))
    if missing:
        return Item(what, False, f"not prepared: {', '.join(missing)}; run prepare again")
    return Item(
        what, True, f"{len(recorded.get('chapters', []))} chapters prepared, in {stamp.parent}"
    )


def _tiny_merge_item() -> Item:
    import pearl_edu

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pearl-edu-check-") as scratch:
        folder = Path(scratch)
        try:
            a = pearl_edu.make_tiny_model(folder / "a", seed=1)
            b = pearl_edu.make_tiny_model(folder / "b", seed=2)
            recipe = (
                f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n"
                f"  - model: {b}\nparameters:\n  t: 0.5\ndtype: float32\n"
            )
            pearl_edu.merge(pearl_edu.load_config(recipe), folder / "merged", progress=False)
        except Exception as error:  # whatever breaks here is what the teacher must see
            return Item("a merge of two tiny models", False, f"{type(error).__name__}: {error}")
    return Item("a merge of two tiny models", True, f"{time.perf_counter() - started:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pearl_edu.teaching.classroom", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="run every chapter once: trains and caches the models")
    p.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    p.add_argument("--only", nargs="+", default=[], metavar="PREFIX", help="e.g. 07 08")
    p.add_argument("--record", type=Path, help="write the timings to this JSON file")
    c = sub.add_parser("check", help="say whether this laptop is ready for the course")
    c.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if not args.notebooks.is_dir():
            print(
                f"classroom: error: no folder {args.notebooks} (see --notebooks)", file=sys.stderr
            )
            return 2
        from nbclient.exceptions import CellExecutionError, DeadKernelError

        try:
            prepare(args.notebooks, args.only, args.record)
        except (CellExecutionError, DeadKernelError) as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "an error"
            print(f"classroom: error: a chapter stopped: {reason}", file=sys.stderr)
            return 1
        return 0
    expected = [p.stem for p in chapters(args.notebooks)] if args.notebooks.is_dir() else []
    items = check(expected)
    for item in items:
        print(item)
    ready = all(item.ok for item in items)
    print("This laptop is ready." if ready else "This laptop is not ready: see the lines above.")
    return 0 if ready else 1


if __name__ == "__main__":
    raise SystemExit(main())
