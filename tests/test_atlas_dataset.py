"""A release's atlases as a Hub dataset: written by the library and by ``make_release.py --atlas-dataset``,
read back with ``datasets.load_dataset`` from the local folder and from the loopback Hub, row for row equal to
what :class:`NeuronAtlas` says about each neuron.

The atlases are the bundled toy release's (read only); everything is written under pytest's temp folders.
"""

from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import yaml
from app_inputs import app_release_path  # noqa: E402

import datasets  # noqa: E402

from revelio_hub.interpret.atlas_model import NeuronAtlas  # noqa: E402
from revelio_hub.interpret.atlas_dataset import (  # noqa: E402
    SPLIT, auroc_columns, config_name, write_atlas_dataset, write_release_atlas_dataset)
from revelio_hub.release import Release  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ("down_ft1", 25)


@pytest.fixture(scope="module")
def release() -> Release:
    return Release.from_pretrained(app_release_path())


@pytest.fixture(scope="module")
def atlas(release) -> NeuronAtlas:
    return NeuronAtlas.load(Path(release.path) / f"{ENTRY[0]}/t{ENTRY[1]}" / "atlas")


def same_number(got, want: float) -> bool:
    return got is None if math.isnan(want) else got == pytest.approx(want, rel=1e-6, abs=1e-7)


def assert_rows_match_atlas(rows: datasets.Dataset, atlas: NeuronAtlas, top: int = 10) -> None:
    """Every row is its neuron as the atlas describes it (summary, statistics, AUROCs, top images)."""
    assert len(rows) == atlas.num_neurons
    columns = auroc_columns(atlas)
    best = atlas.best_auroc()
    for i, row in enumerate(rows):
        info = atlas.neuron(i)
        assert row["neuron"] == i and row["summary"] == atlas.summary(i)
        assert same_number(row["frequency"], info.frequency) and same_number(row["mean_activation"], info.mean_activation)
        assert same_number(row["best_auroc"], float(best[i])) and row["dense"] == info.dense and row["dead"] == info.dead
        for name, (column, value) in columns.items():
            want = float(atlas.value_auroc(column)[i, atlas.label_columns[column].index(value)])
            assert same_number(row[name], want), (i, name)
        assert row["top_image_ids"] == info.top_image_ids[:top]
        assert row["top_labels"] == info.top_labels[:top]
        assert row["top_activations"] == pytest.approx(info.top_activations[:top], rel=1e-6)
        if i % 64 == 0:  # decoding every thumbnail of every row adds nothing: sample them
            for image, image_id in zip(row["top_images"], row["top_image_ids"]):
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(atlas.thumbnail(image_id)))


def test_local_folder_loads_with_load_dataset(release, atlas, tmp_path):
    other = NeuronAtlas.load(Path(release.path) / "bottleneck/t100" / "atlas")
    out = write_atlas_dataset({ENTRY: atlas, ("bottleneck", 100): other}, tmp_path / "atlas-ds",
                              release_name=release.name, release_repo="me/toy", rows_per_file=200)
    assert sorted(p.name for p in (out / "down_ft1" / "t25").iterdir()) == [
        f"{SPLIT}-0000{k}-of-00003.parquet" for k in range(3)]
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["down_ft1_t25", "bottleneck_t100"]
    assert "me/toy" in card and "auroc_color_red" in card
    rows = datasets.load_dataset(str(out), config_name(*ENTRY), split=SPLIT, cache_dir=str(tmp_path / "cache"))
    assert_rows_match_atlas(rows, atlas)
    default = datasets.load_dataset(str(out), split=SPLIT, cache_dir=str(tmp_path / "cache"))
    assert default["summary"] == rows["summary"]  # the first entry is the default configuration


def test_existing_output_is_refused_and_kept(release, atlas, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        write_atlas_dataset({ENTRY: atlas}, out, release_name="x")
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="No atlas to write"):
        write_atlas_dataset({}, tmp_path / "empty", release_name="x")
    assert not (tmp_path / "empty").exists()


def test_make_release_atlas_dataset_round_trips_through_the_hub(atlas, hub, tmp_path, monkeypatch, capsys):
    # datasets reads the endpoint into its own config at import time (the hub fixture patches huggingface_hub's).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    main = runpy.run_path(str(ROOT / "training" / "make_release.py"))["main"]
    entry = Path(app_release_path()) / "down_ft1" / "t25"
    out = tmp_path / "toy"
    args = ["--sae", str(entry / "sae"), "--atlas", str(entry / "atlas"), "--examples", "--out", str(out),
            "--atlas-dataset", "--push", "me/toy"]
    assert main(args) == 0
    local = datasets.load_dataset(str(tmp_path / "toy-atlas"), "down_ft1_t25", split=SPLIT,
                                  cache_dir=str(tmp_path / "c1"))
    remote = datasets.load_dataset("me/toy-atlas", "down_ft1_t25", split=SPLIT, cache_dir=str(tmp_path / "c2"))
    assert_rows_match_atlas(remote, atlas)
    assert remote["summary"] == local["summary"] and remote["top_image_ids"] == local["top_image_ids"]
    # The README's snippet, on this dataset.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S) if "load_dataset(" in b)
    snippet = snippet.replace("your-hf-username/revelio-sd15-oxford-pets-atlas", "me/toy-atlas")
    snippet = snippet.replace('"up_ft1_t25", split="neurons"', f'"down_ft1_t25", split="neurons", cache_dir={str(tmp_path / "c3")!r}')
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "neuron" in printed and "summary" in printed
    assert any(word in printed for word in ("true on", "unsure", "mixed", "AUROC"))  # the atlas's summary lines
    # A second run without --overwrite stops before building anything.
    with pytest.raises(SystemExit, match="--atlas-dataset: .*already exists"):
        main(["--sae", str(entry / "sae"), "--atlas", str(entry / "atlas"), "--examples", "--out",
              str(tmp_path / "toy2"), "--atlas-dataset", str(tmp_path / "toy-atlas")])
    assert not (tmp_path / "toy2").exists()


def test_release_library_call_writes_every_entry(release, tmp_path):
    out = write_release_atlas_dataset(release, tmp_path / "all", top_images=0, rows_per_file=4096)
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == [config_name(l, t) for l, t in release.entries]
