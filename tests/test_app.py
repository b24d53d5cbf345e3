"""The app's event functions, called directly (no server): what a user of the UI relies on.

Runs on the bundled toy release (``releases/toy-shapes``), or on the release
named by ``$REVELIO_TEST_RELEASE``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_inputs import BAD_INPUTS, GOOD_ODD_INPUTS, LibraryReference, app_release_path, red_and_blue, shape_image  # noqa: E402

import gradio as gr
import torch

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState, FeatureCache  # noqa: E402
from revelio_hub.app.validation import read_image  # noqa: E402
from revelio_hub.interpret.heatmap import overlay_heatmap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def release_path() -> str:
    return app_release_path()


def uploaded(path, name=None) -> dict:
    """What the browser or gradio_client sends for an uploaded file (a tagged FileData)."""
    value = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
    if name:
        value["orig_name"] = name
    return value


@pytest.fixture(scope="module")
def state() -> AppState:
    return AppState.from_config(AppConfig(releases=[release_path()], feature_cache_size=8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return red_and_blue(tmp_path_factory.mktemp("app_images"))


@pytest.fixture()
def count_backbone_calls(state):
    """Wrap the real backbone's ``extract`` to count passes; yields a one-element list."""
    rel = state.get_release()
    backbone = state.backbone(rel)
    original = backbone.extract
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    backbone.extract = counting
    try:
        yield calls
    finally:
        backbone.extract = original


def test_analyze_matches_library_and_is_sorted(state, images):
    rel = state.get_release()
    layer, t = rel.default_entry()
    result = A.analyze(state, str(images["red"]), layer, t)
    acts, preds = LibraryReference(release_path()).run(images["red"], layer, t)

    assert (result.layer, result.timestep, result.release) == (layer, t, rel.name)
    # Ranked by relevance: activation over the neuron's mean activation when it fires (how unusual for it);
    # the listed non-dense neurons are the most relevant ones, dense ones come flagged.
    atlas = LibraryReference(release_path()).entry(layer, t).atlas
    relevance = atlas.relevance(acts)
    got = [n.relevance for n in result.neurons]
    assert got == sorted(got, reverse=True) and all(n.activation > 0 for n in result.neurons)
    visible = result.visible_neurons()
    firing = torch.nonzero((acts > 0) & ~atlas.dense_mask).flatten()
    expected_ids = firing[torch.argsort(relevance[firing], descending=True, stable=True)][: len(visible)].tolist()
    assert [n.id for n in visible] == expected_ids
    for n in result.neurons:
        assert n.activation == pytest.approx(float(acts[n.id]), rel=1e-4, abs=1e-5)
        assert n.relevance == pytest.approx(float(relevance[n.id]), rel=1e-3, abs=1e-4)
        assert n.dense == bool(atlas.dense_mask[n.id]) and n.summary == atlas.summary_on_image(n.id, float(acts[n.id]))
        assert n.frequency == pytest.approx(float(atlas.stats["frequency"][n.id]), abs=1e-4)
    # Predictions are the entry's Diff-C top-5: probabilities, summing to at most 1.
    assert set(result.predictions) == set(preds)
    for name, p in preds.items():
        assert result.predictions[name] == pytest.approx(p, abs=1e-5)
    assert len(result.predictions) <= 5
    assert sum(result.predictions.values()) <= 1 + 1e-5
    assert all(0 <= p <= 1 for p in result.predictions.values())
    payload = result.to_json()
    assert set(payload) == {"release", "layer", "timestep", "predictions", "note", "neurons", "ranking", "reliable",
                            "reasons", "ood"}
    assert payload["note"] is None  # this entry has a Diff-C
    assert set(payload["neurons"][0]) == {"id", "activation", "relevance", "frequency", "summary", "dense"}
    assert set(payload["ood"]) >= {"reconstruction_error", "error_percentile", "diffc_confidence",
                                   "out_of_distribution", "message", "layers", "reliable", "reasons"}
    assert payload["reliable"] is payload["ood"]["reliable"] is (not payload["ood"]["out_of_distribution"])
    assert layer in payload["ood"]["layers"]
    assert payload["ood"]["diffc_confidence"] == pytest.approx(max(preds.values()), abs=1e-5)


