"""The app in a real headless Chromium: upload, Analyze, and everything appears.

Drives Debian's ``/usr/bin/chromium`` through Python Playwright (no browser
download). Saves a screenshot to the test's tmp folder, and also to the path
in ``$REVELIO_SCREENSHOT`` when set (``REVELIO_SCREENSHOT=docs/screenshot.png``);
the phone-width pass likewise to ``$REVELIO_SCREENSHOT_MOBILE``
(``docs/screenshot-mobile.png``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from app_inputs import shape_image  # noqa: E402
from app_fixtures import app, browser, open_and_analyze  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.browser


def test_upload_analyze_and_see_everything(app, browser, tmp_path):
    examples = app.state.get_release().examples
    # One of the release's own example images when it has some (a realistic screenshot), else a drawn shape.
    image = Path(examples[0][0]) if examples else shape_image(tmp_path / "upload.png", color=(220, 40, 40), size=128)
    errors: list[str] = []
    page = open_and_analyze(browser, app, image, {"width": 1400, "height": 1000}, errors)

    # (a) predictions, (b) neuron list, (c) gallery, (d) heat map
    page.wait_for_selector("#predictions .output-class, #predictions [data-testid='label-output-value']", timeout=90_000)
    page.wait_for_function(
        "() => (document.querySelector('#neurons')?.innerText || '').split('\\n').some(l => /^\\d+$/.test(l.trim()))",
        timeout=90_000,
    )
    page.wait_for_selector("#neuron-gallery img", timeout=90_000)
    page.wait_for_selector("#heatmap img", timeout=90_000)

    state = app.state
    rel = state.get_release()
    entry = rel.entry(*rel.default_entry())
    class_names = [str(c) for c in entry.diffc.class_names] if entry.diffc is not None else []
    predictions_text = page.locator("#predictions").inner_text()
    assert any(name in predictions_text for name in class_names), predictions_text
    cells = [c.strip() for c in page.locator("#neurons").inner_text().split("\n")]
    # each neuron row carries its atlas line as it applies to this image (the library's, for the same upload)
    from PIL import Image

    from revelio_hub.app.analysis import analyze

    lines = {n.id: n.summary for n in analyze(state, Image.open(image), *rel.default_entry()).neurons}
    first = int(next(c for c in cells if c.isdigit()))
    assert lines[first] in cells, (lines[first], cells)
    assert page.locator("#neuron-gallery img").count() >= 1
    assert page.locator("[data-testid='toast-body']").count() == 0  # no error toast

    page.wait_for_timeout(500)  # let images finish painting before the screenshot
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("REVELIO_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    assert not errors, errors
    page.close()


#: Per tab: the page's width overflow, headers cut short, and headings wrapped into a column of short lines.
LAYOUT_PROBLEMS = """() => {
  const problems = [];
  if (document.documentElement.scrollWidth > innerWidth) {
    problems.push(`page is ${document.documentElement.scrollWidth}px wide in a ${innerWidth}px window`);
  }
  for (const th of document.querySelectorAll('th')) {
    if (th.offsetParent === null) continue;  // on another tab
    const label = th.querySelector('.header') || th;
    const text = label.innerText.trim();
    if (!text) continue;
    if (label.scrollWidth > label.clientWidth + 1) problems.push(`header "${text}" is cut short`);
    const line = parseFloat(getComputedStyle(label).lineHeight) || 20;
    if (th.getBoundingClientRect().height > 2.6 * line) problems.push(`header "${text}" wraps over 3+ lines`);
  }
  const h1 = document.querySelector('#revelio-title h1');
  if (h1 && h1.getBoundingClientRect().height > 1.6 * (parseFloat(getComputedStyle(h1).lineHeight) || 40)) {
    problems.push('the title wraps');
  }
  return problems;
}"""


def open_tab(page, name: str) -> None:
    """Click a tab, through Gradio's "More tabs" menu when the narrow tab bar has folded it away."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.locator("button[aria-label='More tabs']").click()
    page.locator(".overflow-dropdown button", has_text=name).first.click()


#: The first result (out-of-distribution warning, predictions or the note replacing them) in the upper half of
#: the window: what a user who just tapped Analyze sees without scrolling.
RESULTS_IN_VIEW = """() => {
  const shown = [...document.querySelectorAll('#ood-warning, #predictions, #predictions-note')]
    .filter((el) => el.offsetParent !== null && el.getBoundingClientRect().height > 0);
  if (!shown.length) return false;
  const top = Math.min(...shown.map((el) => el.getBoundingClientRect().top));
  return top >= 0 && top < innerHeight / 2;
}"""

