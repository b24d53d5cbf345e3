"""No screen shows results that do not belong to the inputs on screen.

For each control (image, layer, timestep, release in the Analyze tab; layer,
timestep and release in the Neuron browser) the test checks two things: the
wiring (the control's event chain ends in a handler that writes every output
depending on it) and the handler's outputs (recomputed for the new entry, or
cleared). Event functions are called directly with the values the components
would send. The numeric-input rule of every endpoint is checked over raw HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_inputs import FILEDATA_TAG, LaunchedApp, app_release_path, call, shape_image, upload  # noqa: E402

import gradio as gr

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402
from revelio_hub.app.ui import BROWSER_PROMPT, Events, build_ui  # noqa: E402

N_RESULTS = 9  # preds, note, table, neuron dropdown, caption, gallery, heat map, state, out-of-distribution line


@pytest.fixture(scope="module")
def state() -> AppState:
    return AppState.from_config(AppConfig(releases=[app_release_path()], feature_cache_size=16))


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def events(state, uploads) -> Events:
    return Events(state, upload_roots=[str(uploads)])


@pytest.fixture(scope="module")
def image(uploads) -> dict:
    path = shape_image(uploads / "red.png", color=(220, 40, 40))
    return {"path": str(path), "orig_name": "red.png", "meta": FILEDATA_TAG}


def two_layers(rel):
    """Two layers sharing a timestep (switching between them needs no backbone pass), and that timestep."""
    for t in rel.timesteps():
        layers = [l for l, tt in rel.entries if tt == t]
        if len(layers) >= 2:
            return layers[0], layers[1], t
    pytest.skip("the release has no two layers at one timestep")


def is_cleared(out) -> bool:
    preds, note, rows, neuron, caption, gallery, heatmap, result, ood = out
    return (preds is None and note == "" and rows == [] and neuron["value"] is None and caption == ""
            and gallery == [] and heatmap is None and result is None and ood["value"] == "")


def shown_entry(out):
    """(layer, t) of the result an Analyze output tuple shows, after checking the outputs agree with it."""
    preds, note, rows, neuron, caption, gallery, heatmap, result, ood = out
    shown = result.visible_neurons()
    assert [r[0] for r in rows] == [n.id for n in shown]
    assert neuron["value"] == shown[0].id and caption.startswith(f"Neuron {shown[0].id}")
    return result.layer, result.timestep


# ------------------------------------------------------------------ wiring


def chain(demo, component, event: str) -> list:
    """The block functions run when ``component`` fires ``event``, following .then/.success/.failure."""
    fns = list(demo.fns.values())
    first = [fn for fn in fns if (component._id, event) in [tuple(t) for t in fn.targets]]
    out, frontier = list(first), list(first)
    while frontier:
        parent = frontier.pop()
        children = [fn for fn in fns if fn.trigger_after == parent._id]
        out += children
        frontier += children
    return out


def writers(fns) -> set[int]:
    return {block._id for fn in fns for block in fn.outputs}


def test_every_control_rewrites_what_depends_on_it(state):
    demo = build_ui(state)
    by_label = {}
    for block in demo.blocks.values():
        kind = "Dropdown" if getattr(block, "get_block_name", lambda: "")() == "dropdown" else type(block).__name__
        by_label.setdefault((kind, getattr(block, "label", None)), []).append(block)  # IntDropdown is a Dropdown
    analyze_fn = next(fn for fn in demo.fns.values() if fn.api_name == "analyze")
    results = {b._id for b in analyze_fn.outputs}
    assert len(analyze_fn.outputs) == N_RESULTS
    image_in = by_label[("Image", "Image")][0]
    (layer_dd, b_layer), (t_dd, b_t) = by_label[("Dropdown", "Layer")], by_label[("Dropdown", "Timestep t")]
    release_dd = by_label[("Dropdown", "Release")][0]
    for control, event in ((image_in, "change"), (layer_dd, "input"), (t_dd, "input"), (release_dd, "input")):
        assert results <= writers(chain(demo, control, event)), (control.label, event)
    # The comparison tables describe one (image, other image, entry): each of those controls clears them.
    compare_fn = next(fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__name__ == "compare")
    compared = {b._id for b in compare_fn.outputs}
    other_in = by_label[("Image", "Other image")][0] if ("Image", "Other image") in by_label else next(
        b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "compare-image")
    for control, event in ((image_in, "change"), (layer_dd, "input"), (t_dd, "input"), (release_dd, "input"),
                           (other_in, "change")):
        assert compared <= writers(chain(demo, control, event)), ("compare", control.label, event)
    # An error clears what the failed analysis would have replaced.
    failure = [fn for fn in demo.fns.values() if fn.trigger_after == analyze_fn._id and fn.trigger_only_on_failure]
    assert failure and results <= writers(failure)
    # Browser: layer, timestep and release rewrite the lists and the shown neuron's stats, histogram, gallery.
    browser = next(fn for fn in demo.fns.values() if fn.api_name == "neuron")
    shown = {b._id for b in browser.outputs}
    for control in (b_layer, b_t, release_dd):
        assert shown <= writers(chain(demo, control, "input")), control.label


# ------------------------------------------------------------------ Analyze tab


def test_layer_and_timestep_changes_recompute(state, events, image):
    rel = state.get_release()
    first, second, t = two_layers(rel)
    out = events.analyze(image, first, t, rel.name, progress=None)
    assert shown_entry(out) == (first, t)
    calls = state.backbone_calls
    out2 = events.refresh(image, second, t, rel.name, out[-2], progress=None)
    assert shown_entry(out2) == (second, t)
    assert state.backbone_calls == calls  # same image and t: cached features, no backbone pass
    assert [n.id for n in out2[-2].neurons] == [n.id for n in A.analyze(state, image["path"], second, t).neurons]
    other_t = next((tt for tt in rel.timesteps(second) if tt != t), None)
    if other_t is not None:
        assert shown_entry(events.refresh(image, second, other_t, rel.name, out2[-2], progress=None)) == (second, other_t)


def test_nothing_to_recompute_clears(events, image, state):
    rel = state.get_release()
    layer, t = rel.default_entry()
    assert is_cleared(events.refresh(image, layer, t, rel.name, None, progress=None))
    assert is_cleared(events.refresh(None, layer, t, rel.name, object(), progress=None))
    assert is_cleared(events.clear_results())
    out = events.change_release(rel.name)
    assert is_cleared(out[6:]) and out[0]["value"] == layer


def test_a_row_of_an_old_layer_is_never_shown(state, events, image):
    rel = state.get_release()
    first, second, t = two_layers(rel)
    out = events.analyze(image, first, t, rel.name, progress=None)
    result = out[-2]
    row = gr.SelectData(None, {"index": [0, 0], "value": result.neurons[0].id,
                               "row_value": [result.neurons[0].id, 1.0, ""]})
    neuron, caption, _, _ = events.select_row(result, first, t, rel.name, row)
    assert neuron["value"] == result.neurons[0].id and caption.startswith(f"Neuron {result.neurons[0].id}")
    with pytest.raises(gr.Error, match=f"These results are for {first} t={t}"):
        events.select_row(result, second, t, rel.name, row)
    with pytest.raises(gr.Error, match="These results are for"):
        events.select_neuron(result, result.neurons[0].id, second, t, rel.name)
    with pytest.raises(gr.Error, match="Analyze an image first"):
        events.select_row(None, first, t, rel.name, row)


def test_entries_without_diffc_say_so(state, events, image):
    rel = state.get_release()
    without = [(l, t) for l, t in rel.entries if (l, t) not in A.diffc_entries(rel)]
    if not without:
        pytest.skip("every entry of this release has a Diff-C head")
    layer, t = without[0]
    out = events.analyze(image, layer, t, rel.name, progress=None)
    preds, note = out[0], out[1]
    assert preds is None and "No Diff-C" in note
    for other_layer, other_t in A.diffc_entries(rel):  # names the entries that have one
        assert f"{other_layer} t={other_t}" in note
    payload = events.analyze_json(image, layer, t, rel.name)
    assert payload["predictions"] is None and payload["note"] == note
    with_diffc = events.analyze_json(image, *A.diffc_entries(rel)[0], rel.name)
    assert with_diffc["predictions"] and with_diffc["note"] is None


# ------------------------------------------------------------------ Neuron browser


def test_browser_follows_the_entry(state, events):
    rel = state.get_release()
    first, second, t = two_layers(rel)
    neuron = 5
    for layer in (first, second):
        out = events.browser_entry(rel.name, layer, t, "frequency", None, neuron)
        sorted_rows, _, _, stats, hist, gallery = out
        expected = A.neuron_details(state, rel.name, layer, t, neuron)
        assert stats.startswith(f"### Neuron {neuron}") and f"{expected.frequency:.2%}" in stats
        assert hist == expected.histogram and gallery == expected.top_images
        assert sorted_rows == A.sorted_neurons(state, rel.name, layer, t, "frequency")
    n = rel.entry(first, t).sae.n_latents
    out = events.browser_entry(rel.name, first, t, "frequency", None, n + 10)  # an id this entry lacks
    assert out[3:] == (BROWSER_PROMPT, None, [])


# ------------------------------------------------------------------ numbers, over raw HTTP


@pytest.fixture(scope="module")
def app(state):
    with LaunchedApp(state) as launched:
        yield launched


def test_one_rule_for_numbers_on_every_endpoint(app, tmp_path):
    rel = app.state.get_release()
    layer, t = rel.default_entry()
    ok, payload = call(app, "neuron", [rel.name, layer, str(t), "3"])
    assert ok == "complete" and payload[0].startswith("### Neuron 3"), payload
    assert call(app, "neuron", [rel.name, layer, t, 3])[1] == payload
    served = upload(app, shape_image(tmp_path / "n.png"))
    image = {"path": served, "orig_name": "n.png", "meta": FILEDATA_TAG}
    default = call(app, "analyze_json", [image, "", -1, ""])[1][0]
    for timestep in ("-1", " -1 ", None):
        assert call(app, "analyze_json", [image, "", timestep, ""])[1][0] == default
    assert call(app, "analyze_json", [image, layer, str(t), ""])[1][0]["timestep"] == t
    huge = "9" * 309
    refused = {
        ("neuron", 3): [(rel.name, layer, t, 3.5), (rel.name, layer, t, "x"), (rel.name, layer, t, -2),
                        (rel.name, layer, t, int(huge)), (rel.name, layer, huge, 1), (rel.name, layer, 2.5, 1)],
        ("analyze_json", 2): [(image, layer, -7, ""), (image, layer, "abc", ""), (image, layer, 25.5, ""),
                              (image, layer, int(huge), ""), (image, layer, huge, "")],
        ("analyze", 2): [(image, layer, huge, rel.name), (image, layer, -3, rel.name)],
    }
    for (api_name, _), cases in refused.items():
        for data in cases:
            event, payload = call(app, api_name, list(data))
            assert event == "error", (api_name, data, payload)
            message = payload["error"]
            assert re_short(message) and "999999999999999999999999" not in message, message
            assert "whole number" in message or "not available" in message, message


def re_short(message: str) -> bool:
    """A one-line message of reasonable length (no huge echo)."""
    return "\n" not in message and len(message) < 300
