"""Neuron atlas: streaming statistics, purity on planted neurons, folder round trip, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from revelio_hub.interpret.atlas_builder import build_atlas
from revelio_hub.interpret.atlas_config import ATLAS_FILE, STATS_FILE, AtlasConfig
from revelio_hub.interpret.atlas_model import NeuronAtlas
from revelio_hub.interpret.atlas_statistics import TopKAccumulator
from process_group import run_group

CLASSES = ["circle", "square", "triangle", "star"]


def _batches(acts: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
    ids = torch.arange(acts.shape[0])
    start = 0
    for size in sizes:
        yield acts[start : start + size], labels[start : start + size], ids[start : start + size]
        start += size
    assert start == acts.shape[0]


def _image(image_id: int) -> Image.Image:
    """A distinct solid-colour 200×160 image per id (so thumbnails can be told apart)."""
    return Image.new("RGB", (200, 160), ((37 * image_id) % 256, (91 * image_id) % 256, (13 * image_id) % 256))


def _planted(n_images: int = 120, n_latents: int = 12, seed: int = 0):
    """Sparse random activations, with neuron 3 firing only on 'triangle' images and neuron 7 dead."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_images) % len(CLASSES)
    acts = torch.rand(n_images, n_latents, generator=g) * (torch.rand(n_images, n_latents, generator=g) < 0.3)
    acts[:, 3] = torch.where(labels == 2, 1.0 + torch.rand(n_images, generator=g), torch.zeros(n_images))
    acts[:, 7] = 0.0
    return acts, labels


def test_streaming_topk_equals_dense_topk():
    g = torch.Generator().manual_seed(1)
    n_images, n_latents, top_n = 203, 50, 7
    acts = torch.relu(torch.randn(n_images, n_latents, generator=g))
    labels = torch.randint(0, 4, (n_images,), generator=g)
    acc = TopKAccumulator(n_latents, top_n)
    for x, y, ids in _batches(acts, labels, [3, 64, 1, 100, 35]):  # batches smaller and larger than top_n
        acc.update(x, y, ids)
        assert acc.values.shape == (top_n, n_latents)  # state never grows with the number of images
    res = acc.result()

    dense_vals, dense_ids = torch.topk(acts, top_n, dim=0)
    dense_vals, dense_ids = dense_vals.T, dense_ids.T
    fired = dense_vals > 0
    assert torch.equal(res["top_image_ids"], torch.where(fired, dense_ids, torch.full_like(dense_ids, -1)))
    assert torch.allclose(res["top_activations"], torch.where(fired, dense_vals, torch.zeros_like(dense_vals)))
    assert torch.equal(res["top_labels"], torch.where(fired, labels[dense_ids], torch.full_like(dense_ids, -1)))
    assert torch.allclose(res["frequency"], (acts > 0).float().mean(0))
    mean_when_active = acts.sum(0) / (acts > 0).sum(0).clamp_min(1)
    assert torch.allclose(res["mean_activation"], mean_when_active, atol=1e-6)


def test_merging_two_accumulators_equals_one_pass():
    g = torch.Generator().manual_seed(2)
    acts = torch.relu(torch.randn(90, 20, generator=g))
    labels = torch.randint(0, 3, (90,), generator=g)
    ids = torch.arange(90)
    whole = TopKAccumulator(20, 5)
    whole.update(acts, labels, ids)
    a, b = TopKAccumulator(20, 5), TopKAccumulator(20, 5)
    a.update(acts[::2], labels[::2], ids[::2])
    b.update(acts[1::2], labels[1::2], ids[1::2])
    a.merge(TopKAccumulator.from_state(b.state()))
    for key, value in whole.result().items():
        assert torch.allclose(value.double(), a.result()[key].double()), key
    assert a.num_images == 90


