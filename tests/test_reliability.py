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
from revelio_hub.interpret.reliability import (  # noqa: E402
    RELIABILITY_DIR, RELIABILITY_FILE, ClassReferences, ReliabilityModel, auroc, trust_ratio,
)
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
    expected = entry_signals(m, layer, model.layers, model.views, (model.references, model.centre),
                             class_references=model.class_references)
    assert any(name.startswith("trust:") for name in model.signals)  # format 2: the app must feed these too
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.png"
        img.save(path)
        got = A.analyze(state, str(path), layer, t).ood["reliability"]["signals"]
        for name in model.signals:
            assert got[name]["value"] == pytest.approx(float(expected[name][i]), rel=1e-3, abs=1e-4), name
    state.close()


def _two_class_references():
    """Class 0 around one direction, class 1 around another (4 noisy references each)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 5.0, 5.0
    rows = torch.stack([a + 0.3 * torch.randn(16, generator=g) for _ in range(4)]
                       + [b + 0.3 * torch.randn(16, generator=g) for _ in range(4)])
    return ClassReferences.of(rows, [0, 0, 0, 0, 1, 1, 1, 1]), a, b


def test_trust_ratio_ranks_an_answer_its_neighbours_contradict_above_one_they_confirm():
    refs, a, b = _two_class_references()
    near_a = (a + 0.1 * torch.ones(16))[None].repeat(2, 1)
    ratio = trust_ratio(near_a, torch.tensor([0, 1]), refs)  # the same image, answered right, then wrong
    assert ratio[0] < 0 < ratio[1]
    # an image halfway between the classes is less certain than one deep in either
    between = trust_ratio(((a + b) / 2)[None], torch.tensor([0]), refs)
    assert ratio[0] < between[0] < ratio[1]
    # excluding an image's own copy among the references (calibration) makes it match the next one, not itself
    own = refs.features[0] + refs.centre
    alone = trust_ratio(own[None], torch.tensor([0]), refs)
    held = trust_ratio(own[None], torch.tensor([0]), refs, exclude=[[0]])
    assert alone[0] < held[0] < 0


def test_a_format_1_calibration_still_loads_and_scores_as_before(tmp_path):
    """Releases calibrated before the trust signals (format 1) keep working: same signals, same scores."""
    signals = ["diffc_energy", "diffc_entropy", "nearest_distance", "sae_error:down_ft1"]
    data = {"layer": "down_ft1", "timestep": 25, "signals": signals, "mean": [0.0, 0.5, 0.2, -1.0],
            "std": [1.0, 0.5, 0.1, 0.4], "weights": [0.3, 0.8, 0.5, 1.2], "bias": -1.5, "threshold": 0.6,
            "quantiles": {s: [float(i) / 100 for i in range(101)] for s in signals}, "layers": ["down_ft1"],
            "views": [], "reference_layer": "down_ft1", "metrics": {}, "format_version": 1}
    (tmp_path / RELIABILITY_FILE).write_text(json.dumps(data))
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    save_file({"references": torch.randn(10, 8, generator=g), "centre": torch.zeros(8)},
              str(tmp_path / "references.safetensors"))
    model = ReliabilityModel.load(tmp_path)
    assert model.format_version == 1 and model.trust_layers == [] and model.class_references == {}
    values = {s: torch.randn(5, generator=g) for s in signals}
    z = torch.stack([(values[s].double() - m) / sd for s, m, sd in zip(signals, data["mean"], data["std"])], 1)
    expected = torch.sigmoid(z @ torch.tensor(data["weights"], dtype=torch.float64) + data["bias"]).float()
    assert torch.allclose(model.score(values), expected, atol=1e-6)
    one = model.image_values({"down_ft1": 0.05}, torch.tensor([[2.0, 0.1, -1.0]]), pooled=torch.randn(1, 8))
    assert sorted(one) == sorted(signals)  # no max-pooled features needed
    assert ReliabilityModel.load(model.save(tmp_path / "again")).to_dict() == model.to_dict()


def test_trust_signals_need_their_labelled_references(release_dir, tmp_path):
    release = Release.from_pretrained(release_dir)
    layer, t = next((l, t) for l, t in release.diffc_entries if t == 25)
    model = release.load(layer, t).reliability
    assert model.trust_layers and set(model.trust_layers) <= set(model.layers)
    with pytest.raises(ValueError, match="max-pooled features of"):
        model.image_values({l: 0.05 for l in model.layers}, torch.zeros(1, 5),
                           {v: torch.zeros(1, 5) for v in model.views}, model.centre[None])
    from safetensors.torch import load_file, save_file

    copy = model.save(tmp_path / "copy")
    tensors = load_file(str(copy / "references.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "labels"}, str(copy / "references.safetensors"))
    with pytest.raises(ValueError, match="lacks the labelled references"):
        ReliabilityModel.load(copy)


def test_a_pairwise_term_counts_only_when_both_signals_are_high(tmp_path):
    """The combiner's products: two signals that mean "wrong" only together raise the score only together."""
    model = ReliabilityModel(layer="down_ft1", timestep=25, signals=["diffc_entropy", "view_disagreement:flip"],
                             mean=[0.0, 0.0], std=[1.0, 1.0], weights=[0.0, 0.0], bias=-1.0, threshold=0.5,
                             quantiles={s: [i / 50 - 1 for i in range(101)] for s in ("diffc_entropy",
                                                                                       "view_disagreement:flip")},
                             pairs=[[0, 1]], pair_weights=[2.0])
    both = {"diffc_entropy": 1.5, "view_disagreement:flip": 1.5}
    one = {"diffc_entropy": 1.5, "view_disagreement:flip": 0.0}
    assert model.verdict(both).score > model.threshold > model.verdict(one).score
    assert len(model.verdict(both).reasons) == 2  # the pair's weight is shared by the two signals it multiplies
    again = ReliabilityModel.load(model.save(tmp_path / "pairs"))
    assert again.verdict(both).score == pytest.approx(model.verdict(both).score)
    data = json.loads((tmp_path / "pairs" / RELIABILITY_FILE).read_text())
    (tmp_path / "pairs" / RELIABILITY_FILE).write_text(json.dumps({**data, "pairs": [[0, 2]]}))
    with pytest.raises(ValueError, match="inconsistent"):
        ReliabilityModel.load(tmp_path / "pairs")


def test_the_false_alarm_budget_counts_only_held_out_answers_that_are_right():
    """Where Diff-C is often wrong on ordinary images, the threshold must not sit among those wrong answers."""
    from revelio_hub.interpret.calibration import fit

    g = torch.Generator().manual_seed(0)
    right_held = torch.randn(200, generator=g) * 0.3            # ordinary images, right answers
    wrong_held = 3.0 + torch.randn(100, generator=g) * 0.3      # ordinary images, wrong answers: the clearest ones
    wrong_shifted = 1.5 + torch.randn(300, generator=g) * 0.3   # shifted images, wrong answers
    x = torch.cat([right_held, wrong_held, wrong_shifted])
    wrong = torch.cat([torch.zeros(200), torch.ones(400)]).bool()
    held = torch.cat([torch.ones(300), torch.zeros(300)]).bool()
    config = CalibrationConfig(trust=False, pairwise=False, false_alarm=0.03)
    model = fit({"diffc_entropy": x}, wrong, held, "down_ft1", 100, config, ["down_ft1"])
    flagged = model.score({"diffc_entropy": x}) > model.threshold
    assert float(flagged[:200].float().mean()) <= 0.05   # false alarms: right answers on ordinary images
    assert float(flagged[300:].float().mean()) >= 0.9    # the shifted images' wrong answers are caught
