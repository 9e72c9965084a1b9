"""The student edition (`python -m pearl_edu.teaching.student`): valid notebooks, no solutions,
hidden checks left out, and answer cells that check the teacher's answers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pearl_edu.teaching import answers, student

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = [entry for entry in student.chapters(ROOT) if (ROOT / (entry + ".ipynb")).is_file()]


@pytest.fixture
def edition(student_edition) -> tuple[Path, dict[Path, list[str]]]:
    return student_edition  # conftest.py: built once for this file and test_homework.py


def _text(notebook: nbformat.NotebookNode) -> str:
    """Everything a student sees or can open: sources, outputs and metadata."""
    return nbformat.writes(notebook)


def _solution_texts(path: Path) -> list[str]:
    """The text of every solution of a teacher's notebook, code of solution regions included.

    Found independently of `student`: the lines between ``{solution}`` and its closing
    fence, and every cell between ``{solution-start}`` and ``{solution-end}``.
    """
    found, inside = [], False
    for cell in nbformat.read(path, as_version=4).cells:
        lines = cell.source.split("\n")
        if inside and "{solution-end}" not in cell.source:
            found.append(cell.source)
            continue
        for i, line in enumerate(lines):
            if inside:
                if "{solution-end}" in line:
                    inside = False
                else:
                    found.append(line)
            elif re.match(r"^:{3,}\{solution\}", line):
                fence = line.split("{")[0]
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence)
                found += lines[i + 1 : end]
            elif "{solution-start}" in line:
                inside = True
    # Lines long enough to be the solution's own words, not a fence or a blank.
    return [t.strip() for t in found if len(t.strip()) > 25 and not t.startswith(":")]


def test_every_chapter_has_a_valid_student_notebook(edition):
    out, written = edition
    stems = sorted(p.relative_to(out).with_suffix("").as_posix() for p in written)
    assert stems == sorted(CHAPTERS + ["book/intro", "book/performance", "book/gpu_contract"])
    for path in written:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["pearl_edu"] == {"edition": "student"}
        ids = [cell.id for cell in notebook.cells]
        assert len(ids) == len(set(ids)), f"{path.name}: cell ids repeat"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_solution_text_and_no_hidden_cell(edition, chapter):
    out, _ = edition
    teacher_path = ROOT / (chapter + ".ipynb")
    teacher = nbformat.read(teacher_path, as_version=4)
    notebook = nbformat.read(out / (chapter + ".ipynb"), as_version=4)
    text = _text(notebook)
    assert "{solution" not in text
    for line in _solution_texts(teacher_path):
        assert line not in text, f"{chapter}: solution text left in: {line[:60]!r}"
    hidden = [c for c in teacher.cells if "remove-cell" in c.metadata.get("tags", [])]
    for cell in hidden:
        assert cell.source not in text, f"{chapter}: hidden cell left in: {cell.source[:60]!r}"
    for cell in notebook.cells:
        assert "remove-cell" not in cell.metadata.get("tags", [])
        assert student.ANSWERS_KEY not in cell.metadata
    exercises = re.findall(r"^:label: (ex-\S+)", "\n".join(c.source for c in teacher.cells), re.M)
    for label in exercises:  # every exercise stays
        assert f":label: {label}" in text


def test_the_solutions_found_are_many():
    """The solution extractor above finds solutions, including a code cell of a region."""
    lines = [line for chapter in CHAPTERS for line in _solution_texts(ROOT / (chapter + ".ipynb"))]
    assert len(lines) > 60
    assert any("def harsher" in line for line in lines)  # chapter 08's worked solution


def test_each_checked_exercise_is_followed_by_its_answer_and_check_cells(edition):
    out, written = edition
    checked = sorted(label for labels in written.values() for label in labels)
    assert checked == sorted(answers.EXERCISES)
    for path, labels in written.items():
        cells = nbformat.read(path, as_version=4).cells
        for label in labels:
            (at,) = [i for i, c in enumerate(cells) if c.id == f"{label}-answer"]
            assert f":label: {label}" in cells[at - 1].source
            assert cells[at + 1].id == f"{label}-check"
            for blank in answers.EXERCISES[label].blanks:
                assert f"# {blank.question}\n{blank.name} = ...\n" in cells[at].source + "\n"
            assert f'answers.check("{label}"' in cells[at + 1].source


def _run_answer_cells(fill_in: str, check: str, values: dict | None) -> answers.Verdict:
    """Run a student's two cells, with ``values`` written in place of the ``...``."""
    if values is not None:
        fill_in = "\n".join(
            f"{line.split(' = ')[0]} = {values[line.split(' = ')[0]]!r}"
            if " = ..." in line
            else line
            for line in fill_in.split("\n")
        )
    namespace: dict = {}
    exec(fill_in, namespace)
    exec(check.replace("answers.check(", "verdict = answers.check("), namespace)
    return namespace["verdict"]


