"""Calibrated claims, "where" labels, "Why this class?" by concept and σ_label beside its chance level (issue 19)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from app_inputs import app_release_path  # noqa: E402

from revelio_hub.interpret.atlas_builder import build_atlas  # noqa: E402
from revelio_hub.interpret.atlas_config import ATLAS_FILE, AtlasConfig  # noqa: E402
from revelio_hub.interpret.atlas_model import NeuronAtlas  # noqa: E402
from revelio_hub.interpret.claim_calibration import CalibrationConfig, ClaimCalibration  # noqa: E402
from revelio_hub.interpret.where import where_label  # noqa: E402

COLUMNS = {"shape": ["circle", "square", "star"], "colour": ["blue", "red"]}


def _planted(n: int = 600, seed: int = 0):
    """Neuron 0 detects red exactly. Neuron 1's top images are all squares, but on held-out images it fires as
    strongly on a third of the other shapes: its "square" claim is true on only about half of its strong firings."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 2, (n,), generator=g)
    acts = torch.zeros(n, 2)
    acts[:, 0] = torch.where(colour == 1, 1 + torch.rand(n, generator=g), torch.zeros(n))
    square = shape == 1
    other_fires = ~square & (torch.rand(n, generator=g) < 0.35)
    acts[:, 1] = torch.where(square, 2 + torch.rand(n, generator=g), torch.zeros(n))
    acts[:, 1] = torch.where(other_fires, 1.9 + torch.rand(n, generator=g) * 1.0, acts[:, 1])
    top = torch.argsort(acts[:, 1], descending=True)[:10]
    acts[top, 1] = 3.5 + torch.arange(10, 0, -1).float() / 10  # the top-10 are squares only
    shape[top] = 1
    return acts, {"shape": shape, "colour": colour}


def _atlas(tmp_path, calibration=CalibrationConfig(regimes=(1.0,))):
    acts, labels = _planted()
    ids = torch.arange(acts.shape[0])
    config = AtlasConfig(claim_calibration=calibration)
    build_atlas([(acts, labels, ids)], label_columns=COLUMNS, config=config, out=tmp_path / "a")
    return NeuronAtlas.load(tmp_path / "a"), acts, labels


def test_claims_below_the_precision_floor_are_not_named(tmp_path):
    atlas, acts, labels = _atlas(tmp_path)
    cal = atlas.calibration
    assert cal is not None and cal.held_out_images == acts.shape[0]

    # The red detector's band measured (nearly) every held-out strong firing red: named, with that figure.
    named = atlas.explanation(0)
    assert [e.value for e in named] == ["red"] and named[0].held_out >= 0.9
    pct = f"{100 * named[0].held_out:.0f}%"
    assert atlas.summary(0).startswith(f"red (colour) · true on {pct} of held-out images it fires strongly on")
    assert atlas.neuron(0).named_values[0]["held_out_precision"] == pytest.approx(named[0].held_out, abs=1e-4)

    # The square neuron's top images are 10/10 squares, yet its claims held on far fewer held-out images.
    e = next(e for e in atlas.evidence(1) if e.column == "shape")
    assert e.value == "square" and e.hits == e.filled == 10
    measured = cal.precision(e.auroc, e.precision, dense=bool(atlas.dense_mask[1]), neuron=1, column="shape")
    assert measured is not None and measured < 0.9
    # ... and recomputing the measured share by hand over the held-out folds agrees in size
    strong_square = (labels["shape"][acts[:, 1] > 0] == 1).float().mean()
    assert measured == pytest.approx(float(strong_square), abs=0.2)
    assert atlas.explanation(1) == []
    summary = atlas.summary(1)
    assert summary.startswith(f"unsure: square (shape)? claims like it held on {100 * measured:.0f}%")
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_explain.py"))
    assert bench["named_values"](summary) == [] and bench["named_values"](atlas.summary(0)) == ["red"]

    # A stricter floor un-names the red detector too; the table is data in atlas.json.
    meta = json.loads((tmp_path / "a" / ATLAS_FILE).read_text())
    meta["claim_calibration"]["config"]["min_precision"] = 1.01 if named[0].held_out < 1 else 1.0
    meta["claim_calibration"]["true"] = _filled(meta["claim_calibration"]["true"], 0)
    (tmp_path / "a" / ATLAS_FILE).write_text(json.dumps(meta))
    stricter = NeuronAtlas.load(tmp_path / "a")
    assert stricter.explanation(0) == [] and stricter.summary(0).startswith("unsure: red (colour)?")


