"""Slides for each class of the course, made from the chapters as saved.

    python -m pearl_edu.teaching.slides [--out _build/slides] [--plan course_plan.yml]

(``make slides`` runs it.) The classes, and which chapters each teaches, come from the
course plan (`pearl_edu.teaching.course_plan`). For each class it writes one reveal.js deck,
``<out>/class-NN.html``, and ``<out>/index.html`` lists them. The book stays the source: a
deck is read from the chapter notebooks with their saved outputs, nothing is run. For each
chapter a deck shows:

- its title, and its objectives (the "Audience & objectives" note at its top);
- each section (its ``##`` heading, the first sentence of its prose and its ``###``
  headings), then, in the order they come:
  its display equations (``$$ ... $$``, with their labels as tags), its figures (the
  images that its code cells output, embedded in the deck) and its key results;
- its summary (the section "Summary").

What a chapter says before its first section comes first, under the chapter's title, if it
has equations, figures or key results.

**Key results.** If a chapter tags code cells ``slide``, the printed output of exactly those
cells is its key results. Otherwise the rule is: a key result is a table that a code cell
prints, that is, a block of its printed output (blocks are separated by blank lines) of
three lines or more, at least three of which have columns separated by two spaces or more.
The comparison tables of the chapters are such blocks; single lines, lists of numbers and
YAML recipes are not.

Never on a slide: code, the exercises and their hints, the solutions (``{solution}`` blocks,
and everything between ``{solution-start}`` and ``{solution-end}``, the outputs of code cells
there included), the hidden check cells (tag ``remove-cell``), the outputs a chapter hides
(tag ``remove-output``), and the references.

The decks work opened from disk with no network: reveal.js and MathJax are copied next to
them from ``.build-deps`` (fetched from npm by ``make setup``), and figures are embedded.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import nbformat
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

from pearl_edu.teaching import course_plan
from pearl_edu.teaching.student import _Scan, book_arguments, strip_solutions

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "_build" / "slides"
MATHJAX = Path(".build-deps/static/mathjax")
REVEAL = Path(".build-deps/slides/reveal")
# What a deck needs of MathJax (as the Makefile copies it) and of reveal.js.
MATHJAX_PARTS = ("tex-chtml.js", "input", "output", "ui", "a11y", "adaptors")
REVEAL_PARTS = ("reveal.js", "reveal.css", "reset.css", "theme/white.css", "theme/fonts")

SLIDE_TAG = "slide"
OBJECTIVES = "Audience & objectives"
SKIPPED_SECTIONS = {"exercises", "references"}
EQUATIONS_PER_SLIDE = 2
LINES_PER_RESULT = 26  # a longer table goes on more than one slide

_FENCE = re.compile(r"^(?P<fence>:{3,}|`{3,})\{(?P<name>[a-z:-]+)\}\s*(?P<arg>.*)$")
_CODE_FENCE = re.compile(r"^(`{3,}|~{3,})")
_HEADING = re.compile(r"^(?P<level>#{1,3})\s+(?P<text>.+?)\s*#*\s*$")
_DISPLAY_MATH = re.compile(r"\$\$(?P<tex>.+?)\$\$(?:[ \t]*\((?P<label>[^()\s]+)\))?", re.S)
_ROLE = re.compile(r"\{(?P<role>[a-z:]+)\}`(?P<text>[^`]*)`")
_COLUMNS = re.compile(r"\S(?: {2,}|\t)\S")


class SlidesError(ValueError):
    """Slides that cannot be made; the message says what is missing or wrong."""


# ---------------------------------------------------------------------------------------
# Reading a chapter


@dataclass
class Item:
    """One thing on a section's slides: an equation, a figure or a key result."""

    kind: str  # "equation", "figure" or "result"
    content: str  # TeX, base64 PNG, or text
    tag: str = ""  # an equation's label, shown as its tag
    caption: str = ""  # the theorem, definition or proof an equation is part of


@dataclass
class Section:
    title: str  # Markdown (inline)
    intro: bool = False  # what comes before the first section, under the chapter's title
    lead: str = ""  # Markdown: the first sentence of its prose
    subsections: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)


@dataclass
class Chapter:
    stem: str
    title: str = ""
    objectives: str = ""  # Markdown
    sections: list[Section] = field(default_factory=list)
    summary: str = ""  # Markdown