@pytest.mark.parametrize("label", sorted(answers.EXERCISES))
def test_the_student_cells_check_the_teachers_answer(edition, label):
    out, written = edition
    (path,) = [p for p, labels in written.items() if label in labels]
    teacher_path = ROOT / path.relative_to(out)
    cells = {c.id: c.source for c in nbformat.read(path, as_version=4).cells}
    fill_in, check = cells[f"{label}-answer"], cells[f"{label}-check"]
    right = student.teacher_answers(teacher_path)[label]
    assert _run_answer_cells(fill_in, check, right).passed
    unanswered = _run_answer_cells(fill_in, check, None)
    assert not unanswered.passed and "not answered yet" in str(unanswered)


def test_no_name_is_left_undefined(edition):
    """Leaving the hidden cells out must not break a visible cell that used their names."""
    out, _ = edition
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--isolated",
            "--select",
            "F821",
            str(out / "notebooks"),
        ],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stdout[-3000:]


def test_a_student_notebook_runs_top_to_bottom_unanswered(edition):
    out, _ = edition
    path = out / "notebooks" / "02_vectors_angles_paths.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    ).execute()
    checks = [c for c in notebook.cells if c.id.endswith("-check")]
    assert len(checks) == 2
    for cell in checks:
        shown = "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
        assert "not yet" in shown and "not answered yet" in shown


def test_markdown_pages_lose_their_solutions_and_hidden_cells_but_keep_outputs(edition):
    out, written = edition
    teacher = (ROOT / "book" / "performance.md").read_text()
    assert "{solution}" in teacher and "The solution's estimate" in teacher
    path = out / "book" / "performance.ipynb"
    assert path in written and not (out / "book" / "performance.md").exists()
    page = nbformat.read(path, as_version=4)
    text = _text(page)
    assert "{solution" not in text and "The solution's estimate" not in text
    assert ":label: ex-perf-floor" in text
    assert all("remove-cell" not in c.metadata.get("tags", []) for c in page.cells)
    shown = [c for c in page.cells if c.cell_type == "code"]
    assert shown and all(c.outputs for c in shown)  # run in the teacher's folder
    intro = _text(nbformat.read(out / "book" / "intro.ipynb", as_version=4))
    assert "](performance.ipynb)" in intro and "](performance.md)" not in intro  # relinked
    page = (out / "book" / "course_student.md").read_text()  # plain Markdown stays Markdown
    assert page.startswith("# About this course")


def test_config_of_the_student_book(edition):
    out, _ = edition
    import yaml

    config = yaml.safe_load((out / "_config.yml").read_text())
    assert config["title"].endswith("(student edition)")
    assert config["execute"]["execute_notebooks"] == "off"
    assert (
        config["launch_buttons"]["colab_url"] == ""
        and config["launch_buttons"]["binderhub_url"] == ""
    )
    for folder in config["sphinx"]["config"]["html_static_path"]:
        assert Path(folder).is_absolute()
    toc = yaml.safe_load((out / "_toc.yml").read_text())
    assert toc == student.student_toc(ROOT)
    teacher_toc = (ROOT / "_toc.yml").read_text()
    assert "file: book/course\n" in teacher_toc and "course_student" not in teacher_toc
    left_out = {page for page, instead in student.TEACHER_ONLY.items() if instead is None}
    assert left_out, "the homework page, with its rubrics and keys"
    kept = yaml.safe_load(teacher_toc)
    for part in kept["parts"]:
        part["chapters"] = [c for c in part["chapters"] if c.get("file") not in left_out]
    assert (out / "_toc.yml").read_text().replace("book/course_student", "book/course") == (
        yaml.safe_dump(kept, sort_keys=False)
    )  # the same book, but for the course guide and the pages left out
    assert (out / "book" / "references.bib").is_file()
    assert (out / "pearl_edu" / "core" / "interpolation.py").is_file()  # chapter 05 includes it


def test_strip_solutions_keeps_the_rest():
    text = (
        "A\n:::{exercise}\n:label: ex-a\nQ\n:::\n\n:::{solution} ex-a\n:class: dropdown\nS\n:::\nB"
    )
    assert (
        student.strip_solutions(text, student._Scan())
        == "A\n:::{exercise}\n:label: ex-a\nQ\n:::\n\nB"
    )
    scan = student._Scan()
    assert student.strip_solutions("x\n```{solution-start} ex-b\n```\ny", scan) == "x"
    assert scan.in_solution
    assert student.strip_solutions("z\n```{solution-end}\n```\nw", scan) == "w"
    with pytest.raises(ValueError, match="never closed"):
        student.strip_solutions(":::{solution} ex-c\nS", student._Scan())


