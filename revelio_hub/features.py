"""Cached feature stores: extract diffusion features once, train on them many times.

The original Revelio code recomputed diffusion features every epoch; here one extraction
writes a *store* (a directory for one dataset split) that the k-SAE, Diff-C and
atlas stages read back as tensors or as a :class:`datasets.Dataset`.

Layout (see ``docs/CONTRACTS.md``)::

    summary.json                 recipe, dataset, classes, layers, timesteps, counts, complete
    <layer>/t<t>/<chunk>.safetensors
        pooled    N×C    float32   mean of the spatial map
        spatial   N×C×H×W float16  only with spatial=True
        labels    N      int64     (-1 when unlabelled)
        image_ids N      int64     row index in the dataset split
        views     N      int64     0 = plain resize + center crop, >=1 = augmented
      metadata: "covered_ids" (every image id the chunk accounts for, including
      corrupt ones) and "skipped" ({id: reason} for corrupt images).

Why it is built this way:

* **Resume.** Work is cut into chunks of image ids. A chunk's files are written
  under a temporary name and renamed only when complete, and a chunk counts as
  done only when its file exists for *every* (layer, t). Rerunning the same
  command after a kill therefore skips done ids, never duplicates rows and never
  exposes a half-written file; leftovers are removed on the next start.
* **Multi-process.** Rank ``r`` of ``w`` handles ids with ``id % w == r`` and
  writes its own chunk files (the rank is part of the name), so processes never
  write the same file. The noise is seeded per image id by the backbone, so the
  values do not depend on which process handled an image or on batching.
* **Safety.** Only safetensors are ever read: a store from someone else cannot
  execute code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from .layer_names import canonical_layer
from .recipe import FeatureRecipe

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
FORMAT_VERSION = 1
_SHARD_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
# Summary keys that must agree before a run may resume into an existing store.
_IDENTITY_KEYS = ("recipe", "dataset", "class_names", "layers", "timesteps", "channels", "views", "spatial")
# Default number of images per chunk: pooled vectors are tiny, spatial maps are not
# (64 images of SD1.5 up_ft1 at 512 px are ~170 MB in fp16).
DEFAULT_SHARD_SIZE = 512
DEFAULT_SPATIAL_SHARD_SIZE = 64

PathLike = Union[str, os.PathLike]


@dataclass
class FeatureSet:
    """Rows of one (layer, t) entry, sorted by ``(image_id, view)``.

    Attributes:
        features: ``N×C`` float32 (pooled) or ``N×C×H×W`` float16 (spatial).
        labels: ``N`` int64 class ids (``-1`` when unlabelled).
        image_ids: ``N`` int64 row indices into the dataset split.
        views: ``N`` int64 view index (0 = un-augmented).
    """

    features: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    views: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def entry_dir(root: PathLike, layer: str, timestep: int) -> Path:
    """Directory holding the chunk files of one (layer, t) entry."""
    return Path(root) / layer / f"t{int(timestep)}"


def augment_view(image: Image.Image, image_id: int, view: int, image_size: int, seed: int = 0,
                 resize: str = "bicubic") -> Image.Image:
    """The ``view``-th training view of an image.

    View 0 is the image itself (the backbone applies the paper's resize + center
    crop). Views >= 1 follow the Diff-C training augmentation,
    ``RandomResizedCrop(image_size, scale=(0.8, 1.0))`` + horizontal flip, drawn
    from a generator seeded by ``(seed, image_id, view)``, so a view is the same
    on every rerun, rank and batch size. ``resize="bilinear"`` resamples the crop
    as torchvision's ``RandomResizedCrop`` does (the original Revelio code's), the
    default bicubic.
    """
    if view == 0:
        return image
    rng = np.random.default_rng([int(seed), int(image_id), int(view)])
    width, height = image.size
    area = width * height
    box = None
    for _ in range(10):
        target = area * rng.uniform(0.8, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # extreme aspect ratio: fall back to the central square-ish crop
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    resample = Image.Resampling.BILINEAR if resize == "bilinear" else Image.Resampling.BICUBIC
    out = image.resize((image_size, image_size), resample=resample, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(_TMP_PREFIX + path.name)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _read_summary(root: Path) -> Optional[dict[str, Any]]:
    path = root / SUMMARY_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _chunk_names(root: Path, entries: Sequence[tuple[str, int]]) -> dict[tuple[str, int], set[str]]:
    out = {}
    for layer, t in entries:
        directory = entry_dir(root, layer, t)
        names = set()
        if directory.is_dir():
            names = {
                p.name
                for p in directory.iterdir()
                if p.name.endswith(_SHARD_SUFFIX) and not p.name.startswith(".")
            }
        out[(layer, t)] = names
    return out


def _chunk_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "covered_ids": json.loads(meta.get("covered_ids", "[]")),
        "skipped": {int(k): v for k, v in json.loads(meta.get("skipped", "{}")).items()},
    }


class FeatureStoreWriter:
    """Writes one rank's chunks of a feature store and keeps it resumable.

    Use from every process of a run::

        writer = FeatureStoreWriter(out_dir, header, rank=r, world_size=w)
        if r == 0:
            writer.initialize(overwrite=False)   # create, or validate + clean up leftovers
        barrier()
        todo = writer.pending_ids()              # this rank's ids not in complete chunks
        ... writer.write_chunk(...) for each chunk ...
        barrier()
        if r == 0:
            writer.finalize()                    # counts, skipped list, complete flag

    ``header`` is the summary without counts: ``recipe``, ``dataset``,
    ``label_column``, ``class_names``, ``layers``, ``timesteps``, ``channels``,
    ``views``, ``spatial``.
    """

    def __init__(self, out_dir: PathLike, header: dict[str, Any], *, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.root = Path(out_dir)
        self.header = dict(header)
        self.rank = rank
        self.world_size = world_size
        self.entries = [(str(layer), int(t)) for layer in header["layers"] for t in header["timesteps"]]

    # -- set-up ----------------------------------------------------------------------------------
    def initialize(self, overwrite: bool = False) -> None:
        """Create the store or validate an existing one (main process, before any rank writes).

        Removes temporary files and chunks that exist for only some entries
        (a run killed between renames), so every visible chunk is complete.

        Raises:
            ValueError: the directory holds a store with a different recipe or
                something that is not a feature store, and ``overwrite`` is false.
        """
        self.validate(overwrite)
        summary = _read_summary(self.root)
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
            summary = None
        if summary is None:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write_json(self.root / SUMMARY_NAME, self._summary(complete=False))
            return
        self._check_same_setup(summary)
        self._remove_leftovers()

    def validate(self, overwrite: bool = False) -> None:
        """Read-only check that this run may write to ``out_dir``; safe to call on every rank.

        Every rank calls it before the main process touches anything, so a bad
        setup fails on all processes alike instead of leaving some waiting at a barrier.
        """
        summary = _read_summary(self.root)
        not_empty = self.root.is_dir() and any(self.root.iterdir())
        if summary is None and not_empty:
            raise ValueError(
                f"{self.root} is not empty and is not a feature store (no {SUMMARY_NAME}); "
                "refusing to write or delete there. Choose an empty or new output directory."
            )
        if summary is not None and not overwrite:
            self._check_same_setup(summary)

    def check(self) -> None:
        """Validate the store from any rank (after :meth:`initialize` ran on the main process)."""
        summary = _read_summary(self.root)
        if summary is None:
            raise ValueError(f"{self.root} has no {SUMMARY_NAME}; call initialize() on the main process first")
        self._check_same_setup(summary)

    def _check_same_setup(self, summary: dict[str, Any]) -> None:
        diffs = []
        for key in _IDENTITY_KEYS:
            stored, wanted = summary.get(key), self.header.get(key)
            if isinstance(stored, dict) and isinstance(wanted, dict):
                for sub in sorted(set(stored) | set(wanted)):
                    if stored.get(sub) != wanted.get(sub):
                        diffs.append(f"{key}.{sub}: stored {stored.get(sub)!r}, requested {wanted.get(sub)!r}")
            elif stored != wanted:
                diffs.append(f"{key}: stored {stored!r}, requested {wanted!r}")
        if diffs:
            raise ValueError(
                f"Cannot resume into the feature store {self.root}: it was extracted with a different setup ("
                + "; ".join(diffs)
                + "). Rerun with the original arguments to resume, or pass --overwrite (overwrite=True) "
                "to delete it and start over."
            )

    def _remove_leftovers(self) -> None:
        names = _chunk_names(self.root, self.entries)
        complete = set.intersection(*names.values()) if names else set()
        for (layer, t), have in names.items():
            directory = entry_dir(self.root, layer, t)
            for name in sorted(have - complete):
                logger.warning("Removing incomplete chunk %s (a run was interrupted)", directory / name)
                (directory / name).unlink()
            if directory.is_dir():
                for tmp in directory.glob(_TMP_PREFIX + "*"):
                    tmp.unlink()
        for tmp in self.root.glob(_TMP_PREFIX + "*"):
            tmp.unlink()

    # -- progress --------------------------------------------------------------------------------
    def complete_chunks(self) -> list[str]:
        """Names of chunks present for every entry (the only ones that count)."""
        names = _chunk_names(self.root, self.entries)
        return sorted(set.intersection(*names.values())) if names else []

    def done_ids(self) -> set[int]:
        """Image ids accounted for by complete chunks (written or skipped as corrupt)."""
        first = entry_dir(self.root, *self.entries[0])
        done: set[int] = set()
        for name in self.complete_chunks():
            done.update(_chunk_metadata(first / name)["covered_ids"])
        return done

    def pending_ids(self, num_images: int) -> list[int]:
        """This rank's image ids (``id % world_size == rank``) that still need work."""
        done = self.done_ids()
        return [i for i in range(self.rank, num_images, self.world_size) if i not in done]

    # -- writing ---------------------------------------------------------------------------------
    def chunk_name(self, first_id: int) -> str:
        return f"chunk-w{self.world_size:03d}-r{self.rank:03d}-{int(first_id):09d}{_SHARD_SUFFIX}"

    def write_chunk(
        self,
        covered_ids: Sequence[int],
        image_ids: Sequence[int],
        views: Sequence[int],
        labels: Sequence[int],
        pooled: dict[tuple[str, int], torch.Tensor],
        spatial: Optional[dict[tuple[str, int], torch.Tensor]] = None,
        skipped: Optional[dict[int, str]] = None,
    ) -> str:
        """Write one chunk for every entry: temp files first, then atomic renames.

        ``covered_ids`` are all ids this chunk accounts for (rows + skipped ones);
        rows are given by ``image_ids``/``views``/``labels``.
        """
        from safetensors.torch import save_file

        if not covered_ids:
            raise ValueError("A chunk must cover at least one image id")
        name = self.chunk_name(min(covered_ids))
        meta = {
            "covered_ids": json.dumps(sorted(int(i) for i in covered_ids)),
            "skipped": json.dumps({str(k): v for k, v in (skipped or {}).items()}),
            "format_version": str(FORMAT_VERSION),
        }
        common = {
            "labels": torch.as_tensor(list(labels), dtype=torch.int64),
            "image_ids": torch.as_tensor(list(image_ids), dtype=torch.int64),
            "views": torch.as_tensor(list(views), dtype=torch.int64),
        }
        n = int(common["labels"].shape[0])
        pending = []
        for key in self.entries:
            tensors = dict(common)
            tensors["pooled"] = pooled[key].to(torch.float32).contiguous()
            if self.header.get("spatial"):
                if spatial is None or key not in spatial:
                    raise ValueError(f"spatial maps for {key} are missing from a spatial store")
                tensors["spatial"] = spatial[key].to(torch.float16).contiguous()
            for tname, tensor in tensors.items():
                if tensor.shape[0] != n:
                    raise ValueError(f"{key} {tname}: {tensor.shape[0]} rows, expected {n}")
            directory = entry_dir(self.root, *key)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (_TMP_PREFIX + name)
            save_file(tensors, str(tmp), metadata=meta)
            pending.append((tmp, directory / name))
        for tmp, final in pending:
            os.replace(tmp, final)
        return name

    # -- finishing -------------------------------------------------------------------------------
    def finalize(self) -> dict[str, Any]:
        """Count what the complete chunks hold and write the final ``summary.json``."""
        first = entry_dir(self.root, *self.entries[0])
        covered: set[int] = set()
        skipped: dict[int, str] = {}
        images: set[int] = set()
        rows = 0
        for name in self.complete_chunks():
            meta = _chunk_metadata(first / name)
            covered.update(meta["covered_ids"])
            skipped.update(meta["skipped"])
            with safe_open(str(first / name), framework="pt") as f:
                ids = f.get_tensor("image_ids")
            images.update(ids.tolist())
            rows += int(ids.shape[0])
        num_rows = int(self.header["dataset"]["num_rows"])
        complete = covered >= set(range(num_rows))
        summary = self._summary(complete=complete)
        summary.update(
            num_images=len(images),
            num_rows=rows,
            num_skipped=len(skipped),
            skipped=[{"image_id": i, "reason": skipped[i]} for i in sorted(skipped)],
        )
        _atomic_write_json(self.root / SUMMARY_NAME, summary)
        if skipped:
            logger.warning("%d corrupt images were skipped (listed in %s)", len(skipped), self.root / SUMMARY_NAME)
        return summary

    def _summary(self, complete: bool) -> dict[str, Any]:
        out = {"format_version": FORMAT_VERSION}
        out.update(self.header)
        out.update(num_images=None, num_rows=None, num_skipped=None, skipped=[], complete=complete)
        return out


