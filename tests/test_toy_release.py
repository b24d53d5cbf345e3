"""The toy release: the smoke build runs end to end, the committed release loads, the benchmark scores correctly."""

import json
from pathlib import Path

import pytest
import torch

from revelio_hub.toy.build_recipe import TOY_BUILD_FILE, ToyBuildConfig
from revelio_hub.toy.monosemanticity import best_raw_channel_auroc, best_unit_auroc, summarize, _targets
from revelio_hub.toy.shapes import FACTORS, make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "releases" / "toy-shapes"


# ---------------------------------------------------------------- the AUROC benchmark on planted data


def test_best_unit_auroc_finds_the_planted_detector():
    g = torch.Generator().manual_seed(0)
    n = 300
    shape = torch.randint(0, 3, (n,), generator=g)
    acts = torch.rand(n, 40, generator=g)
    acts[:, 7] += 2.0 * (shape == 1)  # a perfect "b" detector
    acts[:, 11] += 0.3 * (shape == 2)  # a weak "c" detector
    s = best_unit_auroc(acts, {"shape": shape}, {"shape": ["a", "b", "c"]}, chunk=16)
    assert s.best["shape"]["b"] == pytest.approx(1.0)
    assert s.unit["shape"]["b"] == 7
    assert s.unit["shape"]["c"] == 11 and 0.6 < s.best["shape"]["c"] < 1.0
    assert s.best["shape"]["a"] < 0.7  # nothing was planted for "a": only noise-level maxima
    assert s.mean("shape") == pytest.approx(sum(s.best["shape"].values()) / 3)


def test_raw_channels_use_the_better_pooling_and_either_sign():
    g = torch.Generator().manual_seed(1)
    n = 200
    size = torch.randint(0, 2, (n,), generator=g)
    maps = torch.randn(n, 4, 5, 5, generator=g) * 0.1
    maps[:, 2, 0, 0] += 3.0 * size  # one hot position: visible to max-pooling
    maps[:, 3] -= 1.0 * (size == 0).float()[:, None, None]  # low for "small": needs the sign flip
    plain = best_raw_channel_auroc(maps, {"size": size}, {"size": ["small", "large"]})
    assert plain.best["size"]["large"] == pytest.approx(1.0)  # channel 2 by max-pooling, or channel 3 by mean
    either = best_raw_channel_auroc(maps, {"size": size}, {"size": ["small", "large"]}, either_sign=True)
    assert either.best["size"]["small"] == pytest.approx(1.0)  # only a negated channel detects "small"
    assert plain.best["size"]["small"] < either.best["size"]["small"]


def test_summary_picks_each_factors_best_entry_and_checks_targets():
    names = {"shape": ["a", "b"], "color": ["r", "g"]}
    labels = {"shape": torch.tensor([0, 1] * 50), "color": torch.tensor([0] * 50 + [1] * 50)}
    good = torch.cat([torch.nn.functional.one_hot(labels["shape"], 2), torch.nn.functional.one_hot(labels["color"], 2)],
                     1).float()
    noise = torch.rand(100, 2, generator=torch.Generator().manual_seed(2))
    results = {"sae": {"L/t25": best_unit_auroc(good, labels, names), "L/t200": best_unit_auroc(noise, labels, names)},
               "raw": {"L/t25": best_unit_auroc(noise, labels, names), "L/t200": best_unit_auroc(noise, labels, names)}}
    summary = summarize(results, ["shape", "color"])
    assert summary["sae"]["shape"]["best_entry"] == "L/t25" and summary["sae"]["shape"]["auroc"] == pytest.approx(1.0)
    checks = _targets(summary, {"L/t25": 0.97})
    assert checks["shape_auroc>=0.85"]["pass"] and checks["sae_beats_raw_on_average"]["pass"]
    assert checks["diffc_shape_accuracy>=0.95"]["pass"]


def test_bad_activation_shapes_are_refused():
    with pytest.raises(ValueError, match="N×M"):
        best_unit_auroc(torch.zeros(3), {"shape": torch.zeros(3)}, {"shape": ["a"]})
    with pytest.raises(ValueError, match="labels"):
        best_unit_auroc(torch.zeros(3, 2), {"shape": torch.zeros(4)}, {"shape": ["a"]})


# ---------------------------------------------------------------- releases


