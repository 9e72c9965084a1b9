"""The book's chapters as an nbgrader course, to release and autograde on JupyterHub.

    python -m pearl_edu.teaching.nbgrader_course [--out _build/nbgrader] [--chapter NAME ...]
                                                 [--generate]

(``make nbgrader`` runs it with ``--generate``.) It writes an nbgrader course folder:

- ``nbgrader_config.py``: the course's settings (a long cell timeout, since the chapters
  train small models; the chapters' saved outputs kept in the released notebooks, so the
  figures are there before a student runs anything, as in the student edition);
- ``source/<chapter>/<chapter>.ipynb``: one assignment for each chapter with checked
  exercises, made from that chapter's student edition (`pearl_edu.teaching.student`):
  the solutions and the teacher-only cells are left out in the same way, and

  - each checked exercise's answer cell is an nbgrader *solution* cell whose solution
    region (``### BEGIN SOLUTION`` ... ``### END SOLUTION``) holds the teacher's answer:
    the worked answer that the teacher's edition keeps in the exercise cell's metadata
    (`pearl_edu.teaching.student.teacher_answers`), the values the tests of
    `pearl_edu.teaching.answers` run through the same checks; the course is not written
    unless each of them passes its check;
  - each check is an autograded *tests* cell worth one point for each value the exercise
    asks for (all or nothing), which runs `pearl_edu.teaching.answers.require`: it raises
    ``AssertionError``, with the student edition's hints, unless every value is right;
  - every other cell is locked (read-only): nbgrader restores its text before grading.

With ``--generate`` it then runs ``nbgrader generate_assignment`` on each assignment, which
strips the solution regions into ``release/``, ready for ``nbgrader release_assignment``.
Teachers then collect and ``nbgrader autograde`` as usual (the kernel that grades must
import ``pearl_edu``). Rebuilding rewrites ``nbgrader_config.py`` and the assignments it
writes under ``source/``; the gradebook and the submissions stay.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from pearl_edu.teaching import answers, student

ROOT = student.ROOT
DEFAULT_OUT = ROOT / "_build" / "nbgrader"
COURSE_ID = "pearl-edu"
# The version of nbgrader's cell metadata (nbgrader 0.6 to 0.9 write and read version 3).
SCHEMA_VERSION = 3
# Seconds a cell may run when nbgrader executes a notebook (autograde, validate): nbgrader's
# default, 30, is less than some chapters' training cells take on a laptop.
CELL_TIMEOUT = 600

COURSE_NOTE = """\
> **The course edition** of the chapter: the exercises' solutions are left out, and the
> chapter's own cells are read-only. Where an exercise has an answer to compute, set each
> value named in the cell after it (in place of `# YOUR CODE HERE` and
> `raise NotImplementedError()`) and run the cell below it, which checks your answer and
> gives a hint if it is not right yet. That cell is the one that is graded."""

CONFIG = f'''\
# The nbgrader settings of the pearl-edu course, written by
# `python -m pearl_edu.teaching.nbgrader_course` (make nbgrader): rebuilding rewrites it.
c = get_config()  # noqa: F821 (nbgrader provides it)

c.CourseDirectory.course_id = "{COURSE_ID}"
# Some chapters train small models: a cell may take minutes on a laptop.
c.Execute.timeout = {CELL_TIMEOUT}
# The released notebooks keep the chapters' saved outputs (figures and tables), as the
# student edition does; the answer and check cells have none.
c.ClearOutput.enabled = False
'''


def _nbgrader(grade_id: str, *, grade=False, solution=False, locked=False, points=None) -> dict:
    """An nbgrader cell's metadata (schema version 3)."""
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if points is not None:
        meta["points"] = points
    return meta


def python_literal(value: object) -> str:
    """``value`` as Python source that evaluates to it (multi-line text as a triple-quoted string)."""
    text = repr(value)
    if isinstance(value, str) and '"' not in value and "\\" not in value:
        text = f'"""{value}"""' if "\n" in value else f'"{value}"'
    if ast.literal_eval(text) != value:
        raise ValueError(f"{value!r} cannot be written as a Python literal")
    return text


def solution_cell_source(label: str, values: dict[str, object]) -> str:
    """The answer cell of exercise ``label``: what to set, then the teacher's answer."""
    exercise = answers.EXERCISES[label]
    lines = [f"# Your answer to {label}: set each of these names to a value (or code)."]
    lines += [f"# {blank.name}: {blank.question}" for blank in exercise.blanks]
    lines.append("### BEGIN SOLUTION")
    lines += [f"{blank.name} = {python_literal(values[blank.name])}" for blank in exercise.blanks]
    lines.append("### END SOLUTION")
    return "\n".join(lines)


def tests_cell_source(label: str) -> str:
    """The graded cell of exercise ``label``: raises ``AssertionError`` unless all is right."""
    arguments = ", ".join(f"{b.name}={b.name}" for b in answers.EXERCISES[label].blanks)
    return (
        "from pearl_edu.teaching import answers\n\n"
        "# Raises AssertionError, with a hint, unless every value is right. It prints rather\n"
        "# than shows its result: nbgrader would read a shown result as a partial score.\n"
        f'print(answers.require("{label}", {arguments}))'
    )


def points(label: str) -> int:
    """The points of exercise ``label``: one for each value it asks for."""
    return len(answers.EXERCISES[label].blanks)


