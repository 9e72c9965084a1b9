"""The course plan: the classes of the course, and which chapters each one teaches.

The plan is one data file, ``pearl_edu/data/course_plan.yml``::

    classes:
      - number: 1
        title: What a merge is, and the geometry under it
        minutes: 90
        chapters: [01_meet_pearl, 02_vectors_angles_paths, 03_high_dimension]

A chapter is named by its notebook's stem, as ``_toc.yml`` lists it without the folder
(``01_meet_pearl`` for ``notebooks/01_meet_pearl.ipynb``). Every chapter notebook of
``_toc.yml`` belongs to exactly one class: `unplanned_chapters` says which do not yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pearl_edu.teaching.student import chapters as toc_entries

PLAN = Path(__file__).resolve().parents[1] / "data" / "course_plan.yml"


class PlanError(ValueError):
    """A course plan that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class CourseClass:
    """One class of the course: its number, title, length and chapters (notebook stems)."""

    number: int
    title: str
    minutes: int
    chapters: tuple[str, ...]


def load_course_plan(path: Path = PLAN) -> list[CourseClass]:
    """The classes of a course plan file, checked: numbered 1, 2, ..., no chapter twice."""
    path = Path(path)
    entries = read_classes(path, "course plan", PlanError)
    classes, seen = [], {}
    for index, entry in enumerate(entries, start=1):
        where = f"{path}: classes[{index}]"
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: expected a mapping with number, title, minutes, chapters")
        unknown = sorted(set(entry) - {"number", "title", "minutes", "chapters"})
        missing = [key for key in ("number", "title", "chapters") if key not in entry]
        if unknown or missing:
            what = ", ".join(
                [f"unknown key {k!r}" for k in unknown] + [f"no {k!r}" for k in missing]
            )
            raise PlanError(f"{where}: {what}")
        number, title = entry["number"], entry["title"]
        minutes, chapters = entry.get("minutes", 90), entry["chapters"]
        if number != index or isinstance(number, bool):
            raise PlanError(f"{where}: number is {number!r}; the classes are numbered 1, 2, ...")
        if not isinstance(title, str) or not title.strip():
            raise PlanError(f"{where}: title must be a non-empty string")
        if not isinstance(minutes, int) or isinstance(minutes, bool) or minutes <= 0:
            raise PlanError(f"{where}: minutes must be a positive whole number, not {minutes!r}")
        if not isinstance(chapters, list) or not all(isinstance(c, str) for c in chapters):
            raise PlanError(f"{where}: chapters must be a list of notebook stems")
        for chapter in chapters:
            if chapter in seen:
                raise PlanError(f"{path}: {chapter} is in class {seen[chapter]} and class {number}")
            seen[chapter] = number
        classes.append(CourseClass(number, title.strip(), minutes, tuple(chapters)))
    if not classes:
        raise PlanError(f"{path}: no classes")
    return classes


def toc_notebooks(root: Path) -> dict[str, Path]:
    """The chapter notebooks of a book's ``_toc.yml``, in its order: {stem: path}."""
    found = {}
    for entry in toc_entries(root):
        path = root / (entry + ".ipynb")
        if path.is_file():
            found[path.stem] = path
    return found


def chapter_paths(plan: list[CourseClass], root: Path, path: Path = PLAN) -> dict[str, Path]:
    """Each planned chapter's notebook; a chapter that is not a notebook of _toc.yml is an error."""
    notebooks = toc_notebooks(root)
    found = {}
    for course_class in plan:
        for chapter in course_class.chapters:
            if chapter not in notebooks:
                stem = Path(chapter).stem
                hint = f" (did you mean {stem}?)" if stem in notebooks else ""
                raise PlanError(
                    f"{path}: class {course_class.number} lists {chapter}, which is not a "
                    f"chapter notebook of {root / '_toc.yml'}{hint}"
                )
            found[chapter] = notebooks[chapter]
    return found


def unplanned_chapters(plan: list[CourseClass], root: Path) -> list[str]:
    """The chapter notebooks of ``_toc.yml`` that no class of the plan teaches."""
    planned = {chapter for course_class in plan for chapter in course_class.chapters}
    return [stem for stem in toc_notebooks(root) if stem not in planned]


def read_classes(path: Path, what: str, error: type[Exception]) -> list:
    """The list under ``classes:`` in the YAML file ``path``, or ``error`` in one line naming
    the file and what is wrong (``what`` names the file's kind in the message)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as problem:
        raise error(f"{path}: cannot read the {what} ({problem.strerror})") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML{where} ({_first_line(problem)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise error(f"{path}: expected a mapping with a list under 'classes'")
    return data["classes"]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
