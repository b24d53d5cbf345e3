"""Feature stores: round trip, resume after a kill, recipe checks, and multi-process extraction.

Uses the real pixel backbone built from a tiny config (tests/tiny_models.py),
10 images of 32 px, one of them corrupt.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from revelio_hub.backbones import load_backbone
from revelio_hub.data import open_image_dataset
from revelio_hub.features import FeatureStore, augment_view, entry_dir, extract_to_store

from app_inputs import class_colour_png
from tiny_models import make_tiny_pixel
from process_group import run_group

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "extract_features.py"
CLASSES = ["red", "green", "blue"]
N_IMAGES = 10
CORRUPT = 7  # row index of the undecodable image
LAYERS = ["bottleneck", "up_ft2"]
TIMESTEPS = [25, 200]


def _png(i: int) -> bytes:
    return class_colour_png(i, height=32 + 4 * (i % 2))  # odd rows are not square


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    cells = [{"bytes": _png(i), "path": None} for i in range(N_IMAGES)]
    cells[CORRUPT] = {"bytes": b"\x89PNG\r\n\x1a\n definitely not a png", "path": None}
    ds = datasets.Dataset.from_dict(
        {"image": cells, "label": [i % 3 for i in range(N_IMAGES)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}),
    )
    ds.to_parquet(str(root / "images.parquet"))
    model = make_tiny_pixel(root / "pixel", image_size=32)
    return root, model


@pytest.fixture(scope="module")
def backbone(workspace):
    return load_backbone(workspace[1])


def _source(workspace):
    return open_image_dataset(str(workspace[0] / "images.parquet"))


def _extract(backbone, workspace, out, **kw):
    args = dict(spatial=False, views=1, batch_size=3, seed=0, progress=False, shard_size=3)
    args.update(kw)
    return extract_to_store(backbone, _source(workspace), out, LAYERS, TIMESTEPS, **args)


def _assert_same_rows(a: FeatureStore, b: FeatureStore, kind: str = "pooled") -> None:
    assert a.entries == b.entries
    for layer, t in a.entries:
        x, y = a.load(layer, t, kind), b.load(layer, t, kind)
        assert torch.equal(x.image_ids, y.image_ids) and torch.equal(x.views, y.views)
        assert torch.equal(x.labels, y.labels)
        torch.testing.assert_close(x.features, y.features)


def _assert_no_duplicates(fs) -> None:
    pairs = list(zip(fs.image_ids.tolist(), fs.views.tolist()))
    assert len(pairs) == len(set(pairs))


@pytest.fixture(scope="module")
def reference(backbone, workspace):
    """An uninterrupted single-process pooled store."""
    return _extract(backbone, workspace, workspace[0] / "reference")


@pytest.mark.slow  # a spatial extraction: 39 s loaded
def test_spatial_store_round_trip(backbone, workspace):
    out = workspace[0] / "spatial"
    store = _extract(backbone, workspace, out, spatial=True, views=2, shard_size=4)
    expected_ids = [i for i in range(N_IMAGES) if i != CORRUPT]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["recipe"]["backbone"] == str(workspace[1])
    assert summary["recipe"]["image_size"] == 32 and summary["recipe"]["family"] == "pixel"
    assert summary["recipe"]["noise_seed"] == 0 and summary["recipe"]["ensemble"] == 1
    assert summary["dataset"]["split"] == "train" and summary["dataset"]["image_column"] == "image"
    assert summary["layers"] == LAYERS and summary["timesteps"] == TIMESTEPS
    assert summary["num_images"] == len(expected_ids) and summary["num_rows"] == 2 * len(expected_ids)
    assert [s["image_id"] for s in summary["skipped"]] == [CORRUPT]
    assert store.class_names == CLASSES and store.num_images == len(expected_ids)

    for layer, t in store.entries:
        pooled = store.load(layer, t)
        spatial = store.load(layer, t, "spatial")
        assert pooled.features.dtype == torch.float32 and spatial.features.dtype == torch.float16
        assert pooled.features.shape == (2 * len(expected_ids), backbone.channels(layer))
        assert tuple(spatial.features.shape[1:]) == backbone.feature_shape(layer)
        assert pooled.image_ids.tolist() == [i for i in expected_ids for _ in range(2)]
        assert pooled.views.tolist() == [0, 1] * len(expected_ids)
        assert pooled.labels.tolist() == [i % 3 for i in pooled.image_ids.tolist()]
        torch.testing.assert_close(pooled.features, spatial.features.float().mean(dim=(2, 3)), atol=2e-3, rtol=2e-3)

    # view 0 is exactly what the backbone gives for the plain image; view 1 is an augmentation
    images = [Image.open(io.BytesIO(_png(i))) for i in expected_ids]
    direct = backbone.extract(images, ["up_ft2"], [200], pool="mean", image_ids=expected_ids)[("up_ft2", 200)]
    plain = store.load("up_ft2", 200, views=0)
    torch.testing.assert_close(plain.features, direct, atol=1e-5, rtol=1e-4)
    augmented = store.load("up_ft2", 200, views=1)
    assert not torch.allclose(augmented.features, plain.features, atol=1e-3)

    # filters read only what is asked for
    subset = store.load("bottleneck", 25, "spatial", views=[1], image_ids=[8, 2, 5])
    assert subset.image_ids.tolist() == [2, 5, 8] and subset.views.tolist() == [1, 1, 1]

    ds = store.to_dataset("up_ft2", 25, views=0)
    assert ds.column_names == ["features", "label", "image_id", "view"]
    assert ds.features["label"].names == CLASSES and len(ds) == len(expected_ids)
    torch.testing.assert_close(ds.with_format("torch")[:]["features"], store.load("up_ft2", 25, views=0).features)

    recipe = store.recipe("up_ft2", 25, "spatial")
    assert (recipe.layer, recipe.timestep, recipe.d_in, recipe.granularity) == ("up_ft2", 25, backbone.channels("up_ft2"), "spatial")
    recipe.check_compatible(backbone.recipe("up_ft2", 25))

    with pytest.raises(ValueError, match=r"No entry \('up_ft0', t=25\).*available"):
        store.load("up_ft0", 25)


def test_augmented_views_are_seeded_per_image_and_view():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    a = augment_view(image, image_id=3, view=1, image_size=32, seed=0)
    assert a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(augment_view(image, 3, 1, 32, 0)))
    others = [augment_view(image, 3, 2, 32, 0), augment_view(image, 4, 1, 32, 0), augment_view(image, 3, 1, 32, 1)]
    assert all(not np.array_equal(np.asarray(a), np.asarray(o)) for o in others)
    assert augment_view(image, 3, 0, 32, 0) is image


@pytest.mark.slow  # kills and reruns an extraction: 71 s loaded
def test_resume_after_a_kill_gives_the_uninterrupted_rows(backbone, workspace, reference, capsys):
    out = workspace[0] / "killed"

    class Killed(RuntimeError):
        pass

    def die_after_first_chunk(name: str) -> None:
        raise Killed(name)

    with pytest.raises(Killed):
        _extract(backbone, workspace, out, on_chunk=die_after_first_chunk)
    partial = FeatureStore(out)
    assert partial.complete is False
    assert len(partial.load("bottleneck", 25)) == 3  # one chunk of 3 images made it

    # leftovers of a kill: a half-written temp file and a chunk renamed for only some entries
    first_dir = entry_dir(out, "bottleneck", 25)
    chunk = next(first_dir.glob("chunk-*.safetensors"))
    (first_dir / ".tmp-chunk-w001-r000-000000003.safetensors").write_bytes(b"partial")
    orphan = first_dir / "chunk-w001-r000-000000005.safetensors"
    shutil.copy(chunk, orphan)

    capsys.readouterr()
    store = _extract(backbone, workspace, out)  # same command again
    assert "resuming from shard 1 (3 of" in capsys.readouterr().err
    assert store.complete and store.summary["num_images"] == N_IMAGES - 1
    assert not orphan.exists() and not list(first_dir.glob(".tmp-*"))
    _assert_same_rows(store, reference)
    for layer, t in store.entries:
        _assert_no_duplicates(store.load(layer, t))
    assert store.summary["skipped"] == reference.summary["skipped"]

    # a finished store is a no-op to rerun
    names = sorted(p.name for p in first_dir.iterdir())
    _extract(backbone, workspace, out, on_chunk=die_after_first_chunk)
    assert sorted(p.name for p in first_dir.iterdir()) == names


def test_resume_refuses_a_different_recipe(backbone, workspace, reference):
    with pytest.raises(ValueError, match=r"noise_seed: stored 0, requested 1.*--overwrite"):
        _extract(backbone, workspace, reference.path, seed=1)
    with pytest.raises(ValueError, match=r"layers: stored"):
        extract_to_store(backbone, _source(workspace), reference.path, ["bottleneck"], TIMESTEPS, progress=False)
    with pytest.raises(ValueError, match=r"spatial: stored False, requested True"):
        _extract(backbone, workspace, reference.path, spatial=True)

    other = workspace[0] / "not-a-store"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a feature store"):
        _extract(backbone, workspace, other, overwrite=True)
    assert (other / "notes.txt").exists()

    copy = workspace[0] / "overwritten"
    shutil.copytree(reference.path, copy)
    store = _extract(backbone, workspace, copy, seed=1, overwrite=True, max_images=4)
    assert store.summary["recipe"]["noise_seed"] == 1 and store.num_images == 4

    with pytest.raises(ValueError, match="Unknown layer"):
        extract_to_store(backbone, _source(workspace), workspace[0] / "bad", ["mid"], [25], progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        extract_to_store(backbone, _source(workspace), workspace[0] / "bad", ["bottleneck"], [1000], progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes under torchrun: 44 s loaded
def test_two_process_accelerate_run_writes_the_same_rows(workspace, reference):
    root, model = workspace
    out = root / "two-proc"
    # CPU-only: the script forms a gloo process group (accelerate's MULTI_CPU) under the torchrun launcher
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT),
        "--backbone", str(model), "--dataset", str(root / "images.parquet"),
        "--layers", *LAYERS, "--timesteps", *map(str, TIMESTEPS),
        "--batch-size", "3", "--shard-size", "3", "--num-workers", "0", "--no-progress", "--out", str(out),
    ]
    proc = run_group(cmd, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "complete=True" in proc.stdout

    store = FeatureStore(out)
    assert store.complete
    names = [p.name for p in store.shard_paths("bottleneck", 25)]
    assert any("-r000-" in n for n in names) and any("-r001-" in n for n in names)  # each rank wrote its own
    _assert_same_rows(store, reference)
    assert store.summary["skipped"] == reference.summary["skipped"]
    assert store.summary["num_rows"] == reference.summary["num_rows"] == N_IMAGES - 1