def test_planted_class_neuron_is_pure_and_finds_its_images(tmp_path):
    acts, labels = _planted()
    # uncalibrated summaries (120 images are too few to check claims on held-out folds: tests/test_claims.py)
    atlas = build_atlas(_batches(acts, labels, [50, 50, 20]), CLASSES, thumbnails=_image, out=tmp_path / "atlas",
                        config=AtlasConfig(claim_calibration=None))

    # The planted neuron: purity 0 (all top-10 share one class id), entropy 0, right images in order.
    info = atlas.neuron(3)
    assert info.purity == 0.0 and info.entropy == 0.0
    expected = torch.argsort(acts[:, 3], descending=True)[:20].tolist()
    assert info.top_image_ids == expected
    assert set(info.top_labels) == {"triangle"}
    assert info.frequency == pytest.approx(0.25)
    assert atlas.summary(3).startswith("triangle · AUROC 1.00 · 10/10 top images")
    assert atlas.label_histogram(3) == {"triangle": 10}
    assert atlas.neurons_for_class("triangle", min_fraction=1.0) == [3]
    assert atlas.sorted_neurons("purity")[0] == 3

    # Mixed neurons are less pure; dead neurons are listed and excluded from the summary.
    assert all(atlas.neuron(i).purity > 0 for i in range(12) if i not in (3, 7))
    assert atlas.dead_neurons == [7]
    assert atlas.neuron(7).dead and "dead" in atlas.summary(7)
    assert 7 not in atlas.sorted_neurons("frequency")
    s = atlas.summary_stats
    assert s["dead_count"] == 1 and s["num_neurons"] == 12
    alive_purity = torch.stack([torch.tensor(atlas.neuron(i).purity) for i in range(12) if i != 7])
    assert s["mean_purity"] == pytest.approx(float(alive_purity.mean()), rel=1e-5)

    # Top images come back as 128-px thumbnails of the right images, from the folder alone.
    loaded = NeuronAtlas.load(tmp_path / "atlas")
    top = loaded.top_images(3, 5)
    assert [label for _, label, _ in top] == ["triangle"] * 5
    assert [a for _, _, a in top] == pytest.approx(acts[expected[:5], 3].tolist())
    thumb = top[0][0]
    assert thumb.size == (128, 128)
    assert thumb.getpixel((64, 64)) == pytest.approx(_image(expected[0]).getpixel((0, 0)), abs=6)
    stored = {p.stem for p in (tmp_path / "atlas" / "thumbnails").iterdir()}
    referenced = {i for i in loaded.stats["top_image_ids"].flatten().tolist() if i >= 0}
    assert stored == {str(i) for i in referenced}  # only referenced images are stored
    assert json.loads((tmp_path / "atlas" / ATLAS_FILE).read_text())["class_names"] == CLASSES


def test_rarely_firing_neuron_lists_only_its_images():
    acts = torch.zeros(30, 2)
    acts[[4, 9, 17], 0] = torch.tensor([0.5, 2.0, 1.0])
    acts[:, 1] = torch.linspace(0.1, 1, 30)
    labels = torch.tensor([i % 3 for i in range(30)])
    atlas = build_atlas([(acts, labels, torch.arange(30))], ["a", "b", "c"])
    info = atlas.neuron(0)
    assert info.top_image_ids == [9, 17, 4]
    assert info.top_labels == ["a", "c", "b"]
    assert info.purity == pytest.approx(torch.tensor([0.0, 2.0, 1.0]).std(unbiased=False).item())
    assert len(atlas.top_images(0, 10)) == 3


def test_build_from_sae_and_feature_batches_matches_activations():
    from revelio_hub.sae.model import KSparseAutoencoder

    torch.manual_seed(0)
    sae = KSparseAutoencoder(d_in=8, n_latents=32, k=4)
    features = torch.randn(40, 8, 3, 3)  # maps: a pooled SAE mean-pools them itself
    labels = torch.arange(40) % 2
    ids = torch.arange(40)
    batches = [(features[i : i + 16], labels[i : i + 16], ids[i : i + 16]) for i in range(0, 40, 16)]
    via_sae = build_atlas(batches, ["a", "b"], sae=sae, config=AtlasConfig(top_n=5, purity_top=5))
    with torch.no_grad():
        acts = sae.image_activations(features)
    direct = build_atlas([(acts, labels, ids)], ["a", "b"], config=AtlasConfig(top_n=5, purity_top=5))
    assert torch.equal(via_sae.stats["top_image_ids"], direct.stats["top_image_ids"])
    assert torch.allclose(via_sae.stats["frequency"], direct.stats["frequency"])


