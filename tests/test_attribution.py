"""Neuron attribution, deletion curves, image comparison and the concept map (revelio_hub.interpret).

Attribution is checked against a brute-force re-run: encode with the SAE, zero
one neuron, decode, add the reconstruction error back, run Diff-C. Runs on the
bundled toy release's first Diff-C entry with a token SAE; a pooled SAE is built here, and the release's own
pooled SAEs are checked too.
"""

from __future__ import annotations

import math

import pytest
import torch
from app_inputs import app_release_path  # noqa: E402

from revelio_hub.diffc.model import DiffC  # noqa: E402
from revelio_hub.interpret import (  # noqa: E402
    attribute,
    compare,
    concept_map,
    deletion_curve,
    encode_codes,
    label_values,
    remove_neurons,
)
from revelio_hub.interpret.metrics import spearman  # noqa: E402
from revelio_hub.release import Release  # noqa: E402
from revelio_hub.sae.model import KSparseAutoencoder  # noqa: E402


@pytest.fixture(scope="module")
def release() -> Release:
    return Release.from_pretrained(app_release_path())


def _diffc_entry(release: Release, granularity: str):
    """The release's first Diff-C entry whose SAE has ``granularity`` (skips when it has none)."""
    for layer, t in release.diffc_entries:
        entry = release.load(layer, t)
        if entry.sae.granularity == granularity:
            return entry
    pytest.skip(f"the release has no Diff-C entry with a {granularity} SAE")


def _held_out_maps(release: Release, entry) -> torch.Tensor:
    """Diff-C input maps of four held-out toy images (seed 11: not a seed the release was built with)."""
    from revelio_hub.toy.shapes import make_shapes_dataset

    backbone = release.load_backbone()
    images = [row["image"] for row in make_shapes_dataset(4, seed=11, image_size=backbone.image_size)]
    recipe = entry.diffc.recipe or {}
    with torch.no_grad():
        out = backbone.extract(images, [entry.layer], [entry.timestep], seed=int(recipe.get("noise_seed") or 0))
    return out[(entry.layer, entry.timestep)].float()


@pytest.fixture(scope="module")
def entry(release):
    return _diffc_entry(release, "token")


@pytest.fixture(scope="module")
def features(release, entry) -> torch.Tensor:
    return _held_out_maps(release, entry)


def brute_force_token(sae, diffc, x: torch.Tensor, neuron: int, target: int) -> tuple[float, float]:
    """(prob effect, logit effect) of zeroing ``neuron`` at every position, by decode + error + Diff-C."""
    with torch.no_grad():
        vals, idx = sae.encode(x)
        error = x - sae.decode(vals, idx).permute(0, 3, 1, 2)
        removed = vals.masked_fill(idx == neuron, 0.0)
        ablated = sae.decode(removed, idx).permute(0, 3, 1, 2) + error
        logits = diffc.eval()(torch.cat([x, ablated]))
    probs = logits.softmax(1)[:, target]
    return float(probs[0] - probs[1]), float(logits[0, target] - logits[1, target])


def brute_force_pooled(sae, diffc, x: torch.Tensor, neuron: int, target: int) -> tuple[float, float]:
    """Same for a pooled SAE: the mean is re-decoded without the neuron (error kept); every position shifts alike."""
    with torch.no_grad():
        mean = x.mean(dim=(2, 3))
        vals, idx = sae.encode(mean)
        error = mean - sae.decode(vals, idx)
        new_mean = sae.decode(vals.masked_fill(idx == neuron, 0.0), idx) + error
        ablated = x + (new_mean - mean)[:, :, None, None]
        logits = diffc.eval()(torch.cat([x, ablated]))
    probs = logits.softmax(1)[:, target]
    return float(probs[0] - probs[1]), float(logits[0, target] - logits[1, target])


def pooled_sae(d_in: int, maps: torch.Tensor, scale: float) -> KSparseAutoencoder:
    torch.manual_seed(0)
    sae = KSparseAutoencoder(d_in, 96, k=6, granularity="pooled", input_norm={"scale": scale})
    with torch.no_grad():
        sae.b_pre.copy_(maps.mean(dim=(0, 2, 3)) * scale)  # centred inputs: a realistic mix of active neurons
    return sae.eval()


# ------------------------------------------------------------------- attribution


def test_token_attribution_equals_brute_force(entry, features):
    results = entry.attribute(features[:2], top=None)
    for x, res in zip(features[:2], results):
        assert len(res) == len(res.all_neurons) > 5  # top=None measures every active neuron
        for j, (n, ep, el) in enumerate(zip(res.neurons.tolist(), res.effects_prob.tolist(), res.effects_logit.tolist())):
            bp, bl = brute_force_token(entry.sae, entry.diffc, x[None], n, res.target)
            assert ep == pytest.approx(bp, abs=2e-6), (n, j)
            assert el == pytest.approx(bl, abs=2e-5), (n, j)
        # the atlas line of each measured neuron comes along, as it applies to this image
        assert res.summaries == [entry.atlas.summary_on_image(n, float(x))
                                 for n, x in zip(res.neurons.tolist(), res.activations.tolist())]