def build_header(
    backbone: Any,
    source: Any,
    layers: Sequence[str],
    timesteps: Sequence[int],
    *,
    spatial: bool,
    views: int,
    seed: int,
    ensemble: int,
) -> dict[str, Any]:
    """The identity part of ``summary.json`` (everything a resume must match)."""
    recipe = backbone.recipe(layers[0], timesteps[0], granularity="pooled", ensemble=ensemble, seed=seed).to_dict()
    for key in ("layer", "timestep", "d_in", "granularity"):
        recipe.pop(key, None)
    return {
        "recipe": recipe,
        "dataset": source.describe(),
        "label_column": source.label_column,
        "class_names": list(source.class_names),
        "layers": list(layers),
        "timesteps": [int(t) for t in timesteps],
        "channels": {layer: int(backbone.channels(layer)) for layer in layers},
        "views": int(views),
        "spatial": bool(spatial),
    }


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def check_request(backbone: Any, layers: Sequence[str], timesteps: Sequence[int]) -> tuple[list[str], list[int]]:
    """The requested layers (canonical names) and timesteps, without repeats; unknown ones fail clearly."""
    layers = _unique(canonical_layer(layer) for layer in layers)
    timesteps = _unique(int(t) for t in timesteps)
    if not layers or not timesteps:
        raise ValueError("Give at least one layer and one timestep")
    valid_layers = list(getattr(backbone, "layers", layers))
    bad = [layer for layer in layers if layer not in valid_layers]
    if bad:
        raise ValueError(f"Unknown layer(s) {bad} for {backbone.name}; valid layers: {valid_layers}")
    num_t = int(getattr(backbone, "num_train_timesteps", 1000))
    bad_t = [t for t in timesteps if not 0 <= t < num_t]
    if bad_t:
        raise ValueError(f"Timestep(s) {bad_t} outside [0, {num_t}) for {backbone.name}")
    return layers, timesteps


