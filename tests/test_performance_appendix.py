"""The performance appendix stays short: at most 1,500 words of prose."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "book" / "performance.md"
MAX_PROSE_WORDS = 1500
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def prose_words(text: str) -> int:
    """Words of a MyST page outside its front matter, code, code cells and tables.

    A word is a run of non-blank characters with a letter or digit in it. Fenced blocks
    count when they hold prose (a figure's caption, an admonition: ``{name}`` other than
    ``{code-cell}``) and not when they hold code (``bash``, ``text``, ``{code-cell}``, ...);
    table rows (``|`` first), directive fences (``:::``) and option lines (``:label: x``)
    do not count.
    """
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        lines = lines[lines.index("---", 1) + 1 :]
    words, fence, code = 0, None, False
    for line in lines:
        stripped = line.strip()
        match = FENCE.match(stripped)
        if fence is not None:
            if match and match.group(1) == fence and not match.group(2).strip():
                fence = None
                continue
            if code:
                continue
        elif match:
            fence, info = match.group(1), match.group(2).strip()
            code = not info.startswith("{") or info.startswith("{code-cell}")
            continue
        if stripped.startswith(("|", ":::")) or re.match(r"^:[\w-]+:", stripped):
            continue
        words += sum(1 for token in stripped.split() if re.search(r"[A-Za-z0-9]", token))
    return words


def test_counting_leaves_out_code_tables_and_options():
    page = "\n".join(
        [
            "---",
            "kernelspec: {name: python3}",
            "---",
            "# Two words",
            "One two three, four.",
            "```{code-cell} python",
            "print('not counted at all')",
            "```",
            "```bash",
            "pearl-edu merge a b",
            "```",
            "```{figure} x.png",
            ":alt: not counted",
            "",
            "A caption counts.",
            "```",
            "| not | a | word |",
            "|---|---|---|",
            ":::{exercise}",
            ":label: ex-x",
            "Six: - 1 x 2",
            ":::",
        ]
    )
    # "# Two words" 2, "One two three, four." 4, the caption 3, "Six: - 1 x 2" 4 ("-" not).
    assert prose_words(page) == 2 + 4 + 3 + 4


def test_the_performance_appendix_has_at_most_1500_words_of_prose():
    words = prose_words(PAGE.read_text())
    assert words <= MAX_PROSE_WORDS, f"{PAGE.name}: {words} words of prose"
