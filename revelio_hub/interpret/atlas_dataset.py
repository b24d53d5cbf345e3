"""A release's neuron atlases as a Hub dataset: parquet files with image columns and a dataset card.

The atlas folder format (:mod:`revelio_hub.interpret.atlas_config`) is what the app
loads fast; this is the same content for everyone else. As a dataset it gets
the Hub's dataset viewer, ``datasets.load_dataset``, and SQL or pandas over the
parquet files, with no Revelio code. One row per neuron, one configuration per
``(layer, t)`` entry (``down_ft1_t25``), one split, ``neurons``:

=====================  ==================================================================
``neuron``             the neuron id (row ``i`` is neuron ``i``)
``summary``            :meth:`NeuronAtlas.summary`: the label value it detects, or "mixed"
``frequency``          share of the atlas images it fires on
``mean_activation``    mean activation when it fires
``entropy``            label entropy (bits) of its top images
``best_auroc``         its best AUROC over every label value (null without one)
``dense``, ``dead``    fires on most images / never fires
``auroc_<col>_<val>``  AUROC of its activation for "the image has value ``val`` of column
                       ``col``" over all atlas images (null where undefined); the card lists
                       which column is which label value
``top_image_ids``      ids of its top-activating images, strongest first
``top_activations``    their activations
``top_labels``         their class names
``top_images``         their thumbnails (``Image`` features)
=====================  ==================================================================

A release is a model repo, and ``load_dataset`` reads dataset repos only, so the
dataset goes to a sibling dataset repo (``<release repo>-atlas``) whose card
links back to the release.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import datasets
from huggingface_hub import HfApi

from revelio_hub.interpret.atlas_config import THUMBNAIL_DIR
from revelio_hub.interpret.atlas_model import NeuronAtlas

PathLike = Union[str, Path]
SPLIT = "neurons"
#: Rows per parquet file: a paper-size SAE (81,920 neurons) makes 80 files, each holding its rows' thumbnails.
ROWS_PER_FILE = 1024
TOP_IMAGES = 10


def config_name(layer: str, timestep: int) -> str:
    """The dataset configuration of one release entry, e.g. ``down_ft1_t25``."""
    return f"{layer}_t{int(timestep)}"


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(text).lower()).strip("_") or "x"


def auroc_columns(atlas: NeuronAtlas) -> dict[str, tuple[str, str]]:
    """Column name → (label column, value) of every per-value AUROC column, in ``label_columns`` order.

    Names are lower-case ``auroc_<column>_<value>`` with other characters as
    ``_`` (plain SQL identifiers); a name that two values would share gets a
    numeric suffix.
    """
    out: dict[str, tuple[str, str]] = {}
    for column, values in atlas.label_columns.items():
        for value in values:
            name = base = f"auroc_{_slug(column)}_{_slug(value)}"
            suffix = 2
            while name in out:
                name, suffix = f"{base}_{suffix}", suffix + 1
            out[name] = (column, value)
    return out


def atlas_features(atlas: NeuronAtlas) -> datasets.Features:
    """The dataset's schema for ``atlas`` (its AUROC columns depend on its label columns)."""
    features = {
        "neuron": datasets.Value("int32"),
        "summary": datasets.Value("string"),
        "frequency": datasets.Value("float32"),
        "mean_activation": datasets.Value("float32"),
        "entropy": datasets.Value("float32"),
        "best_auroc": datasets.Value("float32"),
        "dense": datasets.Value("bool"),
        "dead": datasets.Value("bool"),
    }
    features.update({name: datasets.Value("float32") for name in auroc_columns(atlas)})
    features.update({
        "top_image_ids": datasets.List(datasets.Value("int64")),
        "top_activations": datasets.List(datasets.Value("float32")),
        "top_labels": datasets.List(datasets.Value("string")),
        "top_images": datasets.List(datasets.Image()),
    })
    return datasets.Features(features)


def _nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


def _thumbnail(atlas: NeuronAtlas, image_id: int) -> dict[str, Any]:
    """The stored WebP bytes as they are (no re-encoding), or the in-memory thumbnail."""
    file = Path(atlas.path) / THUMBNAIL_DIR / f"{image_id}.webp" if atlas.path is not None else None
    if file is not None and file.is_file():
        return {"bytes": file.read_bytes(), "path": f"{image_id}.webp"}
    return atlas.thumbnail(image_id)


