"""The project's own promises: layout, dependency lists, notebooks in the book, CLI basics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pearl_edu

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _requirement_names(requirements: list[str]) -> dict[str, str]:
    """Map normalised package name -> full requirement string."""
    names = {}
    for req in requirements:
        name = re.split(r"[<>=!~ \[;@]", req.strip(), maxsplit=1)[0]
        names[re.sub(r"[-_.]+", "-", name).lower()] = req.replace(" ", "")
    return names


def test_layout_of_the_design_card():
    for path in [
        "book",
        "notebooks",
        "pearl_edu",
        "tests",
        "bench",
        "_config.yml",
        "_toc.yml",
        "environment.yml",
        "pyproject.toml",
        "Makefile",
        "README.md",
        ".ci/run",
    ]:
        assert (ROOT / path).exists(), f"{path} is missing from the repository root"


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        # "pearl-edu[reference]" inside another extra names the package's own extra, whose
        # requirements are listed where it is defined.
        wanted += [r for r in extra if not r.startswith(project["name"] + "[")]

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_names = [d for d in env["dependencies"] if isinstance(d, str)]

    from_pip = {k: v for k, v in _requirement_names(pip_section).items() if k != "-e"}
    assert from_pip == _requirement_names(wanted), (
        "environment.yml's pip section and pyproject.toml must list the same requirements"
    )
    assert any(name.startswith("python") for name in conda_names)
    assert "-e ." in [p.strip() for p in pip_section] or "." in pip_section, (
        "environment.yml must install the package itself"
    )


def _toc_files(entries) -> list[str]:
    files = []
    for entry in entries or []:
        if "file" in entry:
            files.append(entry["file"])
        files += _toc_files(entry.get("sections"))
        files += _toc_files(entry.get("chapters"))
        for part in entry.get("parts", []):
            files += _toc_files(part.get("chapters"))
    return files


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    files += _toc_files(toc.get("chapters"))
    for part in toc.get("parts", []):
        files += _toc_files(part.get("chapters"))
    return [re.sub(r"\.(ipynb|md)$", "", f) for f in files]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no chapter"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_is_in_the_toc(notebook):
    stem = notebook.relative_to(ROOT).with_suffix("").as_posix()
    assert stem in toc_files(), f"{notebook.name} is not listed in _toc.yml"


def test_every_toc_entry_exists():
    for stem in toc_files():
        matches = [p for p in (ROOT / Path(stem).parent).glob(Path(stem).name + ".*")]
        assert matches, f"_toc.yml lists {stem}, which does not exist"


def test_references_bib_parses_with_one_entry_per_key():
    """The bibliography the build reads: every entry closed, no key twice, every cited key there."""
    from pybtex.database import parse_file

    bib = ROOT / "book" / "references.bib"
    entries = parse_file(bib).entries  # raises on an entry left open
    keys = re.findall(r"^@\w+\{([^,]+),", bib.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(keys) == len(set(keys)) == len(entries)
    cited = set()
    for path in [*NOTEBOOKS, *(ROOT / "book").glob("*.md")]:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", path.read_text(encoding="utf-8")):
            cited.update(key.strip() for key in group.split(","))
    assert cited <= set(keys), f"cited but not in references.bib: {sorted(cited - set(keys))}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_is_saved_executed(notebook):
    """Strict nbval passes trivially on cells saved without outputs; refuse such notebooks."""
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{notebook.name} has no code cells"
    unexecuted = [i for i, c in enumerate(cells) if c in code and not c.get("execution_count")]
    assert not unexecuted, f"{notebook.name}: cells {unexecuted} were saved unexecuted"
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts), f"{notebook.name} was not run top to bottom"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_imports_pearl_edu_first(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    first = next(c for c in cells if c["cell_type"] == "code")
    assert "import pearl_edu" in "".join(first["source"])


def test_colab_installs_the_release_of_the_books_repository():
    """A fresh Colab runtime installs the tagged release of the package, not a moving branch.

    The repository URL lives in _config.yml; the tag is ``v`` and the package's version, so
    a release bumps `pearl_edu._version` and the chapters' install lines together (README,
    "Releases").
    """
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    pinned = f"{url}@v{pearl_edu.__version__}"
    for page in [*NOTEBOOKS, ROOT / "book" / "gpu_contract.md"]:
        found = re.findall(r"git\+(https://[^\s\"'\\]+)", page.read_text())
        assert found, f"{page.name} has no install line"
        for address in found:
            assert address == pinned, f"{page.name} installs from {address}, not {pinned}"


def test_cli_version_and_help():
    for argv in (["--version"], ["--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "pearl_edu", *argv], capture_output=True, text=True, check=True
        )
        assert "pearl-edu" in done.stdout
    version = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "--version"], capture_output=True, text=True
    ).stdout
    assert version.strip() == f"pearl-edu {pearl_edu.__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pearl-edu"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("plan", "merge", "verify"):
        assert command in done.stdout


def test_leaderboard_is_read_from_the_cards_table():
    rows = pearl_edu.leaderboard()
    assert rows[0].model == "louisbrulenaudet/Pearl-7B-slerp"
    assert rows[0].scores["Average"] == 72.75
    assert rows[0].scores["GSM8K"] == 73.62
    assert len(rows) == 6
    assert all(len(r.scores) == 8 for r in rows)


def test_shipped_recipe_is_pearls():
    text = pearl_edu.recipe_text()
    recipe = yaml.safe_load(text)
    assert recipe["merge_method"] == "slerp"
    assert recipe["base_model"] == "mlabonne/OmniBeagle-7B"
    with pytest.raises(FileNotFoundError, match="pearl-7b-slerp"):
        pearl_edu.recipe_path("no-such-recipe")


def test_importing_pearl_edu_needs_no_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import pearl_edu; pearl_edu.setup()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("page", ["book/intro.md", "book/course.md"])
def test_the_introduction_and_the_course_guide_name_every_chapter(page):
    """Each chapter of _toc.yml is linked from the introduction's "What you will learn" and
    from its class in the course guide."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    chapters = [
        entry["file"]
        for part in toc["parts"]
        for entry in part["chapters"]
        if entry["file"].startswith("notebooks/")
    ]
    text = (ROOT / page).read_text()
    missing = [c for c in chapters if f"{{doc}}`../{c}`" not in text]
    assert not missing, f"{page} does not link {missing}"


def test_the_course_guide_has_a_section_for_every_class_of_the_plan():
    from pearl_edu.teaching.course_plan import load_course_plan

    text = (ROOT / "book" / "course.md").read_text()
    sections = text.split("\n### Class ")[1:]
    by_number = {int(s.split(":", 1)[0]): s.split("\n### ", 1)[0] for s in sections}
    plan = load_course_plan()
    assert sorted(by_number) == [c.number for c in plan]
    for lesson in plan:
        for chapter in lesson.chapters:
            assert f"{{doc}}`../notebooks/{chapter}`" in by_number[lesson.number], chapter