def _check_release(path: Path, n_images: int = 6) -> None:
    """The release loads, every entry's SAE accepts its backbone's features, Diff-C predicts shapes."""
    from revelio_hub.release import Release

    release = Release.from_pretrained(str(path))
    build = ToyBuildConfig.from_dict(json.loads((path / TOY_BUILD_FILE).read_text()))
    backbone = release.load_backbone()
    assert backbone.family == "pixel" and release.embedded_backbone == "backbone"
    images = list(make_shapes_dataset(n_images, seed=99, image_size=backbone.image_size)["image"])
    layers = sorted({l for l, _ in release.entries}, key=backbone.layers.index)
    steps = sorted({t for _, t in release.entries})
    maps = backbone.extract(images, layers, steps, batch_size=8)
    diffc_seen = 0
    for layer, t in release.entries:
        entry = release.load(layer, t)
        granularity = build.sae_granularity(layer)
        assert entry.sae.granularity == granularity
        entry.sae.check_recipe(backbone.recipe(layer, t, granularity))
        acts = entry.sae.image_activations(maps[(layer, t)])
        assert acts.shape == (n_images, entry.sae.n_latents) and torch.isfinite(acts).all()
        assert (acts > 0).any()
        if entry.diffc is not None:
            diffc_seen += 1
            preds = entry.diffc.predict(maps[(layer, t)], top_k=2)
            assert len(preds) == n_images and set(preds[0]) <= set(FACTORS["shape"])
        assert entry.atlas.num_neurons == entry.sae.n_latents
        # The wrong layer's features are refused with a message naming the difference.
        other = next((l for l in layers if l != layer), None)
        if other is not None and backbone.channels(other) == backbone.channels(layer):
            with pytest.raises(ValueError, match="layer"):
                entry.sae.check_recipe(backbone.recipe(other, t, granularity))
    assert diffc_seen > 0, "no entry of the release has a Diff-C head"


@pytest.fixture(scope="module")
def smoke_release(tmp_path_factory):
    from revelio_hub.toy.pipeline import ToyBuildConfig, build_toy_release

    root = tmp_path_factory.mktemp("toy")
    report = build_toy_release(ToyBuildConfig.smoke(), root / "release", root / "work", progress=False,
                               log=lambda *_: None)
    return root, report


@pytest.mark.slow  # the smoke build (shared fixture): 175 s loaded
def test_smoke_build_makes_a_loadable_release(smoke_release):
    root, report = smoke_release
    out = root / "release"
    for name in ("README.md", "release.json", "toy_build.json", "figures/samples.png", "backbone/model_index.json",
                 "backbone/null_conditioning.safetensors"):
        assert (out / name).is_file(), name
    index = json.loads((out / "backbone" / "model_index.json").read_text())
    assert index["_class_name"] == "RevelioPixelPipeline"
    assert set(report["timings_s"]) >= {"shapes", "backbone", "features", "sae", "diffc", "atlas", "release", "total"}
    _check_release(out)
    card = (out / "README.md").read_text()
    assert "figures/samples.png" in card
    # the smoke build trains one layer's SAE on pooled vectors: the card says which, and _check_release its recipe
    assert "each image's mean-pooled vector (the paper's granularity; up_ft0)" in card
    assert ("8 positions per image, drawn in proportion to their squared distance from the map's mean (token level; "
            "bottleneck)") in card
    # a release is published: none of its text files names the folders it was built in
    for path in [*out.rglob("*.json"), *out.rglob("*.md")]:
        assert str(root) not in path.read_text(), path
    assert json.loads((out / "monosemanticity.json").read_text())["release"] == "release"
    # the reliability stage calibrated every Diff-C entry, from generic shifts of the test split only
    from revelio_hub.interpret.calibration import CARD_HEADING
    from revelio_hub.release import Release

    assert "reliability" in report["timings_s"] and CARD_HEADING in card
    release = Release.from_pretrained(str(out))
    for layer, t in release.diffc_entries:
        model = release.load(layer, t, load_atlas=False).reliability
        assert model is not None and model.metrics["calibration"]["per_shift"]["held_out"]["images"] == 24


@pytest.mark.slow  # reruns the smoke build: 46 s loaded
def test_smoke_build_rerun_reuses_finished_stages(smoke_release):
    from revelio_hub.toy.pipeline import ToyBuildConfig, build_toy_release

    root, first = smoke_release
    again = build_toy_release(ToyBuildConfig.smoke(), root / "release2", root / "work", progress=False,
                              log=lambda *_: None)
    assert again["timings_s"]["backbone"] < 1.0  # reused, not retrained
    assert again["timings_s"]["features"] < first["timings_s"]["features"] + 1.0


@pytest.mark.slow  # needs the smoke build
def test_backbone_folder_opens_with_the_generic_loader(smoke_release):
    from revelio_hub.backbones import load_backbone

    root, _ = smoke_release
    backbone = load_backbone(str(root / "work" / "backbone"))
    assert backbone.family == "pixel" and backbone.image_size == 32
    x = backbone.extract(list(make_shapes_dataset(2, seed=5, image_size=32)["image"]), "bottleneck", 25, pool="mean")
    assert x[("bottleneck", 25)].shape[0] == 2


@pytest.mark.skipif(not (COMMITTED / "release.json").exists(), reason="the committed toy release is not built yet")
def test_committed_release_loads_and_its_saes_accept_the_embedded_backbone():
    _check_release(COMMITTED, n_images=4)
    size = sum(f.stat().st_size for f in COMMITTED.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"the committed release is {size / 2**20:.1f} MB (limit 20 MB)"