def test_heatmap_overlays_for_top_images(tmp_path):
    from revelio_hub.sae.model import KSparseAutoencoder

    torch.manual_seed(0)
    sae = KSparseAutoencoder(d_in=8, n_latents=16, k=4, granularity="token")
    maps = torch.randn(12, 8, 4, 4)
    atlas = build_atlas([(maps, torch.zeros(12, dtype=torch.long), torch.arange(12))], ["x"], sae=sae,
                        thumbnails=_image, heatmap_maps=lambda ids: maps[list(ids)], heatmap_neurons=[0, 1],
                        config=AtlasConfig(top_n=3, purity_top=3), out=tmp_path / "a")
    loaded = NeuronAtlas.load(tmp_path / "a")
    for i in loaded.meta["heatmap_neurons"]:
        first = loaded.neuron(i).top_image_ids[0]
        overlay = loaded.heatmap(i, first)
        assert overlay is not None and overlay.size == (128, 128)
        assert loaded.top_images(i, 1, heatmaps=True)[0][0].tobytes() == overlay.tobytes()


def test_bad_queries_name_what_is_valid():
    acts, labels = _planted(n_images=40)
    atlas = build_atlas([(acts, labels, torch.arange(40))], CLASSES)
    with pytest.raises(ValueError, match=r"neurons 0\.\.11"):
        atlas.neuron(12)
    with pytest.raises(ValueError, match="frequency"):
        atlas.sorted_neurons(by="loudness")
    with pytest.raises(ValueError, match="circle"):
        atlas.neurons_for_class("hexagon")
    with pytest.raises(ValueError, match="class names"):
        build_atlas([(acts, labels + 10, torch.arange(40))], CLASSES)
    with pytest.raises(ValueError, match="no batches"):
        build_atlas([], CLASSES)


def test_missing_or_corrupt_atlas_files_are_named(tmp_path):
    acts, labels = _planted(n_images=40)
    folder = tmp_path / "atlas"
    build_atlas([(acts, labels, torch.arange(40))], CLASSES, out=folder)
    stats = folder / STATS_FILE
    data = stats.read_bytes()
    stats.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=STATS_FILE):
        NeuronAtlas.load(folder)
    (folder / ATLAS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=ATLAS_FILE):
        NeuronAtlas.load(folder)
    stats.unlink()
    with pytest.raises(FileNotFoundError, match=STATS_FILE):
        NeuronAtlas.load(folder)


