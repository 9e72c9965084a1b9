"""The course's homework: one set per class, with rubrics and answer keys for the teacher.

    python -m pearl_edu.teaching.homework [--book ROOT] [--student-list]

The sets live in one data file, ``pearl_edu/data/homework.yml`` (its header says how it is
written): for each class of the course plan (`pearl_edu.teaching.course_plan`, which gives
its title and chapters), 2 to 4 of its chapters' exercises, by label, each with its points. A
*checked* exercise (one of `pearl_edu.teaching.answers.EXERCISES`) is marked by its check,
its points split over the values it judges, plus criteria for any working it asks for; a
*written* one by a rubric of 2 to 4 criteria, each checkable against the chapter's folded
solution.

The teacher's page ``book/homework.md`` renders every set with `class_markdown`: points,
rubrics, and the answer key, whose values `expected_values` computes with the checks' own
functions. The student edition leaves that page out; ``book/course_student.md`` lists the
sets (`student_list`) without rubrics or keys. A class whose chapters are not in
``_toc.yml`` yet is left out of both (`classes_in_book`).

The command checks the file against a book (every label an exercise of its class's
chapters, checked exactly when `answers` checks it, the points adding up) and says what is
wrong in one line each; ``--student-list`` prints the list for ``book/course_student.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from pearl_edu.teaching.answers import EXERCISES
from pearl_edu.teaching.course_plan import (
    PLAN,
    CourseClass,
    PlanError,
    load_course_plan,
    read_classes,
)
from pearl_edu.teaching.student import book_arguments
from pearl_edu.teaching.student import chapters as toc_entries

HOMEWORK = Path(__file__).resolve().parents[1] / "data" / "homework.yml"
ROOT = Path(__file__).resolve().parents[2]
SET_SIZE = (2, 4)  # exercises in a class's set
RUBRIC_SIZE = (2, 4)  # criteria of a written exercise's rubric

_KEYS = {"exercise", "points", "blanks", "working", "rubric", "answer", "mistake", "note", "deduct"}


class HomeworkError(ValueError):
    """A homework file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Criterion:
    """One line of a rubric: what a marker looks for, and its points."""

    points: int
    text: str


@dataclass(frozen=True)
class Assignment:
    """One exercise of a homework set, with how it is marked.

    A checked exercise has ``blanks`` (the points of each value its check judges) and
    ``working`` (criteria for what it asks to show beyond them, possibly none); a written
    one has a ``rubric`` and an ``answer``, the key result in a line.
    """

    label: str
    points: int
    mistake: str
    blanks: dict[str, int]
    working: tuple[Criterion, ...] = ()
    rubric: tuple[Criterion, ...] = ()
    answer: str = ""
    note: str = ""
    deduct: str = ""

    @property
    def checked(self) -> bool:
        return bool(self.blanks)

    @property
    def criteria(self) -> tuple[Criterion, ...]:
        """The criteria marked by hand: the working of a checked exercise, or the rubric."""
        return self.working if self.checked else self.rubric


@dataclass(frozen=True)
class HomeworkClass:
    """One class of the course plan, and its homework set."""

    course: CourseClass
    homework: tuple[Assignment, ...]

    @property
    def points(self) -> int:
        return sum(a.points for a in self.homework)


# ---------------------------------------------------------------------------------------
# Reading the file


