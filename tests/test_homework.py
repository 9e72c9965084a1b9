"""The homework sets (pearl_edu/data/homework.yml): drawn from each class's own chapters,
marked by checks and rubrics whose points add up, and kept out of the student edition.

The file and the course plan it follows are read here as plain YAML and the exercises found
in the notebooks by their own pattern, so that these tests do not lean on
`pearl_edu.teaching.homework`'s reading of any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

from pearl_edu.teaching import answers, course_plan, homework, student

ROOT = Path(__file__).resolve().parents[1]
PLAN = yaml.safe_load(course_plan.PLAN.read_text())["classes"]
CHAPTERS = {c["number"]: c["chapters"] for c in PLAN}
# The homework file's classes, each with its chapters from the course plan.
DATA = [
    {**c, "chapters": CHAPTERS[c["number"]]}
    for c in yaml.safe_load(homework.HOMEWORK.read_text())["classes"]
]
TOC = yaml.safe_dump(yaml.safe_load((ROOT / "_toc.yml").read_text()))


def _exercises_of(notebook: Path) -> list[str]:
    """The labels of a notebook's ``{exercise}`` directives, as its Markdown writes them."""
    text = "\n".join(
        c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "markdown"
    )
    return re.findall(
        r"^:{3,}\{exercise\}[^\n]*\n(?::[a-z]+:[^\n]*\n)*?:label: (ex-\S+)", text, re.M
    )


CHAPTER_OF = {
    label: notebook.stem
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb"))
    for label in _exercises_of(notebook)
}
IN_BOOK = [c for c in DATA if any(f"notebooks/{chapter}\n" in TOC for chapter in c["chapters"])]
ENTRIES = [(c["number"], entry) for c in DATA for entry in c["homework"]]


def _points(criteria: list[dict]) -> int:
    return sum(row["points"] for row in criteria)


def test_the_exercise_pattern_finds_every_exercise():
    assert len(CHAPTER_OF) > 60
    assert CHAPTER_OF["ex-unequal"] == "02_vectors_angles_paths"
    assert CHAPTER_OF["ex-capstone"] == "capstone"
    assert set(answers.EXERCISES) <= set(CHAPTER_OF)


def test_every_class_of_the_course_is_there():
    assert [c["number"] for c in DATA] == list(range(1, 11))
    assert DATA[-1]["chapters"] == ["capstone"]
    planned = [chapter for c in DATA for chapter in c["chapters"]]
    assert len(planned) == len(set(planned))
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # every chapter has a class
        assert notebook.stem in planned, f"{notebook.stem} belongs to no class"


def test_every_label_is_an_exercise_of_the_notebooks():
    assert len(ENTRIES) >= 25
    for number, entry in ENTRIES:
        assert entry["exercise"] in CHAPTER_OF, (
            f"class {number}: {entry['exercise']} is no exercise"
        )


def test_each_class_draws_from_its_own_chapters():
    assert len(IN_BOOK) >= 9
    for course_class in IN_BOOK:
        labels = [entry["exercise"] for entry in course_class["homework"]]
        assert len(labels) == len(set(labels))
        if course_class["chapters"] == ["capstone"]:  # the capstone is the last class's set
            assert labels == ["ex-capstone"]
            continue
        assert 2 <= len(labels) <= 4, f"class {course_class['number']}: {len(labels)} exercises"
        for label in labels:
            assert CHAPTER_OF[label] in course_class["chapters"], (
                f"class {course_class['number']}: {label} is from {CHAPTER_OF[label]}"
            )
        in_class = [label for label, ch in CHAPTER_OF.items() if ch in course_class["chapters"]]
        assert len(in_class) > len(labels)  # some are left for practice in class


def test_a_class_whose_chapters_are_not_in_the_book_yet_has_no_set():
    waiting = [c for c in DATA if c not in IN_BOOK]
    for course_class in waiting:
        assert course_class["homework"] == []
    in_book = homework.classes_in_book(homework.load_homework(), ROOT)
    numbers = [c.course.number for c in in_book]
    assert numbers == [c["number"] for c in IN_BOOK]


