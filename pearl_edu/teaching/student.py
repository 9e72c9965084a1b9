"""The student edition of the book: every chapter without its solutions, with checked answers.

    python -m pearl_edu.teaching.student [--out _build/student] [--html]

(``make student`` runs it with ``--html``.) For every chapter in ``_toc.yml`` it writes a
notebook to hand out, ``<out>/notebooks/<chapter>.ipynb``:

- the solutions are left out: ``{solution}`` blocks, and everything between
  ``{solution-start}`` and ``{solution-end}``, code cells included;
- the hidden cells (tag ``remove-cell``), which check the teacher's edition, are left out;
- the exercises and their hints stay; after each exercise that `pearl_edu.teaching.answers`
  can check come a cell to fill in (``value = ...``) and a cell that checks it;
- every other cell stays as it is, with its saved outputs, so the figures are there
  before a student runs anything.

The teacher-only pages (`TEACHER_ONLY`: the course guide, ``book/course.md``, with its
marking procedure) stay out of it: the student edition lists a page for students in their
place (``book/course_student.md``), in its own ``_toc.yml``. The book's other pages come
along without their solutions; those with code to run (MyST
Markdown notebooks such as ``book/performance.md``) are run in the teacher's folder and
written as notebooks, with their outputs. With ``--html`` it also builds the student
edition of the HTML book into ``<out>/html``: the same theme and pages, from those
notebooks, with nothing executed again.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient

from pearl_edu.teaching.answers import EXERCISES

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "_build" / "student"
# Where the answers of the teacher's edition live: the metadata of the exercise's cell,
# {"answers": {label: {blank: value}}}. The student edition leaves it out.
ANSWERS_KEY = "answers"
EDITION_NOTE = """\
:::{note}
This is the **student edition**: the exercises' solutions are left out. Where an exercise
has an answer to compute, fill in the cell after it (replace each `...`) and run the cell
below it, which checks your answer and gives a hint if it is not right yet.
:::"""

# The teacher's pages that the student edition leaves out, each with the page it lists in
# its place (None: nothing). The main book does not build the replacements: they are not in
# its _toc.yml, and its _config.yml builds only the pages listed there.
TEACHER_ONLY: dict[str, str | None] = {
    "book/course": "book/course_student",
    "book/homework": None,  # the homework's rubrics and answer keys; course_student lists the sets
}

_OPEN = re.compile(r"^(?P<fence>:{3,}|`{3,})\{(?P<name>[a-z:-]+)\}\s*(?P<arg>\S*)")


@dataclass
class _Scan:
    """The state of the scan through a notebook: inside a solution-start/end region or not."""

    in_solution: bool = False
    fence: str = ""


@dataclass
class StudentNotebook:
    """A student notebook, and which checked exercises it holds."""

    notebook: nbformat.NotebookNode
    checked: list[str] = field(default_factory=list)


def strip_solutions(text: str, scan: _Scan) -> str:
    """Markdown without its ``{solution}`` blocks and ``{solution-start/end}`` regions.

    ``scan`` carries a region opened in one cell and closed in a later one.
    """
    lines, kept, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        opened = _OPEN.match(line)
        if scan.in_solution:
            if opened and opened["name"] == "solution-end":
                scan.in_solution = False
                i = _after_block(lines, i, opened["fence"])
            else:
                i += 1
            continue
        if opened and opened["name"] == "solution":
            i = _after_block(lines, i, opened["fence"])
            continue
        if opened and opened["name"] == "solution-start":
            scan.in_solution = True
            i = _after_block(lines, i, opened["fence"])
            continue
        kept.append(line)
        i += 1
    return _tidy("\n".join(kept))


def _after_block(lines: list[str], start: int, fence: str) -> int:
    """The index of the line after the directive opened at ``start`` closes."""
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == fence:
            return j + 1
    raise ValueError(f"directive opened by {lines[start]!r} is never closed by {fence!r}")


def _tidy(text: str) -> str:
    """No runs of blank lines where blocks were taken out."""
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def split_after_exercises(text: str, labels: Iterable[str]) -> list[tuple[str, str | None]]:
    """Markdown cut after each checked exercise (and the hints that follow it).

    Returns ``(markdown, label)`` pieces: ``label`` is the checked exercise that the piece
    ends with, or None for the last piece.
    """
    wanted = set(labels)
    lines = text.split("\n")
    pieces: list[tuple[str, str | None]] = []
    start, i, pending = 0, 0, None
    while i < len(lines):
        opened = _OPEN.match(lines[i])
        if opened and opened["name"] == "exercise":
            end = _after_block(lines, i, opened["fence"])
            label = _label(lines[i:end])
            if pending is not None:  # two checked exercises with nothing between
                pieces.append(("\n".join(lines[start:i]), pending))
                start = i
            pending = label if label in wanted else None
            i = end
            continue
        if opened and opened["name"] == "hint" and pending is not None:
            i = _after_block(lines, i, opened["fence"])
            continue
        if pending is not None and lines[i].strip():
            pieces.append(("\n".join(lines[start:i]), pending))
            start, pending = i, None
        i += 1
    pieces.append(("\n".join(lines[start:]), pending))
    if pieces[-1][1] is not None:
        pieces.append(("", None))
    return [(_tidy(md), label) for md, label in pieces]


def _label(block: list[str]) -> str | None:
    for line in block:
        found = re.match(r"^:label:\s*(\S+)", line.strip())
        if found:
            return found.group(1)
    return None


def student_notebook(path: Path) -> StudentNotebook:
    """The student edition of one chapter notebook (see the module's docstring).

    A MyST Markdown page with code cells (``book/performance.md``) is read as a notebook and
    run first, in its own folder, so that the student edition has its outputs too.
    """
    teacher = _read_teacher(path)
    cells: list[nbformat.NotebookNode] = []
    checked: list[str] = []
    scan = _Scan()
    for cell in teacher.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "markdown":
            if not scan.in_solution and "remove-cell" not in tags:
                cells.append(_without_answers(cell))
            continue
        text = strip_solutions(cell.source, scan)
        pieces = split_after_exercises(text, EXERCISES)
        for k, (markdown, label) in enumerate(pieces):
            if markdown:
                piece = _without_answers(cell)
                piece.source = markdown
                piece.id = cell.id if k == 0 else f"{cell.id}-{k}"[:64]
                cells.append(piece)
            if label is not None:
                exercise = EXERCISES[label]
                cells.append(_code(exercise.fill_in_cell(), f"{label}-answer", ["answer"]))
                cells.append(_code(exercise.check_cell(), f"{label}-check", ["check"]))
                checked.append(label)
    if scan.in_solution:
        raise ValueError(f"{path}: a solution-start has no solution-end")
    if cells and cells[0].cell_type == "markdown":
        cells.insert(1, nbformat.v4.new_markdown_cell(EDITION_NOTE, id="student-edition-note"))
    student = nbformat.v4.new_notebook(cells=cells, metadata=copy.deepcopy(teacher.metadata))
    student.metadata["pearl_edu"] = {"edition": "student"}
    nbformat.validate(student)
    return StudentNotebook(student, checked)


def _without_answers(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    copied = copy.deepcopy(cell)
    copied.metadata.pop(ANSWERS_KEY, None)
    return copied


def _code(source: str, cell_id: str, tags: list[str]) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source, id=cell_id, metadata={"tags": tags})


def teacher_answers(path: Path) -> dict[str, dict[str, object]]:
    """The worked answers of a teacher's notebook: {exercise label: {blank: value}}."""
    found: dict[str, dict[str, object]] = {}
    for cell in nbformat.read(path, as_version=4).cells:
        for label, values in cell.get("metadata", {}).get(ANSWERS_KEY, {}).items():
            if label in found:
                raise ValueError(f"{path}: answers of {label} are given twice")
            found[label] = dict(values)
    return found


def is_markdown_notebook(path: Path) -> bool:
    """Whether a page is a MyST Markdown notebook (code cells to run), not plain Markdown."""
    from myst_nb.core.read import is_myst_markdown_notebook

    return path.suffix == ".md" and is_myst_markdown_notebook(path.read_text())


def _read_teacher(path: Path) -> nbformat.NotebookNode:
    if path.suffix == ".ipynb":
        return nbformat.read(path, as_version=4)
    from myst_nb.core.read import read_myst_markdown_notebook

    notebook = read_myst_markdown_notebook(path.read_text())
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name=notebook.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return notebook


# ---------------------------------------------------------------------------------------
# The whole edition


def chapters(root: Path = ROOT) -> list[str]:
    """The book's files in the order of its ``_toc.yml`` (without extensions)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    found = [toc["root"]]

    def walk(entries) -> None:
        for entry in entries or []:
            if "file" in entry:
                found.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))
            for part in entry.get("parts", []):
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    return [re.sub(r"\.(ipynb|md)$", "", f) for f in found]


def student_chapters(root: Path = ROOT) -> list[str]:
    """`chapters` with each teacher-only page replaced by its student page (`TEACHER_ONLY`)."""
    replaced = [TEACHER_ONLY.get(entry, entry) for entry in chapters(root)]
    return [entry for entry in replaced if entry is not None]


def student_toc(root: Path = ROOT) -> dict:
    """The book's ``_toc.yml`` with each teacher-only page replaced (or left out)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())

    def replace(entries: list | None) -> list | None:
        if entries is None:
            return None
        kept = []
        for entry in entries:
            entry = dict(entry)
            if "file" in entry:
                stem = re.sub(r"\.(ipynb|md)$", "", entry["file"])
                if stem in TEACHER_ONLY:
                    if TEACHER_ONLY[stem] is None:
                        continue
                    entry["file"] = TEACHER_ONLY[stem]
            for key in ("sections", "chapters"):
                if key in entry:
                    entry[key] = replace(entry[key])
            if "parts" in entry:
                entry["parts"] = [
                    {**part, "chapters": replace(part.get("chapters"))} for part in entry["parts"]
                ]
            kept.append(entry)
        return kept

    if toc["root"] in TEACHER_ONLY:
        raise ValueError(f"_toc.yml: the root page {toc['root']} is teacher-only")
    if "chapters" in toc:
        toc["chapters"] = replace(toc["chapters"])
    toc["parts"] = [
        {**part, "chapters": replace(part.get("chapters"))} for part in toc.get("parts", [])
    ]
    toc["parts"] = [part for part in toc["parts"] if part["chapters"]]
    return toc


def build(out: Path = DEFAULT_OUT, root: Path = ROOT) -> dict[Path, list[str]]:
    """Write the student notebooks (and the book's other pages) under ``out``.

    Returns each student notebook written, with the checked exercises it holds. The book's
    Markdown pages with code (MyST notebooks) are run and written as notebooks too.
    """
    out = Path(out)
    for stale in ("notebooks", "book", "pearl_edu", "_toc.yml", "_config.yml"):
        target = out / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    written: dict[Path, list[str]] = {}
    pages: list[Path] = []
    for entry in student_chapters(root):
        source = _source_of(root, entry)
        target = out / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".ipynb" or is_markdown_notebook(source):
            student = student_notebook(source)
            target = target.with_suffix(".ipynb")
            nbformat.write(student.notebook, target)
            written[target] = student.checked
        else:
            target.write_text(strip_solutions(source.read_text(), _Scan()) + "\n")
        pages.append(target)
        _copy_included_files(source, root, out)
    _relink(pages, {p.with_suffix(".md") for p in written})
    _copy_book_assets(root, out)
    (out / "_toc.yml").write_text(yaml.safe_dump(student_toc(root), sort_keys=False))
    (out / "_config.yml").write_text(yaml.safe_dump(student_config(root), sort_keys=False))
    return written


def _source_of(root: Path, entry: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (root / (entry + suffix)).is_file():
            return root / (entry + suffix)
    raise FileNotFoundError(f"_toc.yml lists {entry}, which has no .ipynb or .md file")


def _copy_included_files(source: Path, root: Path, out: Path) -> None:
    """Files a page pulls in with ``{literalinclude}``, at the same place under ``out``."""
    if source.suffix == ".ipynb":
        text = "\n".join(c.source for c in nbformat.read(source, as_version=4).cells)
    else:
        text = source.read_text()
    for included in re.findall(r"\{literalinclude\}\s+(\S+)", text):
        path = (source.parent / included).resolve()
        if path.is_file() and root in path.parents:
            target = out / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


_LINK = re.compile(r"\]\((?P<target>[^)\s#]+\.md)(?P<anchor>#[^)\s]*)?\)")


def _relink(pages: list[Path], converted: set[Path]) -> None:
    """Links to Markdown pages that became notebooks point to the notebooks."""

    def fix(text: str, folder: Path) -> str:
        def replace(link: re.Match) -> str:
            target = (folder / link["target"]).resolve()
            if target not in converted:
                return link.group(0)
            return f"]({link['target'][:-3]}.ipynb{link['anchor'] or ''})"

        return _LINK.sub(replace, text)

    converted = {p.resolve() for p in converted}
    for page in pages:
        if page.suffix == ".md":
            page.write_text(fix(page.read_text(), page.parent))
            continue
        notebook = nbformat.read(page, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                cell.source = fix(cell.source, page.parent)
        nbformat.write(notebook, page)


def _copy_book_assets(root: Path, out: Path) -> None:
    """The book's static files and its bibliography."""
    shutil.copytree(root / "book" / "_static", out / "book" / "_static", dirs_exist_ok=True)
    for bib in (root / "book").glob("*.bib"):
        shutil.copy2(bib, out / "book" / bib.name)


def student_config(root: Path = ROOT) -> dict:
    """The book's ``_config.yml`` for the student edition.

    The same theme and extensions. Nothing is executed again: every page with code is a
    notebook with its outputs (the chapters' saved ones; `build` ran the Markdown pages). No
    launch or repository buttons: they would open the teacher's notebooks.
    """
    config = yaml.safe_load((root / "_config.yml").read_text())
    config["title"] = f"{config['title']} (student edition)"
    config["exclude_patterns"] = [*config.get("exclude_patterns", []), "html", ".build"]
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    config["html"] = {
        **config.get("html", {}),
        "use_repository_button": False,
        "use_issues_button": False,
        "use_edit_page_button": False,
    }
    config["launch_buttons"] = {
        "notebook_interface": "classic",
        "colab_url": "",
        "binderhub_url": "",
    }
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["html_static_path"] = [str((root / p).resolve()) for p in sphinx["html_static_path"]]
    return config


def build_html(
    out: Path = DEFAULT_OUT, flags: Iterable[str] = ("-W", "-n", "--keep-going")
) -> Path:
    """Build the student edition's HTML book from ``out`` (written by `build`) into ``out/html``."""
    out = Path(out)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", str(out), "--path-output", str(out / ".build"), *flags]
    subprocess.run(command, check=True)
    html = out / "html"
    shutil.rmtree(html, ignore_errors=True)
    shutil.move(str(out / ".build" / "_build" / "html"), html)
    return html


def book_arguments(
    module: str,
    description: str,
    argv: list[str] | None,
    options: Callable[[argparse.ArgumentParser], None],
) -> argparse.Namespace | None:
    """The command line of ``python -m pearl_edu.teaching.<module>``, a command that reads
    the book: ``--book`` (the book's root, by default this checkout's) and the ``options``
    that the command adds. None, after a one-line error, when ``--book`` has no ``_toc.yml``.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m pearl_edu.teaching.{module}", description=description
    )
    parser.add_argument("--book", type=Path, default=ROOT, help="the book's root (_toc.yml)")
    options(parser)
    args = parser.parse_args(argv)
    if not (args.book / "_toc.yml").is_file():
        print(f"error: {args.book}: no _toc.yml; --book must be the book's root", file=sys.stderr)
        return None
    return args


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write it")
        parser.add_argument("--html", action="store_true", help="also build its HTML book")

    description = "Write the student edition: chapters without solutions, with checked answers."
    args = book_arguments("student", description, argv, options)
    if args is None:
        return 2
    written = build(args.out, args.book.resolve())
    checked = sum(len(labels) for labels in written.values())
    print(
        f"{len(written)} student notebooks in {args.out / 'notebooks'}, "
        f"with {checked} exercises to fill in and check"
    )
    if args.html:
        html = build_html(args.out)
        print(f"The student edition's HTML book is in {html}; open {html / 'index.html'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