def test_unlike_images_are_flagged_and_shapes_are_not(state, images, tmp_path):
    """The OOD warning: a noise image is beyond the atlas images' reconstruction errors, a shape image is not."""
    from PIL import Image

    rel = state.get_release()
    layer, t = rel.default_entry()
    if not (rel.entry(layer, t).atlas.meta.get("reconstruction_error") or {}).get("quantiles"):
        pytest.skip("this release's atlas records no reconstruction errors")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    flagged = A.analyze(state, str(noise), layer, t).ood
    assert flagged["out_of_distribution"] and "unlike the release's data" in flagged["message"].lower()
    assert max(v["error_percentile"] for v in flagged["layers"].values()) == pytest.approx(100.0)
    from revelio_hub.toy.shapes import make_shapes_dataset

    shape = make_shapes_dataset(1, seed=11, image_size=32)[0]["image"]
    ok = A.analyze(state, shape, layer, t).ood
    assert not ok["out_of_distribution"] and ok["error_percentile"] < 100


def test_search_neurons_lists_detectors_of_a_label_value(state):
    rel = state.get_release()
    layer, t = rel.default_entry()
    atlas = rel.entry(layer, t).atlas
    column, values = next(iter(atlas.label_columns.items()))
    rows = A.search_neurons(state, values[0], layer, t)
    if "value_auroc" not in atlas.stats:
        assert rows == []
        return
    assert rows and all(r["value"] == values[0] for r in rows)
    aurocs = [r["auroc"] for r in rows]
    assert aurocs == sorted(aurocs, reverse=True)
    best = rows[0]
    assert best["auroc"] == pytest.approx(float(atlas.value_auroc(best["column"])[best["neuron"], values.index(values[0])]),
                                          abs=1e-4)
    assert best["summary"] == atlas.summary(best["neuron"])
    assert A.search_neurons(state, f"{column}={values[0]}", layer, t)[0]["column"] == column
    with pytest.raises(ValueError, match="unknown label value 'unicorn'"):
        A.search_neurons(state, "unicorn", layer, t)
    with pytest.raises(ValueError, match="Give a label value"):
        A.search_neurons(state, "  ", layer, t)
    table = A.search_rows(state, "", layer, t, values[0])
    assert len(table[0]) == len(A.SEARCH_TABLE_HEADERS) and table[0][0] == best["neuron"]


def test_selecting_neurons_and_layers_reuses_backbone_features(state, images, count_backbone_calls):
    rel = state.get_release()
    layer, t = rel.default_entry()
    path = str(images["blue"])
    events = __import__("revelio_hub.app.ui", fromlist=["Events"]).Events(state, upload_roots=[str(images["blue"].parent)])
    loads_before = state.backbones.loads

    def passes(entry) -> int:  # one pass, plus one per view the entry's reliability check compares (mirrored copy)
        model = rel.entry(*entry).reliability
        return 1 + (len(model.views) if model is not None else 0)

    first = passes((layer, t))
    out = events.analyze(uploaded(path, "blue.png"), layer, t, "", progress=None)
    preds, note, rows, neuron_update, caption, gallery, overlay, result, ood = out
    assert count_backbone_calls[0] == first
    assert [r[0] for r in rows] == [n.id for n in result.visible_neurons()]
    assert neuron_update["value"] == result.visible_neurons()[0].id
    # the dense toggle lists the dense neurons too, from the analysed result (no backbone pass)
    rows_all = events.toggle_dense(result, True)[1]
    assert [r[0] for r in rows_all] == [n.id for n in result.neurons]
    # The backbone's square crop at display size, with the colour scale drawn under it.
    assert overlay.size[0] == A.DISPLAY_SIZE and A.DISPLAY_SIZE < overlay.size[1] < A.DISPLAY_SIZE + 80
    assert "centre crop" in caption
    assert 0 < len(gallery) <= state.config.top_images

    # Another neuron: new gallery and heat map, no backbone pass.
    other = result.visible_neurons()[-1].id
    caption2, gallery2, overlay2 = events.select_neuron(result, other)
    assert f"Neuron {other}" in caption2
    assert count_backbone_calls[0] == first
    assert gallery2 == A.neuron_gallery(state, "", layer, t, other)

    # Analysing again, or at another layer with the same t: cached features.
    events.analyze(uploaded(path), layer, t, "", progress=None)
    for other_layer in [l for l, tt in rel.entries if tt == t]:
        A.analyze(state, path, other_layer, t)
    assert count_backbone_calls[0] == first
    # Another timestep is a new pass (and its views); the backbone itself is never reloaded.
    others = [(l, tt) for l, tt in rel.entries if tt != t]
    if others:
        A.analyze(state, path, *others[0])
        assert count_backbone_calls[0] == first + passes(others[0])
    assert state.backbones.loads == loads_before == 1