def read_chapter(path: Path) -> Chapter:
    """The slide material of one chapter notebook (see the module's docstring)."""
    notebook = nbformat.read(path, as_version=4)
    chapter = Chapter(path.stem)
    tagged = any(SLIDE_TAG in _tags(cell) for cell in notebook.cells)
    scan = _Scan()
    section: Section | None = None
    summary: list[str] = []
    for cell in notebook.cells:
        tags = _tags(cell)
        if "remove-cell" in tags:
            continue
        if cell.cell_type == "markdown":
            text = _without_blocks(strip_solutions(cell.source, scan), {"exercise", "hint"})
            text, objectives = _take_objectives(text)
            chapter.objectives = chapter.objectives or objectives
            for kind, value in _blocks(text):
                if kind == "heading":
                    level, title = value
                    if level == 1 and not chapter.title:
                        chapter.title = title
                        section = Section(title, intro=True)
                        chapter.sections.append(section)
                    elif level == 2:
                        section = Section(title)
                        chapter.sections.append(section)
                    elif level == 3 and section is not None:
                        section.subsections.append(title)
                elif section is not None and _plain(section.title) == "summary":
                    summary.append(value)
                elif section is not None:
                    section.lead = section.lead or _lead(value)
                    section.items += _equations(value)
            continue
        if cell.cell_type != "code" or scan.in_solution or "remove-output" in tags:
            continue
        if section is None or _plain(section.title) in SKIPPED_SECTIONS:
            continue
        section.items += _figures(cell)
        if (SLIDE_TAG in tags) if tagged else True:
            section.items += _results(cell, whole=tagged)
    if not chapter.title:
        raise SlidesError(f"{path}: no title (a '# ' heading in its first Markdown cell)")
    chapter.summary = "\n\n".join(part.strip() for part in summary if part.strip())
    chapter.sections = [
        s
        for s in chapter.sections
        if _plain(s.title) not in SKIPPED_SECTIONS | {"summary"} and (s.items or not s.intro)
    ]
    return chapter


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _plain(title: str) -> str:
    return title.strip().lower()


def _without_blocks(text: str, names: set[str]) -> str:
    """Markdown without the directives named (exercises and hints stay off the slides)."""
    lines, kept, i = text.split("\n"), [], 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if opened and opened["name"] in names:
            close = next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip() == opened["fence"]),
                len(lines) - 1,
            )
            i = close + 1
            continue
        kept.append(lines[i])
        i += 1
    return "\n".join(kept)


