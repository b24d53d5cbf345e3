"""The interpretation views in a real headless Chromium: the "Why this class?" chart appears after Analyze,
and clicking a bar shows that neuron's heat map."""

from __future__ import annotations


import pytest
from app_inputs import shape_image  # noqa: E402
from app_fixtures import app, browser, open_and_analyze  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.browser


def test_why_chart_appears_and_a_bar_click_shows_its_neuron(app, browser, tmp_path):
    from revelio_hub.app import analysis as A
    from revelio_hub.app import attribution_view as V

    state = app.state
    rel = state.get_release()
    if rel.entry(*rel.default_entry()).diffc is None:
        pytest.skip("the default entry has no Diff-C")
    image = shape_image(tmp_path / "upload.png", color=(220, 40, 40), size=128)
    errors: list[str] = []
    page = open_and_analyze(browser, app, image, {"width": 1400, "height": 1400}, errors)
    chart = page.locator("#why-chart img")
    chart.wait_for(timeout=120_000)
    page.wait_for_function("() => document.querySelector('#why-chart img')?.naturalHeight > 0", timeout=30_000)

    # The same chart, computed directly, tells where its first bar is and which neuron it is.
    view = V.attribute_analysis(state, A.analyze(state, str(image)))
    picture, bars = V.why_chart(view)
    assert bars
    natural_h = page.evaluate("() => document.querySelector('#why-chart img').naturalHeight")
    assert natural_h == picture.size[1]
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()  # in viewport coordinates, now that the chart is in view
    scale = box["height"] / natural_h
    bar = bars[0]
    page.mouse.click(box["x"] + box["width"] * 0.7, box["y"] + scale * (bar.top + bar.bottom) / 2)
    page.wait_for_function(
        f"() => (document.querySelector('.revelio-caption')?.innerText || '').includes('Neuron {bar.neuron}')",
        timeout=60_000,
    )
    assert page.locator("[data-testid='toast-body']").count() == 0
    assert not errors, errors
    page.close()
