"""Figures a reader drives with sliders (`pearl_edu.teaching.interactive`).

The first tests need nothing but the package. The browser tests load the built books
(``_build/html``, and the student edition's ``_build/student/html``; ``make test`` builds
both first) in headless Chromium with every request off this machine blocked, check that
the sliders render and respond, and leave screenshots in ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
from test_browser import CHROMIUM_FLAGS, _QuietHandler, chromium_path

from pearl_edu.teaching import interactive

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
PAGES = {  # page -> (figure's element id, number of sliders)
    "notebooks/04_deriving_slerp": ("pearl-fig-slerp-arc", 2),
    "notebooks/06_reading_the_recipe": ("pearl-fig-schedule", 5),
    "notebooks/08_when_merging_works": ("pearl-fig-merge-path", 2),
}


def _tiny() -> interactive.InteractiveFigure:
    sliders = [interactive.Slider("a", [0.0, 1.0, 2.0], 1), interactive.Slider("b", [0.5, 1.5])]
    frames = interactive.grid(sliders, lambda a, b: {"y": [a, a + b / 3]})
    return interactive.InteractiveFigure(
        "tiny",
        [{"type": "scatter", "x": [0, 1]}],
        {"height": 300},
        sliders,
        [interactive.Frames(0, (0, 1), frames)],
        b"\x89PNG not really",
        interactive.Readout(sliders=(0,), texts=["zero", "one", "two"]),
    )


def test_frames_are_stored_in_row_major_order_and_rounded():
    spec = _tiny().spec()
    ys = [frame["y"] for frame in spec["updates"][0]["frames"]]
    assert ys == [[0.0, 0.1667], [0.0, 0.5], [1.0, 1.1667], [1.0, 1.5], [2.0, 2.1667], [2.0, 2.5]]
    assert spec["sliders"][0]["start"] == 1 and spec["readout"]["texts"][1] == "one"


def test_the_html_is_the_same_every_time_and_needs_no_network():
    first, second = _tiny().to_html(), _tiny().to_html()
    assert first == second
    assert "http://" not in first and "https://" not in first
    assert interactive.PLOTLY_PATH in first and 'id="pearl-fig-tiny"' in first
    assert first.count('type="range"') == 2


def test_the_bundle_has_html_a_png_and_text():
    bundle = _tiny()._repr_mimebundle_()
    assert set(bundle) == {"text/html", "image/png", "text/plain"}
    assert bundle["text/plain"] == "<interactive figure 'tiny': a, b>"


def test_mistakes_are_one_line_errors():
    with pytest.raises(ValueError, match="slider 'a': start 3 is not an index of its 3 values"):
        interactive.Slider("a", [0, 1, 2], 3)
    with pytest.raises(ValueError, match="figure tiny: trace frames has 2 entries for 6 positions"):
        sliders = [interactive.Slider("a", [0, 1, 2]), interactive.Slider("b", [0, 1])]
        interactive.InteractiveFigure(
            "tiny", [{}], {}, sliders, [interactive.Frames(0, (0, 1), [{}, {}])], b""
        )
    with pytest.raises(ValueError, match="figure name 'Tiny figure'"):
        interactive.InteractiveFigure("Tiny figure", [], {}, [], [], b"")


def test_the_schedule_figure_adds_up_anchors_as_the_planner_does():
    import numpy as np

    from pearl_edu.layer_schedule import gradient_value, layer_position

    anchors = [0.1, 0.9, 0.2, 0.6, 0.35]
    figure = interactive.schedule_explorer(anchors, 9, {"model.layers.0.mlp.up_proj.weight": 1})
    update = figure.updates[0]
    ys = np.array(update.offset) + np.array(anchors) @ np.array(update.basis)
    assert np.allclose(ys, [gradient_value(anchors, layer_position(i, 9)) for i in range(9)])


@pytest.mark.parametrize("page", sorted(PAGES))
def test_each_chapter_saves_its_figure_with_a_static_image(page):
    notebook = nbformat.read(ROOT / f"{page}.ipynb", as_version=4)
    element, sliders = PAGES[page]
    found = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if element in output.get("data", {}).get("text/html", "")
    ]
    assert len(found) == 1, f"{page}: the figure's output is missing"
    data = found[0]["data"]
    assert data["image/png"] and data["text/html"].count('type="range"') == sliders


# ---------------------------------------------------------------------------------------
# In the browser, with the network blocked


def _serve(folder: Path):
    if not (folder / "index.html").is_file():
        pytest.fail(f"{folder}/index.html is missing: build it first ('make book', 'make student')")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


def _open(browser, folder: Path, page_path: str):
    """Load one page of a built book; return the page and the requests it tried off-machine."""
    server = _serve(folder)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    blocked: list[str] = []
    errors: list[str] = []
    # The theme declares THEBE_JS_URL twice on every page, figure or not: not ours to judge.
    page.on(
        "pageerror",
        lambda error: None if "THEBE_JS_URL" in str(error) else errors.append(str(error)),
    )

    def only_localhost(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        elif route.request.url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_localhost)
    response = page.goto(
        f"http://127.0.0.1:{server.server_address[1]}/{page_path}.html", wait_until="networkidle"
    )
    assert response is not None and response.ok, f"{page_path} did not load"
    return page, server, blocked, errors


def _drive(page, element: str, sliders: int, shot: str) -> None:
    """The figure draws, every slider moves the readout, and the plot is redrawn."""
    figure = page.locator(f"#{element}")
    page.wait_for_function(
        f"() => document.getElementById('{element}').dataset.ready === 'yes'", timeout=30000
    )
    assert figure.locator(".pearl-plot .main-svg").count() >= 1, f"{element}: no plot drawn"
    assert not figure.locator(".pearl-static").is_visible()  # the static image gives way
    inputs = figure.locator("input[type=range]")
    assert inputs.count() == sliders
    figure.scroll_into_view_if_needed()
    SHOTS.mkdir(parents=True, exist_ok=True)
    figure.screenshot(path=str(SHOTS / f"{shot}-start.png"))
    for k in range(sliders):
        before = figure.locator(".pearl-readout").inner_text()
        plot_before = figure.locator(".pearl-plot .main-svg").first.inner_html()
        value = int(inputs.nth(k).get_attribute("value"))
        target = value - 2 if value >= 2 else value + 2
        inputs.nth(k).fill(str(target))  # a range input takes fill(), and fires input events
        page.wait_for_timeout(200)
        after = figure.locator(".pearl-readout").inner_text()
        assert after != before, f"{element}: slider {k} did not change the readout"
        assert figure.locator(".pearl-plot .main-svg").first.inner_html() != plot_before
        shown = inputs.nth(k).locator("xpath=following-sibling::output").inner_text()
        assert shown, f"{element}: slider {k} shows no value"
    figure.screenshot(path=str(SHOTS / f"{shot}-moved.png"))


@pytest.mark.browser
@pytest.mark.parametrize("page_path", sorted(PAGES))
def test_the_sliders_work_offline(browser, page_path):
    page, server, blocked, errors = _open(browser, ROOT / "_build" / "html", page_path)
    try:
        element, sliders = PAGES[page_path]
        _drive(page, element, sliders, Path(page_path).name)
        assert not errors, errors
        assert not [url for url in blocked if "plotly" in url.lower()], blocked
    finally:
        page.close()
        server.shutdown()


@pytest.mark.browser
@pytest.mark.parametrize("page_path", sorted(PAGES))
def test_the_student_book_has_the_sliders_and_no_solutions(browser, page_path):
    folder = ROOT / "_build" / "student" / "html"
    page, server, blocked, errors = _open(browser, folder, page_path)
    try:
        element, sliders = PAGES[page_path]
        _drive(page, element, sliders, "student-" + Path(page_path).name)
        assert page.locator("article .exercise").count() >= 3
        assert page.locator("article .solution").count() == 0
        assert "student edition" in page.locator("article").inner_text()
        assert not errors, errors
    finally:
        page.close()
        server.shutdown()


@pytest.mark.browser
def test_no_page_of_the_student_book_has_a_solution():
    html = ROOT / "_build" / "student" / "html"
    pages = sorted(html.glob("**/*.html"))
    assert len(pages) > 10, f"{html}: build the student edition first ('make student')"
    for path in pages:
        text = path.read_text()
        assert not re.search(r'class="[^"]*\bsolution\b', text), f"{path}: a solution"
        assert "{solution" not in text, path
    capstone = (html / "notebooks" / "capstone.html").read_text()
    assert "task_arithmetic" not in capstone  # the worked solution's method


def test_the_saved_figures_hold_no_url():
    for page in PAGES:
        text = (ROOT / f"{page}.ipynb").read_text()
        for cell in json.loads(text)["cells"]:
            for output in cell.get("outputs", []):
                html = "".join(output.get("data", {}).get("text/html", ""))
                if "pearl-interactive" in html:
                    assert "http://" not in html and "https://" not in html
