"""Execute chapters in place, top to bottom, so that their saved outputs are current.

    .venv/bin/python tests/execute_notebooks.py notebooks/01_meet_pearl.ipynb [...]

(`make execute` runs it on every chapter.) nbval then checks that a fresh run reproduces the
saved outputs, so run this after editing a chapter and commit the executed notebook.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # timestamps of an earlier run would only add noise to diffs
        cell.metadata.pop("execution", None)
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": path.parent}},
    ).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - started


if __name__ == "__main__":
    for name in sys.argv[1:]:
        seconds = execute(Path(name))
        print(f"{name}: executed in {seconds:.1f} s")