def atlas_rows(atlas: NeuronAtlas, top_images: int = TOP_IMAGES, start: int = 0,
               stop: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """The dataset rows of neurons ``start``..``stop`` (default: all), in neuron order."""
    aurocs = {column: atlas.value_auroc(column) for column in atlas.label_columns}
    names = auroc_columns(atlas)
    offsets = {name: atlas.label_columns[column].index(value) for name, (column, value) in names.items()}
    best = atlas.best_auroc()
    dense = atlas.dense_mask
    stats = atlas.stats
    classes = atlas.class_names
    for i in range(start, atlas.num_neurons if stop is None else min(stop, atlas.num_neurons)):
        filled = int((stats["top_image_ids"][i] >= 0).sum())
        m = min(top_images, filled)
        ids = stats["top_image_ids"][i, :m].tolist()
        labels = [classes[c] if 0 <= c < len(classes) else None for c in stats["top_labels"][i, :m].tolist()]
        frequency = float(stats["frequency"][i])
        row = {
            "neuron": i,
            "summary": atlas.summary(i),
            "frequency": frequency,
            "mean_activation": float(stats["mean_activation"][i]),
            "entropy": _nan_to_none(float(stats["entropy"][i])),
            "best_auroc": _nan_to_none(float(best[i])),
            "dense": bool(dense[i]),
            "dead": frequency <= 0,
        }
        row.update({name: _nan_to_none(float(aurocs[names[name][0]][i, offsets[name]])) for name in names})
        row.update({
            "top_image_ids": ids,
            "top_activations": stats["top_activations"][i, :m].tolist(),
            "top_labels": labels,
            "top_images": [_thumbnail(atlas, int(image_id)) for image_id in ids],
        })
        yield row


def atlas_to_dataset(atlas: NeuronAtlas, top_images: int = TOP_IMAGES, start: int = 0,
                     stop: Optional[int] = None) -> datasets.Dataset:
    """Neurons ``start``..``stop`` of ``atlas`` as an in-memory ``datasets.Dataset`` (one row per neuron)."""
    rows = list(atlas_rows(atlas, top_images, start, stop))
    features = atlas_features(atlas)
    return datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in features}, features=features)


def write_atlas_parquet(atlas: NeuronAtlas, folder: PathLike, top_images: int = TOP_IMAGES,
                        rows_per_file: int = ROWS_PER_FILE) -> list[Path]:
    """Write ``atlas`` as ``folder/neurons-0000i-of-0000n.parquet`` files of ``rows_per_file`` neurons each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, math.ceil(atlas.num_neurons / rows_per_file))
    files = []
    for k in range(n_files):
        file = folder / f"{SPLIT}-{k:05d}-of-{n_files:05d}.parquet"
        atlas_to_dataset(atlas, top_images, k * rows_per_file, (k + 1) * rows_per_file).to_parquet(str(file))
        files.append(file)
    return files


def dataset_card(entries: Mapping[tuple[str, int], NeuronAtlas], *, release_name: str,
                 release_repo: Optional[str] = None, license: str = "apache-2.0") -> str:
    """The dataset card: YAML (configs per entry, tags, license) and what the columns mean."""
    configs = []
    for k, (layer, t) in enumerate(entries):
        name = config_name(layer, t)
        configs.append(f"- config_name: {name}\n  data_files:\n  - split: {SPLIT}\n    path: {layer}/t{t}/*.parquet"
                       + ("\n  default: true" if k == 0 else ""))
    source = f"[{release_repo}](https://huggingface.co/{release_repo})" if release_repo else f"`{release_name}`"
    first = config_name(*next(iter(entries)))
    rows = "\n".join(
        f"| `{config_name(layer, t)}` | {atlas.num_neurons} | {atlas.num_images} | "
        + ", ".join(f"`{name}` = {value} ({column})" for name, (column, value) in auroc_columns(atlas).items()) + " |"
        for (layer, t), atlas in entries.items())
    return f"""---
license: {license}
pretty_name: Neuron atlas of {release_name}
tags:
- interpretability
- sparse-autoencoder
- diffusion
- revelio-hub
configs:
{chr(10).join(configs)}
---