@pytest.mark.slow  # runs training/build_atlas.py: 50 s on a loaded 2-core machine
def test_build_atlas_script_on_a_feature_store(tmp_path):
    """training/build_atlas.py end to end: imagefolder → store (spatial) → token SAE → atlas with thumbnails + heat maps."""
    import runpy
    import sys
    from pathlib import Path
    from tiny_models import make_tiny_pixel

    from revelio_hub.backbones import load_backbone
    from revelio_hub.features import FeatureStore, extract_to_store
    from revelio_hub.sae.model import KSparseAutoencoder

    images = tmp_path / "images"
    for c, colour in (("reds", (200, 30, 30)), ("blues", (30, 30, 200))):
        (images / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (36, 36), tuple(max(0, v - 15 * i) for v in colour)).save(images / c / f"{i}.png")
    backbone = load_backbone(str(make_tiny_pixel(tmp_path / "bb", image_size=32)))
    store = extract_to_store(backbone, str(images), tmp_path / "store", ["bottleneck"], [25], spatial=True,
                             progress=False)
    torch.manual_seed(0)
    recipe = FeatureStore(store.path).recipe("bottleneck", 25, "token").to_dict()
    KSparseAutoencoder(d_in=recipe["d_in"], n_latents=64, k=4, granularity="token", recipe=recipe).save_pretrained(
        tmp_path / "sae")

    main = runpy.run_path(str(Path(__file__).parents[1] / "training" / "build_atlas.py"))["main"]
    out = tmp_path / "atlas"
    assert main(["--store", str(store.path), "--layer", "bottleneck", "--timestep", "25", "--sae",
                 str(tmp_path / "sae"), "--out", str(out), "--top-n", "4", "--purity-top", "4",
                 "--heatmaps", "3", "--batch-size", "4", "--cpu"]) == 0
    atlas = NeuronAtlas.load(out)
    assert atlas.num_images == 10 and atlas.num_neurons == 64
    assert sorted(atlas.class_names) == ["blues", "reds"]
    assert atlas.meta["layer"] == "bottleneck" and atlas.meta["recipe"]["layer"] == "bottleneck"
    best = atlas.sorted_neurons()[0]
    assert atlas.top_images(best, 4)[0][0].size == (128, 128)
    assert len(list((out / "thumbnails").iterdir())) == len(
        {i for i in atlas.stats["top_image_ids"].flatten().tolist() if i >= 0})
    assert len(atlas.meta["heatmap_neurons"]) >= 1
    # a token SAE's atlas records where each neuron peaks on its top images ("where" in the summary)
    assert atlas.stats["top_peak_positions"].shape == atlas.stats["top_image_ids"].shape
    assert len(atlas.meta["peak_grid"]) == 2
    # Two processes (torchrun, gloo on CPU) split the images and merge their top-N: same atlas as one process.
    import os
    import subprocess

    two = tmp_path / "atlas2"
    script = Path(__file__).parents[1] / "training" / "build_atlas.py"
    run = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         "--store", str(store.path), "--layer", "bottleneck", "--timestep", "25", "--sae", str(tmp_path / "sae"),
         "--out", str(two), "--top-n", "4", "--purity-top", "4", "--batch-size", "3", "--cpu", "--no-thumbnails"],
        timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    merged = NeuronAtlas.load(two)
    assert merged.num_images == 10
    for key, value in atlas.stats.items():
        assert torch.allclose(value.double().nan_to_num(-1), merged.stats[key].double().nan_to_num(-1)), key
    # A pooled-only store cannot feed a token SAE: the script says why.
    with pytest.raises(SystemExit, match="spatial"):
        pooled = extract_to_store(backbone, str(images), tmp_path / "pooled", ["bottleneck"], [25], progress=False)
        main(["--store", str(pooled.path), "--layer", "bottleneck", "--timestep", "25", "--sae", str(tmp_path / "sae"),
              "--out", str(tmp_path / "x"), "--cpu"])


# ----------------------------------------------------------------------------- multi-label atlas, summaries