def test_pooled_attribution_equals_brute_force(entry, features):
    sae = pooled_sae(entry.sae.d_in, features, entry.sae.scale)
    results = attribute(sae, entry.diffc, features[:2], top=None)
    for x, res in zip(features[:2], results):
        assert len(res) >= 3
        dense = sae.image_activations(x[None])[0].detach()
        assert torch.allclose(res.activations, dense[res.neurons], atol=1e-6)
        for n, ep, el in zip(res.neurons.tolist(), res.effects_prob.tolist(), res.effects_logit.tolist()):
            bp, bl = brute_force_pooled(sae, entry.diffc, x[None], n, res.target)
            assert ep == pytest.approx(bp, abs=2e-6)
            assert el == pytest.approx(bl, abs=2e-5)


def test_a_released_pooled_sae_attribution_equals_brute_force(release):
    """The bundled release's pooled SAEs (down_ft1, up_ft1) go through the same exact attribution."""
    entry = _diffc_entry(release, "pooled")
    maps = _held_out_maps(release, entry)
    for x, res in zip(maps[:2], entry.attribute(maps[:2], top=None)):
        assert len(res) == len(res.all_neurons) >= 3
        for n, ep, el in zip(res.neurons.tolist(), res.effects_prob.tolist(), res.effects_logit.tolist()):
            bp, bl = brute_force_pooled(entry.sae, entry.diffc, x[None], n, res.target)
            assert ep == pytest.approx(bp, abs=2e-6) and el == pytest.approx(bl, abs=2e-5)


def test_nothing_removed_is_the_plain_prediction(entry, features):
    probs = entry.diffc.predict_proba(features)
    logits = entry.diffc.eval()(features).detach()
    for i, res in enumerate(entry.attribute(features, top=3)):
        assert res.target == res.predicted == int(probs[i].argmax())
        assert res.target_name == entry.diffc.class_names[res.target]
        assert res.prob == pytest.approx(float(probs[i, res.target]), abs=1e-6)
        assert res.logit == pytest.approx(float(logits[i, res.target]), abs=1e-5)
    codes = encode_codes(entry.sae, features[:1])[0]
    assert torch.equal(remove_neurons(codes, features[0], [[]])[0], features[0])
    inactive = sorted(set(range(entry.sae.n_latents)) - set(codes.neurons.tolist()))[:3]
    assert torch.equal(remove_neurons(codes, features[0], [inactive])[0], features[0])


def test_batched_equals_one_by_one_and_top_picks_largest_estimates(entry, features):
    batched = entry.attribute(features, top=4)
    for i, res in enumerate(batched):
        alone = entry.attribute(features[i], top=4)[0]
        assert torch.equal(res.neurons, alone.neurons)
        assert torch.allclose(res.effects_prob, alone.effects_prob, atol=1e-6)
        # the measured neurons are those with the largest |estimate|, and their estimates agree with the full list
        assert torch.equal(res.neurons, res.all_neurons[:4])
        assert res.all_estimates_prob.abs().tolist() == sorted(res.all_estimates_prob.abs().tolist(), reverse=True)
        assert math.isnan(res.spearman) or -1 <= res.spearman <= 1
        up, down = res.pushing("up"), res.pushing("down")
        assert all(r["effect_prob"] > 0 for r in up) and all(r["effect_prob"] < 0 for r in down)
        assert len(up) + len(down) <= len(res)


def test_estimate_is_exact_for_a_linear_head(entry, features):
    """Gradient × activation is a first-order expansion: for a linear head's logits it is exact."""
    torch.manual_seed(0)
    head = DiffC(entry.sae.d_in, entry.diffc.class_names, head="linear").eval()
    res = attribute(entry.sae, head, features[:1], top=None)[0]
    assert torch.allclose(res.estimates_logit, res.effects_logit, atol=1e-4, rtol=1e-4)
    # ranks agree but for float ties: one swap of two near-equal neurons among ~100 costs about 1e-6
    assert res.spearman_logit == pytest.approx(1.0, abs=1e-5)


def test_targets_and_errors(release, entry, features):
    name = entry.diffc.class_names[2]
    res = entry.attribute(features[:2], target=name, top=2)
    assert [r.target for r in res] == [2, 2] and res[0].target_name == name
    per_image = entry.attribute(features[:2], target=[0, 1], top=2)
    assert [r.target for r in per_image] == [0, 1]
    with pytest.raises(ValueError, match="Unknown class 'zebra'"):
        entry.attribute(features[:1], target="zebra")
    with pytest.raises(ValueError, match="one per image"):
        entry.attribute(features[:2], target=[0, 1, 2])
    with pytest.raises(ValueError, match="top must be"):
        entry.attribute(features[:1], top=-1)
    with pytest.raises(ValueError, match="channels"):
        entry.attribute(features[:1, :10])
    without = [(l, t) for l, t in release.entries if (l, t) not in release.diffc_entries]
    if without:
        bare = release.load(*without[0], load_atlas=False)
        first = release.diffc_entries[0][0]
        with pytest.raises(ValueError, match=r"no Diff-C head.*Entries with both a k-SAE and a Diff-C: " + first):
            bare.attribute(features[:1])


