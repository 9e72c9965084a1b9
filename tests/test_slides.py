"""The slides (`python -m pearl_edu.teaching.slides`, `make slides`): one deck per class of the
course plan, each with its chapters' material, no solutions or hidden cells, and nothing
loaded from the network.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml

from pearl_edu.teaching import course_plan, slides

ROOT = Path(__file__).resolve().parents[1]


def _toc_notebooks() -> list[str]:
    """Every notebook that _toc.yml lists, as a stem, read from the file itself."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    stems = []
    for entry in files:
        path = ROOT / re.sub(r"\.ipynb$", "", entry)
        if path.with_suffix(".ipynb").is_file():
            stems.append(path.name)
    return stems


TOC_NOTEBOOKS = _toc_notebooks()
PLAN = course_plan.load_course_plan()
CLASS_OF = {chapter: c.number for c in PLAN for chapter in c.chapters}


@pytest.fixture(scope="module")
def decks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slides")
    written = slides.build(out, ROOT)
    assert written == [out / slides.deck_name(c.number) for c in PLAN]
    return out


class _Slides(HTMLParser):
    """Each slide's text and attributes, and every address a page loads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.slides: list[dict] = []
        self.loads: list[tuple[str, str]] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "data", "poster"):
            if attrs.get(name) is not None:
                self.loads.append((tag, attrs[name]))
        if tag == "section":
            self.depth += 1
            self.slides.append({"attrs": attrs, "text": [], "images": []})
        elif tag == "img" and self.slides:
            self.slides[-1]["images"].append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "section":
            self.depth -= 1

    def handle_data(self, data):
        if self.slides and self.depth:
            self.slides[-1]["text"].append(data)


def _parse(path: Path) -> _Slides:
    parser = _Slides()
    parser.feed(path.read_text())
    return parser


def _chapter_slides(decks: Path, stem: str) -> tuple[str, list[str], str]:
    """A chapter's slides in its class's deck: their text, their images, their raw HTML."""
    deck = decks / slides.deck_name(CLASS_OF[stem])
    parsed = _parse(deck)
    mine = [s for s in parsed.slides if s["attrs"].get("data-chapter") == stem]
    assert mine, f"{deck.name} has no slide of {stem}"
    text = _normal(" ".join("".join(s["text"]) for s in mine))
    images = [src for s in mine for src in s["images"]]
    return text, images, deck.read_text()


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _solution_cells(path: Path):
    """Markdown lines of solutions, and the cells between solution-start and solution-end.

    Found independently of `slides` and `student`.
    """
    lines, cells, inside = [], [], False
    for cell in nbformat.read(path, as_version=4).cells:
        source = cell.source.split("\n")
        if inside and "{solution-end}" not in cell.source:
            cells.append(cell)
            if cell.cell_type == "markdown":
                lines += source
            continue
        for i, line in enumerate(source):
            if inside:
                if "{solution-end}" in line:
                    inside = False
                else:
                    lines.append(line)
            elif re.match(r"^:{3,}\{solution\}", line):
                fence = line.split("{")[0]
                end = next(j for j in range(i + 1, len(source)) if source[j].strip() == fence)
                lines += source[i + 1 : end]
            elif "{solution-start}" in line:
                inside = True
    return lines, cells


def _phrases(line: str) -> list[str]:
    """Stretches of a Markdown line's own words, long enough to be telling."""
    line = re.sub(r"^\s*([-*+]|\d+\.)\s+", "", line)
    pieces = re.split(r"[$*`{}\[\]()|\\_]", line)
    return [_normal(p) for p in pieces if len(_normal(p)) >= 30]


def _printed(cell) -> list[str]:
    text = ""
    for output in cell.get("outputs", []):
        text += output.get("text", "") + output.get("data", {}).get("text/plain", "")
    return [_normal(line) for line in text.split("\n") if len(line.strip()) >= 25]


def _shown_cells(path: Path):
    """The chapter's cells outside solutions and hidden cells, up to its exercises."""
    _, in_solution = _solution_cells(path)
    hidden = {cell.get("id") for cell in in_solution}
    for cell in nbformat.read(path, as_version=4).cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.get("id") in hidden or "remove-cell" in tags:
            continue
        end = re.search(r"^## (Exercises|References)", cell.source, re.M)
        if cell.cell_type == "markdown" and end:
            yield nbformat.v4.new_markdown_cell(cell.source[: end.start()])
            return
        yield cell