def _two_column_planted(n: int = 200, seed: int = 3):
    """Images with a shape and a colour; neuron 0 detects 'red', neuron 1 fires on every image (dense),
    neuron 2 is random noise, neuron 3 detects 'square' AND fires weakly on everything else."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 2, (n,), generator=g)
    acts = torch.zeros(n, 4)
    acts[:, 0] = torch.where(colour == 1, 1 + torch.rand(n, generator=g), torch.zeros(n))
    acts[:, 1] = 0.5 + 0.1 * torch.rand(n, generator=g)
    acts[:, 2] = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    acts[:, 3] = torch.where(shape == 1, 2 + torch.rand(n, generator=g), 0.1 * torch.rand(n, generator=g))
    return acts, {"shape": shape, "colour": colour}


COLUMNS = {"shape": ["circle", "square", "star"], "colour": ["blue", "red"]}


def test_multi_label_atlas_names_the_value_with_evidence_and_says_mixed_otherwise(tmp_path):
    acts, labels = _two_column_planted()
    ids = torch.arange(acts.shape[0])
    batches = [(acts[:120], {k: v[:120] for k, v in labels.items()}, ids[:120]),
               (acts[120:], {k: v[120:] for k, v in labels.items()}, ids[120:])]
    # the uncalibrated rule (atlases built before claim calibration); calibrated claims: tests/test_claims.py
    atlas = build_atlas(batches, label_columns=COLUMNS, out=tmp_path / "a", config=AtlasConfig(claim_calibration=None))
    atlas = NeuronAtlas.load(tmp_path / "a")  # everything below must survive the folder round trip

    assert atlas.label_columns == COLUMNS
    assert atlas.class_names == COLUMNS["shape"]  # first column = class column
    # AUROC over all images, checked against the rank formula for one (neuron, value)
    from revelio_hub.interpret.metrics import auroc

    auc = atlas.value_auroc("colour")
    assert auc.shape == (4, 2) and auc.dtype == torch.float32
    assert auc[0, 1].item() == pytest.approx(auroc(acts[:, 0], labels["colour"] == 1), abs=1e-6)
    assert atlas.value_auroc("shape")[3, 1].item() == pytest.approx(1.0)

    # The red detector is named in its colour column, with its numbers; the colour histogram sees it.
    assert atlas.summary(0).startswith("red (colour) · AUROC 1.00 · 10/10 top images")
    assert atlas.label_histogram(0, column="colour") == {"red": 10}
    assert [e.value for e in atlas.explanation(0)] == ["red"]
    # The square detector is named although it fires (weakly) on every image.
    assert atlas.summary(3).startswith("square (shape) · AUROC 1.00")
    # Noise and an always-on neuron name no value.
    for i in (1, 2):
        assert atlas.summary(i).startswith("mixed") and atlas.explanation(i) == []
        assert not any(v in atlas.summary(i) for vals in COLUMNS.values() for v in vals)
    assert atlas.dense_mask.tolist() == [False, True, False, True]  # fire on > 50% of images
    info = atlas.neuron(0)
    assert info.named_values[0]["value"] == "red" and not info.dense and info.best_auroc == pytest.approx(1.0)

    # Search: by value, optionally by column; AUROC descending; unknown values list the valid ones.
    hits = atlas.search("red")
    assert hits[0] == {"neuron": 0, "column": "colour", "value": "red", "auroc": 1.0, "precision": 1.0}
    assert [h["auroc"] for h in hits] == sorted((h["auroc"] for h in hits), reverse=True)
    assert atlas.search("square", column="shape", limit=1)[0]["neuron"] == 3
    with pytest.raises(ValueError, match="unknown label value 'purple'.*circle.*red"):
        atlas.search("purple")
    with pytest.raises(ValueError, match="unknown label column"):
        atlas.search("red", column="size")
    assert atlas.sorted_neurons("auroc")[:2] in ([0, 3], [3, 0])

    # Thresholds are data: stricter ones turn the weaker explanation into "mixed".
    from revelio_hub.interpret.neuron_labels import SummaryThresholds

    atlas.thresholds = SummaryThresholds(min_auroc=0.999, min_precision=1.0)
    assert atlas.summary(0).startswith("red (colour)")
    assert json.loads((tmp_path / "a" / ATLAS_FILE).read_text())["format_version"] == 2


def test_sigma_label_follows_the_original_formula():
    """Hand-computed from the original Revelio code's save_feature.py: sample std of the top-10 class ids of the neurons
    firing on > 10 images, ranked by mean activation over their firing images."""
    from revelio_hub.interpret.metrics import sigma_label

    top = torch.tensor([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # std (n-1) = sqrt(0.1 * 0.9 * 10 / 9) = 0.316228
        [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],  # 0.527046
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # 0 but fires on only 10 images: excluded
        [0, 2, 0, 2, 0, 2, 0, 2, 0, 2],  # 1.054093
    ])
    count = torch.tensor([50, 11, 10, 30])
    mean_act = torch.tensor([1.0, 3.0, 9.0, 2.0])  # ranking: neuron 1, 3, 0 (2 is not eligible)
    value, n = sigma_label(top, count, mean_act, n_neurons=2)
    assert n == 2 and value == pytest.approx((0.5270463 + 1.0540926) / 2, abs=1e-6)
    value, n = sigma_label(top, count, mean_act, n_neurons=1000)
    assert n == 3 and value == pytest.approx((0.3162278 + 0.5270463 + 1.0540926) / 3, abs=1e-6)
    assert sigma_label(top, torch.tensor([1, 2, 3, 4]), mean_act) == (None, 0)


def test_format_1_atlas_still_loads_and_summarises(tmp_path):
    acts, labels = _planted()
    atlas = build_atlas(_batches(acts, labels, [120]), CLASSES)
    # what an atlas of the first format held
    atlas.stats = {k: v for k, v in atlas.stats.items() if k not in ("value_auroc", "activation_std")}
    atlas.meta = {k: v for k, v in atlas.meta.items()
                  if k not in ("label_columns", "summary_thresholds", "reconstruction_error", "dense_frequency",
                               "claim_calibration")}
    atlas.meta["format_version"] = 1
    atlas.save(tmp_path / "old")
    old = NeuronAtlas.load(tmp_path / "old")
    assert old.label_columns == {"class": CLASSES}
    assert old.summary(3).startswith("triangle · 10/10 top images")  # no AUROC to show
    assert torch.isnan(old.value_auroc("class")).all()


def _original_sigma_label(x, labels, w_enc, b_enc, b_dec, n_neurons=1000, top=10):
    """The original Revelio code's σ_label, written from its definition (save_feature.py), independently of
    the library: ReLU of the dense pre-TopK activations of every image, mean activation where it fires
    (sum / (count + 1e-8)), neurons firing on > 10 images ranked by it, the sample std of the class ids of
    each one's top-10 images, averaged over the first ``n_neurons``."""
    hidden_pre = (x - b_dec) @ w_enc + b_enc                         # N × d_sae, no TopK
    acts = torch.relu(hidden_pre).T                                    # d_sae × N
    count = (acts > 0).sum(1).float()
    mean_acts = acts.sum(1) / (count + 1e-8)
    top_idx = torch.topk(acts, k=20, dim=1).indices                    # the original keeps 20
    top_labels = labels[top_idx]
    _, neurons = torch.topk(mean_acts * (count > 10), k=mean_acts.shape[0])
    std_per_row = top_labels[neurons][:, :top].float().std(dim=1)
    assert bool((count > 10).sum() >= n_neurons)                       # else the original averages ineligible rows
    return float(std_per_row[:n_neurons].mean())


