"""Streaming k-SAE training: every (layer, t) SAE from one backbone pass per batch, no feature store.

Uses the real pixel backbone built from a tiny config (tests/tiny_models.py) on 24 images of 32 px.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import pytest
import torch

from revelio_hub.backbones import load_backbone
from revelio_hub.data import open_image_dataset
from revelio_hub.features import FeatureStore, extract_to_store
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.sae.streaming import FeatureStream, entry_dir, train_sae_stream
from revelio_hub.sae.training import SAETrainConfig, sample_tokens, train_sae

from app_inputs import class_colour_png
from process_group import run_group
from tiny_models import make_tiny_pixel

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["bottleneck", "up_ft1"]
TIMESTEPS = [25, 200]
N_IMAGES = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": class_colour_png(i), "path": None} for i in range(N_IMAGES)], "label": [i % 3 for i in range(N_IMAGES)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g", "b"])}),
    )
    ds.to_parquet(str(root / "images.parquet"))
    return root, make_tiny_pixel(root / "pixel", image_size=32)


@pytest.fixture(scope="module")
def backbone(workspace):
    return load_backbone(workspace[1])


def _source(workspace):
    return open_image_dataset(str(workspace[0] / "images.parquet"))


def _cfg(**kw) -> SAETrainConfig:
    base = dict(k=4, expansion=2, batch_size=8, steps=10, lr=2e-3, warmup_steps=2, log_every=2, eval_fraction=0.2,
                dead_window=16, checkpoint_every=3)
    base.update(kw)
    return SAETrainConfig(**base)


def test_streaming_equals_extract_then_train(backbone, workspace, tmp_path):
    # a batch as large as the training set: the first batch's statistics are the whole set's, so
    # the streamed run must give the weights of train_sae on the stored vectors of the same images
    cfg = _cfg(batch_size=64, steps=6)
    results = train_sae_stream(backbone, _source(workspace), tmp_path / "stream", LAYERS, TIMESTEPS, cfg,
                               progress=False)
    assert sorted(results) == sorted((layer, t) for layer in LAYERS for t in TIMESTEPS)
    store = extract_to_store(backbone, _source(workspace), tmp_path / "store", LAYERS, TIMESTEPS, progress=False)
    for layer, t in [("bottleneck", 25), ("up_ft1", 200)]:
        stored = FeatureStore(store.path).load(layer, t).features
        ref = train_sae(stored, cfg, progress=False)
        streamed = results[(layer, t)]
        for name, tensor in ref.model.state_dict().items():
            torch.testing.assert_close(streamed.model.state_dict()[name], tensor, atol=1e-5, rtol=1e-5)
        assert streamed.eval["fvu"] == pytest.approx(ref.eval["fvu"], abs=1e-5)
        # the same folder format as a stored run: loadable, with its recipe, eval and log
        folder = entry_dir(tmp_path / "stream", layer, t)
        loaded = KSparseAutoencoder.from_pretrained(folder)
        assert (loaded.recipe["layer"], loaded.recipe["timestep"]) == (layer, t)
        assert loaded.recipe == FeatureStore(store.path).recipe(layer, t).to_dict()
        assert json.loads((folder / "eval.json").read_text())["fvu"] == pytest.approx(streamed.eval["fvu"])
        assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
        assert not (folder / "checkpoint").exists()


def test_streaming_resumes_after_a_kill_to_the_uninterrupted_weights(backbone, workspace, tmp_path, capsys):
    cfg = _cfg()  # 8 images per step: 19 training images make several batches per epoch
    full = train_sae_stream(backbone, _source(workspace), tmp_path / "full", LAYERS, [25], cfg, progress=False)
    partial = train_sae_stream(backbone, _source(workspace), tmp_path / "run", LAYERS, [25], cfg, progress=False,
                               stop_after_step=7)
    assert all(r.eval == {} for r in partial.values())
    assert not (entry_dir(tmp_path / "run", "bottleneck", 25) / "model.safetensors").exists()
    # one entry's checkpoint ahead of the other (as if killed between their saves): it skips the steps it took
    train_sae_stream(backbone, _source(workspace), tmp_path / "run", ["up_ft1"], [25], cfg, progress=False,
                     stop_after_step=9)
    capsys.readouterr()
    resumed = train_sae_stream(backbone, _source(workspace), tmp_path / "run", LAYERS, [25], cfg, progress=False)
    err = capsys.readouterr().err
    assert "resuming from step 6 of 10" in err and "resuming from step 9 of 10" in err
    assert not (entry_dir(tmp_path / "run", "up_ft1", 25) / "checkpoint").exists()
    for key, ref in full.items():
        for name, tensor in ref.model.state_dict().items():
            assert torch.equal(resumed[key].model.state_dict()[name], tensor), (key, name)
        assert resumed[key].eval["fvu"] == ref.eval["fvu"]
    # finished: rerunning returns the saved results; other settings are refused
    again = train_sae_stream(backbone, _source(workspace), tmp_path / "run", LAYERS, [25], cfg, progress=False)
    assert again[("up_ft1", 25)].eval == pytest.approx(resumed[("up_ft1", 25)].eval)
    with pytest.raises(ValueError, match="different settings.*'lr'"):
        train_sae_stream(backbone, _source(workspace), tmp_path / "run", LAYERS, [25], _cfg(lr=1e-3), progress=False)


def test_token_streaming_feeds_the_stored_maps_tokens_and_saves_token_saes(backbone, workspace, tmp_path):
    key = ("bottleneck", 25)
    stream = FeatureStream(backbone, _source(workspace), ["bottleneck"], [25], granularity="token", tokens_per_image=5)
    ids = [3, 7, 11]
    rows = stream.features(ids)[key]
    assert rows.shape == (15, backbone.channels("bottleneck"))
    assert torch.equal(stream.features([11, 7])[key][5:10], rows[5:10])  # an image's tokens in any batch
    store = extract_to_store(backbone, _source(workspace), tmp_path / "store", ["bottleneck"], [25], spatial=True,
                             progress=False)
    got = FeatureStore(store.path).load("bottleneck", 25, kind="spatial", views=[0])
    where = {int(i): j for j, i in enumerate(got.image_ids)}
    expected = torch.cat([sample_tokens(got.features[where[i]:where[i] + 1].float(), 5, seed=i)[0] for i in ids])
    # the stored maps' positions (what a store-fed token SAE sees), to fp16 rounding of a different batch
    torch.testing.assert_close(rows, expected, atol=1e-3, rtol=1e-3)
    # drawn by deviation: still the image's own positions, not the uniform ones
    deviation = FeatureStream(backbone, _source(workspace), ["bottleneck"], [25], granularity="token",
                              tokens_per_image=5, token_sampling="deviation").features(ids)[key]
    assert not torch.equal(deviation, rows)
    for j, i in enumerate(ids):
        positions = got.features[where[i]].float().flatten(1).t()  # HW×C
        for token in deviation[5 * j:5 * j + 5]:
            assert (positions - token).abs().amax(1).min() < 1e-2
    results = train_sae_stream(backbone, _source(workspace), tmp_path / "tok", ["bottleneck"], [25],
                               _cfg(steps=4, checkpoint_every=0), granularity="token", tokens_per_image=5,
                               progress=False)
    loaded = KSparseAutoencoder.from_pretrained(entry_dir(tmp_path / "tok", "bottleneck", 25))
    assert loaded.recipe["granularity"] == "token" and results[key].eval["fvu"] < 1.5


def test_streaming_input_errors(backbone, workspace, tmp_path):
    with pytest.raises(ValueError, match="eval_fraction > 0"):
        train_sae_stream(backbone, _source(workspace), tmp_path / "a", LAYERS, [25], _cfg(eval_fraction=0.0),
                         progress=False)
    with pytest.raises(ValueError, match="Unknown layer"):
        train_sae_stream(backbone, _source(workspace), tmp_path / "b", ["up_ft9"], [25], _cfg(), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_streams_under_two_processes_like_one(backbone, workspace, tmp_path):
    """``train_ksae.py --backbone --dataset`` under torchrun: one run over 2 processes gives the weights of 1 process."""
    cfg = SAETrainConfig(k=4, expansion=2, batch_size=8, steps=6, lr=2e-3, warmup_steps=2, eval_fraction=0.2,
                         dead_window=16)
    one = train_sae_stream(backbone, _source(workspace), tmp_path / "one", ["bottleneck"], [25, 200], cfg,
                           progress=False)
    script = REPO / "training" / "train_ksae.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    two = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(script), "--backbone", str(workspace[1]), "--dataset", str(workspace[0] / "images.parquet"),
                     "--layers", "bottleneck", "--timesteps", "25", "200", "--k", "4", "--expansion", "2",
                     "--batch-size", "8", "--steps", "6", "--lr", "2e-3", "--warmup-steps", "2", "--eval-fraction", "0.2",
                     "--dead-window", "16", "--no-progress", "--out", str(tmp_path / "two")], env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr
    report = json.loads(two.stdout)
    for t in (25, 200):
        b = KSparseAutoencoder.from_pretrained(entry_dir(tmp_path / "two", "bottleneck", t))
        for name, tensor in one[("bottleneck", t)].model.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], tensor, atol=1e-5, rtol=1e-5)
        assert report[f"bottleneck/t{t}"]["fvu"] == pytest.approx(one[("bottleneck", t)].eval["fvu"], abs=1e-5)