def load_homework(path: Path = HOMEWORK, plan: Path = PLAN) -> list[HomeworkClass]:
    """The classes of a homework file, checked for shape and for points that add up, each
    with its class of the course plan ``plan``."""
    path = Path(path)
    courses = load_course_plan(plan)
    entries = read_classes(path, "homework file", HomeworkError)
    if len(entries) != len(courses):
        raise HomeworkError(
            f"{path}: {len(entries)} classes, but the course plan {plan} has {len(courses)}"
        )
    classes = []
    for index, (entry, course) in enumerate(zip(entries, courses, strict=True), start=1):
        where = f"{path}: classes[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"number", "homework"}:
            raise HomeworkError(
                f"{where}: expected the keys number, homework (the course plan gives the "
                "title and chapters)"
            )
        if entry["number"] != index or isinstance(entry["number"], bool):
            raise HomeworkError(
                f"{where}: number is {entry['number']!r}; the classes are numbered 1, 2, ..."
            )
        homework = entry["homework"]
        if not isinstance(homework, list):
            raise HomeworkError(f"{where}: homework must be a list (empty until it is written)")
        assignments = tuple(
            _assignment(item, f"{where}.homework[{k}]") for k, item in enumerate(homework, 1)
        )
        labels = [a.label for a in assignments]
        if len(labels) != len(set(labels)):
            raise HomeworkError(f"{where}: an exercise is listed twice")
        classes.append(HomeworkClass(course, assignments))
    return classes


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _assignment(item: Any, where: str) -> Assignment:
    if not isinstance(item, dict):
        raise HomeworkError(f"{where}: expected a mapping with exercise, points, ...")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise HomeworkError(f"{where}: unknown key {unknown[0]!r}")
    label, points = item.get("exercise"), item.get("points")
    if not isinstance(label, str) or not label.startswith("ex-"):
        raise HomeworkError(f"{where}: exercise must be an exercise's label (ex-...)")
    where = f"{where} ({label})"
    if not _count(points):
        raise HomeworkError(f"{where}: points must be a positive whole number")
    if not isinstance(item.get("mistake"), str) or not item["mistake"].strip():
        raise HomeworkError(f"{where}: no 'mistake' (the mistake to watch for)")
    blanks = item.get("blanks", {})
    if not isinstance(blanks, dict) or not all(_count(p) for p in blanks.values()):
        raise HomeworkError(f"{where}: blanks must map each value's name to its points")
    if blanks and "rubric" in item:
        raise HomeworkError(f"{where}: a checked exercise has blanks and working, no rubric")
    if not blanks and ("working" in item or "rubric" not in item or "answer" not in item):
        raise HomeworkError(f"{where}: a written exercise has a rubric and an answer")
    criteria = {
        key: _criteria(item.get(key, []), f"{where}: {key}") for key in ("working", "rubric")
    }
    if not blanks and not RUBRIC_SIZE[0] <= len(criteria["rubric"]) <= RUBRIC_SIZE[1]:
        raise HomeworkError(
            f"{where}: a rubric has {RUBRIC_SIZE[0]} to {RUBRIC_SIZE[1]} criteria, "
            f"not {len(criteria['rubric'])}"
        )
    total = sum(blanks.values()) + sum(c.points for c in criteria["working"] + criteria["rubric"])
    if total != points:
        raise HomeworkError(f"{where}: its blanks and criteria give {total} points, not {points}")
    return Assignment(
        label,
        points,
        item["mistake"].strip(),
        dict(blanks),
        criteria["working"],
        criteria["rubric"],
        **{k: str(item.get(k, "")).strip() for k in ("answer", "note", "deduct")},
    )


def _criteria(value: Any, where: str) -> tuple[Criterion, ...]:
    if not isinstance(value, list):
        raise HomeworkError(f"{where} must be a list of criteria")
    found = []
    for row in value:
        if not isinstance(row, dict) or set(row) != {"points", "criterion"}:
            raise HomeworkError(f"{where}: each criterion has points and criterion")
        if not _count(row["points"]) or not isinstance(row["criterion"], str):
            raise HomeworkError(f"{where}: points must be a positive whole number, with a text")
        found.append(Criterion(row["points"], row["criterion"].strip()))
    return tuple(found)


# ---------------------------------------------------------------------------------------
# The book: which chapters it has, and which exercises they hold


def toc_chapters(root: Path = ROOT) -> list[str]:
    """The chapter notebooks of a book's ``_toc.yml``, by stem, in its order."""
    return [Path(e).name for e in toc_entries(root) if (root / (e + ".ipynb")).is_file()]


_EXERCISE = re.compile(r"^(?P<fence>:{3,}|`{3,})\{exercise(?:-start)?\}")