#: At phone width: labels cut short or past the screen's edge, gallery tiles past their gallery's edge,
#: controls a finger cannot hit (under 40 px either way), tabs shown twice or folded away.
PHONE_PROBLEMS = """() => {
  const problems = [];
  const visible = (el) => el.offsetParent !== null && el.getBoundingClientRect().width > 0
    && el.getBoundingClientRect().height > 0
    && !el.closest('.visually-hidden, [aria-hidden=true]');
  const name = (el) => `${el.tagName.toLowerCase()} in #${el.closest('[id]')?.id} "${(el.innerText || el.value
    || el.getAttribute('aria-label') || '').trim().slice(0, 40)}"`;
  const labels = '[data-testid=block-label], [data-testid=block-label] *, .caption-label, .caption-label *, label, '
    + 'label *, [role=tab], button, button *, #neuron-select input';
  for (const el of document.querySelectorAll(labels)) {
    if (!visible(el) || el.closest('table')) continue;
    const box = el.getBoundingClientRect();
    // cut = text wider than its box in a box that hides the rest (an ellipsis, a text field)
    const hides = el.matches('input') || getComputedStyle(el).overflowX !== 'visible';
    if (hides && el.scrollWidth > el.clientWidth + 1 && (el.innerText || el.value)) problems.push(`${name(el)} is cut short`);
    if (box.right > innerWidth + 1 || box.left < -1) problems.push(`${name(el)} reaches past the screen`);
  }
  for (const gallery of document.querySelectorAll('.grid-container')) {
    if (!visible(gallery)) continue;
    const frame = (gallery.closest('.grid-wrap') || gallery).getBoundingClientRect();
    for (const tile of gallery.children) {
      if (!visible(tile)) continue;
      const box = tile.getBoundingClientRect();
      if (box.right > Math.min(frame.right, innerWidth) + 1 || box.bottom > frame.bottom + 1) {
        problems.push(`a gallery tile "${tile.innerText.trim().slice(0, 30)}" is clipped by its gallery`);
      }
    }
  }
  const targets = new Set();
  for (const el of document.querySelectorAll('button, a[href], [role=tab], input[type=checkbox], input[role=listbox], input[aria-expanded]')) {
    if (!visible(el) || el.closest('table') || (el.matches('a') && el.closest('p, li'))) continue;  // links in prose
    targets.add(el.type === 'checkbox' ? (el.closest('label') || el) : el.matches('input') ? (el.closest('.wrap') || el) : el);
  }
  for (const el of targets) {
    let box = el.getBoundingClientRect();
    if (box.width < 40 || box.height < 40) {
      problems.push(`${name(el)} is ${Math.round(box.width)}x${Math.round(box.height)} px, under 40 px`);
    }
    el.scrollIntoView({block: 'center', behavior: 'instant'});  // then a finger at its centre must reach it
    box = el.getBoundingClientRect();
    const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
    if (!hit || !(el.contains(hit) || hit.contains(el))) problems.push(`${name(el)} is hidden behind ${hit && name(hit)}`);
  }
  const tabs = [...document.querySelectorAll('[role=tab]')].filter(visible).map((el) => el.innerText.trim());
  if (new Set(tabs).size !== tabs.length) problems.push(`a tab is shown twice: ${tabs}`);
  if ([...document.querySelectorAll("button[aria-label='More tabs']")].some(visible)) problems.push('tabs folded into "..."');
  return problems;
}"""


def phone_problems(page) -> list[str]:
    """LAYOUT_PROBLEMS and PHONE_PROBLEMS, measured again (up to 3 times) while follow-up events still run:
    a loading overlay can cover a control for a moment; a real problem stays."""
    for _ in range(3):
        problems = page.evaluate(LAYOUT_PROBLEMS) + page.evaluate(PHONE_PROBLEMS)
        if not problems:
            break
        page.wait_for_timeout(1500)
    return problems


def test_phone_width_layout(app, browser, tmp_path):
    """At 390 px (a phone): results brought into view after Analyze, nothing wider than the screen, no label
    cut, every control at least 40 px, all tabs in the bar once, every table header and the title readable."""
    examples = app.state.get_release().examples
    image = Path(examples[0][0]) if examples else shape_image(tmp_path / "upload.png", color=(220, 40, 40), size=128)
    page = open_and_analyze(browser, app, image, {"width": 390, "height": 844})
    page.wait_for_selector("#heatmap img", timeout=90_000)
    page.wait_for_selector("#neuron-gallery img", timeout=90_000)
    page.wait_for_function(RESULTS_IN_VIEW, timeout=10_000)  # they start a screen below the button: it scrolled
    page.wait_for_timeout(500)
    problems = {"Analyze": phone_problems(page)}
    shot = tmp_path / "screenshot-mobile.png"
    page.screenshot(path=str(shot), full_page=True)
    for tab in ("Neuron browser", "Concept map", "About"):
        open_tab(page, tab)
        page.wait_for_timeout(800)
        problems[tab] = phone_problems(page)
    assert page.locator("th:visible").count() > 0  # the About tab's metrics table was checked
    assert not any(problems.values()), problems
    target = os.environ.get("REVELIO_SCREENSHOT_MOBILE")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    page.close()