def _filled(table, value):
    """A stored count table (nested lists) with every count replaced by ``value``."""
    return [_filled(x, value) for x in table] if isinstance(table, list) else value


def test_calibration_round_trips_and_old_atlases_keep_their_summaries(tmp_path):
    atlas, _, _ = _atlas(tmp_path)
    stored = json.loads((tmp_path / "a" / ATLAS_FILE).read_text())["claim_calibration"]
    again = ClaimCalibration.from_dict(stored)
    assert again.to_dict() == atlas.calibration.to_dict() == stored
    # too few pairs in a band = unmeasured: no claim is made there
    few = ClaimCalibration.from_dict({**stored, "pairs": _filled(stored["pairs"], 5)})
    assert few.precision(0.99, 1.0, dense=False) is None
    # An atlas built without calibration (or of an unknown table version) keeps the AUROC / top-image line.
    old, _, _ = _atlas(tmp_path / "old", calibration=None)
    assert old.calibration is None
    assert old.summary(0).startswith("red (colour) · AUROC 1.00 · 10/10 top images")
    assert ClaimCalibration.from_dict({**stored, "version": 99}) is None
    with pytest.raises(ValueError, match="min_precision"):
        CalibrationConfig(min_precision=0)
    with pytest.raises(ValueError, match="folds"):
        CalibrationConfig(folds=1)