def test_heatmap_overlay_marks_where_the_neuron_fires():
    from PIL import Image

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    amap = torch.zeros(4, 4)
    amap[0, 3] = 2.0  # top-right corner
    out = torch.from_numpy(np.asarray(overlay_heatmap(image, amap), dtype=np.float32))
    changed = (out - 128).abs().sum(-1)
    assert changed[:16, 48:].mean() > 50 and changed[48:, :16].mean() < 1
    # A neuron that never fires leaves the picture as it was.
    assert np.array_equal(np.asarray(overlay_heatmap(image, torch.zeros(4, 4))), np.asarray(image))


def test_a_pooled_saes_heat_map_says_what_it_shows(state, images):
    """A listed neuron fires on the image. A token SAE's map peaks where it does; a pooled SAE reads the image's
    mean vector, so its map (each position encoded alone) is labelled as rough and never says the neuron is silent."""
    rel = state.get_release()
    kinds = {}
    for layer, t in rel.entries:
        kinds.setdefault(rel.entry(layer, t).sae.granularity, (layer, t))
    if "pooled" not in kinds and Path(release_path()).resolve() == (REPO / "releases" / "toy-shapes").resolve():
        pytest.fail("the bundled release has pooled SAE entries (down_ft1, up_ft1)")
    for granularity, (layer, t) in kinds.items():
        result = A.analyze(state, images["blue"], layer, t)
        for hit in result.visible_neurons()[:3]:
            _, _, caption = A.neuron_view(state, result, hit.id)
            assert hit.activation > 0 and "does not fire anywhere" not in caption
            assert ("mean feature vector" in caption) == (granularity == "pooled"), caption
            if granularity == "token":  # the image's activation is the max over positions: the map peaks there
                peak = float(A.activation_map(state, result, hit.id).max())
                assert peak == pytest.approx(hit.activation, rel=1e-3) and "peak activation" in caption
    pooled = type("SAE", (), {"granularity": "pooled"})()
    assert A._map_peak(pooled, 0.0) == "no single position fires it on its own"
    assert A._map_peak(type("SAE", (), {"granularity": "token"})(), 0.0) == "does not fire anywhere on this image"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_give_plain_errors(state, tmp_path, case):
    make, pattern = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        A.analyze(state, str(path))
    events = __import__("revelio_hub.app.ui", fromlist=["Events"]).Events(state, upload_roots=[str(tmp_path)])
    with pytest.raises(gr.Error) as info:
        events.analyze(uploaded(path, path.name), "", None, "", progress=None)
    message = str(info.value)
    assert re.search(pattern, message) and path.name in message
    assert "Traceback" not in message and str(tmp_path) not in message  # no server paths, no stack
    assert "max_pixels" not in message  # a hint for Python callers, not for web users


def test_missing_image_and_bad_choices(state, images):
    events = __import__("revelio_hub.app.ui", fromlist=["Events"]).Events(state)
    with pytest.raises(gr.Error, match="No image given"):
        events.analyze(None, "", None, "", progress=None)
    rel = state.get_release()
    layer, t = rel.default_entry()
    with pytest.raises(ValueError, match=f"Layer 'nope' is not in release.*{layer}"):
        A.analyze(state, str(images["red"]), "nope", t)
    with pytest.raises(ValueError, match="Timestep 999 is not available"):
        A.analyze(state, str(images["red"]), layer, 999)
    with pytest.raises(ValueError, match="Unknown release 'other'.*this app serves"):
        A.analyze(state, str(images["red"]), layer, t, "other")
    n = state.get_release().entry(layer, t).sae.n_latents
    with pytest.raises(ValueError, match=f"from 0 to {n - 1}"):
        A.neuron_details(state, "", layer, t, n)
    with pytest.raises(ValueError, match="Cannot sort neurons by 'name'"):
        A.sorted_neurons(state, "", layer, t, "name")
    with pytest.raises(ValueError, match="Unknown class 'unicorn'"):
        A.class_neurons(state, "", layer, t, "unicorn")


@pytest.mark.parametrize("case", sorted(GOOD_ODD_INPUTS))
def test_unusual_but_valid_images_are_analysed(state, tmp_path, case):
    path = GOOD_ODD_INPUTS[case](tmp_path)
    result = A.analyze(state, str(path))
    assert result.neurons and result.image.mode == "RGB"
    if case == "exif_rotated":  # the model sees the image upright, as a viewer shows it
        assert read_image(str(path)).size == (80, 120)


def test_large_images_are_downscaled_before_the_backbone(tmp_path):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), (10, 200, 10)).save(path)
    img = read_image(str(path))
    assert max(img.size) == 1024 and img.size == (1024, 512)


