"""The app's interpretation views ("Why this class?", Compare, Concept map), called as the UI and the API do.

Runs on the bundled toy release (or ``$REVELIO_TEST_RELEASE``); the library results
they must reproduce come from :class:`app_inputs.LibraryReference` (no app code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_inputs import LibraryReference, app_release_path, red_and_blue, shape_image  # noqa: E402

import gradio as gr
import torch

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app import attribution_view as V  # noqa: E402
from revelio_hub.app import comparison_view  # noqa: E402
from revelio_hub.app import concept_view  # noqa: E402
from revelio_hub.app.interpret_ui import InterpretEvents  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402
from revelio_hub.app.ui import Events  # noqa: E402
from revelio_hub.images import load_image  # noqa: E402


@pytest.fixture(scope="module")
def state() -> AppState:
    return AppState.from_config(AppConfig(releases=[app_release_path()], feature_cache_size=8))


@pytest.fixture(scope="module")
def library() -> LibraryReference:
    return LibraryReference(app_release_path())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return red_and_blue(tmp_path_factory.mktemp("interpret_images"))


@pytest.fixture(scope="module")
def events(state, images) -> InterpretEvents:
    """The events as the server runs them, with the test images' folder standing in for Gradio's upload folder."""
    return InterpretEvents(state, Events(state, upload_roots=[str(images["red"].parent)]))


def uploaded(path: Path) -> dict:
    """What the browser / gradio_client send for an uploaded file."""
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def diffc_entry(state):
    rel = state.get_release()
    return next((l, t) for l, t in rel.entries if rel.entry(l, t).diffc is not None)


def library_features(library, path, layer, t):
    entry = library.entry(layer, t)
    recipe = entry.diffc.recipe or {}
    with torch.no_grad():
        return library.backbone.extract([load_image(path)], [layer], [t], seed=int(recipe.get("noise_seed") or 0),
                                        ensemble=int(recipe.get("ensemble") or 1))[(layer, t)]


def test_attribute_image_matches_the_library(state, library, images):
    layer, t = diffc_entry(state)
    view = V.attribute_image(state, str(images["red"]), layer, t, "")
    expected = library.entry(layer, t).attribute(library_features(library, images["red"], layer, t), top=V.WHY_TOP)[0]
    got = view.attribution
    assert torch.equal(got.neurons, expected.neurons)
    assert torch.allclose(got.effects_prob, expected.effects_prob, atol=1e-5)
    payload = view.to_json()
    assert (payload["layer"], payload["timestep"]) == (layer, t)
    assert payload["target"] == payload["predicted"] == expected.target_name
    assert payload["pushing_up"] == [r["neuron"] for r in expected.pushing("up")]
    assert all(n["effect_prob"] < 0 for n in payload["neurons"] if n["neuron"] in payload["pushing_down"])
    # the analysed image's cached features give the same answer without a backbone pass
    analysis = A.analyze(state, str(images["red"]), layer, t, "")
    calls = state.backbone_calls
    again = V.attribute_analysis(state, analysis, expected.target_name)
    assert state.backbone_calls == calls
    assert torch.equal(again.attribution.neurons, got.neurons)


def test_why_chart_bars_map_clicks_to_their_neurons(state, events, images):
    layer, t = diffc_entry(state)
    analysis = A.analyze(state, str(images["red"]), layer, t, "")
    note, chart, thumbs, layout, target = events.after_analyze(analysis)
    view = V.attribute_analysis(state, analysis)
    assert "Why " + view.attribution.target_name in note
    assert target["value"] == view.attribution.target_name and target["choices"]
    # dense neurons (firing on most atlas images) are hidden, as in the neuron table; the same box shows them
    shown = lambda rows: [r for r in rows if r["neuron"] not in view.dense][: V.CHART_BARS]  # noqa: E731
    up, down = shown(view.attribution.pushing("up")), shown(view.attribution.pushing("down"))
    charted = [r["neuron"] for r in up] + [r["neuron"] for r in reversed(down)]
    assert [b.neuron for b in layout["bars"]] == charted and chart.size[0] > 100
    _, _, _, with_dense = events.why(analysis, view.attribution.target_name, True)
    up, down = view.attribution.pushing("up", V.CHART_BARS), view.attribution.pushing("down", V.CHART_BARS)
    assert [b.neuron for b in with_dense["bars"]] == [r["neuron"] for r in up] + [r["neuron"] for r in reversed(down)]
    if view.dense & {r["neuron"] for r in up + down}:
        assert "dense neuron" in note and "hidden" in note
    for c in view.concepts[:6]:  # the by-concept lines under the chart (six at most)
        assert c.text(view.attribution.target_name) in note
    for bar in layout["bars"]:  # a click in the middle of each bar's row selects that bar's neuron
        middle = (bar.top + bar.bottom) / 2
        evt = gr.SelectData(None, {"index": [chart.size[0] // 2, middle], "value": None})
        neuron, caption, gallery, heatmap = events.click_bar(analysis, layout, evt)
        assert neuron["value"] == bar.neuron and f"Neuron {bar.neuron}" in caption
    assert V.bar_at(layout["bars"], -5) is None
    if thumbs:
        evt = gr.SelectData(None, {"index": 0, "value": None})
        assert events.click_thumb(analysis, layout, evt)[0]["value"] == layout["thumbs"][0]
    # another class: the chart explains that class
    other = next(c for c in target["choices"] if c != target["value"])
    other = other[0] if isinstance(other, (list, tuple)) else other
    note2, *_ = events.why(analysis, other)
    assert f"Why {other}?" in note2


def test_why_refuses_entries_without_a_classifier(state, images):
    rel = state.get_release()
    bare = [(l, t) for l, t in rel.entries if rel.entry(l, t).diffc is None]
    if not bare:
        pytest.skip("every entry of this release has a Diff-C")
    with pytest.raises(ValueError, match="Entries with both a k-SAE and a Diff-C: .*t="):
        V.attribute_image(state, str(images["red"]), *bare[0], "")
    with pytest.raises(ValueError, match="Unknown class 'zebra'"):
        V.attribute_image(state, str(images["red"]), *diffc_entry(state), "", "zebra")


def test_compare_tables_have_the_sign_of_the_activations(state, library, images, events):
    layer, t = diffc_entry(state)
    view = comparison_view.compare_images(state, str(images["red"]), str(images["blue"]), layer, t, "", top=5)
    sae = library.entry(layer, t).sae
    with torch.no_grad():
        a = sae.image_activations(library_features(library, images["red"], layer, t))[0]
        b = sae.image_activations(library_features(library, images["blue"], layer, t))[0]
    first, second = view.tables()
    assert first and second
    for row in first:
        assert row[3] > 0 and row[1] == pytest.approx(float(a[row[0]]), abs=1e-4)
    for row in second:
        assert row[3] < 0 and row[2] == pytest.approx(float(b[row[0]]), abs=1e-4)
    assert first[0][0] == int((a - b).argmax()) and second[0][0] == int((a - b).argmin())
    t1, t2, note = events.compare(uploaded(images["red"]), uploaded(images["blue"]), layer, t, "")
    assert t1[:5] == first and "more active in this image" in note
    with pytest.raises(gr.Error, match="Upload a second image"):
        events.compare(uploaded(images["red"]), None, layer, t, "")
    # the UI event passes both images through the upload gate: server paths are refused
    from revelio_hub.app.validation import UPLOAD_REFUSED

    for first_value, second_value in ((str(images["red"]), uploaded(images["blue"])),
                                      (uploaded(images["red"]), {"path": str(images["blue"])})):
        with pytest.raises(gr.Error, match=UPLOAD_REFUSED):
            events.compare(first_value, second_value, layer, t, "")


# ------------------------------------------------------------------ served API


@pytest.fixture(scope="module")
def served(state):
    from app_inputs import LaunchedApp

    with LaunchedApp(state) as launched:
        yield launched


def test_attribute_and_compare_endpoints(served, state, images):
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in api["/attribute_json"]["parameters"]] == ["image", "layer", "timestep", "release", "target"]
    assert [p["parameter_name"] for p in api["/compare_json"]["parameters"]] == ["image", "other", "layer", "timestep", "release"]
    layer, t = diffc_entry(state)
    got = client.predict(handle_file(str(images["red"])), layer, t, "", "", api_name="/attribute_json")
    direct = V.attribute_image(state, str(images["red"]), layer, t, "").to_json()
    assert [n["neuron"] for n in got["neurons"]] == [n["neuron"] for n in direct["neurons"]]
    assert got["target"] == direct["target"] and got["pushing_up"] == direct["pushing_up"]
    default = client.predict(handle_file(str(images["red"])), "", -1, "", "", api_name="/attribute_json")
    assert (default["layer"], default["timestep"]) == state.get_release().default_entry()
    pair = client.predict(handle_file(str(images["red"])), handle_file(str(images["blue"])), layer, t, "",
                          api_name="/compare_json")
    assert pair["more_in_first"] and all(d["difference"] > 0 for d in pair["more_in_first"])
    assert all(d["difference"] < 0 for d in pair["more_in_second"])


@pytest.mark.parametrize("case", ["not_an_image", "corrupt", "tiny"])
def test_endpoints_refuse_what_analyze_json_refuses(served, tmp_path, case, images):
    """Same input rules as /analyze_json: the same bad upload gets the same sentence."""
    from app_inputs import BAD_INPUTS
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served.url, verbose=False)
    path = BAD_INPUTS[case][0](tmp_path)
    messages = []
    calls = [
        ("/analyze_json", (handle_file(str(path)), "", -1, "")),
        ("/attribute_json", (handle_file(str(path)), "", -1, "", "")),
        ("/compare_json", (handle_file(str(images["red"])), handle_file(str(path)), "", -1, "")),
    ]
    for api_name, args in calls:
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name=api_name)
        messages.append(str(info.value).replace("The second image: ", ""))
    assert messages[0] == messages[1] == messages[2], messages
    assert path.name in messages[0] and "/tmp/gradio" not in messages[0]


def test_second_image_of_compare_passes_the_same_gate(served, tmp_path_factory):
    """Raw HTTP, as a hostile client: a string path or untagged dict in either slot is refused like /analyze_json."""
    from test_app_security import TAG, attack_cases, call, upload

    from revelio_hub.app.validation import UPLOAD_REFUSED

    folder = tmp_path_factory.mktemp("server_side")
    files = {"secret": shape_image(folder / "secret.png", color=(10, 200, 10)), "missing": folder / "missing.png"}
    good = {"path": upload(served, shape_image(folder / "mine.png")), "orig_name": "mine.png", "meta": TAG}
    cases = attack_cases(files)
    for name in ("string path, file exists", "untagged dict, file exists", "tagged, outside the upload folder, exists"):
        bad = cases[name]
        expected = call(served, "analyze_json", [bad, "", -1, ""])
        assert expected == ("error", {"error": UPLOAD_REFUSED}) or expected[1]["error"] == UPLOAD_REFUSED
        for api_name, data in (("compare_json", [good, bad, "", -1, ""]), ("compare", [good, bad, None, None, ""]),
                               ("attribute_json", [bad, "", -1, "", ""])):
            event, payload = call(served, api_name, data)
            assert event == "error" and payload["error"] == expected[1]["error"], (api_name, name, payload)
            assert str(folder) not in str(payload)
    event, payload = call(served, "compare_json", [good, good, "", -1, ""])
    assert event == "complete" and payload[0]["more_in_first"] == [] and payload[0]["more_in_second"] == []


def test_concept_map_cells_open_their_neuron_in_the_browser(state, events):
    """The table shows each entry's best neuron; a click on a cell opens exactly that neuron in the browser tab."""
    from revelio_hub.interpret import concept_map

    rel = state.get_release()
    entries = rel.entries

    class Stub:  # the multi-label atlas contract, with known numbers
        label_columns = {"background": ["dark", "stripes"]}

        def __init__(self, seed: int) -> None:
            self.scores = torch.rand(rel.entry(*entries[0]).sae.n_latents, 2, generator=torch.Generator().manual_seed(seed))

        def value_auroc(self, column):
            return self.scores

        def search(self, value, column=None, limit=20):
            v = self.label_columns[column].index(value)
            scores = self.value_auroc(column)[:, v]
            order = torch.argsort(scores, descending=True)[:limit].tolist()
            return [{"neuron": i, "column": column, "value": value, "auroc": float(scores[i]), "precision": 0.0} for i in order]

    atlases = {key: Stub(i) for i, key in enumerate(entries)}
    cmap = concept_map(atlases, "stripes")
    styled, headers = concept_view.concept_table(cmap)
    frame = styled.data
    assert list(frame.columns) == headers == ["layer"] + [f"t={t}" for t in cmap.timesteps]
    for (layer, t), stub in atlases.items():
        row, col = cmap.layers.index(layer), cmap.timesteps.index(t) + 1
        best = int(stub.scores[:, 1].argmax())
        assert frame.iloc[row, col] == f"{float(stub.scores[best, 1]):.3f} · #{best}"
        assert concept_view.concept_cell(cmap, row, col) == (layer, t, best)
        evt = gr.SelectData(None, {"index": [row, col], "value": frame.iloc[row, col]})
        tab, layer_u, t_u, neuron, stats, hist, gallery = events.concept_click("", cmap, evt)
        assert tab.selected == "browser" and layer_u["value"] == layer and t_u["value"] == t and neuron == best
        assert f"Neuron {best}" in stats
    assert concept_view.concept_cell(cmap, 0, 0) is None  # the layer-name column opens nothing


