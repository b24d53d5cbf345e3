"""A flagged image in the served app: ``reliable: false`` with reasons in the JSON API, greyed results in the page.

The app runs on a copy of the bundled release whose t=25 entries carry a small
calibration (:func:`app_inputs.calibrated_release`). Requests are raw HTTP
(httpx) through Gradio's call API, as any client would send them; the page is
driven in headless Chromium. What the served app answers is checked against
the library's own verdict on the same image, never against fixed numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import browser, open_and_analyze  # noqa: E402,F401 (fixtures)
from app_inputs import FILEDATA_TAG, LaunchedApp, calibrated_release, call, held_out_shapes, photo, upload  # noqa: E402

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def app():
    from revelio_hub.app.state import AppConfig, AppState

    release = calibrated_release()
    with LaunchedApp(AppState.from_config(AppConfig(releases=[release], workers=0))) as launched:
        yield launched


def _entry(app):
    rel = app.state.get_release()
    return next((l, t) for l, t in rel.release.diffc_entries if t == 25)


def _sent(app, path: Path) -> dict:
    return {"path": upload(app, path), "orig_name": path.name, "meta": FILEDATA_TAG}


def test_json_endpoints_mark_a_photo_unreliable_and_keep_the_numbers(app, tmp_path):
    layer, t = _entry(app)
    image = _sent(app, photo(tmp_path))
    event, payload = call(app, "analyze_json", [image, layer, t, ""])
    assert event == "complete", payload
    result = payload[0]
    assert result["reliable"] is False and result["reasons"] and all(isinstance(r, str) for r in result["reasons"])
    assert result["predictions"] and result["neurons"]  # flagged, not withheld
    event, payload = call(app, "attribute_json", [image, layer, t, "", ""])
    assert event == "complete", payload
    attribution = payload[0]
    assert attribution["reliable"] is False and attribution["reasons"] == result["reasons"]
    assert attribution["predicted"] and attribution["neurons"]


def test_json_reliable_field_matches_the_library_on_a_held_out_shape(app, tmp_path):
    from revelio_hub.app import analysis as A

    layer, t = _entry(app)
    img = held_out_shapes(1, start=400, image_size=app.state.get_release().image_size or 32)[0][0]
    path = tmp_path / "shape.png"
    img.save(path)
    expected = A.analyze(app.state, str(path), layer, t).to_json()
    for api_name, data in (("analyze_json", [layer, t, ""]), ("attribute_json", [layer, t, "", ""])):
        event, payload = call(app, api_name, [_sent(app, path), *data])
        assert event == "complete", payload
        assert payload[0]["reliable"] is expected["reliable"] and payload[0]["reasons"] == expected["reasons"]
    assert isinstance(expected["reliable"], bool)


@pytest.mark.browser
def test_a_flagged_image_is_shown_greyed_with_one_line_saying_why(app, browser, tmp_path):
    page = open_and_analyze(browser, app, photo(tmp_path), {"width": 1400, "height": 1000})
    page.wait_for_selector("#ood-warning.ood-flagged", timeout=90_000)
    page.wait_for_selector("#predictions .output-class, #predictions [data-testid='label-output-value']",
                           timeout=90_000)
    warning = page.locator("#ood-warning").inner_text()
    assert "unreliable here" in warning and "Why:" in warning
    for selector in ("#predictions", "#neurons"):
        style = page.eval_on_selector(selector, "e => [getComputedStyle(e).opacity, getComputedStyle(e).filter]")
        assert float(style[0]) < 0.6 and "grayscale" in style[1], (selector, style)
    page.close()


@pytest.mark.browser
def test_a_reliable_image_is_not_greyed(app, browser, tmp_path):
    from revelio_hub.app import analysis as A

    layer, t = _entry(app)
    size = app.state.get_release().image_size or 32
    shapes = held_out_shapes(10, start=420, image_size=size)[0]
    for i, img in enumerate(shapes):  # the first shape the library calls reliable (most are: ~3 % are flagged)
        path = tmp_path / f"shape{i}.png"
        img.resize((size * 4, size * 4)).save(path)
        if A.analyze(app.state, str(path), layer, t).reliable:
            break
    else:
        pytest.fail("none of 10 held-out shapes was called reliable")
    page = open_and_analyze(browser, app, path, {"width": 1400, "height": 1000})
    page.wait_for_selector("#predictions .output-class, #predictions [data-testid='label-output-value']",
                           timeout=90_000)
    page.wait_for_function("() => /percentile/.test(document.querySelector('#ood-warning')?.innerText || '')",
                           timeout=30_000)
    assert page.locator("#ood-warning.ood-flagged").count() == 0
    assert float(page.eval_on_selector("#predictions", "e => getComputedStyle(e).opacity")) == 1.0
    page.close()