def test_atlas_sigma_label_is_the_originals_on_pre_topk_activations(tmp_path):
    """An SAE in the original's layout (TopK without ReLU, no input normalisation, two separate
    Kaiming-uniform matrices, b_dec at the data mean), streamed in batches: the atlas' σ_label equals the
    original's definition to 1e-4, and the TopK-code statistic is kept apart under its own name."""
    from revelio_hub.sae.model import KSparseAutoencoder

    g = torch.Generator().manual_seed(0)
    d_in, d_sae, k, n, n_classes = 16, 2048, 8, 240, 12
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centres = torch.randn(n_classes, d_in, generator=g) * 2
    x = centres[labels] + torch.randn(n, d_in, generator=g)
    w_enc = torch.nn.init.kaiming_uniform_(torch.empty(d_in, d_sae), generator=g)
    w_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_dec = x.mean(0)
    torch.save({"state_dict": {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}, "k": k},
               tmp_path / "original.pt")
    sae = KSparseAutoencoder.from_original_checkpoint(tmp_path / "original.pt")  # relu=False, no input_norm
    assert not sae.relu and sae.input_norm is None

    expected = _original_sigma_label(x, labels, w_enc, b_enc, b_dec)
    names = [f"c{i}" for i in range(n_classes)]
    atlas = build_atlas(_batches(x, labels, [100, 100, 40]), names, sae=sae, config=AtlasConfig(top_n=20))
    s = atlas.summary_stats
    assert s["sigma_label_neurons"] == 1000
    assert s["sigma_label"] == pytest.approx(expected, abs=1e-4)
    # the labels carry class structure, so shuffling them must raise σ_label
    assert s["sigma_label_shuffled"] > s["sigma_label"] + 0.3
    # on TopK codes far fewer neurons qualify: a different number, kept under another name
    assert s["topk_sigma_label_neurons"] < 1000
    assert "topk_sigma_label" in s and s["topk_sigma_label"] != pytest.approx(expected, abs=1e-3)
    # the pre-TopK statistics travel with the atlas, so the number can be recomputed from the folder
    atlas.save(tmp_path / "atlas")
    back = NeuronAtlas.load(tmp_path / "atlas")
    from revelio_hub.interpret.metrics import sigma_label

    ids = back.stats["pre_topk_top_image_ids"]
    count = (back.stats["pre_topk_frequency"] * n).round().long()
    again, used = sigma_label(labels[ids], count, back.stats["pre_topk_mean_activation"])
    assert used == 1000 and again == pytest.approx(expected, abs=1e-4)