def test_concept_map_on_the_release(state):
    """On the release's own atlases: each cell is the entry's best live neuron for the value, and the best cell wins."""
    choices = [value for _, value in concept_view.concept_choices(state)]
    choice = "background=stripes" if "background=stripes" in choices else (choices[0] if choices else None)
    if choice is None:
        pytest.skip("the release's atlases record no label columns")
    column, value = choice.split("=", 1)
    cmap = concept_view.concept_map(state, "", choice)
    assert (cmap.column, cmap.value) == (column, value)
    rel = state.get_release()
    filled = 0
    for layer, t in rel.entries:
        atlas = rel.entry(layer, t).atlas
        neuron, score = cmap.cell(layer, t)
        if atlas is None or value not in atlas.label_columns.get(column, []):
            assert neuron == -1
            continue
        scores = atlas.value_auroc(column)[:, atlas.label_columns[column].index(value)]
        alive = (atlas.stats["frequency"] > 0) & ~torch.isnan(scores)
        if not alive.any():
            assert neuron == -1
            continue
        filled += 1
        assert neuron == atlas.search(value, column=column, limit=1)[0]["neuron"]
        assert score == pytest.approx(float(scores[neuron])) and score >= float(scores[alive].max()) - 1e-4
    assert filled > 0
    best = cmap.best()
    assert best[3] == pytest.approx(float(torch.nan_to_num(cmap.auroc, nan=-1).max()))