def _take_objectives(text: str) -> tuple[str, str]:
    """The text without its "Audience & objectives" note, and the note's body."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        opened = _FENCE.match(line)
        if opened and opened["name"] == "admonition" and opened["arg"].strip() == OBJECTIVES:
            close = next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip() == opened["fence"]),
                len(lines),
            )
            body = [x for x in lines[i + 1 : close] if not re.match(r"^:\w+:", x)]
            return "\n".join(lines[:i] + lines[close + 1 :]), "\n".join(body).strip()
    return text, ""


def _blocks(text: str):
    """A Markdown cell as ("heading", (level, text)) and ("text", markdown) pieces."""
    lines, buffer, in_code = text.split("\n"), [], ""
    for line in lines:
        fence = _CODE_FENCE.match(line)
        if in_code:
            buffer.append(line)
            if fence and line.strip() == in_code:
                in_code = ""
            continue
        if fence:  # a code block, or a directive in backticks ({literalinclude}): no headings
            in_code = fence.group(1)
            buffer.append(line)
            continue
        heading = _HEADING.match(line)
        if heading:
            if buffer:
                yield "text", "\n".join(buffer)
                buffer = []
            yield "heading", (len(heading["level"]), heading["text"])
            continue
        buffer.append(line)
    if buffer:
        yield "text", "\n".join(buffer)


def _lead(text: str) -> str:
    """The first sentence of the first paragraph of prose (not a list, table, math or note)."""
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph or re.match(r"^([:`$|<>#~]|[-*+] |\d+\. )", paragraph):
            continue
        sentence = re.match(r"^(.+?[.!?:])(?=\s+[A-Z({*`$]|$)", paragraph)
        return sentence.group(1) if sentence else paragraph
    return ""


def _equations(text: str) -> list[Item]:
    """The display equations of some Markdown, each with its label (or its theorem's title)."""
    items = []
    for found in _DISPLAY_MATH.finditer(text):
        tex = found["tex"].strip()
        if tex:
            caption = _enclosing_directive(text[: found.start()])
            items.append(Item("equation", tex, _tag(found["label"] or ""), caption))
    return items


def _enclosing_directive(before: str) -> str:
    """The title of the prf: directive (theorem, definition, ...) still open at this point."""
    stack: list[tuple[str, str, str]] = []
    for line in before.split("\n"):
        opened = _FENCE.match(line)
        if opened:
            stack.append((opened["fence"], opened["name"], opened["arg"].strip()))
        elif stack and line.strip() == stack[-1][0]:
            stack.pop()
    for _fence, name, arg in reversed(stack):
        if name.startswith("prf:"):
            kind = name[4:].capitalize()
            return f"{kind} ({arg})" if arg and name != "prf:proof" else kind
    return ""


def _figures(cell: nbformat.NotebookNode) -> list[Item]:
    return [
        Item("figure", "".join(output["data"]["image/png"]).replace("\n", ""))
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


def _printed(cell: nbformat.NotebookNode) -> str:
    """What a code cell prints: its standard output and its results shown as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            parts.append(output.get("text", ""))
        elif output.get("output_type") == "execute_result":
            data = output.get("data", {})
            if "image/png" not in data and "text/html" not in data:
                parts.append(data.get("text/plain", ""))
    return "".join(parts)


def is_table(block: str) -> bool:
    """Whether a block of printed text is a table (the rule of the module's docstring)."""
    lines = [line for line in block.split("\n") if line.strip()]
    return len(lines) >= 3 and sum(bool(_COLUMNS.search(line)) for line in lines) >= 3


def _results(cell: nbformat.NotebookNode, whole: bool) -> list[Item]:
    printed = _printed(cell).strip("\n")
    if not printed.strip():
        return []
    blocks = [printed] if whole else re.split(r"\n[ \t]*\n", printed)
    found = []
    for block in blocks:
        block = block.strip("\n")
        if whole or is_table(block):
            lines = block.split("\n")
            for start in range(0, len(lines), LINES_PER_RESULT):
                found.append(Item("result", "\n".join(lines[start : start + LINES_PER_RESULT])))
    return found


# ---------------------------------------------------------------------------------------
# Markdown to HTML


class Renderer:
    """MyST Markdown of the chapters as HTML for a slide: math for MathJax, roles as text."""

    def __init__(self, titles: dict[str, str], citations: dict[str, str]):
        self.titles, self.citations = titles, citations
        self.markdown = MarkdownIt("commonmark").enable("table")
        dollarmath_plugin(
            self.markdown,
            double_inline=True,
            renderer=_math_html,
            label_renderer=lambda label: "",
        )

    def block(self, text: str) -> str:
        return self.markdown.render(self._roles(_without_directive_fences(text)))

    def inline(self, text: str) -> str:
        return self.markdown.renderInline(self._roles(text))

    def _roles(self, text: str) -> str:
        def replace(found: re.Match) -> str:
            role, content = found["role"], found["text"]
            explicit = re.match(r"^(?P<text>.*?)\s*<(?P<target>[^>]+)>$", content, re.S)
            if explicit and role != "cite":
                return explicit["text"]
            if role == "doc":
                return f"*{self.titles.get(Path(content).stem, Path(content).stem)}*"
            if role == "eq":
                return f"({_tag(content)})"
            if role.startswith("cite"):
                keys = [key.strip() for key in content.split(",")]
                return "[" + "; ".join(self.citations.get(k, k) for k in keys) + "]"
            return content

        return _ROLE.sub(replace, text)


def _math_html(tex: str, options: dict) -> str:
    if options.get("display_mode"):
        return f"\\[{html.escape(tex)}\\]"
    return f"\\({html.escape(tex)}\\)"


def _tag(label: str) -> str:
    return label.removeprefix("eq:")


def _without_directive_fences(text: str) -> str:
    """Directive fences and options dropped, their content kept (a note's text, say)."""
    kept = []
    for line in text.split("\n"):
        if _FENCE.match(line) or re.fullmatch(r"\s*(:{3,}|`{3,})\s*", line):
            continue
        if re.match(r"^:(class|label|name|nonumber):", line):
            continue
        kept.append(line)
    return "\n".join(kept)


def citations(bib: Path) -> dict[str, str]:
    """{key: "Surname et al. 2024"} for each entry of a BibTeX file."""
    found = {}
    if not bib.is_file():
        return found
    for entry in re.split(r"\n(?=@)", bib.read_text()):
        key = re.match(r"@\w+\{([^,\s]+),", entry.strip())
        if not key:
            continue
        authors = re.search(r"\bauthor\s*=\s*\{(.*?)\},?\s*\n", entry, re.S)
        year = re.search(r"\byear\s*=\s*\{?(\d{4})", entry)
        name = key.group(1)
        if authors:
            people = [_surname(person) for person in re.split(r"\s+and\s+", authors.group(1))]
            name = people[0] + (" et al." if len(people) > 2 else "")
            if len(people) == 2:
                name = f"{people[0]} and {people[1]}"
        found[key.group(1)] = f"{name} {year.group(1)}" if year else name
    return found


def _surname(person: str) -> str:
    """A BibTeX author's surname; an organisation (in braces, or with ``{ }``) whole."""
    person = person.strip()
    if "{ }" in person or (person.startswith("{") and person.endswith("}")):
        person = person.replace("{ }", " ")
        return re.sub(r"\\.|[{}]", "", person).strip()
    person = re.sub(r"\\.|[{}]", "", person).strip()
    if "," in person:
        return person.split(",")[0].strip()
    return person.split()[-1] if person.split() else person


# ---------------------------------------------------------------------------------------
# The decks


def _slides(chapter: Chapter, render: Renderer) -> list[dict]:
    """A chapter as a list of slides: {"kind", "title", ...} for the template."""
    slides = [{"kind": "chapter", "title": render.inline(chapter.title)}]
    if chapter.objectives:
        slides.append(
            {"kind": "text", "title": "Objectives", "html": render.block(chapter.objectives)}
        )
    if any(not s.intro for s in chapter.sections):
        outline = "".join(
            f"<li>{render.inline(s.title)}</li>" for s in chapter.sections if not s.intro
        )
        slides.append({"kind": "text", "title": "Outline", "html": f"<ol>{outline}</ol>"})
    for section in chapter.sections:
        title = render.inline(section.title)
        first = {"kind": "section", "title": title, "subsections": [], "equations": []}
        first["subsections"] = [render.inline(s) for s in section.subsections]
        first["lead"] = render.inline(section.lead) if section.lead else ""
        slides.append(first)
        current = first
        for item in section.items:
            if item.kind == "equation":
                if current.get("kind") != "section" or len(current["equations"]) >= (
                    EQUATIONS_PER_SLIDE
                ):
                    current = {
                        "kind": "section",
                        "title": title,
                        "subsections": [],
                        "equations": [],
                    }
                    slides.append(current)
                tag = f"\\tag{{{item.tag}}}" if item.tag else ""
                current["equations"].append({"tex": item.content + tag, "caption": item.caption})
            elif item.kind == "figure":
                current = {"kind": "figure", "title": title, "png": item.content}
                slides.append(current)
            else:
                current = {"kind": "result", "title": title, "text": item.content}
                current["font_px"] = _font_px(item.content)
                slides.append(current)
    if chapter.summary:
        slides.append({"kind": "text", "title": "Summary", "html": render.block(chapter.summary)})
    return slides


def _font_px(text: str) -> int:
    """A font size that fits a block of monospaced text on a 1280 x 720 slide."""
    lines = text.split("\n")
    widest = max(len(line) for line in lines)
    by_width = 1180 / (0.6 * max(widest, 1))
    by_height = 560 / (1.3 * max(len(lines), 1))
    return int(max(10, min(26, by_width, by_height)))


_ENV = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

_HEAD = """\
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<script>
window.MathJax = {
  tex: {tags: "ams", inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]]},
  startup: {pageReady: () => MathJax.startup.defaultPageReady().then(() => {
    document.documentElement.dataset.mathjax = "done";
    if (window.Reveal && Reveal.isReady()) {
      Reveal.layout();
      fitEquations(Reveal.getCurrentSlide());
    }
  })}
};
</script>
<script src="mathjax/tex-chtml.js" defer></script>
"""

DECK = _ENV.from_string(
    """<!DOCTYPE html>
<html lang="en">
<head>
<title>Class {{ course_class.number }}: {{ course_class.title }}</title>
{{ head | safe }}
<link rel="stylesheet" href="reveal/reset.css">
<link rel="stylesheet" href="reveal/reveal.css">
<link rel="stylesheet" href="reveal/theme/white.css">
<style>
.reveal h1, .reveal h2, .reveal h3 { text-transform: none; }
.reveal h1 { font-size: 2.1em; } .reveal h2 { font-size: 1.45em; } .reveal h3 { font-size: 1.1em; }
.reveal section { text-align: left; } .reveal section.title-slide { text-align: center; }
.reveal .kicker { color: #777; font-size: 0.7em; margin-bottom: 0.3em; }
.reveal ul, .reveal ol { display: block; font-size: 0.8em; }
.reveal .equation { font-size: 0.8em; margin: 0.4em 0; }
.reveal .caption { color: #555; font-size: 0.6em; }
.reveal img.figure { display: block; margin: 0 auto; max-height: 590px; max-width: 100%; }
.reveal pre.result { box-shadow: none; width: 100%; }
.reveal pre.result code { max-height: 600px; line-height: 1.3; padding: 0.4em; }
.reveal .subsections { color: #555; }
.reveal p.lead { font-size: 0.75em; color: #333; }
.reveal p code, .reveal li code { font-size: 0.85em; }
</style>
</head>
<body>
<div class="reveal"><div class="slides">
<section class="title-slide">
  <p class="kicker">Class {{ course_class.number }} &middot; {{ course_class.minutes }} minutes</p>
  <h1>{{ course_class.title }}</h1>
  <ol>{% for chapter in chapters %}<li>{{ chapter.title | safe }}</li>{% endfor %}</ol>
</section>
{% for chapter in chapters %}
{% for slide in chapter.slides %}
<section data-chapter="{{ chapter.stem }}" data-kind="{{ slide.kind }}"
{%- if slide.kind == "chapter" %} class="title-slide"{% endif %}>
{% if slide.kind == "chapter" %}
  <p class="kicker">{{ chapter.stem }}</p>
  <h1>{{ slide.title | safe }}</h1>
{% else %}
  <p class="kicker">{{ chapter.title | safe }}</p>
  <h2>{{ slide.title | safe }}</h2>
{% endif %}
{% if slide.kind == "text" %}
  {{ slide.html | safe }}
{% elif slide.kind == "section" %}
  {% if slide.lead %}<p class="lead">{{ slide.lead | safe }}</p>{% endif %}
  {% if slide.subsections %}<ul class="subsections">{% for s in slide.subsections %}<li>{{ s | safe }}</li>{% endfor %}</ul>{% endif %}
  {% for equation in slide.equations %}
  {% if equation.caption %}<p class="caption">{{ equation.caption }}</p>{% endif %}
  <div class="equation">\\[{{ equation.tex }}\\]</div>
  {% endfor %}
{% elif slide.kind == "figure" %}
  <img class="figure" alt="a figure of {{ chapter.stem }}" src="data:image/png;base64,{{ slide.png }}">
{% elif slide.kind == "result" %}
  <pre class="result"><code style="font-size: {{ slide.font_px }}px">{{ slide.text }}</code></pre>
{% endif %}
</section>
{% endfor %}
{% endfor %}
</div></div>
<script src="reveal/reveal.js"></script>
<script>
// A display equation wider than its slide is scaled down to fit (MathJax 3 does not).
function fitEquations(slide) {
  if (!slide || document.documentElement.dataset.mathjax !== "done") { return; }
  slide.querySelectorAll(".equation mjx-container").forEach((math) => {
    math.style.fontSize = "";
    const available = math.parentElement.clientWidth, needed = math.scrollWidth;
    if (available > 0 && needed > available) {
      math.style.fontSize = Math.floor(100 * available / needed) + "%";
    }
  });
}
Reveal.on("ready", (event) => fitEquations(event.currentSlide));
Reveal.on("slidechanged", (event) => fitEquations(event.currentSlide));
Reveal.initialize({hash: true, width: 1280, height: 720, margin: 0.04, center: false,
                   slideNumber: "c/t", transition: "none"});
</script>
</body>
</html>
"""
)

INDEX = _ENV.from_string(
    """<!DOCTYPE html>
<html lang="en">
<head>
<title>Slides: {{ book_title }}</title>
{{ head | safe }}
<style>
body { font-family: system-ui, sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em;
       line-height: 1.5; color: #222; }
li { margin: 0.2em 0; } .minutes { color: #666; }
</style>
</head>
<body>
<h1>Slides: {{ book_title }}</h1>
<p>One deck per class of the course. Open a deck, then use the arrow keys; F for full screen,
Esc for an overview of the slides.</p>
<ol>
{% for entry in classes %}
<li><a href="{{ entry.file }}">Class {{ entry.number }}: {{ entry.title }}</a>
<span class="minutes">({{ entry.minutes }} minutes)</span>
<ul>{% for title in entry.chapters %}<li>{{ title | safe }}</li>{% endfor %}</ul></li>
{% endfor %}
</ol>
</body>
</html>
"""
)


def deck_name(number: int) -> str:
    return f"class-{number:02d}.html"


def build(
    out: Path = DEFAULT_OUT,
    root: Path = ROOT,
    plan_path: Path = course_plan.PLAN,
    mathjax: Path | None = None,
    reveal: Path | None = None,
) -> list[Path]:
    """Write one deck per class of the plan, and the index, into ``out``; return the decks."""
    root, out = Path(root).resolve(), Path(out)
    mathjax = Path(mathjax) if mathjax else root / MATHJAX
    reveal = Path(reveal) if reveal else root / REVEAL
    _check_assets(mathjax, MATHJAX_PARTS, "MathJax")
    _check_assets(reveal, REVEAL_PARTS, "reveal.js")
    plan = course_plan.load_course_plan(plan_path)
    paths = course_plan.chapter_paths(plan, root, plan_path)
    chapters = {stem: read_chapter(path) for stem, path in paths.items()}
    titles = {stem: c.title for stem, c in chapters.items()}
    for stem, path in course_plan.toc_notebooks(root).items():
        titles.setdefault(stem, _title_of(path))
    render = Renderer(titles, citations(root / "book" / "references.bib"))
    book_title = _book_title(root)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("class-*.html"):
        stale.unlink()
    _copy_assets(mathjax, MATHJAX_PARTS, out / "mathjax")
    _copy_assets(reveal, REVEAL_PARTS, out / "reveal")
    decks, entries = [], []
    for course_class in plan:
        shown = [
            {
                "stem": stem,
                "title": render.inline(chapters[stem].title),
                "slides": _slides(chapters[stem], render),
            }
            for stem in course_class.chapters
        ]
        deck = out / deck_name(course_class.number)
        deck.write_text(DECK.render(course_class=course_class, chapters=shown, head=_HEAD))
        decks.append(deck)
        entries.append(
            {
                "number": course_class.number,
                "title": course_class.title,
                "minutes": course_class.minutes,
                "file": deck.name,
                "chapters": [c["title"] for c in shown],
            }
        )
    (out / "index.html").write_text(
        INDEX.render(classes=entries, book_title=book_title, head=_HEAD)
    )
    return decks


def _check_assets(folder: Path, parts: tuple[str, ...], name: str) -> None:
    missing = [part for part in parts if not (folder / part).exists()]
    if missing:
        raise SlidesError(f"{name} is missing from {folder} ({missing[0]}); run `make setup`")


def _copy_assets(source: Path, parts: tuple[str, ...], target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    for part in parts:
        (target / part).parent.mkdir(parents=True, exist_ok=True)
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part)
        else:
            shutil.copy2(source / part, target / part)


def _title_of(path: Path) -> str:
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            found = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if found:
                return found.group(1).strip()
    return path.stem


def _book_title(root: Path) -> str:
    found = re.search(r'^title:\s*"?(.*?)"?\s*$', (root / "_config.yml").read_text(), re.M)
    return found.group(1) if found else "the book"


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write them")
        parser.add_argument("--plan", type=Path, default=course_plan.PLAN, help="the course plan")

    description = "Write one reveal.js deck per class of the course plan, from the chapters."
    args = book_arguments("slides", description, argv, options)
    if args is None:
        return 2
    try:
        decks = build(args.out, args.book, args.plan)
        plan = course_plan.load_course_plan(args.plan)
    except (SlidesError, course_plan.PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for stem in course_plan.unplanned_chapters(plan, args.book.resolve()):
        print(f"note: {stem} is in _toc.yml but in no class of {args.plan}: it has no slides")
    print(f"{len(decks)} decks in {args.out}; open {args.out / 'index.html'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