def _two_square_neurons(n: int = 900, seed: int = 1):
    """Two neurons whose top-10 images are all squares, with the same AUROC band: neuron 0 fires strongly only on
    squares; neuron 1 fires as strongly on a third of the other shapes (claims like neuron 0's hold, its own do not)."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 2, (n,), generator=g)
    square = shape == 1
    acts = torch.zeros(n, 2)
    acts[:, 0] = torch.where(square, 2 + torch.rand(n, generator=g), torch.zeros(n))
    other = ~square & (torch.rand(n, generator=g) < 0.3)
    acts[:, 1] = torch.where(square | other, 2 + torch.rand(n, generator=g), torch.zeros(n))
    for j in (0, 1):  # the top-10 of both are squares
        top = torch.argsort(acts[:, j], descending=True)[:10]
        shape[top] = 1
    return acts, {"shape": shape, "colour": colour}


def test_a_neuron_is_judged_by_its_own_held_out_record_not_only_its_band(tmp_path):
    acts, labels = _two_square_neurons()
    ids = torch.arange(acts.shape[0])
    # One AUROC band holds both. A prior of 0 pairs: each neuron's figure is its own record; a huge prior: the
    # band's (version-1 behaviour).
    own = build_atlas([(acts, labels, ids)], label_columns=COLUMNS, out=tmp_path / "own",
                      config=AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.0,), prior_pairs=0, auroc_edges=(0.5,))))
    own = NeuronAtlas.load(tmp_path / "own")
    cal = own.calibration
    assert cal.version == 3 and cal.columns == list(COLUMNS)
    t0, n0 = cal.neuron_record(0, "shape")
    t1, n1 = cal.neuron_record(1, "shape")
    # the records are the held-out strong firings: every one of neuron 0's is a square, about 60 % of neuron 1's
    assert n0 > 30 and t0 == n0
    square_share = float((labels["shape"][acts[:, 1] > 0] == 1).float().mean())
    assert n1 > 30 and t1 / n1 == pytest.approx(square_share, abs=0.08) and t1 / n1 < 0.8
    assert [e.value for e in own.explanation(0)] == ["square"] and own.explanation(0)[0].held_out == 1.0
    assert own.explanation(1) == [] and own.summary(1).startswith("unsure: square (shape)?")
    banded = build_atlas([(acts, labels, ids)], label_columns=COLUMNS,
                         config=AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.0,), prior_pairs=1e9, auroc_edges=(0.5,))))
    e0, e1 = (next(e for e in banded.evidence(j) if e.column == "shape") for j in (0, 1))
    assert banded.calibration.band(e0.auroc, e0.precision) == banded.calibration.band(e1.auroc, e1.precision)
    # by band alone both neurons get the same figure: the band cannot tell them apart
    assert banded.calibration.precision(e0.auroc, e0.precision, False, 0, "shape") == pytest.approx(
        banded.calibration.precision(e1.auroc, e1.precision, False, 1, "shape"), abs=1e-6)
    # the stored per-neuron record round-trips, and a version-1 table (no records) still loads, band figures only
    stored = json.loads((tmp_path / "own" / ATLAS_FILE).read_text())["claim_calibration"]
    assert ClaimCalibration.from_dict(stored).to_dict() == stored
    # tables of versions 2 (one regime, no regime axis) and 1 (no records: band figures only) still load
    config2 = {**{k: v for k, v in stored["config"].items() if k != "regimes"}, "strong": 1.0}
    v2 = {**stored, "version": 2, "config": config2,
          **{k: stored[k][0] for k in ("true", "pairs", "neuron_true", "neuron_pairs")}}
    two = ClaimCalibration.from_dict(v2)
    assert two.config.regimes == [1.0] and two.neuron_record(1, "shape") == (t1, n1) and two.to_dict() == v2
    assert two.precision(e0.auroc, e0.precision, False, 0, "shape") == cal.precision(e0.auroc, e0.precision, False, 0,
                                                                                     "shape")
    v1 = {k: v for k, v in v2.items() if k not in ("columns", "neuron_true", "neuron_pairs")}
    old = ClaimCalibration.from_dict({**v1, "version": 1})
    assert old is not None and old.neuron_record(1, "shape") is None and old.to_dict()["version"] == 1
    with pytest.raises(ValueError, match="prior_pairs"):
        CalibrationConfig(prior_pairs=-1)


def test_where_label_names_the_region_of_the_peaks():
    grid = (8, 8)
    top_left = [0, 1, 9, 10, 18, 2, 17, 8, 3, 24]  # rows 0-3, columns 0-3
    assert where_label(top_left, grid) == "top-left"
    centre = [27, 28, 35, 36, 27, 28, 35, 36, 44, 19]  # rows/cols 2-5, both sides of the middle
    assert where_label(centre, grid) == "centre"
    top = [0, 7, 1, 6, 9, 14, 2, 5, 16, 23]  # top rows, both halves
    assert where_label(top, grid) == "top"
    spread = [0, 7, 56, 63, 27, 36, 3, 60, 24, 31]
    assert where_label(spread, grid) == "anywhere"
    assert where_label([0, 1, -1, -1], grid) is None  # too few known peaks


def test_token_atlas_records_where_its_neurons_peak(tmp_path):
    from revelio_hub.sae.model import KSparseAutoencoder

    torch.manual_seed(0)
    sae = KSparseAutoencoder(4, 8, k=2, granularity="token").eval()
    maps = torch.randn(40, 4, 6, 6) * 0.1
    direction = sae.W_enc[3].detach()  # what neuron 3 reads; planted in the top-left corner of every image
    maps[:, :, 0, 0] += 5 * direction[:, None].expand(4, 40).t() / direction.norm()
    labels = torch.zeros(40, dtype=torch.long)
    atlas = build_atlas([(maps, labels, torch.arange(40))], ["only"], sae=sae, out=tmp_path / "w")
    atlas = NeuronAtlas.load(tmp_path / "w")
    assert atlas.meta["peak_grid"] == [6, 6]
    assert atlas.stats["top_peak_positions"].shape == atlas.stats["top_image_ids"].shape
    assert atlas.stats["frequency"][3] > 0
    assert atlas.where(3) == "top-left" and "where: top-left" in atlas.summary(3)
    # a pooled atlas (no maps) has no "where"
    flat = build_atlas([(torch.rand(20, 3), torch.zeros(20, dtype=torch.long), torch.arange(20))], ["only"])
    assert flat.where(0) is None and "where" not in flat.summary(0)


# ------------------------------------------------------------------ "Why this class?" by concept, σ_label


@pytest.fixture(scope="module")
def toy_entry():
    from revelio_hub.release import Release
    from revelio_hub.toy.shapes import make_shapes_dataset

    release = Release.from_pretrained(app_release_path())
    layer, t = release.diffc_entries[0]
    entry = release.load(layer, t)
    backbone = release.load_backbone()
    images = [row["image"] for row in make_shapes_dataset(3, seed=11, image_size=backbone.image_size)]
    with torch.no_grad():
        maps = backbone.extract(images, [layer], [t], seed=int((entry.diffc.recipe or {}).get("noise_seed") or 0))
    return entry, maps[(layer, t)].float()


def _remove_together(sae, diffc, x: torch.Tensor, neurons: list[int], target: int) -> float:
    """P(target) lost when every neuron of ``neurons`` is zeroed (decode + error + Diff-C): at every position for a
    token SAE; for a pooled SAE, in the code of the mean, its decoder contribution taken from every position."""
    with torch.no_grad():
        pooled = sae.granularity == "pooled"
        vals, idx = sae.encode(x.mean(dim=(2, 3)) if pooled else x)
        drop = torch.zeros_like(idx, dtype=torch.bool)
        for j in neurons:
            drop |= idx == j
        if pooled:
            removed = sae.decode(vals, idx) - sae.decode(vals.masked_fill(drop, 0.0), idx)
            ablated = x - removed[:, :, None, None]
        else:
            error = x - sae.decode(vals, idx).permute(0, 3, 1, 2)
            ablated = sae.decode(vals.masked_fill(drop, 0.0), idx).permute(0, 3, 1, 2) + error
        probs = diffc.eval()(torch.cat([x, ablated])).softmax(1)[:, target]
    return float(probs[0] - probs[1])


def test_concept_effects_are_exact_joint_removals_of_the_shown_neurons(toy_entry):
    from revelio_hub.interpret.concept_effects import concept_effects, shown_neurons

    entry, maps = toy_entry
    atlas = entry.atlas
    found = 0
    for x in maps:
        a = entry.attribute(x[None], top=16)[0]
        shown = shown_neurons(a, atlas)
        assert all(not bool(atlas.dense_mask[int(a.neurons[k])]) for k in shown)  # dense hidden by default
        groups = concept_effects(entry.sae, entry.diffc, x, a, atlas)
        for g in groups:
            found += 1
            # every member is a shown neuron that names the group's value on this image (checked for its firing)
            act = {int(a.neurons[k]): float(a.activations[k]) for k in range(len(a))}
            assert all(any(e.column == g.column and e.value == g.value for e in atlas.names_on_image(j, act[j]))
                       for j in g.neurons)
            assert set(g.neurons) <= {int(a.neurons[k]) for k in shown}
            assert g.effect_prob == pytest.approx(_remove_together(entry.sae, entry.diffc, x[None], g.neurons,
                                                                   a.target), abs=2e-6)
            singles = {int(a.neurons[k]): float(a.effects_prob[k]) for k in range(len(a))}
            assert g.summed_prob == pytest.approx(sum(singles[j] for j in g.neurons), abs=1e-9)
            change = -g.effect_prob
            assert g.text(a.target_name) == (f"{g.column} = {g.value} neurons ({len(g.neurons)}): "
                                            f"{'−' if change < 0 else '+'}{abs(change):.2f} of P({a.target_name}) "
                                            "when removed")
        assert [abs(g.effect_prob) for g in groups] == sorted((abs(g.effect_prob) for g in groups), reverse=True)
    if atlas.calibration is not None or any(atlas.explanation(i) for i in range(atlas.num_neurons)):
        assert found > 0  # the bundled release names values: some group must form on three images


def test_sigma_label_is_shown_beside_its_chance_level():
    from revelio_hub.app.analysis import sigma_label_note

    class Stub:
        summary_stats = {"sigma_label": 1.30, "sigma_label_neurons": 300, "sigma_label_shuffled": 1.36}

    note = sigma_label_note(Stub())
    assert "1.30" in note and "1.36" in note and "4% below chance" in note
    Stub.summary_stats = {"sigma_label": 1.40, "sigma_label_neurons": 300, "sigma_label_shuffled": 1.36}
    assert "not below chance" in sigma_label_note(Stub())
    assert sigma_label_note(None) == ""


def test_neuron_browser_shows_sigma_label_beside_chance():
    """What the Neuron browser tab shows (Events.neuron_details renders the same markdown)."""
    from revelio_hub.app import analysis as A
    from revelio_hub.app.state import AppConfig, AppState
    from revelio_hub.app.ui import Events

    state = AppState.from_config(AppConfig(releases=[app_release_path()], feature_cache_size=2))
    rel = state.get_release()
    layer, t = rel.entries[0]
    stats = rel.entry(layer, t).atlas.summary_stats
    markdown, _, _ = Events(state).neuron_details(rel.name, layer, t, A.sorted_neurons(state, "", layer, t)[0][0])
    assert f"σ_label of this layer: {stats['sigma_label']:.2f}" in markdown
    assert f"shuffled labels on the same neurons: {stats['sigma_label_shuffled']:.2f}" in markdown


def test_an_atlas_claims_can_be_recalibrated_from_its_activation_log(tmp_path):
    """What benchmarks/bench_claim_prior.py does: the log rebuilt from the same batches gives the atlas' own table."""
    from revelio_hub.interpret.atlas_builder import activation_log
    from revelio_hub.interpret.claim_calibration import calibrate_claims
    from revelio_hub.sae.model import KSparseAutoencoder

    torch.manual_seed(0)
    sae = KSparseAutoencoder(6, 12, k=3).eval()
    x = torch.randn(120, 6)
    labels = {"shape": torch.randint(0, 3, (120,)), "colour": torch.randint(0, 2, (120,))}
    batches = [(x[i:i + 40], {c: v[i:i + 40] for c, v in labels.items()}, torch.arange(i, i + 40)) for i in (0, 40, 80)]
    config = AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.0,), min_pairs=1))
    atlas = build_atlas(batches, sae=sae, label_columns=COLUMNS, config=config)
    log = activation_log(batches, sae, COLUMNS)
    again = calibrate_claims(log, COLUMNS, top=config.purity_top, dense_frequency=config.dense_frequency,
                             config=config.claim_calibration)
    assert again.to_dict() == atlas.calibration.to_dict() and torch.tensor(again.neuron_pairs).sum() > 0
    # swapping the table drops what was cached from the old one
    lines = [atlas.summary(i) for i in range(atlas.num_neurons)]
    atlas.set_calibration(None)
    assert atlas.calibration is None
    assert all("true on" not in atlas.summary(i) and "unsure" not in atlas.summary(i) for i in range(atlas.num_neurons))
    atlas.set_calibration(again)
    assert [atlas.summary(i) for i in range(atlas.num_neurons)] == lines
    with pytest.raises(ValueError, match="no batches"):
        activation_log([], sae, COLUMNS)