def test_neuron_browser(state):
    rel = state.get_release()
    layer, t = rel.default_entry()
    rows = A.sorted_neurons(state, "", layer, t, "frequency", n=20)
    assert 0 < len(rows) <= 20 and len(rows[0]) == len(A.NEURON_TABLE_HEADERS)
    freqs = [r[1] for r in rows]
    assert freqs == sorted(freqs, reverse=True)
    details = A.neuron_details(state, "", layer, t, rows[0][0])
    assert details.id == rows[0][0] and details.frequency == pytest.approx(rows[0][1], abs=1e-4)
    assert sum(details.histogram.values()) == pytest.approx(1.0)
    assert 0 < len(details.top_images) <= state.config.top_images
    for image, caption in details.top_images:
        assert Path(image).is_file() and caption
    classes = A.class_names(state, "", layer, t)
    found = {c: A.class_neurons(state, "", layer, t, c) for c in classes}
    assert any(found.values())
    for c, rows_c in found.items():
        for row in rows_c[:3]:  # a neuron listed for c has top images that are mostly c
            atlas = rel.entry(layer, t).atlas
            hist = atlas.label_histogram(row[0])
            assert max(hist, key=hist.get) == c
            details = A.neuron_details(state, "", layer, t, row[0])  # shows its best-explaining column
            column_hist = atlas.label_histogram(row[0], column=details.histogram_column)
            assert max(details.histogram, key=details.histogram.get) == max(column_hist, key=column_hist.get)


def test_release_lookup_and_shared_backbone():
    path = release_path()
    st = AppState.from_config(AppConfig(releases=[path, path.rstrip("/") + "/"]))
    assert st.get_release("").id == path
    assert st.get_release(Path(path).name).id == path
    a, b = (st.get_release(r) for r in st.release_ids)
    assert st.backbone(a) is st.backbone(b) and st.backbones.loads == 1
    # Two releases with the same name get distinct names (the dropdown shows names, not paths).
    assert len(set(st.release_names)) == 2 and st.release_names[0] == a.name
    assert st.get_release(st.release_names[1]) is b
    with pytest.raises(ValueError) as info:
        st.get_release("elsewhere")
    assert path not in str(info.value) and a.name in str(info.value)


def test_feature_cache_is_lru():
    cache = FeatureCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype must be one of"):
        AppConfig(releases=["x"], dtype="int8")
    with pytest.raises(ValueError, match="At least one release"):
        AppConfig(releases=[])


def test_app_help_lists_options():
    out = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--release", "--device", "--dtype", "--port", "--host", "--share"):
        assert flag in out.stdout


def test_layer_and_release_switch_offer_the_release_entries(state):
    from revelio_hub.app.ui import Events, card_markdown

    events = Events(state)
    rel = state.get_release()
    for layer in rel.layers:
        update = events.change_layer("", layer)
        assert [c[0] if isinstance(c, tuple) else c for c in update["choices"]] == rel.timesteps(layer)
        assert update["value"] in rel.timesteps(layer)
    out = events.change_release(rel.name)
    assert out[0]["value"] == rel.default_entry()[0] and [c for _, c in out[2]] == [c for _, c in rel.examples]
    for (shown_path, _), (path, _) in zip(out[2], rel.examples):  # copies of the examples, never the release's files
        assert str(rel.local_dir) not in shown_path and Path(shown_path).read_bytes() == Path(path).read_bytes()
    card = card_markdown(rel)
    assert "](figures/" not in card  # relative figures are served (from a copy in Gradio's cache)
    assert str(rel.local_dir) not in card  # the release folder's path never reaches users
    figures = re.findall(r"\]\(figures/([^)]+)\)", rel.card)
    links = re.findall(r"\]\(gradio_api/file=([^)]+)\)", card)
    assert len(links) == len(figures)
    for figure, link in zip(figures, links):
        assert Path(link).read_bytes() == (Path(rel.local_dir) / "figures" / figure).read_bytes()


def test_app_refuses_a_missing_release_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "app.py"), "--release", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "app.py: error:" in out.stderr and "nothing" in out.stderr and "Traceback" not in out.stderr


def test_progress_is_reported_while_the_backbone_runs(state, tmp_path):
    seen: list[tuple[float, str]] = []
    path = shape_image(tmp_path / "progress.png", color=(30, 160, 90), size=80)
    A.analyze(state, str(path), progress=lambda frac, desc: seen.append((frac, desc)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0
    assert any("backbone" in desc for _, desc in seen)