# --------------------------------------------------------------- deletion curves


def test_deletion_curve_matches_cumulative_removal(entry, features):
    x = features[0]
    codes = encode_codes(entry.sae, x)[0]
    order = codes.neurons[torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))].tolist()[:6]
    curve = deletion_curve(entry.diffc, codes, x, order)
    assert curve.probs[0] == pytest.approx(float(entry.diffc.predict_proba(x[None])[0].max()), abs=1e-6)
    maps = remove_neurons(codes, x, [order[:k] for k in range(len(order) + 1)])
    direct = entry.diffc.predict_proba(maps)[:, curve.target]
    assert torch.allclose(curve.probs, direct, atol=1e-6)
    assert curve.aopc(3) == pytest.approx(float((direct[0] - direct[:4]).mean()), abs=1e-6)
    flip = curve.flip()
    assert flip is None or int(curve.predictions[flip]) != curve.target


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.894427, abs=1e-5)  # ties: average ranks
    assert math.isnan(spearman(a, torch.ones(4))) and math.isnan(spearman(a[:1], a[:1]))


# --------------------------------------------------------------------- compare


def test_compare_directions_match_activations(entry, features):
    result = compare(entry.sae, features[0], features[1], top=5, atlas=entry.atlas)
    a = entry.sae.image_activations(features[:1])[0].detach()
    b = entry.sae.image_activations(features[1:2])[0].detach()
    assert result.first and result.second
    for d in result.first:
        assert d.difference > 0 and d.first == pytest.approx(float(a[d.neuron])) and d.second == pytest.approx(float(b[d.neuron]))
        # the atlas line as it applies where the neuron fires more of the two images
        assert d.summary == entry.atlas.summary_on_image(d.neuron, max(d.first, d.second))
    for d in result.second:
        assert d.difference < 0 and d.second > d.first
    # largest differences first, and nothing larger was left out
    diffs = [d.difference for d in result.first]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] == pytest.approx(float((a - b).max()))
    assert result.second[0].difference == pytest.approx(float((a - b).min()))
    assert result.shared == int(((a > 0) & (b > 0)).sum())
    same = compare(entry.sae, features[0], features[0])
    assert same.first == [] and same.second == []


# ----------------------------------------------------------------- concept map


class StubAtlas:
    """The multi-label atlas contract (label_columns, value_auroc, search) with known numbers."""

    def __init__(self, columns: dict[str, list[str]], scores: dict[str, torch.Tensor]) -> None:
        self.label_columns = columns
        self._scores = scores

    def value_auroc(self, column: str) -> torch.Tensor:
        return self._scores[column]

    def search(self, value, column=None, limit=20):
        v = self.label_columns[column].index(value)
        scores = self.value_auroc(column)[:, v]
        order = torch.argsort(scores, descending=True)[:limit].tolist()
        return [{"neuron": i, "column": column, "value": value, "auroc": float(scores[i]), "precision": 0.0} for i in order]


def test_concept_map_picks_the_best_neuron_per_entry():
    torch.manual_seed(0)
    columns = {"shape": ["circle", "star"], "background": ["dark", "stripes"]}
    atlases, expected = {}, {}
    for layer in ("down", "mid"):
        for t in (25, 100):
            scores = {c: torch.rand(50, len(v)) for c, v in columns.items()}
            atlases[(layer, t)] = StubAtlas(columns, scores)
            best = int(scores["background"][:, 1].argmax())
            expected[(layer, t)] = (best, float(scores["background"][best, 1]))
    atlases[("up", 25)] = None  # an entry without an atlas
    cmap = concept_map(atlases, "stripes")
    assert cmap.column == "background" and cmap.layers == ["down", "mid", "up"] and cmap.timesteps == [25, 100]
    for (layer, t), (neuron, score) in expected.items():
        assert cmap.cell(layer, t) == (neuron, pytest.approx(score))
    assert math.isnan(cmap.cell("up", 25)[1]) and cmap.cell("up", 25)[0] == -1
    best = max(expected.items(), key=lambda kv: kv[1][1])
    assert cmap.best() == (best[0][0], best[0][1], best[1][0], pytest.approx(best[1][1]))
    assert cmap.to_dict()["auroc"][2][1] is None
    assert label_values(atlases) == columns
    with pytest.raises(ValueError, match="No label column has the value 'plaid'"):
        concept_map(atlases, "plaid")
    with pytest.raises(ValueError, match="not a value of 'shape'"):
        concept_map(atlases, "stripes", column="shape")
