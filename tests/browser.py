"""Headless Debian Chromium driven by Playwright (fixtures: ``browser``, ``page``; helper: ``shot``).

The browser is the system's ``/usr/bin/chromium`` (installed with apt-get when missing), never a
download. Each test gets a fresh context (1280×800); console errors and uncaught page errors fail
the test (a Content-Security-Policy violation is one; Admin API error answers are not, the
UI shows those). Screenshots go to ``$ODST_TEST_ARTIFACTS/screenshots`` (default ``<repo>/test-artifacts``): at the steps a test names
with ``shot(page, "step")``, at its end, and when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # without playwright the browser tests skip; the rest of the suite still runs
    PlaywrightError = RuntimeError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
REPO = Path(__file__).resolve().parent.parent


def artifacts_dir() -> Path:
    return Path(os.environ.get("ODST_TEST_ARTIFACTS") or REPO / "test-artifacts")


def screenshots_dir() -> Path:
    path = artifacts_dir() / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _install_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    """One Chromium per test module. Not per session: Playwright's sync API keeps an event loop
    marked running in the main thread while it is open, and later modules' asyncio.run() fails."""
    _install_chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "page"


def shot(page, name: str) -> Path:
    """Save a screenshot of the whole page as ``<test name>-<name>.png``; returns its path."""
    test = getattr(page, "_odst_test", "test")
    path = screenshots_dir() / f"{_slug(test)}-{_slug(name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_odst_report_{report.when}", report)


@pytest.fixture
def page(browser, request):
    """A page in a fresh 1280×800 context; browser console errors and page errors fail the test."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-GB", timezone_id="Europe/Berlin")
    context.set_default_timeout(15_000)
    pg = context.new_page()
    pg._odst_test = request.node.name
    for stale in screenshots_dir().glob(f"{_slug(request.node.name)}-*.png"):  # from an earlier run
        stale.unlink()
    problems: list[str] = []
    pg._odst_problems = problems
    pg._odst_allowed = []

    def on_console(msg) -> None:
        if msg.type != "error":
            return
        where = msg.location or {}
        if _api_answer(msg.text, where.get("url", "")) or any(p.search(msg.text) for p in pg._odst_allowed):
            return
        problems.append(f"console error: {msg.text} ({where.get('url', '')}:{where.get('lineNumber', '')})")

    pg.on("console", on_console)
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        yield pg
    finally:
        failed = any(getattr(getattr(request.node, f"_odst_report_{when}", None), "failed", False)
                     for when in ("setup", "call"))
        try:
            shot(pg, "failed" if failed else "end")
        except PlaywrightError as exc:  # the page may be gone; the screenshot is a courtesy
            warnings.warn(f"no final screenshot of {request.node.name}: {exc}", stacklevel=1)
        context.close()
    if problems and not failed:
        pytest.fail("the browser reported errors:\n" + "\n".join(problems))


def _api_answer(text: str, url: str) -> bool:
    """Chromium logs every 4xx/5xx response as a console error. An Admin API answer such as
    401 (signed out) or 409 is the UI's business to show, not a browser problem; a failed
    asset, a CSP refusal or a script error is."""
    return text.startswith("Failed to load resource: the server responded with a status of") \
        and "/api/v1/" in url


def allow_console_error(page, pattern: str) -> None:
    """A console error this test provokes on purpose (say, a connection it cuts) does not fail it."""
    page._odst_allowed.append(re.compile(pattern))


def sign_in(page, site, username: str, password: str) -> None:
    """Sign in on the site's web UI and land on the Packages page."""
    from playwright.sync_api import expect

    page.goto(site.url + "/")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Packages")).to_be_visible()
