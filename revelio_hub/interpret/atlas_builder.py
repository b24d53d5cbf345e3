"""Building a neuron atlas: stream image batches into statistics, then finalize them into a :class:`NeuronAtlas`.

:func:`build_atlas` streams (x, labels, image_ids) batches through the SAE into
the accumulators of :mod:`~revelio_hub.interpret.atlas_statistics`;
:func:`finalize_atlas` turns them into the read model in named steps (label
evidence, peak positions, the reconstruction-error distribution, the layer
summary, atlas.json, example summaries, thumbnails and heat maps). A
multi-process build (``training/build_atlas.py``) feeds its own accumulators and
calls :func:`finalize_atlas` once on the merged ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from revelio_hub.interpret.atlas_config import ERROR_QUANTILES, FORMAT_VERSION, TOP_LABELS_PREFIX, AtlasConfig, PathLike
from revelio_hub.interpret.atlas_model import NeuronAtlas
from revelio_hub.interpret.atlas_rendering import add_heatmaps, add_thumbnails
from revelio_hub.interpret.atlas_statistics import (
    TopKAccumulator,
    pre_topk_accumulator,
    purity_and_entropy,
    sigma_labels,
)
from revelio_hub.interpret.claim_calibration import calibrate_claims
from revelio_hub.interpret.neuron_labels import ActivationLog, value_auroc
from revelio_hub.interpret.ood import image_reconstruction_error
from revelio_hub.interpret.where import peak_positions

__all__ = ["build_atlas", "finalize_atlas", "store_batches", "atlas_inputs", "Batch"]

Batch = tuple  # (x, labels, image_ids)


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def build_atlas(
    batches: Iterable[Batch],
    class_names: Optional[Sequence[str]] = None,
    *,
    sae: Any = None,
    config: Optional[AtlasConfig] = None,
    label_columns: Optional[Mapping[str, Sequence[str]]] = None,
    thumbnails: Optional[Callable[[int], Any]] = None,
    heatmap_maps: Optional[Callable[[Sequence[int]], torch.Tensor]] = None,
    heatmap_neurons: Optional[Sequence[int]] = None,
    out: Optional[PathLike] = None,
    extra_meta: Optional[dict[str, Any]] = None,
    accumulator: Optional[TopKAccumulator] = None,
    progress: bool = False,
    device: Union[str, torch.device, None] = None,
) -> NeuronAtlas:
    """Build a :class:`NeuronAtlas` by streaming over batches.

    Args:
        batches: iterable of ``(x, labels, image_ids)``. Without ``sae``, ``x``
            is already B×n_latents image-level activations; with ``sae``, ``x``
            is a feature batch (B×d pooled, or B×d×H×W maps) that is turned into
            activations with ``sae.image_activations`` (which respects the SAE's
            granularity), and the SAE's reconstruction error of each image is
            recorded (its distribution is what the app's out-of-distribution
            warning compares against). ``labels`` is a B tensor of the class
            column, a dict column → B tensor (every column of ``label_columns``),
            or ``None`` (unlabelled data); ``image_ids`` index the dataset rows
            used for thumbnails.
        class_names: names of the class ids (the first label column).
        sae: optional :class:`~revelio_hub.sae.model.KSparseAutoencoder`.
        config: :class:`AtlasConfig` (top-N, purity top, thumbnail size, summary thresholds, ...).
        label_columns: column → value names, the first being the class column
            (default: one column ``"class"`` with ``class_names``).
        thumbnails: ``image_id -> PIL image`` (or ``None`` if unavailable);
            only images that appear in some neuron's top list are loaded.
        heatmap_maps: optional ``image_ids -> N×d×H×W`` feature maps; with
            ``sae`` and ``thumbnails`` given, stores a heat-map overlay of each
            of ``heatmap_neurons`` (default: the 64 most frequent) on its top
            images, via ``sae.activation_map``.
        out: folder to write; the atlas is also returned in memory.
        extra_meta: merged into ``atlas.json`` (e.g. recipe, layer, timestep).
        accumulator: continue from (or merge into) an existing accumulator,
            e.g. one gathered from several processes.
        progress: show a tqdm bar.
        device: where to run the SAE and the top-k merge (default: the SAE's device or CPU).
    """
    config = config or AtlasConfig()
    columns = _label_columns(class_names, label_columns)
    class_names = list(next(iter(columns.values()))) if columns else []
    if device is None:
        device = next(sae.parameters()).device if sae is not None else "cpu"
    stream = _AtlasStream(config, columns, device, accumulator)
    iterator: Iterator = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        iterator = iter(tqdm(batches, desc="atlas", unit="batch"))
    with torch.no_grad():
        for batch in iterator:
            stream.add(batch, sae)
    if stream.acc is None:
        raise ValueError("build_atlas got no batches: there is nothing to build an atlas from")
    return finalize_atlas(stream.acc, class_names, config=config, sae=sae, thumbnails=thumbnails,
                          heatmap_maps=heatmap_maps, heatmap_neurons=heatmap_neurons, out=out,
                          extra_meta=extra_meta, progress=progress, log=stream.log, label_columns=columns,
                          pre_topk=stream.pre_topk, peak_grid=stream.peak_grid)


def activation_log(batches: Iterable[Batch], sae: Any, label_columns: Mapping[str, Sequence[str]],
                   config: Optional[AtlasConfig] = None) -> ActivationLog:
    """Every image's activations and labels, as an atlas build logs them, without building the atlas.

    What claims are calibrated from (:func:`~revelio_hub.interpret.claim_calibration.calibrate_claims`):
    lets a study recalibrate an existing atlas' claims under other settings.
    """
    stream = _AtlasStream(config or AtlasConfig(), {c: list(v) for c, v in label_columns.items()},
                          next(sae.parameters()).device)
    with torch.no_grad():
        for batch in batches:
            stream.add(batch, sae)
    if stream.log is None:
        raise ValueError("activation_log got no batches")
    return stream.log


@dataclass
class _AtlasStream:
    """The running statistics of one build, created on the first batch (when the number of latents is known).

    ``acc``: top-N and firing rates of the SAE's TopK codes (or the given
    activations); ``pre_topk``: the same on ReLU of the pre-TopK codes (the
    paper's σ_label); ``log``: every image's activations, labels, errors and peaks.
    """

    config: AtlasConfig
    columns: dict[str, list[str]]
    device: Union[str, torch.device]
    acc: Optional[TopKAccumulator] = None
    pre_topk: Optional[TopKAccumulator] = None
    log: Optional[ActivationLog] = None
    peak_grid: Optional[tuple[int, ...]] = None

    def add(self, batch: Any, sae: Any) -> None:
        """Fold in one ``(x, labels, image_ids)`` batch; bad labels raise before any statistic changes."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise ValueError("each batch must be a tuple (x, labels, image_ids)")
        x, labels, image_ids = batch
        acts, dense, errors, peaks = self._codes(_as_tensor(x, torch.float32), sae)
        ids = _as_tensor(image_ids, torch.long).reshape(-1)
        by_column = _batch_labels(labels, self.columns, ids)
        first = next(iter(self.columns), None)
        labs = by_column.get(first, torch.full_like(ids, -1)) if first else torch.full_like(ids, -1)
        _check_label_names(by_column, self.columns, first)
        if self.acc is None:
            self.acc = TopKAccumulator(acts.shape[1], self.config.top_n, self.config.threshold, device=self.device)
        if self.log is None:
            self.log = ActivationLog(acts.shape[1], list(self.columns), self.config.threshold)
        if dense is not None:
            if self.pre_topk is None:
                self.pre_topk = pre_topk_accumulator(acts.shape[1], self.config, self.device)
            self.pre_topk.update(dense, labs, ids)
        self.acc.update(acts, labs, ids)
        self.log.update(acts, ids, by_column, errors, peaks)

    def _codes(self, x: torch.Tensor, sae: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], Any, Any]:
        """(image activations, pre-TopK codes, reconstruction errors, peak positions) of a batch.

        Without an SAE, ``x`` already is the activations and the rest is ``None``.
        """
        if sae is None:
            return x, None, None, None
        xs = x.to(device=self.device, dtype=next(sae.parameters()).dtype)
        acts, dense = (a.float() for a in sae.image_codes(xs))
        errors = image_reconstruction_error(sae, xs)
        peaks = None
        if xs.dim() == 4 and getattr(sae, "granularity", "pooled") != "pooled":
            peaks, self.peak_grid = peak_positions(sae, xs), tuple(xs.shape[2:])
        return acts, dense, errors, peaks