def test_sets_mix_checked_and_written_exercises_where_the_chapters_allow():
    for course_class in IN_BOOK:
        labels = [entry["exercise"] for entry in course_class["homework"]]
        in_class = [label for label, ch in CHAPTER_OF.items() if ch in course_class["chapters"]]
        checked = [label in answers.EXERCISES for label in labels]
        if any(label in answers.EXERCISES for label in in_class) and any(
            label not in answers.EXERCISES for label in in_class
        ):
            assert any(checked) and not all(checked), f"class {course_class['number']}"


def test_checked_exercises_are_exactly_those_of_answers():
    for number, entry in ENTRIES:
        label = entry["exercise"]
        if label in answers.EXERCISES:
            names = [blank.name for blank in answers.EXERCISES[label].blanks]
            assert sorted(entry.get("blanks", {})) == sorted(names), f"class {number}: {label}"
            assert "rubric" not in entry
        else:
            assert "blanks" not in entry and "working" not in entry, f"class {number}: {label}"


def test_every_written_exercise_has_a_rubric_that_adds_up():
    written = [e for _, e in ENTRIES if e["exercise"] not in answers.EXERCISES]
    assert len(written) >= 12
    for entry in written:
        rubric = entry["rubric"]
        assert 2 <= len(rubric) <= 4, f"{entry['exercise']}: {len(rubric)} criteria"
        assert _points(rubric) == entry["points"], entry["exercise"]
        for row in rubric:
            assert len(row["criterion"].split()) >= 6  # something a marker can check
        assert entry["answer"].strip() and entry["mistake"].strip()


def test_every_checked_exercise_splits_its_points_over_blanks_and_working():
    checked = [e for _, e in ENTRIES if e["exercise"] in answers.EXERCISES]
    assert len(checked) >= 10
    for entry in checked:
        total = sum(entry["blanks"].values()) + _points(entry.get("working", []))
        assert total == entry["points"], entry["exercise"]
        assert entry["mistake"].strip()


def _capstone_rubric_points() -> list[int]:
    """The points of the rubric table in the capstone's folded solution, row by row."""
    cells = nbformat.read(ROOT / "notebooks" / "capstone.ipynb", as_version=4).cells
    (table,) = [c.source for c in cells if "Rubric for the written explanation" in c.source]
    return [int(p) for p in re.findall(r"^\| (\d+) \|", table, re.M)]


def test_the_capstone_rubric_is_the_capstone_notebooks():
    (entry,) = [e for n, e in ENTRIES if e["exercise"] == "ex-capstone"]
    explanation = entry["working"]
    assert [row["points"] for row in explanation] == _capstone_rubric_points()
    assert _points(explanation) == 10  # "a rubric (10 points)", book/course.md
    assert entry["blanks"] == {"recipe": entry["points"] - 10}
    assert (
        entry["blanks"]["recipe"] < 10
    )  # a recipe with an explanation worth nothing scores little
    assert "interval includes zero" in entry["deduct"]
    assert "capstone.evaluate" in entry["note"]
    page = homework.class_markdown(homework.load_homework()[-1], ROOT)
    assert "capstone.WORKED_SOLUTION" in page and "weight: -0.4" in page


def test_the_answer_key_computes_each_checked_value():
    classes = homework.classes_in_book(homework.load_homework(), ROOT)
    pages = {c.course.number: homework.class_markdown(c, ROOT) for c in classes}
    for course_class in classes:
        course = course_class.course
        page = pages[course.number]
        assert f"## Class {course.number}: {course.title}" in page
        for assignment in course_class.homework:
            assert f"{{ref}}`{assignment.label} <{assignment.label}>`" in page
            for blank in answers.EXERCISES.get(assignment.label, answers.Exercise("", ())).blanks:
                if blank.expected is not None:
                    assert f"`{homework.shown(blank.expected())}`" in page
    assert "`0.1`" in pages[1] and "`0.9487`" in pages[1]  # ex-unequal, by hand: 0.1, sqrt(0.9)