def exercise_labels(notebook: Path) -> list[str]:
    """The labels of a chapter notebook's exercises, in order."""
    labels = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            opened = _EXERCISE.match(line)
            if not opened:
                continue
            for inner in lines[i + 1 :]:
                if inner.strip() == opened["fence"]:
                    break
                found = re.match(r"^:label:\s*(\S+)", inner.strip())
                if found:
                    labels.append(found.group(1))
                    break
    return labels


def exercise_chapters(root: Path = ROOT) -> dict[str, str]:
    """Every exercise label of the book's chapters, with the chapter (stem) that holds it."""
    return {
        label: stem
        for stem in toc_chapters(root)
        for label in exercise_labels(root / "notebooks" / f"{stem}.ipynb")
    }


def classes_in_book(classes: Iterable[HomeworkClass], root: Path = ROOT) -> list[HomeworkClass]:
    """The classes with at least one chapter in the book's ``_toc.yml``, in order."""
    present = set(toc_chapters(root))
    return [c for c in classes if present & set(c.course.chapters)]


def problems(classes: list[HomeworkClass], root: Path = ROOT) -> list[str]:
    """What is wrong with the homework against the book, one line each (none: all is well)."""
    found = []
    where = exercise_chapters(root)
    planned = {chapter for c in classes for chapter in c.course.chapters}
    for chapter in toc_chapters(root):
        if chapter not in planned:
            found.append(f"chapter {chapter} belongs to no class")
    for course_class in classes_in_book(classes, root):
        chapters = course_class.course.chapters
        name = f"class {course_class.course.number}"
        size = len(course_class.homework)
        if not SET_SIZE[0] <= size <= SET_SIZE[1] and chapters != ("capstone",):
            found.append(
                f"{name} ({', '.join(chapters)}) has {size} exercises; its set "
                f"has {SET_SIZE[0]} to {SET_SIZE[1]}"
            )
        for assignment in course_class.homework:
            label = assignment.label
            if label not in where:
                found.append(f"{name}: {label} is no exercise of the book's chapters")
            elif where[label] not in chapters:
                found.append(f"{name}: {label} is chapter {where[label]}'s, not this class's")
            if assignment.checked != (label in EXERCISES):
                checked = "checked" if label in EXERCISES else "not checked"
                found.append(f"{name}: {label} is {checked} by pearl_edu.teaching.answers")
            elif assignment.checked:
                names = [b.name for b in EXERCISES[label].blanks]
                if sorted(assignment.blanks) != sorted(names):
                    found.append(f"{name}: {label}'s blanks are {', '.join(names)}")
    return found


# ---------------------------------------------------------------------------------------
# The pages


def expected_values(label: str) -> dict[str, Any]:
    """The right value of each blank of a checked exercise, computed as its check does.

    A blank judged without one right value (a recipe to write) maps to None.
    """
    return {b.name: b.expected() if b.expected else None for b in EXERCISES[label].blanks}


def shown(value: Any) -> str:
    """A right value as the answer key prints it: numbers to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def _ref(label: str) -> str:
    return f"{{ref}}`{label} <{label}>`"


def _doc(chapter: str, prefix: str) -> str:
    return f"{{doc}}`{prefix}notebooks/{chapter}`"


def _points(n: int) -> str:
    return f"{n} point" + ("" if n == 1 else "s")


def _cell(text: str) -> str:
    """Text fit for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def class_markdown(course_class: HomeworkClass, root: Path = ROOT, prefix: str = "../") -> str:
    """One class's set for the teacher's page: points, rubrics and answer key (MyST).

    ``prefix`` leads from the page to the book's root, for the links to the chapters.
    """
    where = exercise_chapters(root)
    present = set(where.values())
    course = course_class.course
    chapters = [c for c in course.chapters if c in present]
    assigned = {a.label for a in course_class.homework}
    practice = [label for label, chapter in where.items() if chapter in chapters]
    practice = [label for label in practice if label not in assigned]
    lines = [
        f"## Class {course.number}: {course.title}",
        "",
        f"Chapters: {', '.join(_doc(c, prefix) for c in chapters)}. "
        f"The set is worth {_points(course_class.points)}.",
        "",
        "| Exercise | Chapter | Marked by | Points |",
        "|---|---|---|---|",
    ]
    for a in course_class.homework:
        how = ("its check" + (", and by hand" if a.working else "")) if a.checked else "rubric"
        lines.append(f"| {_ref(a.label)} | {_doc(where[a.label], prefix)} | {how} | {a.points} |")
    lines.append("")
    if practice:
        lines += [f"For practice in class: {', '.join(_ref(p) for p in practice)}.", ""]
    for a in course_class.homework:
        lines += _assignment_markdown(a)
    return "\n".join(lines)


