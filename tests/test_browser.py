"""Load the built book in a real browser, with every request off this machine blocked.

Needs `_build/html` (``make book`` or ``make test`` builds it first) and Debian's Chromium
(``make setup`` installs it when run as root). Screenshots go to ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "Chromium is needed for the browser test: install Debian's package with "
        "'sudo apt-get install chromium' (make setup does this when run as root)"
    )


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    if not (HTML / "index.html").is_file():
        pytest.fail(f"{HTML}/index.html is missing: build the book first with 'make book'")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser_page(site):
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})

        def only_localhost(route):
            host = urlparse(route.request.url).hostname
            if host in ("127.0.0.1", "localhost") or route.request.url.startswith("data:"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        page.route("**/*", only_localhost)
        page.blocked = blocked
        yield page
        browser.close()


def _load(page, site: str, path: str) -> None:
    response = page.goto(f"{site}/{path}", wait_until="networkidle")
    assert response is not None and response.ok, f"{path} did not load"


def _assert_math_typeset(page, path: str) -> None:
    page.wait_for_function(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20000
    )
    page.evaluate("() => MathJax.startup.promise")
    typeset = page.locator("mjx-container").count()
    assert typeset > 0, f"{path}: MathJax typeset no formula"
    body = page.locator("article").inner_text()
    assert "$$" not in body and "\\frac" not in body, f"{path}: raw TeX left on the page"


def _assert_an_image_loaded(page, path: str) -> None:
    loaded = page.evaluate(
        "() => Array.from(document.querySelectorAll('article img'))"
        ".filter(img => img.complete && img.naturalWidth > 100).length"
    )
    assert loaded > 0, f"{path}: no figure image loaded"


def test_intro_page(browser_page, site):
    _load(browser_page, site, "book/intro.html")
    assert "Pearl-7B-slerp" in browser_page.title()
    _assert_an_image_loaded(browser_page, "book/intro.html")
    _assert_math_typeset(browser_page, "book/intro.html")
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser_page.screenshot(path=str(SHOTS / "intro.png"), full_page=True)


def test_a_notebook_page(browser_page, site):
    path = "notebooks/01_meet_pearl.html"
    _load(browser_page, site, path)
    assert "Meet Pearl" in browser_page.title()
    _assert_an_image_loaded(browser_page, path)
    _assert_math_typeset(browser_page, path)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser_page.screenshot(path=str(SHOTS / "01_meet_pearl.png"), full_page=True)


def test_nothing_left_this_machine(browser_page):
    """Requests to other hosts were blocked; the pages above still rendered without them."""
    stray = [url for url in browser_page.blocked if "mathjax" in url.lower()]
    assert not stray, f"MathJax was requested from the network: {stray[:3]}"