def _two_red_neurons(n: int = 600, seed: int = 2):
    """Two red detectors whose strong firings are all red. Neuron 0 fires only on red, at three levels (strong,
    typical, weak); neuron 1's typical firings (about 0.7× its mean) are all on blue images."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 2, (n,), generator=g)
    red = colour == 1
    u = torch.rand(n, generator=g)
    noise = lambda: 0.2 * torch.rand(n, generator=g)  # noqa: E731
    level0 = torch.where(u < 0.3, 8.0, torch.where(u < 0.7, 4.5, 1.0)) + noise()
    acts = torch.zeros(n, 2)
    acts[:, 0] = torch.where(red, level0, torch.zeros(n))
    acts[:, 1] = torch.where((torch.rand(n, generator=g) < 0.5), torch.where(red, 8.0, 4.5) + noise(), torch.zeros(n))
    return acts, {"shape": shape, "colour": colour}


def test_an_image_gets_a_neurons_names_only_in_a_firing_regime_where_they_were_checked(tmp_path):
    acts, labels = _two_red_neurons()
    config = AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.2, 0.6), prior_pairs=0))
    build_atlas([(acts, labels, torch.arange(acts.shape[0]))], label_columns=COLUMNS, config=config, out=tmp_path / "a")
    atlas = NeuronAtlas.load(tmp_path / "a")
    cal = atlas.calibration
    assert cal.version == 3 and cal.config.regimes == [1.2, 0.6]
    assert [e.value for e in atlas.explanation(0)] == ["red"] == [e.value for e in atlas.explanation(1)]
    mean = atlas.stats["mean_activation"]
    # the held-out records per regime: neuron 0's typical firings are all red, neuron 1's none
    t0, n0 = cal.neuron_record(0, "colour", regime=1)
    t1, n1 = cal.neuron_record(1, "colour", regime=1)
    assert n0 > 50 and t0 == n0 and n1 > 50 and t1 == 0
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_explain.py"))
    for j in (0, 1):  # a strong firing: the summary itself
        strong = 1.3 * float(mean[j])
        assert atlas.names_on_image(j, strong) == atlas.explanation(j)
        assert atlas.summary_on_image(j, strong) == atlas.summary(j)
    # a typical firing: neuron 0 keeps its name with the figure of that regime; neuron 1 names nothing
    typical0 = atlas.names_on_image(0, 0.9 * float(mean[0]))
    assert [e.value for e in typical0] == ["red"] and typical0[0].held_out == pytest.approx(1.0)
    line0 = atlas.summary_on_image(0, 0.9 * float(mean[0]))
    assert line0.startswith("red (colour) · true on 100% of held-out images it fires 0.6–1.2× its usual on")
    assert bench["named_values"](line0) == ["red"]
    assert atlas.names_on_image(1, 0.9 * float(mean[1])) == []
    line1 = atlas.summary_on_image(1, 0.9 * float(mean[1]))
    assert line1.startswith("not named here: fires 0.9× its usual, where its names held too rarely on held-out images; "
                            "where it fires ≥ 1.2×: red (colour)")
    assert bench["named_values"](line1) == []
    # weaker than every regime: nothing is named
    weak = atlas.summary_on_image(0, 0.5 * float(mean[0]))
    assert atlas.names_on_image(0, 0.5 * float(mean[0])) == []
    assert weak.startswith("not named here: fires weakly (0.5× its usual); where it fires ≥ 1.2×: red (colour)")
    assert bench["named_values"](weak) == []
    # the ratio shown is floored: a firing just under the typical regime's edge must not read as at it
    assert atlas.summary_on_image(0, 0.599 * float(mean[0])).startswith("not named here: fires weakly (0.5× its usual)")
    # the table round-trips; one regime = the version-2 rule (weaker firings name nothing)
    stored = json.loads((tmp_path / "a" / ATLAS_FILE).read_text())["claim_calibration"]
    assert ClaimCalibration.from_dict(stored).to_dict() == stored
    only = build_atlas([(acts, labels, torch.arange(acts.shape[0]))], label_columns=COLUMNS,
                       config=AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.2,), prior_pairs=0)))
    assert only.names_on_image(0, 0.9 * float(mean[0])) == []
    # an uncalibrated atlas and a neuron that names nothing withhold nothing
    old, _, _ = _atlas(tmp_path / "old", calibration=None)
    assert old.summary_on_image(0, 1e-6) == old.summary(0) and old.names_on_image(0, 1e-6) == old.explanation(0)
    plain, _, _ = _atlas(tmp_path / "plain")
    assert plain.explanation(1) == [] and plain.summary_on_image(1, 0.01) == plain.summary(1)
    with pytest.raises(ValueError, match="regimes"):
        CalibrationConfig(regimes=(1.0, 1.5))


def test_a_neuron_that_never_fires_strongly_is_summarised_from_its_typical_firings(tmp_path):
    """A clean red detector that fires about equally wherever it fires (as pooled SAEs' neurons do) is never
    measured on strong firings; its summary must name red from its typical firings, say so, and name nothing on a
    strong firing, where it was never checked."""
    g = torch.Generator().manual_seed(3)
    n = 600
    colour = torch.randint(0, 2, (n,), generator=g)
    shape = torch.randint(0, 3, (n,), generator=g)
    flat = torch.where(colour == 1, 1.0 + 0.1 * torch.rand(n, generator=g), torch.zeros(n))
    config = AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.2, 0.6), prior_pairs=0))
    atlas = build_atlas([(flat[:, None], {"shape": shape, "colour": colour}, torch.arange(n))], label_columns=COLUMNS,
                        config=config, out=tmp_path / "a")
    cal, mean = atlas.calibration, float(atlas.stats["mean_activation"][0])
    assert cal.neuron_record(0, "colour", regime=0)[1] == 0 and cal.neuron_record(0, "colour", regime=1)[1] > 100
    named = atlas.explanation(0)
    assert [e.value for e in named] == ["red"] and named[0].held_out == pytest.approx(1.0)
    assert atlas.summary(0).startswith("red (colour) · true on 100% of held-out images it fires 0.6–1.2× its usual on")
    assert NeuronAtlas.load(tmp_path / "a").summary(0) == atlas.summary(0)
    # a typical firing: the summary itself; a strong one (never checked) and a weak one name nothing
    assert atlas.summary_on_image(0, mean) == atlas.summary(0) and atlas.names_on_image(0, mean) == named
    assert atlas.names_on_image(0, 1.5 * mean) == [] and atlas.names_on_image(0, 0.3 * mean) == []
    assert atlas.summary_on_image(0, 1.5 * mean).startswith(
        "not named here: fires 1.5× its usual, where too few held-out images checked its names; where it fires "
        "0.6–1.2×: red (colour)")
    # with strong firings required alone (one regime) it stays unsure, as before
    strict = build_atlas([(flat[:, None], {"shape": shape, "colour": colour}, torch.arange(n))],
                         label_columns=COLUMNS, config=AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.2,))))
    assert strict.explanation(0) == [] and strict.summary(0).startswith("unsure: red (colour)? too few held-out")


def test_an_image_gets_the_names_checked_in_its_own_firing_regime(tmp_path):
    """A neuron whose strong firings are circles of any colour (red ones strongest) and whose typical firings are
    red squares and stars (as a pooled SAE's background detector fires strongly on small shapes): the summary names
    circle (red held on half its strong firings); on a typical firing the image gets red, checked there, not "not
    named here" nor circle."""
    g = torch.Generator().manual_seed(4)
    n = 900
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 2, (n,), generator=g)
    jitter = 0.1 * torch.rand(n, generator=g)
    circle = 5.0 + 0.5 * colour + jitter  # red circles top the neuron's top images
    act = torch.where(shape == 0, circle, torch.where(colour == 1, 1.0 + jitter, torch.zeros(n)))
    config = AtlasConfig(claim_calibration=CalibrationConfig(regimes=(1.5, 0.3), prior_pairs=0))
    atlas = build_atlas([(act[:, None], {"shape": shape, "colour": colour}, torch.arange(n))], label_columns=COLUMNS,
                        config=config, out=tmp_path / "a")
    mean = float(atlas.stats["mean_activation"][0])
    assert [e.value for e in atlas.explanation(0)] == ["circle"]
    assert atlas.summary(0).startswith("circle (shape) · true on 100% of held-out images it fires strongly on")
    assert atlas.names_on_image(0, 5.0) == atlas.explanation(0) and atlas.summary_on_image(0, 5.0) == atlas.summary(0)
    typical = atlas.names_on_image(0, 1.05)
    assert 0.3 < 1.05 / mean < 1.5 and [e.value for e in typical] == ["red"] and typical[0].held_out == pytest.approx(1.0)
    assert atlas.summary_on_image(0, 1.05).startswith(
        "red (colour) · true on 100% of held-out images it fires 0.3–1.5× its usual on")
    assert atlas.names_on_image(0, 0.2 * mean) == []
    # which neurons the app ever calls a value: red only on typical firings still counts; square, never named
    assert atlas.neurons_naming("circle") == [0] and atlas.neurons_naming("red") == [0]
    assert atlas.neurons_naming("square") == [] and atlas.neurons_naming("blue") == []


def test_why_note_says_when_no_single_neuron_moves_the_class():
    """At the toy bottleneck Diff-C answers with P ≈ 1 and single removals barely move it: the note must say the
    bars' order says little; at down_ft1 single neurons move P by tens of points and the note must not."""
    from revelio_hub.app import attribution_view as V
    from revelio_hub.app.state import AppConfig, AppState

    release = app_release_path()
    state = AppState.from_config(AppConfig(releases=[str(release)]))
    star = str(Path(release) / "examples" / "star.png")
    seen = set()
    for layer, t in (("bottleneck", 25), ("down_ft1", 25)):
        view = V.attribute_image(state, star, layer, t)
        largest = float(view.attribution.effects_prob.abs().max())
        saturated = largest < V.SATURATED_EFFECT
        assert ("No single neuron's removal changes P(" in V.why_note(view)) == saturated
        seen.add(saturated)
    assert seen == {True, False}  # the bundled release shows both cases


def test_why_says_when_no_charted_neuron_is_named_for_the_class():
    """The bars answer "whose removal lowers P(star)?", often a size neuron: the note must say when none of the
    charted neurons pushing the class up is named for it on this image (each neuron's names checked against the
    atlas for the way it fires here), and when no neuron of the layer is named for it at all; quiet otherwise."""
    from revelio_hub.app import attribution_view as V
    from revelio_hub.app.state import AppConfig, AppState

    release = app_release_path()
    state = AppState.from_config(AppConfig(releases=[str(release)]))
    seen = set()
    for layer in ("down_ft1", "bottleneck"):
        atlas = state.get_release().entry(layer, 25).atlas
        for shape in ("star", "circle", "cross", "square"):
            view = V.attribute_image(state, str(Path(release) / "examples" / f"{shape}.png"), layer, 25)
            name = view.attribution.target_name
            up = [r for r in V._chart_rows(view, V.CHART_BARS) if r["effect_prob"] > 0]
            named = [r["neuron"] for r in up
                     if name in [e.value for e in atlas.names_on_image(r["neuron"], r["activation"])]]
            layer_wide = sum(name in [e.value for e in atlas.names_on_image(i, a * float(atlas.stats["mean_activation"][i]))]
                             for i in range(atlas.num_neurons) for a in (1.0, 1.6))
            note, payload = V.why_note(view), view.to_json()
            assert (payload["class_neurons"] == 0) == (layer_wide == 0)
            assert ("No neuron of this layer is named " + name in note) == (layer_wide == 0)
            unnamed = bool(up) and not named and layer_wide > 0
            assert (f"None of the charted neurons pushing {name} up is named {name}" in note) == unnamed
            assert {r["neuron"] for r in payload["neurons"] if r["names_class"]} >= set(named)
            for r in payload["neurons"]:  # every measured neuron's flag is its names on this image
                assert r["names_class"] == (name in [e.value for e in atlas.names_on_image(r["neuron"], r["activation"])])
            seen.add("none in layer" if layer_wide == 0 else "unnamed" if unnamed else "named" if named else "-")
    assert {"none in layer", "unnamed", "named"} <= seen  # the bundled release shows each case


def test_an_unsure_figure_just_under_the_floor_never_reads_as_the_floor():
    """0.8996 was shown as "held on 90%" beside "unsure", as if it had met the 90% floor; it must read 89%."""
    from revelio_hub.interpret.neuron_labels import ValueEvidence, summary_text

    unsure = ValueEvidence("colour", "red", 0.95, 9, 10, held_out=0.8996)
    line = summary_text([], 0.3, 100, unsure=unsure)
    assert line.startswith("unsure: red (colour)? claims like it held on 89% of held-out images it fires strongly on")
    named = summary_text([ValueEvidence("colour", "red", 0.95, 9, 10, held_out=0.9996)], 0.3, 100)
    assert named.startswith("red (colour) · true on 100% of held-out")  # named figures are at the floor or above
