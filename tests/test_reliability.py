"""The reliability score: generic shifts, its calibration on a release, storage, and what it says about images.

A small calibration of the bundled release's t=25 entries (30 held-out toy
images, three shifts) is fitted once per module on a copy; the checks are what
a user relies on: the stored calibration reloads to the same scores, a bad file
is a clear error, a photograph is flagged while most held-out shapes are not.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_inputs import app_release_path, calibrated_release, held_out_shapes, photo  # noqa: E402

from revelio_hub.interpret.calibration import CalibrationConfig, wrong_answers  # noqa: E402
from revelio_hub.interpret.reliability import RELIABILITY_DIR, RELIABILITY_FILE, ReliabilityModel, auroc  # noqa: E402
from revelio_hub.interpret.shifts import SHIFTS, shift_image, shift_suite  # noqa: E402
from revelio_hub.release import Release  # noqa: E402


@pytest.fixture(scope="module")
def release_dir():
    return calibrated_release()


def _images(n=6, size=32):
    return held_out_shapes(n, start=200, image_size=size)[0]


def test_every_shift_keeps_size_and_mode_and_changes_the_image():
    images = _images()
    for name in SHIFTS:
        out = shift_image(name, images[0], random.Random(3), images[1:])
        assert out.size == images[0].size and out.mode == "RGB", name
        assert out.tobytes() != images[0].tobytes(), name


def test_a_suite_is_reproducible_from_its_seed_and_another_seed_draws_another():
    images = _images()
    a, b, c = (shift_suite(images, seed) for seed in (0, 0, 1))
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]
    pastes = [s for s in a if s.shift in ("paste", "mosaic")]
    assert pastes and all(len(s.sources) >= 2 for s in pastes)  # every subject's label counts


def test_unknown_shift_and_view_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown shift 'swirl'"):
        shift_image("swirl", _images(1)[0], random.Random(0))
    with pytest.raises(ValueError, match="unknown shifts or views"):
        CalibrationConfig(views=("upside_down",))


def test_auroc_matches_counting_pairs():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    positive = torch.rand(60, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(scores, positive) == pytest.approx(float(pairs.mean()), abs=1e-9)


def test_a_paste_of_two_classes_has_no_right_answer():
    labels = [0, 1, 0]
    wrong = wrong_answers(torch.tensor([0, 0, 1, 0]), [(0,), (0, 2), (0, 1), (1,)], labels)
    assert wrong.tolist() == [False, False, True, True]


def test_calibration_is_stored_and_reloaded_identically(release_dir, tmp_path):
    release = Release.from_pretrained(release_dir)
    t25 = [(l, t) for l, t in release.diffc_entries if t == 25]
    assert t25
    config = json.loads(Path(release_dir, "release.json").read_text())
    for layer, t in t25:
        entry = release.load(layer, t)
        model = entry.reliability
        assert model is not None and model.layer == layer and model.timestep == t
        assert any(i["layer"] == layer and i["timestep"] == t and i.get("reliability") for i in config["entries"])
        again = ReliabilityModel.load(entry.path / RELIABILITY_DIR)
        assert again.to_dict() == model.to_dict()
        assert torch.equal(again.references, model.references)
        g = torch.Generator().manual_seed(1)
        values = {s: torch.randn(16, generator=g) for s in model.signals}
        assert torch.equal(again.score(values), model.score(values))
        resaved = ReliabilityModel.load(model.save(tmp_path / layer))
        assert torch.equal(resaved.score(values), model.score(values))
    other = [(l, t) for l, t in release.entries if t != 25]
    if other:  # calibrating t=25 left the other entries as the source release had them
        before = Release.from_pretrained(app_release_path()).load(*other[0]).reliability
        after = release.load(*other[0]).reliability
        assert (after is None and before is None) or after.to_dict() == before.to_dict()


def test_a_newer_or_broken_calibration_is_a_clear_error(release_dir, tmp_path):
    release = Release.from_pretrained(release_dir)
    layer, t = next((l, t) for l, t in release.diffc_entries if t == 25)
    folder = release.load(layer, t).path / RELIABILITY_DIR
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((folder / RELIABILITY_FILE).read_text())
    (copy / RELIABILITY_FILE).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        ReliabilityModel.load(copy)
    (copy / RELIABILITY_FILE).write_text(json.dumps({**data, "weights": data["weights"][:-1]}))
    with pytest.raises(ValueError, match="inconsistent"):
        ReliabilityModel.load(copy)
    (copy / RELIABILITY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the reliability calibration"):
        ReliabilityModel.load(copy)


def test_photo_is_flagged_and_most_held_out_shapes_are_not(release_dir, tmp_path):
    from revelio_hub.app import analysis as A
    from revelio_hub.app.state import AppConfig, AppState

    state = AppState.from_config(AppConfig(releases=[release_dir], workers=0))
    rel = state.get_release()
    layer, t = next((l, t) for l, t in rel.release.diffc_entries if t == 25)
    flagged = A.analyze(state, str(photo(tmp_path)), layer, t)
    assert flagged.reliable is False and flagged.predictions  # the numbers stay
    payload = flagged.to_json()
    assert payload["reliable"] is False and payload["reasons"]
    assert payload["ood"]["reliability"]["score"] > payload["ood"]["reliability"]["threshold"]
    shapes = held_out_shapes(20, start=300, image_size=rel.image_size or 32)[0]
    paths = []
    for i, img in enumerate(shapes):
        paths.append(tmp_path / f"shape{i}.png")
        img.save(paths[-1])
    verdicts = [A.analyze(state, str(p), layer, t) for p in paths]
    assert sum(v.reliable for v in verdicts) >= 16  # calibrated to flag ~3 % of such images
    line = next(v for v in verdicts if v.reliable).ood["message"]
    decided = next(v for v in verdicts if v.reliable).ood["reliability"]["decided_by"]
    assert decided in line and "percentile" in line  # the line names the signal (and its layer) that decided
    state.close()


def test_the_app_measures_the_signals_the_calibration_measured(release_dir, tmp_path):
    """The score is only calibrated if the app feeds it the numbers the calibration saw: same features, same signals."""
    from revelio_hub.app import analysis as A
    from revelio_hub.app.state import AppConfig, AppState
    from revelio_hub.interpret.calibration import entry_signals, measure

    state = AppState.from_config(AppConfig(releases=[release_dir], workers=0))
    rel = state.get_release()
    layer, t = next((l, t) for l, t in rel.release.diffc_entries if t == 25)
    model = rel.entry(layer, t).reliability
    images = held_out_shapes(3, start=500, image_size=rel.image_size or 32)[0]
    saes = {l: rel.entry(l, t).sae for l in model.layers}
    backbone = rel.release.load_backbone(image_size=rel.image_size)
    m = measure(images, t, saes, {layer: rel.entry(layer, t).diffc}, lambda _size: backbone, model.views)
    expected = entry_signals(m, layer, model.layers, model.views, (model.references, model.centre))
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.png"
        img.save(path)
        got = A.analyze(state, str(path), layer, t).ood["reliability"]["signals"]
        for name in model.signals:
            assert got[name]["value"] == pytest.approx(float(expected[name][i]), rel=1e-3, abs=1e-4), name
    state.close()