def test_the_students_page_lists_the_sets_as_the_file_does():
    page = (ROOT / "book" / "course_student.md").read_text()
    listed = homework.student_list(homework.classes_in_book(homework.load_homework(), ROOT))
    assert listed in page, "regenerate with: python -m pearl_edu.teaching.homework --student-list"
    found = re.findall(r"\{ref\}`(ex-[\w-]+) <\1>` \((\d+) points?\)", page)
    expected = [
        (e["exercise"], str(e["points"]))
        for c in IN_BOOK
        for e in c["homework"]
        if e["exercise"] != "ex-capstone"
    ]
    assert found == expected
    assert (
        "{ref}`ex-capstone <ex-capstone>`: your recipe (5 points) and your explanation (10" in page
    )


def test_the_homework_page_is_teacher_only_and_in_the_toc():
    assert student.TEACHER_ONLY["book/homework"] is None
    entries = student.chapters(ROOT)
    assert entries[entries.index("book/course") + 1] == "book/homework"
    assert "book/homework" not in student.student_chapters(ROOT)
    assert student.is_markdown_notebook(ROOT / "book" / "homework.md")


# ---------------------------------------------------------------------------------------
# The student edition


@pytest.fixture
def edition(student_edition) -> Path:
    return student_edition[
        0
    ]  # conftest.py: what `python -m pearl_edu.teaching.student --out` writes


def _teacher_only_texts() -> list[str]:
    """Every rubric line, key, note and mistake of the file, as plain words."""
    texts = []
    for _, entry in ENTRIES:
        rows = entry.get("rubric", []) + entry.get("working", [])
        texts += [row["criterion"] for row in rows]
        texts += [entry[k] for k in ("answer", "mistake", "note", "deduct") if k in entry]
    return [" ".join(t.split()) for t in texts]


def test_the_student_edition_has_no_homework_page_and_no_rubric(edition):
    assert not list(edition.rglob("homework.*"))
    assert "homework" not in (edition / "_toc.yml").read_text()
    texts = _teacher_only_texts()
    assert len(texts) > 80
    files = [p for p in edition.rglob("*") if p.suffix in (".md", ".ipynb", ".yml")]
    assert len(files) > 15
    for path in files:
        shown = " ".join(path.read_text().split())
        for text in texts:
            assert text not in shown, f"{path.relative_to(edition)}: {text[:60]!r}"
    listed = (edition / "book" / "course_student.md").read_text()
    assert "## Homework" in listed and "{ref}`ex-unequal <ex-unequal>` (4 points)" in listed


def test_the_check_would_catch_the_homework_page():
    """Every text the check above looks for is on the teacher's page, as it renders it."""
    classes = homework.classes_in_book(homework.load_homework(), ROOT)
    page = " ".join(" ".join(homework.class_markdown(c, ROOT) for c in classes).split())
    for text in _teacher_only_texts():
        assert text in page, text[:60]


def test_the_capstone_keeps_its_explanation_cell(edition):
    cells = nbformat.read(edition / "notebooks" / "capstone.ipynb", as_version=4).cells
    ids = [c.id for c in cells]
    (at,) = [i for i, c in enumerate(cells) if c.source.startswith("**Your explanation.**")]
    assert cells[at].cell_type == "markdown"
    assert ids.index("ex-capstone-check") < at  # after the recipe's answer and check cells
    assert "Replace this text" in cells[at].source
    teacher = nbformat.read(ROOT / "notebooks" / "capstone.ipynb", as_version=4).cells
    (original,) = [c for c in teacher if c.source.startswith("**Your explanation.**")]
    assert original.source == cells[at].source


