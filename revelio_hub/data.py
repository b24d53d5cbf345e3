"""Opening image datasets for feature extraction and training.

Every pipeline stage refers to images by their *row index* in one split of one
dataset (the ``image_id``). :func:`open_image_dataset` turns whatever the user
has (a Hub dataset id, an image folder, a parquet/arrow file, a
``save_to_disk`` directory or an in-memory :class:`datasets.Dataset`) into an
:class:`ImageSource` with a known image column, integer labels and class names,
so the rest of the code never cares where the pixels came from.

Images are decoded lazily and one at a time: a corrupt row in a 50k-image
dataset is skipped, remembered and reported instead of killing the job
(``datasets``' own decoding would raise in the middle of a batch).
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Column names tried, in order, when the dataset does not declare a ClassLabel.
_LABEL_NAMES = ("label", "labels")
# Column names tried when no column has the ``datasets.Image`` feature
# (e.g. a parquet file written without Hugging Face metadata).
_IMAGE_NAMES = ("image", "img", "images", "picture", "photo")
# Only the first few corrupt images are logged one by one; the rest are counted.
_MAX_WARNINGS = 10


@dataclass
class ImageSource:
    """One split of an image dataset, ready for feature extraction.

    Attributes:
        dataset: the rows, with the image column cast to ``Image(decode=False)``
            so decoding (and its failures) happen here, image by image.
        source: the dataset id or path as given (recorded in feature stores).
        split: the split name.
        image_column: name of the column holding images.
        label_column: name of the label column, or ``None`` for unlabelled data.
        class_names: names of the classes; ``labels`` index into this list.
        labels: ``int64`` array with one label per row (``-1`` when unlabelled).
        skipped: row index -> reason, for every image that failed to decode so far.
    """

    dataset: Any
    source: str
    split: str
    image_column: str
    label_column: Optional[str]
    class_names: list[str]
    labels: np.ndarray
    skipped: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    def limit(self, max_images: Optional[int]) -> "ImageSource":
        """The first ``max_images`` rows (ids unchanged), for quick trials."""
        if max_images is None or max_images >= len(self):
            return self
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        return ImageSource(
            dataset=self.dataset.select(range(max_images)),
            source=self.source,
            split=self.split,
            image_column=self.image_column,
            label_column=self.label_column,
            class_names=list(self.class_names),
            labels=self.labels[:max_images].copy(),
        )

    def load_image(self, image_id: int) -> Optional[Image.Image]:
        """Decode one image as RGB (EXIF rotation applied), or ``None`` if it is corrupt.

        Corrupt images are recorded in :attr:`skipped` and logged.
        """
        if not 0 <= image_id < len(self):
            raise IndexError(f"image_id {image_id} out of range [0, {len(self)})")
        value = self.dataset[int(image_id)][self.image_column]
        try:
            return _decode(value)
        except Exception as err:  # any decoder failure must not stop a long job
            reason = f"{type(err).__name__}: {err}"
            self._record_skip(int(image_id), reason)
            return None

    def load_images(
        self, image_ids: Sequence[int], num_workers: int = 0
    ) -> tuple[list[int], list[Image.Image], list[int]]:
        """Decode several images, skipping corrupt ones.

        Returns ``(ok_ids, images, skipped_ids)``; ``ok_ids`` keeps the input order.
        ``num_workers > 0`` decodes in a thread pool (PIL releases the GIL while decoding).
        """
        ids = [int(i) for i in image_ids]
        if num_workers > 0 and len(ids) > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                decoded = list(pool.map(self.load_image, ids))
        else:
            decoded = [self.load_image(i) for i in ids]
        ok_ids = [i for i, im in zip(ids, decoded) if im is not None]
        images = [im for im in decoded if im is not None]
        skipped_ids = [i for i, im in zip(ids, decoded) if im is None]
        return ok_ids, images, skipped_ids

    def iter_batches(
        self, image_ids: Optional[Iterable[int]] = None, batch_size: int = 32
    ) -> Iterable[tuple[list[int], list[Image.Image], np.ndarray]]:
        """Yield ``(ids, images, labels)`` batches of decodable images."""
        ids = list(range(len(self))) if image_ids is None else [int(i) for i in image_ids]
        for start in range(0, len(ids), batch_size):
            ok_ids, images, _ = self.load_images(ids[start : start + batch_size])
            if ok_ids:
                yield ok_ids, images, self.labels[ok_ids]

    def describe(self) -> dict[str, Any]:
        """What a feature store records about its dataset."""
        return {
            "id": self.source,
            "split": self.split,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "num_rows": len(self),
        }

    def _record_skip(self, image_id: int, reason: str) -> None:
        first = image_id not in self.skipped
        self.skipped[image_id] = reason
        if first and len(self.skipped) <= _MAX_WARNINGS:
            logger.warning("Skipping corrupt image %d of %s: %s", image_id, self.source, reason)
        elif first and len(self.skipped) == _MAX_WARNINGS + 1:
            logger.warning("More corrupt images in %s; further ones are only counted.", self.source)


def _decode(value: Any) -> Image.Image:
    """Decode a ``datasets`` image cell (undecoded dict, PIL image or path)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("image cell has neither bytes nor path")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif value is None:
        raise ValueError("image cell is empty")
    else:
        raise ValueError(f"unsupported image cell of type {type(value).__name__}")
    image.load()  # force the full decode now, so truncated files fail here
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def open_image_dataset(
    source: Any,
    split: str = "train",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> ImageSource:
    """Open one split of an image dataset.

    Args:
        source: a Hub dataset id (``"timm/oxford-iiit-pet"``), a local image
            folder (``imagefolder`` layout: one subfolder per class, optionally
            under ``train/``/``test/``), a directory of parquet/arrow files, a
            single ``.parquet``/``.arrow`` file, a directory written by
            ``Dataset.save_to_disk``, or a ``datasets.Dataset``/``DatasetDict``.
        split: which split to use (ignored for a plain ``Dataset`` or a single file).
        image_column: column with images; auto-detected from the ``Image``
            feature when omitted.
        label_column: column with labels; auto-detected (a ``ClassLabel``
            feature, else a ``label``/``labels`` column) when omitted. Pass
            ``""`` for an explicitly unlabelled dataset.

    Raises:
        ValueError: the source cannot be found or opened, the split does not
            exist, or a named column is missing (the message lists what exists).
    """
    import datasets

    name, data = _load(source, split)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"Split {split!r} not found in {name}; available splits: {sorted(data)}")
        data = data[split]
    if not isinstance(data, datasets.Dataset):
        raise ValueError(f"Expected a datasets.Dataset for {name}, got {type(data).__name__}")

    image_column = _find_image_column(data, image_column, name)
    data = data.cast_column(image_column, datasets.Image(decode=False))
    label_column, class_names, labels = _labels(data, label_column, name)
    return ImageSource(
        dataset=data,
        source=name,
        split=split,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        labels=labels,
    )


