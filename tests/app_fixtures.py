"""Shared fixtures: the real app served in this process, Debian's headless Chromium, and one page opener.

Imported by the raw-HTTP and browser test modules (``from app_fixtures import app, browser``). Every
browser test starts Chromium with the same flags: this machine's network is closed, and without the
background-networking flags Chromium keeps trying (and failing) to reach Google's hosts.
"""

from __future__ import annotations

import os

import pytest
from app_inputs import LaunchedApp, app_release_path  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def app():
    """The app on the bundled release as ``app.py`` serves it here (a backbone worker process on 2+ cores),
    on a free loopback port for the whole module."""
    from revelio_hub.app.state import AppConfig, AppState
    from revelio_hub.app.workers import default_workers

    with LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()],
                                                          workers=default_workers("cpu")))) as launched:
        yield launched


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through playwright (no browser download: Debian's /usr/bin/chromium)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does it)")
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_and_analyze(browser, app, image, viewport: dict, errors: list | None = None):
    """A new page at ``viewport`` on the served app, ``image`` uploaded and Analyze clicked; returns the page.

    Page errors are appended to ``errors`` when given, so a test can assert the page raised none.
    """
    page = browser.new_page(viewport=viewport)
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(app.url, wait_until="domcontentloaded")
    page.wait_for_selector("#analyze-btn", timeout=60_000)
    page.locator("#image-in input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#image-in img", timeout=30_000)
    page.click("#analyze-btn")
    return page
