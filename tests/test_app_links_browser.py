"""Shareable links in a real headless Chromium: a neuron link opens the Neuron browser on that neuron, an
example link opens the Analyze tab with that example analysed, "copy link" writes a link that reopens what was
shown, and a bad link says what is wrong in one sentence without a path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from app_fixtures import app, browser  # noqa: E402,F401 (fixtures)

from revelio_hub.app import analysis as A  # noqa: E402

pytestmark = pytest.mark.browser


def open_page(browser, url: str, errors: list[str]):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#analyze-btn", state="attached", timeout=60_000)  # a neuron link hides its tab
    return page


def selected_tab(page) -> str:
    return page.locator("button[role='tab'][aria-selected='true']").first.inner_text()


def wait_for_stats(page, neuron: int) -> str:
    page.wait_for_function(
        f"() => (document.querySelector('#neuron-stats')?.innerText || '').includes('Neuron {neuron}')",
        timeout=60_000)
    return page.locator("#neuron-stats").inner_text()


def test_neuron_link_opens_the_browser_on_that_neuron_and_copy_link_reopens_it(app, browser):
    rel = app.state.get_release()
    layer, t = "bottleneck", 100
    neuron = app.state.get_release().entry(layer, t).atlas.search("red")[0]["neuron"]
    summary = A.neuron_details(app.state, rel.name, layer, t, neuron).summary
    errors: list[str] = []
    page = open_page(browser, f"{app.url}?release={rel.name}&layer={layer}&t={t}&neuron={neuron}", errors)
    stats = wait_for_stats(page, neuron)
    assert summary.split(" · ")[0] in stats
    assert selected_tab(page) == "Neuron browser"
    page.click("#neuron-link-button")
    page.wait_for_function("() => (document.querySelector('#neuron-link textarea, #neuron-link input')?.value || '')"
                           ".startsWith('http')", timeout=30_000)
    link = page.locator("#neuron-link textarea, #neuron-link input").first.input_value()
    assert link == f"{app.url}?release={rel.name}&layer={layer}&t={t}&neuron={neuron}"
    again = open_page(browser, link, errors)
    wait_for_stats(again, neuron)
    assert not errors, errors
    page.close()
    again.close()


def test_example_link_opens_the_analysis_on_its_neuron_and_copy_link_keeps_it(app, browser):
    rel = app.state.get_release()
    layer, t = rel.default_entry()
    expected = A.analyze(app.state, rel.examples[1][0], layer, t, rel.name)
    top, second = [n.id for n in expected.visible_neurons()[:2]]
    errors: list[str] = []
    page = open_page(browser, f"{app.url}?layer={layer}&t={t}&example=1&neuron={second}", errors)
    page.wait_for_function(
        f"() => (document.querySelector('.revelio-caption')?.innerText || '').includes('Neuron {second}')",
        timeout=120_000)
    assert selected_tab(page) == "Analyze"
    cells = [c.strip() for c in page.locator("#neurons").inner_text().split("\n")]
    assert next(c for c in cells if c.isdigit()) == str(top)  # the example's own table, most relevant first
    page.wait_for_selector("#image-in img", timeout=30_000)
    page.click("#analysis-link-button")
    page.wait_for_function("() => (document.querySelector('#analysis-link textarea, #analysis-link input')?.value"
                           " || '').startsWith('http')", timeout=30_000)
    link = page.locator("#analysis-link textarea, #analysis-link input").first.input_value()
    assert link == f"{app.url}?release={rel.name}&layer={layer}&t={t}&neuron={second}&example=1"
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("query, message", [
    ("release=elsewhere&neuron=1", r"Unknown release 'elsewhere'; this app serves: toy-shapes"),
    ("layer=../../etc&t=25", r"Layer '\.\./\.\./etc' is not in release 'toy-shapes'"),
    ("layer=bottleneck&t=25&neuron=99999", r"neuron must be from 0 to \d+"),
    ("example=/etc/passwd", r"example must be a whole number"),
])
def test_bad_links_say_what_is_wrong(app, browser, query, message):
    errors: list[str] = []
    page = open_page(browser, f"{app.url}?{query}", errors)
    page.wait_for_function("() => (document.querySelector('#link-note')?.innerText || '').includes('could not')",
                           timeout=60_000)
    note = page.locator("#link-note").inner_text()
    assert re.search(message, note), note
    assert str(Path(app.state.get_release().id).resolve()) not in note
    assert selected_tab(page) == "Analyze"  # the page is as it would be without the link
    assert not errors, errors
    page.close()