def _assignment_markdown(a: Assignment) -> list[str]:
    kind = "checked" if a.checked else "written"
    lines = [f"### {a.label} ({kind}, {_points(a.points)})", ""]
    if a.note:
        lines += [a.note, ""]
    if a.checked:
        values = expected_values(a.label)
        lines += ["| Points | Marked for | Right answer |", "|---|---|---|"]
        for blank in EXERCISES[a.label].blanks:
            right = values[blank.name]
            key = (
                f"`{shown(right)}`" if right is not None else "no single value: its check judges it"
            )
            question = _cell(blank.question)
            lines.append(f"| {a.blanks[blank.name]} | `{blank.name}`: {question} | {key} |")
        for c in a.working:
            lines.append(f"| {c.points} | {_cell(c.text)} | by hand |")
        lines.append("")
        if a.label == "ex-capstone":
            from pearl_edu.teaching.capstone import WORKED_SOLUTION

            lines += [
                "The worked solution (`capstone.WORKED_SOLUTION`), which passes on the test "
                "split of training seed 0, the task's models:",
                "",
                "```yaml",
                WORKED_SOLUTION.strip("\n"),
                "```",
                "",
            ]
    else:
        lines += ["| Points | Marked for |", "|---|---|"]
        lines += [f"| {c.points} | {_cell(c.text)} |" for c in a.rubric]
        lines.append("")
    key = f"**Key.** {a.answer} " if a.answer else ""
    lines += [f"{key}Worked in full: the solution of {_ref(a.label)}.", ""]
    if a.deduct:
        lines += [f"**Deduct** {a.deduct}", ""]
    lines += [f"**Watch for.** {a.mistake}", ""]
    return lines


def student_list(classes: Iterable[HomeworkClass], prefix: str = "../") -> str:
    """The sets for students, by class: exercises and points, no rubric or key (MyST)."""
    lines = []
    for c in classes:
        parts = []
        for a in c.homework:
            if a.checked and a.working and "recipe" in a.blanks:  # the capstone
                parts.append(
                    f"{_ref(a.label)}: your recipe ({_points(a.blanks['recipe'])}) and your "
                    f"explanation ({_points(a.points - a.blanks['recipe'])})"
                )
            else:
                parts.append(f"{_ref(a.label)} ({_points(a.points)})")
        lines.append(
            f"- **Class {c.course.number}**, {c.course.title} ({_points(c.points)}): "
            f"{'; '.join(parts)}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--file", type=Path, default=HOMEWORK, help="the homework file")
        parser.add_argument(
            "--student-list", action="store_true", help="print the list for book/course_student.md"
        )

    description = "Check the homework sets against the book, or print the students' list."
    args = book_arguments("homework", description, argv, options)
    if args is None:
        return 2
    try:
        classes = load_homework(args.file)
    except (HomeworkError, PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    wrong = problems(classes, args.book)
    for line in wrong:
        print(f"error: {args.file}: {line}", file=sys.stderr)
    if wrong:
        return 1
    in_book = classes_in_book(classes, args.book)
    if args.student_list:
        print(student_list(in_book))
    else:
        exercises = sum(len(c.homework) for c in in_book)
        print(f"{args.file}: {len(in_book)} classes in the book, {exercises} exercises: all right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