def test_every_class_of_the_plan_has_a_deck_and_the_index_lists_it(decks):
    assert sorted(p.name for p in decks.glob("class-*.html")) == sorted(
        slides.deck_name(c.number) for c in PLAN
    )
    index = _parse(decks / "index.html")
    linked = [address for tag, address in index.loads if tag == "a"]
    for course_class in PLAN:
        assert slides.deck_name(course_class.number) in linked
        deck = (decks / slides.deck_name(course_class.number)).read_text()
        assert course_class.title in html.unescape(deck)
        assert course_class.minutes == 90


def test_every_toc_notebook_is_in_exactly_one_class():
    assert TOC_NOTEBOOKS, "_toc.yml lists no notebook"
    planned = [chapter for c in PLAN for chapter in c.chapters]
    for stem in TOC_NOTEBOOKS:
        assert planned.count(stem) == 1, f"{stem} is in {planned.count(stem)} classes of the plan"
    assert set(planned) <= set(TOC_NOTEBOOKS), "the plan lists a chapter that _toc.yml does not"
    assert [c.number for c in PLAN] == list(range(1, len(PLAN) + 1))


@pytest.mark.parametrize("stem", TOC_NOTEBOOKS)
def test_a_deck_shows_its_chapters_title_objectives_equations_figures_and_summary(decks, stem):
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    text, images, _ = _chapter_slides(decks, stem)
    cells = list(_shown_cells(path))
    markdown = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    title = re.search(r"^# (.+)$", markdown, re.M).group(1)
    assert _normal(title) in text
    objectives = re.search(r"Audience & objectives\n:class: \w+\n(.+?)\n", markdown)
    assert objectives, f"{stem}: no objectives note"
    assert _phrases(objectives.group(1))[0] in text
    if "$$" in markdown:
        assert "\\[" in text, f"{stem} has display equations; its slides none"
    figures = [
        "".join(o["data"]["image/png"]).replace("\n", "")
        for c in cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    if figures:
        shown = {src.removeprefix("data:image/png;base64,") for src in images}
        assert shown & set(figures), f"{stem} has figures; its slides none"
    summary = re.search(r"^## Summary\n+(.+?)(\n\n|$)", markdown, re.S | re.M)
    if summary:
        assert "Summary" in text
        assert _phrases(summary.group(1))[0] in text


@pytest.mark.parametrize("stem", TOC_NOTEBOOKS)
def test_no_solution_and_no_hidden_cell_on_a_slide(decks, stem):
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    text, images, raw = _chapter_slides(decks, stem)
    lines, cells = _solution_cells(path)
    assert "{solution" not in raw
    # What the chapter also shows outside its solutions may be on a slide.
    shown = {line for cell in _shown_cells(path) for line in _printed(cell)}
    for phrase in (p for line in lines for p in _phrases(line)):
        assert phrase not in text, f"{stem}: solution text on a slide: {phrase!r}"
    for cell in cells:
        for line in set(_printed(cell)) - shown:
            assert line not in text, f"{stem}: output of a solution cell on a slide: {line!r}"
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                png = "".join(output["data"]["image/png"]).replace("\n", "")
                assert png not in raw, f"{stem}: a figure of a solution on a slide"
    for cell in nbformat.read(path, as_version=4).cells:
        if "remove-cell" in cell.get("metadata", {}).get("tags", []):
            for line in cell.source.split("\n"):
                if len(line.strip()) >= 25:
                    assert _normal(line) not in text, f"{stem}: hidden cell on a slide: {line!r}"


def test_the_capstones_worked_solution_is_not_on_its_slides(decks):
    """The capstone's solution prints tables and a figure: the rule of key results alone
    would show them, so this pins that solution regions are left out."""
    text, images, _ = _chapter_slides(decks, "capstone")
    assert "worked solution" not in text
    assert "Rubric" not in text
    assert not images


def test_the_decks_load_nothing_from_the_network(decks):
    pages = sorted(decks.glob("*.html"))
    assert len(pages) == len(PLAN) + 1
    for page in pages:
        parsed = _parse(page)
        scripts = [address for tag, address in parsed.loads if tag == "script"]
        if page.name != "index.html":
            assert "reveal/reveal.js" in scripts and "mathjax/tex-chtml.js" in scripts
        for tag, address in parsed.loads:
            if tag == "a":  # a link the reader may follow; nothing the page loads
                continue
            assert not re.match(r"^\s*(https?:)?//", address, re.I), (
                f"{page.name}: <{tag}> loads {address}"
            )
            if tag in {"script", "link", "img"} and not address.startswith(("data:", "#")):
                assert (page.parent / address).is_file(), f"{page.name}: {address} is missing"
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//", page.read_text())
    for css in decks.rglob("*.css"):
        for found in re.findall(r"url\(\s*['\"]?([^'\")]+)", css.read_text()):
            assert not re.match(r"^(https?:)?//", found), f"{css}: loads {found}"


def test_key_results_are_printed_tables_or_the_cells_tagged_slide(tmp_path):
    table = "model   text  addition\nbase   69.3%    45.7%\nmath   68.8%    74.0%"
    assert slides.is_table(table)
    assert not slides.is_table("one line only")
    assert not slides.is_table("slices:\n- sources:\n  - model: a\n    layer_range: [0, 4]")

    def notebook(tag_first: bool) -> Path:
        first = nbformat.v4.new_code_cell(
            "print(...)", metadata={"tags": ["slide"]} if tag_first else {}
        )
        first.outputs = [nbformat.v4.new_output("stream", name="stdout", text="seen: 42\n")]
        second = nbformat.v4.new_code_cell("print(table)")
        second.outputs = [
            nbformat.v4.new_output("stream", name="stdout", text=f"yaml: x\n\n{table}\n")
        ]
        cells = [nbformat.v4.new_markdown_cell("# A chapter\n\n## A section"), first, second]
        path = tmp_path / f"tagged_{tag_first}.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
        return path

    untagged = slides.read_chapter(notebook(False)).sections[0].items
    assert [item.content for item in untagged if item.kind == "result"] == [table]
    tagged = slides.read_chapter(notebook(True)).sections[0].items
    assert [item.content for item in tagged if item.kind == "result"] == ["seen: 42"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pearl_edu.teaching.slides", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_a_planned_chapter_that_is_missing_is_a_one_line_error(tmp_path):
    plan = tmp_path / "plan.yml"
    plan.write_text(
        "classes:\n  - {number: 1, title: One, minutes: 90, "
        "chapters: [01_meet_pearl, 99_no_such_chapter]}\n"
    )
    result = _run("--plan", str(plan), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "99_no_such_chapter" in result.stderr and "_toc.yml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("classes: [", "not valid YAML"),
        ("classes:\n  - {number: 2, title: Two, chapters: [capstone]}\n", "numbered 1, 2"),
        ("classes:\n  - {number: 1, title: One, chapters: [capstone, capstone]}\n", "class 1"),
        ("classes:\n  - {number: 1, title: One, chapter: [capstone]}\n", "unknown key"),
        ("classes:\n  - {number: 1, title: One, minutes: 0, chapters: [capstone]}\n", "minutes"),
    ],
)
def test_a_bad_plan_is_a_one_line_error(tmp_path, capsys, text, message):
    plan = tmp_path / "plan.yml"
    plan.write_text(text)
    assert slides.main(["--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and str(plan) in error
    assert len(error.strip().splitlines()) == 1


def test_a_chapter_in_no_class_is_named(tmp_path, capsys):
    plan = tmp_path / "plan.yml"
    plan.write_text("classes:\n  - {number: 1, title: Capstone, chapters: [capstone]}\n")
    assert slides.main(["--plan", str(plan), "--out", str(tmp_path / "out")]) == 0
    assert "note: 01_meet_pearl is in _toc.yml but in no class" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").glob("class-*.html")] == ["class-01.html"]


def test_missing_reveal_is_a_clear_error(tmp_path):
    with pytest.raises(slides.SlidesError, match=r"reveal\.js is missing .*make setup"):
        slides.build(tmp_path / "out", ROOT, reveal=tmp_path / "nothing")
