"""revelio_hub.data: every dataset source kind opens to the same images, labels and classes."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
from PIL import Image

from revelio_hub.data import ImageSource, carve_validation, open_image_dataset

CLASSES = ["circle", "square", "star"]


def _image(i: int) -> Image.Image:
    """A 32-px image whose colour encodes its index, so rows can be told apart after decoding."""
    return Image.new("RGB", (32, 24 + i % 3), ((37 * i) % 256, (11 * i + 50) % 256, 200))


def _rows(n: int = 9) -> tuple[list[Image.Image], list[int]]:
    return [_image(i) for i in range(n)], [i % 3 for i in range(n)]


def _memory_dataset(n: int = 9) -> datasets.Dataset:
    images, labels = _rows(n)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)


def _pixels(source: ImageSource) -> list[tuple]:
    return [source.load_image(i).getpixel((0, 0)) for i in range(len(source))]


def _expected_pixels(n: int = 9) -> list[tuple]:
    return [im.getpixel((0, 0)) for im in _rows(n)[0]]


def test_in_memory_dataset_detects_columns_and_classes():
    src = open_image_dataset(_memory_dataset())
    assert (src.image_column, src.label_column) == ("image", "label")
    assert src.class_names == CLASSES
    assert src.labels.tolist() == [i % 3 for i in range(9)]
    assert _pixels(src) == _expected_pixels()
    assert src.load_image(0).mode == "RGB"


def test_parquet_arrow_and_save_to_disk_give_the_same_rows(tmp_path):
    ds = _memory_dataset()
    ds.to_parquet(str(tmp_path / "pets.parquet"))
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "parquet_dir").mkdir()
    ds.to_parquet(str(tmp_path / "parquet_dir" / "test.parquet"))
    arrow_file = next((tmp_path / "single").glob("*.arrow"))

    for source, split in [
        (tmp_path / "pets.parquet", "train"),
        (tmp_path / "single", "train"),
        (tmp_path / "dict", "test"),
        (tmp_path / "parquet_dir", "test"),
        (arrow_file, "train"),
    ]:
        src = open_image_dataset(str(source), split=split)
        assert len(src) == 9, source
        assert src.class_names == CLASSES, source
        assert src.labels.tolist() == [i % 3 for i in range(9)], source
        assert _pixels(src) == _expected_pixels(), source

    with pytest.raises(ValueError, match=r"Split 'validation' not found.*\['test', 'train'\]"):
        open_image_dataset(str(tmp_path / "dict"), split="validation")


def test_image_folder_with_class_subfolders_and_a_corrupt_file(tmp_path, caplog):
    root = tmp_path / "folder"
    for i, (image, label) in enumerate(zip(*_rows(6))):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / CLASSES[label] / f"{i:02d}.png")
    (root / "star" / "99_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")

    src = open_image_dataset(str(root))
    assert src.class_names == CLASSES
    assert len(src) == 7
    broken = [i for i in range(len(src)) if "99_broken" in src.dataset[i]["image"]["path"]]
    assert len(broken) == 1

    with caplog.at_level(logging.WARNING, logger="revelio_hub.data"):
        ok_ids, images, skipped = src.load_images(range(len(src)))
    assert skipped == broken
    assert ok_ids == [i for i in range(7) if i != broken[0]]
    assert len(images) == 6
    assert list(src.skipped) == broken and src.skipped[broken[0]]
    assert "corrupt image" in caplog.text
    # labels follow the folders
    for i in ok_ids:
        path = src.dataset[i]["image"]["path"]
        assert CLASSES[src.labels[i]] in path

    batches = list(src.iter_batches(batch_size=4))
    assert sum(len(ids) for ids, _, _ in batches) == 6


def test_string_labels_explicit_columns_and_helpful_errors():
    images, labels = _rows(6)
    ds = datasets.Dataset.from_dict(
        {"picture": images, "kind": [CLASSES[l] for l in labels], "labels": [5] * 6},
        features=datasets.Features(
            {"picture": datasets.Image(), "kind": datasets.Value("string"), "labels": datasets.Value("int64")}
        ),
    )
    src = open_image_dataset(ds, label_column="kind")
    assert src.image_column == "picture"
    assert src.class_names == sorted(CLASSES)
    assert [src.class_names[l] for l in src.labels] == [CLASSES[l] for l in labels]

    auto = open_image_dataset(ds)  # falls back to the "labels" column: integer ids
    assert auto.label_column == "labels" and auto.class_names == [str(i) for i in range(6)]

    two = datasets.Dataset.from_dict(
        {"image": images, "species": [0] * 6, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "species": datasets.ClassLabel(names=["cat", "dog"]),
                                    "label": datasets.ClassLabel(names=CLASSES)}),
    )
    assert open_image_dataset(two).class_names == CLASSES  # the ClassLabel called "label" wins

    unlabelled = open_image_dataset(ds, label_column="")
    assert unlabelled.label_column is None and (unlabelled.labels == -1).all()

    with pytest.raises(ValueError, match=r"Label column 'breed' not in .*picture"):
        open_image_dataset(ds, label_column="breed")
    with pytest.raises(ValueError, match=r"Image column 'img' not in"):
        open_image_dataset(ds, image_column="img")


def test_missing_sources_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="nobody/no-such-dataset"):
        open_image_dataset("nobody/no-such-dataset")
    with pytest.raises(ValueError, match="does not exist"):
        open_image_dataset(str(tmp_path / "nope" / "x"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"\.parquet or \.arrow"):
        open_image_dataset(str(tmp_path / "notes.txt"))


def test_limit_keeps_ids_and_labels():
    src = open_image_dataset(_memory_dataset()).limit(4)
    assert len(src) == 4 and src.labels.tolist() == [0, 1, 2, 0]
    assert _pixels(src) == _expected_pixels()[:4]


def test_carve_validation_is_stratified_deterministic_and_disjoint():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 2 + [3])
    train, val = carve_validation(labels, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    counts = {c: int((labels[val] == c).sum()) for c in range(4)}
    assert counts == {0: 10, 1: 4, 2: 1, 3: 0}  # rare classes keep a training example
    again = carve_validation(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    other = carve_validation(labels, 0.2, seed=4)[1]
    assert not np.array_equal(val, other)
    assert len(carve_validation(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="fraction"):
        carve_validation(labels, 1.0)