def extract_to_store(
    backbone: Any,
    source: Any,
    out_dir: PathLike,
    layers: Sequence[str],
    timesteps: Sequence[int],
    *,
    spatial: bool = False,
    views: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    ensemble: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    max_images: Optional[int] = None,
    shard_size: Optional[int] = None,
    num_workers: int = 0,
    barrier: Optional[Callable[[], None]] = None,
    on_chunk: Optional[Callable[[str], None]] = None,
) -> "FeatureStore":
    """Extract features of a dataset split into a resumable store.

    Args:
        backbone: a loaded :class:`revelio_hub.backbones.Backbone`.
        source: an :class:`~revelio_hub.data.ImageSource`, or anything
            :func:`~revelio_hub.data.open_image_dataset` accepts (its ``train`` split).
        out_dir: store directory (created; an existing store with the same
            setup is resumed).
        layers, timesteps: what to extract; every (layer, t) becomes an entry.
        spatial: also keep the unpooled maps (fp16); pooled vectors are always kept.
        views: rows per image: view 0 is the plain image, views >= 1 are
            augmented (see :func:`augment_view`) for Diff-C training.
        batch_size: images per backbone call.
        seed, ensemble: noise seed and number of noise draws averaged.
        rank, world_size: this process's share (``id % world_size == rank``).
        overwrite: delete an existing store at ``out_dir`` first.
        max_images: only the first ``max_images`` rows.
        shard_size: images per chunk file (default 512, or 64 with ``spatial``);
            smaller chunks lose less work on a kill, larger ones mean fewer files.
        num_workers: threads decoding images.
        barrier: synchronises processes (``accelerator.wait_for_everyone``);
            required when ``world_size > 1`` so rank 0 can set up the store first.
        on_chunk: called with each chunk's name after it is committed (progress hooks, tests).

    Returns:
        The store (``complete`` once every rank finished).
    """
    from .data import ImageSource, open_image_dataset

    if world_size > 1 and barrier is None:
        raise ValueError("world_size > 1 needs barrier= (e.g. accelerator.wait_for_everyone)")
    for name, value in (("views", views), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    layers, timesteps = check_request(backbone, layers, timesteps)
    if not isinstance(source, ImageSource):
        source = open_image_dataset(source)
    source = source.limit(max_images)
    header = build_header(backbone, source, layers, timesteps, spatial=spatial, views=views, seed=seed, ensemble=ensemble)
    writer = _open_writer(out_dir, header, rank, world_size, overwrite, barrier)
    todo = writer.pending_ids(len(source))
    chunk = shard_size or (DEFAULT_SPATIAL_SHARD_SIZE if spatial else DEFAULT_SHARD_SIZE)
    done_shards = len(writer.complete_chunks())
    if rank == 0 and done_shards and todo:
        print(f"resuming from shard {done_shards} ({len(writer.done_ids())} of {len(source)} images already "
              f"in {out_dir})", file=sys.stderr)
    chunks = [todo[start : start + chunk] for start in range(0, len(todo), chunk)]
    _extract_pending(writer, backbone, source, chunks, layers, timesteps, spatial=spatial, views=views,
                     batch_size=batch_size, seed=seed, ensemble=ensemble, num_workers=num_workers, on_chunk=on_chunk,
                     bar_total=len(range(rank, len(source), world_size)) if progress else None, rank=rank)
    if barrier is not None:
        barrier()
    if rank == 0:
        writer.finalize()
    if barrier is not None:
        barrier()
    return FeatureStore(out_dir)


def _open_writer(out_dir: PathLike, header: dict[str, Any], rank: int, world_size: int, overwrite: bool,
                 barrier: Optional[Callable[[], None]]) -> "FeatureStoreWriter":
    """Validate on every rank, let rank 0 set the store up, then check it everywhere."""
    writer = FeatureStoreWriter(out_dir, header, rank=rank, world_size=world_size)
    writer.validate(overwrite)  # every rank, before anyone writes: a bad setup fails everywhere
    if barrier is not None:
        barrier()
    if rank == 0:
        writer.initialize(overwrite=overwrite)
    if barrier is not None:
        barrier()
    writer.check()
    return writer


def _extract_pending(writer: "FeatureStoreWriter", backbone: Any, source: Any, chunks: list[list[int]],
                     layers: list[str], timesteps: list[int], *, spatial: bool, views: int, batch_size: int, seed: int,
                     ensemble: int, num_workers: int, on_chunk: Optional[Callable[[str], None]],
                     bar_total: Optional[int], rank: int) -> None:
    """Extract and commit ``chunks`` one after the other (the next one decoded on a thread meanwhile)."""
    todo = sum(len(c) for c in chunks)
    bar = None
    if bar_total is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=bar_total, initial=bar_total - todo, desc=f"extract[rank {rank}]", unit="img")

    def prepare(ids: list[int]) -> PreparedRows:
        return prepare_rows(source, ids, views, backbone.image_size, seed, num_workers,
                            getattr(backbone, "resize", "bicubic"))

    # Decode and augment the next chunk on a thread while the backbone works on this one,
    # so an accelerator does not wait for JPEG decoding between chunks.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="revelio-decode") as pool:
            upcoming = pool.submit(prepare, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                prepared = upcoming.result()
                upcoming = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                _extract_chunk(writer, backbone, source, prepared, layers, timesteps, spatial, batch_size, seed,
                               ensemble, on_chunk)
                if bar is not None:
                    bar.update(len(prepared.covered_ids))
    finally:
        if bar is not None:
            bar.close()


@dataclass
class PreparedRows:
    """Decoded, augmented rows of one chunk, ready for the backbone."""

    covered_ids: list[int]
    row_images: list[Image.Image]
    row_ids: list[int]
    row_views: list[int]
    skipped_ids: list[int]


def prepare_rows(
    source: Any, ids: list[int], views: int, image_size: int, seed: int, num_workers: int,
    resize: str = "bicubic",
) -> PreparedRows:
    ok_ids, images, skipped_ids = source.load_images(ids, num_workers=num_workers)
    row_images, row_ids, row_views = [], [], []
    for image_id, image in zip(ok_ids, images):
        for view in range(views):
            row_images.append(augment_view(image, image_id, view, image_size, seed, resize))
            row_ids.append(image_id)
            row_views.append(view)
    return PreparedRows(list(ids), row_images, row_ids, row_views, skipped_ids)


def extract_rows(
    backbone: Any, images: Sequence[Image.Image], image_ids: Sequence[int], layers: Sequence[str],
    timesteps: Sequence[int], *, spatial: bool = False, batch_size: int = 8, seed: int = 0, ensemble: int = 1,
) -> tuple[dict[tuple[str, int], list[torch.Tensor]], dict[tuple[str, int], list[torch.Tensor]]]:
    """One backbone pass per ``batch_size`` images for every (layer, t): ``(pooled, maps)`` lists of fp32 CPU batches.

    ``maps`` (fp16) is filled only with ``spatial``. Shared by the store writer and the
    streaming SAE trainer, so both see exactly the same vectors for an image.
    """
    keys = [(layer, t) for layer in layers for t in timesteps]
    pooled: dict[tuple[str, int], list[torch.Tensor]] = {k: [] for k in keys}
    maps: dict[tuple[str, int], list[torch.Tensor]] = {k: [] for k in keys}
    for b in range(0, len(images), batch_size):
        out = backbone.extract(list(images[b : b + batch_size]), layers, timesteps, pool=None if spatial else "mean",
                               seed=seed, ensemble=ensemble, batch_size=batch_size,
                               image_ids=list(image_ids[b : b + batch_size]))
        for key in keys:
            x = out[key].detach().to("cpu", torch.float32)
            if spatial:
                pooled[key].append(x.mean(dim=(2, 3)))
                maps[key].append(x.to(torch.float16))
            else:
                pooled[key].append(x.flatten(1) if x.dim() > 2 else x)
    return pooled, maps


def _extract_chunk(
    writer: FeatureStoreWriter,
    backbone: Any,
    source: Any,
    prepared: PreparedRows,
    layers: list[str],
    timesteps: list[int],
    spatial: bool,
    batch_size: int,
    seed: int,
    ensemble: int,
    on_chunk: Optional[Callable[[str], None]],
) -> None:
    row_ids, row_views = prepared.row_ids, prepared.row_views
    pooled, maps = extract_rows(backbone, prepared.row_images, row_ids, layers, timesteps, spatial=spatial,
                                batch_size=batch_size, seed=seed, ensemble=ensemble)
    pooled_t = {
        k: torch.cat(v) if v else torch.zeros(0, writer.header["channels"][k[0]]) for k, v in pooled.items()
    }
    maps_t = None
    if spatial:
        maps_t = {
            k: torch.cat(v) if v else torch.zeros(0, writer.header["channels"][k[0]], 0, 0, dtype=torch.float16)
            for k, v in maps.items()
        }
    name = writer.write_chunk(
        covered_ids=prepared.covered_ids,
        image_ids=row_ids,
        views=row_views,
        labels=[int(source.labels[i]) for i in row_ids],
        pooled=pooled_t,
        spatial=maps_t,
        skipped={i: source.skipped.get(i, "could not decode") for i in prepared.skipped_ids},
    )
    if on_chunk is not None:
        on_chunk(name)


class FeatureStore:
    """Read a feature store written by :func:`extract_to_store`.

    Memory: pooled vectors are small, but spatial maps are not (10k images of
    SD1.5 ``up_ft1`` at 512 px are ~27 GB in fp16). :meth:`load` therefore takes
    ``views=`` and ``image_ids=`` filters and reads each chunk file lazily, so
    only the selected rows are held in memory (plus one chunk at a time).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        summary = _read_summary(self.path)
        if summary is None:
            raise ValueError(
                f"{self.path} is not a feature store (no {SUMMARY_NAME}); "
                "create one with training/extract_features.py"
            )
        self.summary: dict[str, Any] = summary

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, backbone={self.summary['recipe'].get('backbone')!r}, "
            f"entries={self.entries}, num_images={self.num_images}, complete={self.complete})"
        )

    @property
    def entries(self) -> list[tuple[str, int]]:
        return [(layer, int(t)) for layer in self.summary["layers"] for t in self.summary["timesteps"]]

    @property
    def class_names(self) -> list[str]:
        return list(self.summary.get("class_names") or [])

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))

    @property
    def views(self) -> int:
        return int(self.summary.get("views", 1))

    @property
    def has_spatial(self) -> bool:
        return bool(self.summary.get("spatial"))

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self.summary.get("skipped") or [])

    @property
    def num_images(self) -> int:
        """Number of distinct images with features (corrupt ones excluded)."""
        if self.summary.get("num_images") is not None:
            return int(self.summary["num_images"])
        layer, t = self.entries[0]
        return int(torch.unique(self.load(layer, t, views=0).image_ids).numel())

    def recipe(self, layer: str, t: int, granularity: str = "pooled") -> FeatureRecipe:
        """The :class:`FeatureRecipe` of one entry (what SAE/Diff-C configs record)."""
        layer = self._check_entry(layer, t)
        data = dict(self.summary["recipe"])
        data.update(layer=layer, timestep=int(t), d_in=int(self.summary["channels"][layer]), granularity=granularity)
        return FeatureRecipe.from_dict(data)

    def shard_paths(self, layer: str, t: int) -> list[Path]:
        """Committed chunk files of one entry (temporary files ignored)."""
        layer = self._check_entry(layer, t)
        directory = entry_dir(self.path, layer, t)
        if not directory.is_dir():
            return []
        return sorted(
            p for p in directory.iterdir() if p.name.endswith(_SHARD_SUFFIX) and not p.name.startswith(".")
        )

    def load(
        self,
        layer: str,
        t: int,
        kind: str = "pooled",
        *,
        views: Union[None, int, Sequence[int]] = None,
        image_ids: Optional[Sequence[int]] = None,
    ) -> FeatureSet:
        """Load the rows of one entry, sorted by ``(image_id, view)``.

        Args:
            kind: ``"pooled"`` (N×C float32) or ``"spatial"`` (N×C×H×W float16).
            views: keep only these view indices (e.g. ``0`` for un-augmented rows).
            image_ids: keep only these images (e.g. a training subset).
        """
        layer = self._check_entry(layer, t)
        if kind not in ("pooled", "spatial"):
            raise ValueError(f"kind must be 'pooled' or 'spatial', got {kind!r}")
        if kind == "spatial" and not self.has_spatial:
            raise ValueError(
                f"{self.path} holds pooled features only; re-extract with --spatial to get spatial maps"
            )
        if not self.complete:
            logger.warning("Feature store %s is incomplete (extraction unfinished); loading what exists", self.path)
        view_set = None if views is None else np.atleast_1d(np.asarray(views, dtype=np.int64))
        id_set = None if image_ids is None else np.asarray(list(image_ids), dtype=np.int64)

        plan, labels, ids, vws = self._plan_rows(layer, t, view_set, id_set)
        if not plan:
            channels = int(self.summary["channels"][layer])
            empty = torch.zeros((0, channels), dtype=torch.float32 if kind == "pooled" else torch.float16)
            z = torch.zeros(0, dtype=torch.int64)
            return FeatureSet(empty, z, z.clone(), z.clone())
        image_ids_t, views_t = torch.cat(ids), torch.cat(vws)
        order = np.lexsort((views_t.numpy(), image_ids_t.numpy()))
        destination = np.empty_like(order)
        destination[order] = np.arange(order.size)

        out = self._copy_rows(plan, kind, order, destination)
        sort = torch.from_numpy(order)
        return FeatureSet(
            features=out,
            labels=torch.cat(labels)[sort],
            image_ids=image_ids_t[sort],
            views=views_t[sort],
        )

    def _plan_rows(self, layer: str, t: int, view_set: Optional[np.ndarray], id_set: Optional[np.ndarray]) -> tuple:
        """Pass 1 of :meth:`load`: ``(plan, labels, ids, views)``, the (shard, rows) to read and their index tensors."""
        plan, labels, ids, vws = [], [], [], []
        for shard in self.shard_paths(layer, t):
            with safe_open(str(shard), framework="pt") as f:
                shard_ids = f.get_tensor("image_ids")
                if shard_ids.numel() == 0:
                    continue
                shard_views = f.get_tensor("views")
                mask = np.ones(shard_ids.shape[0], dtype=bool)
                if view_set is not None:
                    mask &= np.isin(shard_views.numpy(), view_set)
                if id_set is not None:
                    mask &= np.isin(shard_ids.numpy(), id_set)
                if not mask.any():
                    continue
                rows = np.flatnonzero(mask)
                index = torch.from_numpy(rows)
                plan.append((shard, rows))
                labels.append(f.get_tensor("labels")[index])
                ids.append(shard_ids[index])
                vws.append(shard_views[index])
        return plan, labels, ids, vws

    @staticmethod
    def _copy_rows(plan: list, kind: str, order: np.ndarray, destination: np.ndarray) -> torch.Tensor:
        """Pass 2 of :meth:`load`: each shard's selected rows copied straight to their sorted place.

        The peak memory is the result plus one shard (spatial maps can be tens of GB).
        """
        out = None
        offset = 0
        for shard, rows in plan:
            with safe_open(str(shard), framework="pt") as f:
                n_rows = f.get_slice(kind).get_shape()[0]
                if rows.size == n_rows:
                    x = f.get_tensor(kind)
                elif rows[-1] - rows[0] + 1 == rows.size:  # contiguous: read only that slice
                    x = f.get_slice(kind)[int(rows[0]) : int(rows[-1]) + 1]
                else:
                    x = f.get_tensor(kind)[torch.from_numpy(rows)]
            if out is None:
                out = torch.empty((order.size, *x.shape[1:]), dtype=x.dtype)
            out[torch.from_numpy(destination[offset : offset + rows.size])] = x
            offset += rows.size
            del x
        return out

    def to_dataset(
        self,
        layer: str,
        t: int,
        kind: str = "pooled",
        *,
        views: Union[None, int, Sequence[int]] = None,
        image_ids: Optional[Sequence[int]] = None,
    ) -> Any:
        """One entry as a :class:`datasets.Dataset` with columns ``features``, ``label``, ``image_id``, ``view``.

        ``features`` is a fixed-length float32 list (pooled) or an fp16
        ``Array3D`` (spatial); ``label`` is a ``ClassLabel`` when class names are known.
        Use ``.with_format("torch")`` for tensors.
        """
        import datasets

        fs = self.load(layer, t, kind, views=views, image_ids=image_ids)
        channels = int(self.summary["channels"][layer])
        if kind == "pooled":
            feature_type = datasets.List(datasets.Value("float32"), length=channels)
        else:
            shape = tuple(fs.features.shape[1:]) if len(fs) else (channels, 0, 0)
            feature_type = datasets.Array3D(shape=shape, dtype="float16")
        names = self.class_names
        label_type = (
            datasets.ClassLabel(names=names)
            if names and (len(fs) == 0 or int(fs.labels.min()) >= 0)
            else datasets.Value("int64")
        )
        features = datasets.Features(
            {
                "features": feature_type,
                "label": label_type,
                "image_id": datasets.Value("int64"),
                "view": datasets.Value("int64"),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "features": fs.features.numpy(),
                "label": fs.labels.numpy(),
                "image_id": fs.image_ids.numpy(),
                "view": fs.views.numpy(),
            },
            features=features,
        )

    def _check_entry(self, layer: str, t: int) -> str:
        """The entry's canonical layer name (``mid_block`` -> ``bottleneck``); ``ValueError`` when it is absent."""
        layer = canonical_layer(layer)
        if (layer, int(t)) not in self.entries:
            raise ValueError(f"No entry ({layer!r}, t={t}) in {self.path}; available: {self.entries}")
        return layer