# ---------------------------------------------------------------------------------------
# The command, on good and bad files


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """The command's exit status, and what it printed on stdout and stderr."""
    status = homework.main(list(args))
    said = capsys.readouterr()
    return status, said.out, said.err


def test_the_command_checks_the_shipped_file(capsys):
    status, out, err = _run(capsys)
    assert status == 0, err
    assert "all right" in out
    status, out, _ = _run(capsys, "--student-list")
    assert status == 0 and out.startswith("- **Class 1**")


def _with(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(homework.HOMEWORK.read_text())
    change(data["classes"])
    path = tmp_path / "homework.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_command_names_an_exercise_of_another_class(tmp_path, capsys):
    def move(classes):
        classes[0]["homework"][0]["exercise"] = "ex-lmc-boundary"  # chapter 08's, class 4's
        classes[0]["homework"][0].pop("blanks")
        classes[0]["homework"][0].pop("working")
        classes[0]["homework"][0]["rubric"] = classes[3]["homework"][1]["rubric"][:2]
        classes[0]["homework"][0]["answer"] = "moved"
        classes[0]["homework"][0]["points"] = 2

    status, _, err = _run(capsys, "--file", str(_with(tmp_path, move)))
    assert status == 1
    assert "class 1: ex-lmc-boundary is chapter 08_when_merging_works's, not this class's" in err


def test_the_command_names_points_that_do_not_add_up(tmp_path, capsys):
    def inflate(classes):
        classes[1]["homework"][0]["points"] = 9

    status, _, err = _run(capsys, "--file", str(_with(tmp_path, inflate)))
    assert status == 2
    (line,) = err.strip().split("\n")
    assert "classes[2].homework[1] (ex-slerp-limit): its blanks and criteria give 4 points" in line


def test_the_command_names_a_class_in_the_book_without_a_set(tmp_path, capsys):
    def empty(classes):
        classes[4]["homework"] = []

    status, _, err = _run(capsys, "--file", str(_with(tmp_path, empty)))
    assert status == 1
    assert "class 5 (09_full_pearl_merge, 10_beyond_slerp) has 0 exercises" in err


def test_the_command_refuses_a_file_that_is_not_yaml(tmp_path, capsys):
    path = tmp_path / "homework.yml"
    path.write_text("classes: [unclosed\n")
    status, _, err = _run(capsys, "--file", str(path))
    assert status == 2 and "not valid YAML" in err
    assert len(err.strip().split("\n")) == 1


def test_the_command_names_a_wrong_book_folder(tmp_path, capsys):
    status, _, err = _run(capsys, "--book", str(tmp_path))
    assert status == 2 and f"{tmp_path}: no _toc.yml" in err


def test_the_homework_takes_its_classes_from_the_course_plan():
    """homework.yml gives each class's set only: its number, title and chapters are the
    course plan's (pearl_edu/data/course_plan.yml), as the slides and the guide read them."""
    assert [c["number"] for c in DATA] == [c["number"] for c in PLAN]
    assert all(set(c) == {"number", "homework", "chapters"} for c in DATA)
    assert [c.course for c in homework.load_homework()] == course_plan.load_course_plan()


def test_the_command_refuses_a_title_or_chapters_in_the_homework_file(tmp_path, capsys):
    def titled(classes):
        classes[0]["title"] = "What a merge is"

    status, _, err = _run(capsys, "--file", str(_with(tmp_path, titled)))
    assert status == 2
    assert "classes[1]: expected the keys number, homework (the course plan gives" in err


def test_the_command_refuses_a_class_the_plan_does_not_have(tmp_path, capsys):
    def extra(classes):
        classes.append({"number": len(classes) + 1, "homework": []})

    status, _, err = _run(capsys, "--file", str(_with(tmp_path, extra)))
    assert status == 2
    assert "11 classes, but the course plan" in err and "has 10" in err