# Neuron atlas of {release_name}

The neuron atlases of the Revelio Hub release {source}: for every neuron of each k-sparse autoencoder
(one configuration per layer and timestep), what it detects, how often it fires, its AUROC for every
label value over the atlas images, and its top-activating images as thumbnails.

```python
from datasets import load_dataset

neurons = load_dataset("<this repo>", "{first}", split="{SPLIT}")
print(neurons[0]["summary"])
```

| configuration | neurons | atlas images | AUROC columns |
|---|---|---|---|
{rows}

Columns: `neuron` (id), `summary` (the label value the neuron detects, or "mixed": named only when both its
AUROC and its top images agree), `frequency` (share of images it fires on), `mean_activation` (when it
fires), `entropy` (bits, of its top images' labels), `best_auroc`, `dense` (fires on most images), `dead`,
one `auroc_<column>_<value>` per label value (0.5 = chance, 1 = perfect; null where undefined),
`top_image_ids`, `top_activations`, `top_labels` and `top_images` (thumbnails), strongest first.
"""


def check_output(out: PathLike, overwrite: bool = False) -> Path:
    """``out`` as a Path, or ``ValueError`` if it exists and may not be replaced (checked before any work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    return out


def write_atlas_dataset(entries: Mapping[tuple[str, int], NeuronAtlas], out: PathLike, *, release_name: str,
                        release_repo: Optional[str] = None, license: str = "apache-2.0",
                        top_images: int = TOP_IMAGES, rows_per_file: int = ROWS_PER_FILE,
                        overwrite: bool = False) -> Path:
    """Write ``{(layer, t): atlas}`` as a dataset folder (``<layer>/t<t>/*.parquet`` + ``README.md``).

    ``datasets.load_dataset(out, config_name(layer, t), split="neurons")``
    then returns one row per neuron; ``push_atlas_dataset`` uploads it. The
    folder is built next to ``out`` and renamed when complete, so a failure
    leaves no half-written dataset (and an existing one untouched).
    """
    if not entries:
        raise ValueError("No atlas to write: the release has no entry with an atlas.")
    if top_images < 0:
        raise ValueError(f"top_images must be ≥ 0, got {top_images}")
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for (layer, t), atlas in entries.items():
            write_atlas_parquet(atlas, tmp / layer / f"t{int(t)}", top_images, rows_per_file)
        (tmp / "README.md").write_text(dataset_card(entries, release_name=release_name, release_repo=release_repo,
                                                    license=license), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def release_atlases(release: Any) -> dict[tuple[str, int], NeuronAtlas]:
    """``{(layer, t): atlas}`` of every entry of a :class:`~revelio_hub.release.Release` that has an atlas."""
    out = {}
    for item in release.config["entries"]:
        folder = Path(release.path) / item["path"] / "atlas"
        if item.get("atlas", folder.is_dir()) and folder.is_dir():
            out[(str(item["layer"]), int(item["timestep"]))] = NeuronAtlas.load(folder)
    return out


def write_release_atlas_dataset(release: Any, out: PathLike, *, release_repo: Optional[str] = None,
                                top_images: int = TOP_IMAGES, rows_per_file: int = ROWS_PER_FILE,
                                overwrite: bool = False) -> Path:
    """The atlases of a local release as a dataset folder (see :func:`write_atlas_dataset`)."""
    check_output(out, overwrite)
    return write_atlas_dataset(release_atlases(release), out, release_name=str(release.name),
                               release_repo=release_repo, license=str(release.config.get("license") or "apache-2.0"),
                               top_images=top_images, rows_per_file=rows_per_file, overwrite=overwrite)


def push_atlas_dataset(folder: PathLike, repo_id: str, *, private: bool = False,
                       token: Optional[Union[str, bool]] = None) -> str:
    """Create the dataset repo ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} is not an atlas dataset folder (no README.md)")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                             commit_message="Upload neuron atlas dataset")
    return str(info.commit_url)


__all__ = ["SPLIT", "atlas_features", "atlas_rows", "atlas_to_dataset", "auroc_columns", "check_output", "config_name",
           "dataset_card", "push_atlas_dataset", "release_atlases", "write_atlas_dataset", "write_atlas_parquet",
           "write_release_atlas_dataset"]