def _check_label_names(by_column: Mapping[str, torch.Tensor], columns: Mapping[str, Sequence[str]],
                       first: Optional[str]) -> None:
    """Every label id of the batch must name a value of its column."""
    for name, lab in by_column.items():
        if lab.numel() and int(lab.max()) >= len(columns[name]):
            what = "class names" if name == first else f"values in column {name!r}"
            raise ValueError(f"label {int(lab.max())} has no name: only {len(columns[name])} {what} given")


def _label_columns(class_names: Optional[Sequence[str]],
                   label_columns: Optional[Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    if label_columns:
        cols = {str(k): [str(v) for v in vals] for k, vals in label_columns.items()}
        if class_names and list(class_names) != next(iter(cols.values())):
            raise ValueError("class_names must equal the first label column's values (or be omitted)")
        return cols
    return {"class": [str(c) for c in class_names]} if class_names else {}


def _batch_labels(labels: Any, columns: Mapping[str, Sequence[str]], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch's labels as column → B long tensor (-1 = unknown)."""
    b = ids.shape[0]
    if labels is None or not columns:
        return {c: torch.full((b,), -1, dtype=torch.long) for c in columns}
    if isinstance(labels, Mapping):
        unknown = [c for c in labels if c not in columns]
        if unknown:
            raise ValueError(f"labels for unknown columns {unknown}; label_columns has {list(columns)}")
        out = {}
        for c in columns:
            lab = labels.get(c)
            out[c] = torch.full((b,), -1, dtype=torch.long) if lab is None else _as_tensor(lab, torch.long).reshape(-1)
        return out
    first = next(iter(columns))
    out = {c: torch.full((b,), -1, dtype=torch.long) for c in columns}
    out[first] = _as_tensor(labels, torch.long).reshape(-1)
    return out



def finalize_atlas(
    acc: TopKAccumulator,
    class_names: Sequence[str],
    *,
    config: Optional[AtlasConfig] = None,
    sae: Any = None,
    thumbnails: Optional[Callable[[int], Any]] = None,
    heatmap_maps: Optional[Callable[[Sequence[int]], torch.Tensor]] = None,
    heatmap_neurons: Optional[Sequence[int]] = None,
    out: Optional[PathLike] = None,
    extra_meta: Optional[dict[str, Any]] = None,
    progress: bool = False,
    log: Optional[ActivationLog] = None,
    label_columns: Optional[Mapping[str, Sequence[str]]] = None,
    pre_topk: Optional[TopKAccumulator] = None,
    peak_grid: Optional[Sequence[int]] = None,
) -> NeuronAtlas:
    """Turn accumulated statistics into an atlas: label AUROCs, entropy, sigma_label, summary, thumbnails, heat maps.

    ``log`` (every image's activations and labels, see :class:`ActivationLog`)
    adds the per-value AUROCs, the other label columns' top labels and the
    reconstruction-error distribution; without it only the class column's
    top-image statistics are available. ``pre_topk`` (:func:`pre_topk_accumulator`
    fed with ``KSparseAutoencoder.image_codes``' second output) gives the paper's
    σ_label; the same formula on the TopK codes is kept as ``topk_sigma_label``.
    Without it (an atlas of given activations) σ_label is computed on those.
    With ``log`` the claims are calibrated (``config.claim_calibration``); ``peak_grid``
    (H, W) with peaks in the log gives each top image's peak position ("where").
    """
    config = config or AtlasConfig()
    columns = _label_columns(class_names, label_columns)
    class_names = list(next(iter(columns.values()))) if columns else []
    res = acc.result()
    purity, entropy = purity_and_entropy(res["top_labels"], len(class_names), config.purity_top)
    stats = {
        "frequency": res["frequency"],
        "mean_activation": res["mean_activation"],
        "activation_std": res["activation_std"],
        "purity": purity,
        "entropy": entropy,
        "top_image_ids": res["top_image_ids"],
        "top_activations": res["top_activations"],
        "top_labels": res["top_labels"],
    }
    meta_extra: dict[str, Any] = {}
    if log is not None and columns:
        _add_label_evidence(stats, meta_extra, log, columns, config)
    if log is not None and peak_grid is not None:
        _add_peak_positions(stats, meta_extra, log, acc.n_latents, peak_grid)
    errors = _error_distribution(log)
    if errors is not None:
        meta_extra["reconstruction_error"] = errors
    summary = _layer_summary(res, purity, entropy, config,
                             sigma_labels(res, pre_topk, log, columns, config, stats))
    meta = _atlas_meta(acc, class_names, columns, config, sae, summary, pre_topk is not None, meta_extra)
    meta.update(extra_meta or {})
    atlas = NeuronAtlas(stats=stats, meta=meta)
    if atlas.label_columns and "value_auroc" in stats:
        _add_example_summaries(atlas, summary)
    if thumbnails is not None:
        add_thumbnails(atlas, thumbnails, config, progress)
        if heatmap_maps is not None and sae is not None:
            add_heatmaps(atlas, sae, heatmap_maps, heatmap_neurons, config)
    if out is not None:
        atlas.save(out)
    return atlas


def _add_label_evidence(stats: dict[str, torch.Tensor], meta_extra: dict[str, Any], log: ActivationLog,
                        columns: Mapping[str, Sequence[str]], config: AtlasConfig) -> None:
    """The other label columns' top labels, every value's AUROC, and (when configured) the claims' calibration."""
    ids = stats["top_image_ids"]
    size = int(max(int(ids.max()) if ids.numel() else -1, int(log.all_image_ids().max()) if log.num_images else -1)) + 1
    for c in list(columns)[1:]:
        table = log.labels_by_image_id(c, size)
        stats[TOP_LABELS_PREFIX + c] = torch.where(ids >= 0, table[ids.clamp_min(0)], torch.full_like(ids, -1))
    stats["value_auroc"] = value_auroc(log, columns)
    if config.claim_calibration is not None:
        meta_extra["claim_calibration"] = calibrate_claims(
            log, columns, top=config.purity_top, dense_frequency=config.dense_frequency,
            config=config.claim_calibration).to_dict()


def _add_peak_positions(stats: dict[str, torch.Tensor], meta_extra: dict[str, Any], log: ActivationLog,
                        n_latents: int, peak_grid: Sequence[int]) -> None:
    """Where on the feature map (``peak_grid``) each top image peaked, when the log recorded peaks."""
    ids = stats["top_image_ids"]
    peaks = log.peak_lookup(ids, torch.arange(n_latents)[:, None].expand_as(ids))
    if peaks is not None:
        stats["top_peak_positions"] = peaks
        meta_extra["peak_grid"] = [int(g) for g in peak_grid]


def _error_distribution(log: Optional[ActivationLog]) -> Optional[dict[str, Any]]:
    """Quantiles of the SAE's reconstruction error over the atlas images (what the OOD warning compares to)."""
    errors = log.reconstruction_errors() if log is not None else None
    if errors is None or not errors.numel():
        return None
    q = torch.quantile(errors.double(), torch.linspace(0, 1, min(ERROR_QUANTILES, max(errors.numel(), 2)),
                                                        dtype=torch.float64))
    return {
        "quantiles": [float(v) for v in q], "num_images": int(errors.numel()),
        "median": float(errors.median()),
        "definition": "Σ‖x − x̂‖² / Σ‖x − b_pre‖² over an image's SAE inputs (tokens or its pooled vector)",
    }


def _layer_summary(res: dict[str, torch.Tensor], purity: torch.Tensor, entropy: torch.Tensor, config: AtlasConfig,
                   sigma: dict[str, Any]) -> dict[str, Any]:
    """atlas.json's ``summary``: dead and dense counts, σ_label, purity and entropy of the most frequent neurons."""
    freq = res["frequency"]
    alive = freq > 0
    order = torch.sort(freq.double(), descending=True, stable=True).indices
    order = order[alive[order]][: config.summary_neurons]
    chosen_purity = purity[order]
    chosen_purity = chosen_purity[~torch.isnan(chosen_purity)]
    chosen_entropy = entropy[order]
    chosen_entropy = chosen_entropy[~torch.isnan(chosen_entropy)]
    n = freq.shape[0]
    dead = int((~alive).sum())
    return {
        "num_neurons": n,
        "dead_count": dead,
        "dead_fraction": dead / n,
        "summary_neurons": config.summary_neurons,
        **sigma,
        "mean_purity": float(chosen_purity.mean()) if chosen_purity.numel() else None,
        "mean_entropy": float(chosen_entropy.mean()) if chosen_entropy.numel() else None,
        "mean_frequency": float(freq.mean()),
        "median_frequency_alive": float(freq[alive].median()) if alive.any() else None,
        "dense_count": int((freq > config.dense_frequency).sum()),
    }


def _atlas_meta(acc: TopKAccumulator, class_names: list[str], columns: dict[str, list[str]], config: AtlasConfig,
                sae: Any, summary: dict[str, Any], paper_sigma: bool, meta_extra: dict[str, Any]) -> dict[str, Any]:
    """The content of atlas.json (before ``extra_meta``, example summaries and thumbnail counts are added)."""
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class_names": class_names,
        "label_columns": columns,
        "num_images": acc.num_images,
        "top_n": config.top_n,
        "purity_top": config.purity_top,
        "threshold": config.threshold,
        "thumbnail_size": config.thumbnail_size,
        "thumbnail_quality": config.thumbnail_quality,
        "granularity": getattr(sae, "granularity", None),
        "summary": summary,
        "summary_thresholds": config.thresholds.to_dict(),
        "dense_frequency": config.dense_frequency,
        "sigma_label_metric": (f"the paper's: mean sample std of the class ids of the top-{config.purity_top} images "
                               f"of the {config.summary_neurons} neurons with the highest mean activation among those "
                               f"firing on more than {config.sigma_min_images} images (lower = more class-specific), "
                               + ("on ReLU of the SAE's pre-TopK activations, as the original Revelio code; "
                                  "topk_sigma_label: the same on the TopK codes" if paper_sigma
                                  else "on the activations given") + "; *_shuffled: labels permuted across images"),
        "top_images_activations": "topk_code" if sae is not None else "given",
        "purity_metric": "per neuron: population std of the class ids of its top images (lower = more class-specific)",
        "entropy_unit": "bits",
        **meta_extra,
    }
    if sae is not None and getattr(sae, "recipe", None):
        meta["recipe"] = dict(sae.recipe)
    return meta


def _add_example_summaries(atlas: NeuronAtlas, summary: dict[str, Any]) -> None:
    """The share of living neurons the summaries name, and a few summaries for the card (the app's own words)."""
    alive = atlas.stats["frequency"] > 0
    named = sum(1 for i in range(atlas.num_neurons) if alive[i] and atlas.explanation(i))
    summary["named_fraction_alive"] = named / max(int(alive.sum()), 1)
    best = atlas.best_auroc().nan_to_num(-1.0)
    best[~alive] = -2.0
    picks = [int(i) for i in torch.argsort(best, descending=True, stable=True)[:5] if best[i] > 0]
    atlas.meta["example_summaries"] = [{"neuron": i, "summary": atlas.summary(i)} for i in picks]


# ---------------------------------------------------------------------- feature stores


def store_batches(store: Any, layer: str, timestep: int, kind: str = "pooled", batch_size: int = 256,
                  image_ids: Optional[Sequence[int]] = None) -> Iterator[Batch]:
    """``(features, labels, image_ids)`` batches of a feature store entry, un-augmented views only.

    Pooled features are read once (N×C is small); spatial maps are read
    ``batch_size`` images at a time so memory stays bounded.
    """
    if kind == "pooled":
        data = store.load(layer, timestep, "pooled", views=0, image_ids=image_ids)
        for start in range(0, len(data), batch_size):
            yield (data.features[start : start + batch_size], data.labels[start : start + batch_size],
                   data.image_ids[start : start + batch_size])
        return
    if image_ids is None:
        image_ids = store.load(layer, timestep, "pooled", views=0).image_ids.tolist()
    ids = sorted(int(i) for i in image_ids)
    for start in range(0, len(ids), batch_size):
        data = store.load(layer, timestep, "spatial", views=0, image_ids=ids[start : start + batch_size])
        yield data.features.float(), data.labels, data.image_ids


def atlas_inputs(store: Any, layer: str, timestep: int, sae: Any) -> str:
    """Check that ``sae`` fits the store entry and return the feature kind it needs (``pooled``/``spatial``)."""
    if (layer, int(timestep)) not in store.entries:
        raise ValueError(f"{store.path} has no features for ({layer}, {timestep}); it has {store.entries}")
    sae.check_recipe(store.recipe(layer, timestep))
    if getattr(sae, "granularity", "pooled") == "pooled":
        return "pooled"
    if not store.has_spatial:
        raise ValueError(
            f"The SAE is token-level (granularity {sae.granularity!r}) and needs spatial maps, but {store.path} "
            "holds pooled features only; extract with --spatial"
        )
    return "spatial"