def test_the_command_names_a_wrong_book_folder(tmp_path, capsys):
    assert student.main(["--book", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path}: no _toc.yml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_writes_the_notebooks(tmp_path, capsys, monkeypatch):
    # The book's pages with code are copied as text rather than run: the edition that runs
    # them is the session's (conftest.py), and `make test` runs this command in full.
    monkeypatch.setattr(student, "is_markdown_notebook", lambda path: False)
    assert student.main(["--out", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert f"in {tmp_path / 'notebooks'}, with {len(answers.EXERCISES)} exercises" in said
    assert (tmp_path / "notebooks" / "capstone.ipynb").is_file()


# ---------------------------------------------------------------------------------------
# Teacher-only pages: the course guide, and the capstone's worked solution and rubric

COURSE_GUIDE = ROOT / "book" / "course.md"
TEACHER_ONLY_PHRASES = [
    "Keep this edition, with the solutions",
    "Teaching with this book",
    "How the capstone is marked",
    "Rubric for the written explanation",
    "What a good explanation says",
    "WORKED_SOLUTION",
    "weight: -0.4",
]


def _teacher_only_texts() -> list[str]:
    """The phrases above, and every plain line of the course guide (no markup to render)."""
    guide = COURSE_GUIDE.read_text()
    assert all(p in guide for p in TEACHER_ONLY_PHRASES[:3])  # the guide says them
    lines = [
        line.strip()
        for line in guide.split("\n")
        if len(line.strip()) > 40 and not re.search(r"[`{}*|$\[\]_]", line)
    ]
    assert len(lines) > 20
    return TEACHER_ONLY_PHRASES + lines


def _normalised(text: str) -> str:
    """Text as the HTML shows it, with Sphinx's curly quotes and dashes made plain again."""
    for fancy, plain in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"')):
        text = text.replace(fancy, plain)
    return text.replace("\u2013", "--").replace("\u2014", "---")


def test_the_student_edition_has_no_teacher_only_page(edition):
    out, _ = edition
    assert not (out / "book" / "course.md").exists()
    assert "book/course\n" not in (out / "_toc.yml").read_text()
    assert "book/course_student" in (out / "_toc.yml").read_text()
    files = [p for p in out.rglob("*") if p.suffix in (".md", ".ipynb", ".yml")]
    assert len(files) > 15
    texts = _teacher_only_texts()
    for path in files:
        text = path.read_text()
        for teacher in texts:
            assert teacher not in text, f"{path.relative_to(out)}: teacher-only {teacher[:60]!r}"


def test_the_check_would_catch_the_course_guide(tmp_path):
    """Built the old way, with the guide listed, the student edition fails the check above."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(student, "TEACHER_ONLY", {})
        # The pages with code are copied as text rather than run: the guide's words are
        # what the check looks for, and running them adds nothing to this test.
        patch.setattr(student, "is_markdown_notebook", lambda path: False)
        student.build(tmp_path, ROOT)
    leaked = (tmp_path / "book" / "course.md").read_text()
    assert any(teacher in leaked for teacher in _teacher_only_texts())


def test_the_capstone_keeps_its_task_and_loses_its_solution_and_rubric(edition):
    out, _ = edition
    cells = nbformat.read(out / "notebooks" / "capstone.ipynb", as_version=4).cells
    text = "\n".join(c.source for c in cells)
    assert "capstone.try_recipe" in text and ":label: ex-capstone" in text
    assert "**Your explanation.**" in text  # the cell for the student's explanation
    for teacher in ("Rubric", "rubric", "WORKED_SOLUTION", "weight: -0.4", "linear_recipe"):
        assert teacher not in text
    outputs = "\n".join(str(c.get("outputs", "")) for c in cells if c.cell_type == "code")
    assert "test split" not in outputs  # only the validation split is shown to the student


def test_the_student_html_has_no_teacher_only_page():
    html = ROOT / "_build" / "student" / "html"
    pages = sorted(html.glob("**/*.html"))
    assert len(pages) > 10, f"{html}: build the student edition first ('make student')"
    assert (html / "book" / "course_student.html").is_file()
    assert not (html / "book" / "course.html").exists()
    texts = _teacher_only_texts()
    for path in pages:
        shown = _normalised(path.read_text())
        for teacher in texts:
            assert teacher not in shown, f"{path.relative_to(html)}: teacher-only {teacher[:60]!r}"
