"""`python -m pearl_edu.teaching.classroom`: preparing the chapters' models and checking a laptop."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

import pearl_edu
from pearl_edu.teaching import classroom

ROOT = Path(__file__).resolve().parents[1]


def toc_notebooks() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [entry["file"] for part in toc["parts"] for entry in part["chapters"]]
    return [Path(f).name for f in files if f.startswith("notebooks/")]


def test_chapters_come_in_the_books_order():
    assert [p.stem for p in classroom.chapters(ROOT / "notebooks")] == toc_notebooks()


def write_notebook(path: Path, *sources: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEARL_EDU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_prepare_runs_each_chapter_records_its_time_and_stamps_the_cache(tmp_path, cache):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", "x = sum(range(10**6))")
    write_notebook(
        notebooks / "02_b.ipynb", "import pathlib; pathlib.Path('ran').write_text('yes')"
    )
    before = (notebooks / "01_a.ipynb").read_bytes()
    record = tmp_path / "timings.json"
    assert classroom.main(["prepare", "--notebooks", str(notebooks), "--record", str(record)]) == 0
    assert (notebooks / "01_a.ipynb").read_bytes() == before  # read, never written
    assert (notebooks / "ran").read_text() == "yes"  # run in the chapter's own folder
    timings = json.loads(record.read_text())
    assert set(timings["seconds"]) == set(timings["cpu_seconds"]) == {"01_a", "02_b"}
    assert all(s > 0 for s in timings["seconds"].values())
    assert timings["trained"] == {"01_a": 0, "02_b": 0} and timings["machine"]["cores"] >= 1
    # A later run of one chapter updates its entry and keeps the others'.
    write_notebook(
        notebooks / "01_a.ipynb",
        "import os, pathlib; p = pathlib.Path(os.environ['PEARL_EDU_CACHE']) / 'kind' / 'model'",
        "p.mkdir(parents=True)",
    )
    assert (
        classroom.main(
            ["prepare", "--notebooks", str(notebooks), "--only", "01", "--record", str(record)]
        )
        == 0
    )
    again = json.loads(record.read_text())
    assert again["trained"] == {"01_a": 1, "02_b": 0}
    assert again["seconds"]["02_b"] == timings["seconds"]["02_b"]
    stamp = json.loads((cache / classroom.STAMP).read_text())
    assert stamp == {"pearl_edu": pearl_edu.__version__, "chapters": ["01_a", "02_b"]}


def test_a_chapter_that_fails_stops_prepare_in_one_line(tmp_path, cache, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", "raise ValueError('no models here')")
    assert classroom.main(["prepare", "--notebooks", str(notebooks)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no models here" in err
    assert not (cache / classroom.STAMP).exists()


def readiness(cache: Path, stamp: dict | None, chapters=("01_a", "02_b")) -> classroom.Item:
    if stamp is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / classroom.STAMP).write_text(json.dumps(stamp))
    return next(i for i in classroom.check(chapters) if i.what == "models trained and cached")


def test_check_says_whether_the_models_are_prepared_for_this_version(cache):
    assert not readiness(cache, None).ok
    old = readiness(cache, {"pearl_edu": "0.0.1", "chapters": ["01_a", "02_b"]})
    assert not old.ok and "0.0.1" in old.found
    partial = readiness(cache, {"pearl_edu": pearl_edu.__version__, "chapters": ["01_a"]})
    assert not partial.ok and "02_b" in partial.found
    assert readiness(cache, {"pearl_edu": pearl_edu.__version__, "chapters": ["01_a", "02_b"]}).ok


def test_check_merges_two_tiny_models_and_exits_by_readiness(cache, capsys, monkeypatch):
    items = {item.what: item for item in classroom.check([])}
    assert items["a merge of two tiny models"].ok
    assert items["packages"].ok and pearl_edu.__version__ in items["packages"].found
    monkeypatch.chdir(cache.parent)  # no notebooks folder here: no chapter expected
    assert classroom.main(["check"]) == 1  # nothing prepared in this cache
    assert "NOT READY  models trained and cached" in capsys.readouterr().out
    readiness(cache, {"pearl_edu": pearl_edu.__version__, "chapters": []}, chapters=())
    assert classroom.main(["check"]) == 0
    assert capsys.readouterr().out.strip().endswith("This laptop is ready.")