def course_notebook(path: Path) -> tuple[nbformat.NotebookNode, list[str]]:
    """The nbgrader source notebook of one chapter, and the checked exercises it holds."""
    edition = student.student_notebook(path)
    worked = student.teacher_answers(path)
    for label in edition.checked:
        blanks = [b.name for b in answers.EXERCISES[label].blanks]
        values = worked.get(label)
        if values is None or sorted(values) != sorted(blanks):
            raise ValueError(
                f"{path.name}: the teacher's answer to {label} must give {', '.join(blanks)} "
                f"(the exercise cell's metadata {student.ANSWERS_KEY!r})"
            )
        verdict = answers.check(label, **values)
        if not verdict.passed:
            raise ValueError(f"{path.name}: the teacher's answer does not pass: {verdict}")
    cells = []
    for cell in edition.notebook.cells:
        cell = copy.deepcopy(cell)
        tags = cell.metadata.get("tags", [])
        label = cell.id.rsplit("-", 1)[0]
        if "answer" in tags and label in edition.checked:
            cell.source = solution_cell_source(label, worked[label])
            cell.metadata["nbgrader"] = _nbgrader(cell.id, solution=True)
        elif "check" in tags and label in edition.checked:
            cell.source = tests_cell_source(label)
            cell.metadata["nbgrader"] = _nbgrader(
                cell.id, grade=True, locked=True, points=points(label)
            )
        else:
            if cell.id == "student-edition-note":
                cell.source = COURSE_NOTE
                cell.id = "nbgrader-edition-note"
            cell.metadata["nbgrader"] = _nbgrader(cell.id, locked=True)
        cells.append(cell)
    notebook = nbformat.v4.new_notebook(cells=cells, metadata=edition.notebook.metadata)
    notebook.metadata["pearl_edu"] = {"edition": "nbgrader source"}
    nbformat.validate(notebook)
    return notebook, edition.checked


def graded_chapters(root: Path = ROOT) -> list[str]:
    """The chapters (notebooks in ``_toc.yml`` order) with checked exercises, by file name."""
    found = []
    for entry in student.chapters(root):
        path = root / (entry + ".ipynb")
        if path.is_file() and student.teacher_answers(path):
            found.append(path.stem)
    return found


def build(
    out: Path = DEFAULT_OUT, root: Path = ROOT, chapters: list[str] | None = None
) -> dict[str, list[str]]:
    """Write the course folder: ``nbgrader_config.py`` and ``source/<chapter>/<chapter>.ipynb``.

    ``chapters``: file names of chapters (``02_vectors_angles_paths``), all with checked
    exercises when None. Returns each assignment written, with its checked exercises.
    """
    available = graded_chapters(root)
    chosen = available if chapters is None else [Path(name).stem for name in chapters]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(
            f"no chapter with checked exercises named {', '.join(unknown)}; "
            f"the chapters are {', '.join(available)}"
        )
    paths = {name: root / "notebooks" / f"{name}.ipynb" for name in chosen}
    for name in chosen:
        if not paths[name].is_file():
            raise ValueError(f"{name}: no notebook {paths[name]}")
    notebooks = {name: course_notebook(paths[name]) for name in chosen}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nbgrader_config.py").write_text(CONFIG)
    written = {}
    for name, (notebook, checked) in notebooks.items():
        folder = out / "source" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        nbformat.write(notebook, folder / f"{name}.ipynb")
        written[name] = checked
    return written


def nbgrader_environment() -> dict[str, str]:
    """The environment to run nbgrader in: this Python's scripts first on ``PATH``.

    nbgrader's gradebook runs the ``alembic`` command, installed beside this Python, which
    is not on ``PATH`` unless its environment is activated (as under ``make``).
    """
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


def generate(out: Path, assignments: list[str]) -> None:
    """Run ``nbgrader generate_assignment`` on each assignment, in the course folder.

    When they are all the assignments under ``source/``, one run does them all (``*``):
    nbgrader takes seconds to start. A failure keeps nbgrader's log in
    ``generate_assignment.log`` and raises ``RuntimeError`` naming it.
    """
    if importlib.util.find_spec("nbgrader") is None:
        raise RuntimeError("nbgrader is not installed: pip install 'pearl-edu[course]'")
    out = Path(out)
    everything = sorted(p.name for p in (out / "source").iterdir() if p.is_dir())
    for name in ["*"] if sorted(assignments) == everything else assignments:
        command = [sys.executable, "-m", "nbgrader", "generate_assignment", name, "--force"]
        done = subprocess.run(
            command, cwd=out, capture_output=True, text=True, env=nbgrader_environment()
        )
        if done.returncode != 0:
            log = out / "generate_assignment.log"
            log.write_text(done.stdout + done.stderr)
            raise RuntimeError(f"nbgrader generate_assignment {name} failed; its log is {log}")


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the course folder")
        parser.add_argument(
            "--chapter",
            action="append",
            help="a chapter to include, such as 02_vectors_angles_paths (repeatable; default: all)",
        )
        parser.add_argument(
            "--generate", action="store_true", help="also run nbgrader generate_assignment on each"
        )

    description = "Write an nbgrader course of the chapters with checked exercises."
    args = student.book_arguments("nbgrader_course", description, argv, options)
    if args is None:
        return 2
    try:
        written = build(args.out, args.book.resolve(), args.chapter)
        if args.generate:
            generate(args.out, list(written))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    exercises = sum(len(labels) for labels in written.values())
    print(
        f"{len(written)} assignments with {exercises} autograded exercises in "
        f"{args.out / 'source'}"
        + (f"; released versions in {args.out / 'release'}" if args.generate else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