def _load(source: Any, split: str) -> tuple[str, Any]:
    """Return ``(name_for_records, Dataset | DatasetDict)``."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        info = getattr(source, "info", None)
        return (getattr(info, "dataset_name", None) or "<in-memory>"), source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"Unsupported dataset source of type {type(source).__name__}; pass a Hub dataset id, "
            "a local folder or file, or a datasets.Dataset"
        )
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return name, datasets.Dataset.from_parquet(str(path))
        if suffix == ".arrow":
            return name, datasets.Dataset.from_file(str(path))
        raise ValueError(f"Unsupported dataset file {name}: expected a .parquet or .arrow file, or a folder")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return name, datasets.load_from_disk(str(path))
        try:
            # The packaged builders (imagefolder, parquet, arrow) are chosen from the files.
            return name, datasets.load_dataset(str(path), split=None)
        except Exception as err:
            raise ValueError(f"Could not read the dataset folder {name}: {type(err).__name__}: {err}") from err
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"Dataset path {name} does not exist")
    try:
        return name, datasets.load_dataset(name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"Split {split!r} not found in Hub dataset {name}: {err}") from err
        raise ValueError(_hub_error(name, err)) from err
    except Exception as err:
        raise ValueError(_hub_error(name, err)) from err


def _hub_error(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    hint = (
        "You are offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1): download it once while online, "
        "or pass a local folder, parquet/arrow file or save_to_disk directory."
        if offline
        else "Check the id on huggingface.co/datasets (and your token for gated data), "
        "or pass a local folder, parquet/arrow file or save_to_disk directory."
    )
    return f"Could not open dataset {name!r} ({type(err).__name__}: {err}). {hint}"


def _find_image_column(data: Any, requested: Optional[str], name: str) -> str:
    import datasets

    columns = list(data.column_names)
    if requested:
        if requested not in columns:
            raise ValueError(f"Image column {requested!r} not in {name}; columns: {columns}")
        return requested
    image_cols = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
    if image_cols:
        return "image" if "image" in image_cols else image_cols[0]
    for candidate in _IMAGE_NAMES:
        if candidate in columns:
            return candidate
    raise ValueError(f"No image column found in {name}; columns: {columns}. Pass image_column=...")


def _labels(data: Any, requested: Optional[str], name: str) -> tuple[Optional[str], list[str], np.ndarray]:
    import datasets

    columns = list(data.column_names)
    if requested == "":
        return None, [], np.full(len(data), -1, dtype=np.int64)
    if requested is not None and requested not in columns:
        raise ValueError(f"Label column {requested!r} not in {name}; columns: {columns}")
    column = requested
    if column is None:
        class_cols = [c for c, f in data.features.items() if isinstance(f, datasets.ClassLabel)]
        named = [c for c in _LABEL_NAMES if c in columns]
        # several ClassLabels (e.g. breed and species): prefer the one called label/labels
        preferred = [c for c in named if c in class_cols]
        column = (preferred or class_cols or named or [None])[0]
    if column is None:
        return None, [], np.full(len(data), -1, dtype=np.int64)

    feature = data.features[column]
    values = data.data.column(column).to_pylist()  # arrow column: no image decoding
    if isinstance(feature, datasets.ClassLabel):
        labels = np.asarray([-1 if v is None else v for v in values], dtype=np.int64)
        return column, list(feature.names), labels
    if all(isinstance(v, str) for v in values):
        class_names = sorted(set(values))
        index = {c: i for i, c in enumerate(class_names)}
        return column, class_names, np.asarray([index[v] for v in values], dtype=np.int64)
    try:
        labels = np.asarray([-1 if v is None else int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Label column {column!r} of {name} holds neither class ids nor class names ({err})"
        ) from err
    if labels.size and labels.min() < -1:
        raise ValueError(f"Label column {column!r} of {name} has negative class ids")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    return column, [str(i) for i in range(num_classes)], labels


#: Columns that name rows rather than label them: never label columns by default.
_ID_NAMES = ("id", "image_id", "idx", "index", "filename", "file_name", "file", "path", "url")


def label_columns(
    source: ImageSource, columns: Optional[Sequence[str]] = None, max_values: int = 1000
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Every label column of a dataset: column → (value names, int64 label per row, -1 = unknown).

    The source's class column comes first. Without ``columns``, every other
    ``ClassLabel``, integer or string column (not the image) is a label column,
    except row identifiers (``image_id``, ``filename``, ... or a column whose
    every row is distinct) and columns with more than ``max_values`` values.
    ``columns`` names them explicitly (unknown names raise ``ValueError``
    listing the dataset's columns).
    """
    import datasets

    data, name = source.dataset, source.source
    all_columns = [c for c in data.column_names if c != source.image_column]
    if columns is not None:
        missing = [c for c in columns if c not in all_columns]
        if missing:
            raise ValueError(f"Label columns {missing} not in {name}; its columns: {all_columns}")
        wanted = list(dict.fromkeys(columns))
    else:
        wanted = [c for c in all_columns if c == source.label_column or _is_label_column(data, c, max_values)]
    if source.label_column in wanted:  # the class column first
        wanted.remove(source.label_column)
        wanted.insert(0, source.label_column)
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for column in wanted:
        if column == source.label_column:
            out[column] = (list(source.class_names), np.asarray(source.labels, dtype=np.int64))
            continue
        feature = data.features[column]
        if not isinstance(feature, (datasets.ClassLabel, datasets.Value)):
            raise ValueError(f"Column {column!r} of {name} is not a label column (feature {type(feature).__name__})")
        _, names, labels = _labels(data, column, name)
        out[column] = (names, labels)
    return out


def _is_label_column(data: Any, column: str, max_values: int) -> bool:
    import datasets

    feature = data.features[column]
    if column.lower() in _ID_NAMES or column.lower().endswith("_id"):
        return False
    if isinstance(feature, datasets.ClassLabel):
        return True
    if not isinstance(feature, datasets.Value) or not (
            feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string", "bool")):
        return False
    values = data.data.column(column).to_pylist()
    distinct = len(set(values))
    return distinct <= max_values and not (len(values) > 20 and distinct == len(values))


def carve_validation(
    labels: Union[Sequence[int], np.ndarray], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic split of row indices into ``(train, val)``.

    Each class contributes ``round(fraction * n_class)`` rows to validation
    (at least one when the class has two or more rows and ``fraction > 0``), so
    rare classes are neither lost from training nor missing from validation.
    The same labels, fraction and seed always give the same split.

    Returns sorted ``int64`` index arrays.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        n_val = int(round(fraction * len(members)))
        if fraction > 0 and n_val == 0 and len(members) >= 2:
            n_val = 1
        n_val = min(n_val, len(members) - 1) if len(members) > 1 else n_val
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), val_idx.astype(np.int64)
