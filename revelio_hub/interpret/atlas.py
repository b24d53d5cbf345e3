"""The neuron atlas: what makes each k-SAE neuron fire, readable without the dataset.

An SAE with 80k latents is only useful when each latent can be read. The atlas
records, per neuron, its top-activating dataset images (id, activation, labels
of every label column), how often it fires, how strongly when it does, how well
its activation detects each label value over all atlas images (AUROC, see
:mod:`revelio_hub.interpret.neuron_labels`), and how class-specific its top images are
(label entropy, and the paper's ``sigma_label``: the sample std of the class ids
of the top-10 images by ReLU of the SAE's pre-TopK activations, averaged over
the neurons with the highest mean activation, as the original Revelio code). From these it writes one honest line per neuron
(:meth:`NeuronAtlas.summary`), the same text in the app, the JSON API and the
card. Top images are stored as small WebP thumbnails inside the atlas folder so
the app and a Hub release never need the dataset itself. The atlas also keeps
the distribution of the SAE's reconstruction error over its images, so the app
can tell when an image is unlike anything the release was built on.

Building streams over image batches: a running per-neuron top-N is merged with
each batch's top-N, so memory is O(n_latents × (N + batch)) and never
O(n_images × n_latents) — 100k images × 80k latents would be 32 GB dense.

Folder format (CONTRACTS.md)::

    stats.safetensors   frequency, mean_activation, activation_std, purity, entropy (n),
                        top_image_ids, top_activations, top_labels (n×K; id -1 = empty slot),
                        top_labels.<column> (n×K, the other label columns),
                        value_auroc (n × Σ values, columns concatenated in label_columns order),
                        pre_topk_top_image_ids (n×purity_top), pre_topk_frequency, pre_topk_mean_activation
                        (n; ReLU of the SAE's pre-TopK activations, from which σ_label is computed)
    atlas.json          format_version (2), class_names (= first label column), label_columns,
                        num_images, summary (incl. sigma_label), summary_thresholds,
                        reconstruction_error (quantiles over the atlas images), thumbnail size, ...
    thumbnails/<image_id>.webp

Format 1 atlases (one label column, no AUROC, no reconstruction errors) still load;
their summaries fall back to the top-image counts.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from revelio_hub.interpret import metrics as M
from revelio_hub.interpret.claim_calibration import CalibrationConfig, ClaimCalibration, calibrate_claims
from revelio_hub.interpret.neuron_labels import (
    ActivationLog,
    SummaryThresholds,
    ValueEvidence,
    column_offsets,
    explain,
    summary_text,
    value_auroc,
)
from revelio_hub.interpret.where import peak_positions, where_label

__all__ = [
    "AtlasConfig",
    "TopKAccumulator",
    "NeuronInfo",
    "NeuronAtlas",
    "build_atlas",
    "finalize_atlas",
    "STATS_FILE",
    "ATLAS_FILE",
    "THUMBNAIL_DIR",
]

STATS_FILE = "stats.safetensors"
ATLAS_FILE = "atlas.json"
THUMBNAIL_DIR = "thumbnails"
HEATMAP_DIR = "heatmaps"
FORMAT_VERSION = 2
SORT_KEYS = ("frequency", "auroc", "entropy", "mean_activation", "purity")
_INT_KEYS = ("top_image_ids", "top_labels", "pre_topk_top_image_ids", "top_peak_positions")
TOP_LABELS_PREFIX = "top_labels."
#: Quantiles of the reconstruction error kept in atlas.json (0%, 0.1%, ..., 100%).
ERROR_QUANTILES = 1001


def _is_int_key(key: str) -> bool:
    return key in _INT_KEYS or key.startswith(TOP_LABELS_PREFIX)

PathLike = Union[str, os.PathLike]
Batch = tuple  # (x, labels, image_ids)


@dataclass
class AtlasConfig:
    """How an atlas is built.

    Attributes:
        top_n: top images kept per neuron (the original Revelio code keeps 20 and shows 10).
        purity_top: top images used for sigma_label, entropy and precision (the paper: 10).
        summary_neurons: sigma_label over this many neurons with the highest mean activation
            among those firing on more than ``sigma_min_images`` images, or all of them when
            fewer (the paper: 1,000).
        thumbnail_size: side of the square WebP thumbnails, in pixels.
        thumbnail_quality: WebP quality (0–100); 80 keeps a 128-px thumbnail ≈ 3–5 kB.
        threshold: an activation above this counts as firing.
        sigma_min_images: ``sigma_label`` only counts neurons firing on more than this many
            images (the original: 10), so that all of their top-10 images are real firings.
        summary_min_auroc / summary_min_precision / summary_min_top_images / summary_max_values:
            when a neuron's summary names a label value (see
            :class:`~revelio_hub.interpret.neuron_labels.SummaryThresholds`); stored in atlas.json and
            changeable after the build.
        dense_frequency: neurons firing on more than this share of images are "dense": they
            say little about any one image, so the app hides them unless asked.
        claim_calibration: how claims are checked on held-out halves of the atlas images
            (:mod:`~revelio_hub.interpret.claim_calibration`); with a table, a summary names a value
            only where claims like it measured ≥ 0.9 precise. ``None``: uncalibrated summaries.
    """

    top_n: int = 20
    purity_top: int = 10
    summary_neurons: int = 1000
    thumbnail_size: int = 128
    thumbnail_quality: int = 80
    threshold: float = 0.0
    sigma_min_images: int = 10
    summary_min_auroc: float = SummaryThresholds.min_auroc
    summary_min_precision: float = SummaryThresholds.min_precision
    summary_min_top_images: int = SummaryThresholds.min_top_images
    summary_max_values: int = SummaryThresholds.max_values
    dense_frequency: float = 0.5
    claim_calibration: Optional[CalibrationConfig] = field(default_factory=CalibrationConfig)

    @property
    def thresholds(self) -> SummaryThresholds:
        return SummaryThresholds(self.summary_min_auroc, self.summary_min_precision, self.summary_min_top_images,
                                 self.summary_max_values)

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"top_n must be ≥ 1, got {self.top_n}")
        if not 1 <= self.purity_top <= self.top_n:
            raise ValueError(f"purity_top must lie in [1, top_n={self.top_n}], got {self.purity_top}")
        if self.summary_neurons < 1:
            raise ValueError(f"summary_neurons must be ≥ 1, got {self.summary_neurons}")
        if self.thumbnail_size < 8:
            raise ValueError(f"thumbnail_size must be ≥ 8 pixels, got {self.thumbnail_size}")
        if not 0 < self.dense_frequency <= 1:
            raise ValueError(f"dense_frequency must lie in (0, 1], got {self.dense_frequency}")
        self.thresholds  # validates the summary thresholds


class TopKAccumulator:
    """Streaming per-neuron statistics over image batches.

    Keeps, for every neuron, the ``top_n`` largest activations seen so far with
    their image ids and labels, the number of images on which it fired and the
    sum (and sum of squares) of its activations when firing. State is stored neuron-minor
    (``top_n × n``) so a batch's ``topk`` over dim 0 merges without transposes.
    Two accumulators (e.g. from two processes) combine with :meth:`merge`.
    """

    def __init__(self, n_latents: int, top_n: int = 20, threshold: float = 0.0, device: Union[str, torch.device] = "cpu"):
        if n_latents < 1:
            raise ValueError(f"n_latents must be ≥ 1, got {n_latents}")
        if top_n < 1:
            raise ValueError(f"top_n must be ≥ 1, got {top_n}")
        self.n_latents = int(n_latents)
        self.top_n = int(top_n)
        self.threshold = float(threshold)
        self.values = torch.full((top_n, n_latents), -math.inf, device=device)
        self.image_ids = torch.full((top_n, n_latents), -1, dtype=torch.long, device=device)
        self.labels = torch.full((top_n, n_latents), -1, dtype=torch.long, device=device)
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.fire_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.fire_sq = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.num_images = 0

    def update(self, acts: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Fold in one batch: ``acts`` B×n image-level activations, ``labels``/``image_ids`` B."""
        if acts.dim() != 2 or acts.shape[1] != self.n_latents:
            raise ValueError(f"activations must be B×{self.n_latents}, got shape {tuple(acts.shape)}")
        b = acts.shape[0]
        if labels.shape != (b,) or image_ids.shape != (b,):
            raise ValueError(
                f"labels and image_ids must have shape ({b},), got {tuple(labels.shape)} and {tuple(image_ids.shape)}"
            )
        if b == 0:
            return
        device = self.values.device
        acts = acts.to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.long)
        image_ids = image_ids.to(device=device, dtype=torch.long)

        fired = acts > self.threshold
        self.fire_count += fired.sum(0)
        firing = torch.where(fired, acts, torch.zeros((), device=device)).double()
        self.fire_sum += firing.sum(0)
        self.fire_sq += firing.pow(2).sum(0)
        self.num_images += b

        k = min(self.top_n, b)
        batch_vals, rows = torch.topk(acts, k, dim=0)  # k×n
        self._merge(batch_vals, image_ids[rows], labels[rows])

    def _merge(self, values: torch.Tensor, image_ids: torch.Tensor, labels: torch.Tensor) -> None:
        all_vals = torch.cat([self.values, values], 0)
        keep_vals, pos = torch.topk(all_vals, self.top_n, dim=0)
        self.values = keep_vals
        self.image_ids = torch.cat([self.image_ids, image_ids], 0).gather(0, pos)
        self.labels = torch.cat([self.labels, labels], 0).gather(0, pos)

    def merge(self, other: "TopKAccumulator") -> None:
        """Combine with an accumulator that saw a disjoint set of images."""
        if (other.n_latents, other.top_n) != (self.n_latents, self.top_n):
            raise ValueError("can only merge accumulators with the same n_latents and top_n")
        self._merge(other.values.to(self.values.device), other.image_ids.to(self.values.device),
                    other.labels.to(self.values.device))
        self.fire_count += other.fire_count.to(self.fire_count.device)
        self.fire_sum += other.fire_sum.to(self.fire_sum.device)
        self.fire_sq += other.fire_sq.to(self.fire_sq.device)
        self.num_images += other.num_images

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the state (for gathering across processes)."""
        return {"values": self.values, "image_ids": self.image_ids, "labels": self.labels,
                "fire_count": self.fire_count, "fire_sum": self.fire_sum, "fire_sq": self.fire_sq,
                "num_images": torch.tensor([self.num_images], device=self.values.device)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], threshold: float = 0.0) -> "TopKAccumulator":
        top_n, n = state["values"].shape
        acc = cls(n, top_n, threshold, device=state["values"].device)
        acc.values, acc.image_ids, acc.labels = state["values"], state["image_ids"], state["labels"]
        acc.fire_count, acc.fire_sum = state["fire_count"], state["fire_sum"]
        if "fire_sq" in state:
            acc.fire_sq = state["fire_sq"]
        acc.num_images = int(state["num_images"].sum())
        return acc

    def result(self) -> dict[str, torch.Tensor]:
        """Per-neuron tensors in atlas layout (n×K), empty slots as id -1 / activation 0.

        A slot is empty when the image in it did not fire (activation ≤
        threshold): a neuron that fired on 3 images lists exactly 3.
        """
        empty = ~(self.values > self.threshold)
        ids = self.image_ids.masked_fill(empty, -1).T.contiguous().cpu()
        vals = self.values.masked_fill(empty, 0.0).T.contiguous().cpu()
        labels = self.labels.masked_fill(empty, -1).T.contiguous().cpu()
        count = self.fire_count.cpu()
        frequency = (count.double() / max(self.num_images, 1)).float()
        mean_act = (self.fire_sum.cpu() / count.clamp_min(1).double()).float()
        # std over *all* images (silent ones count as 0): the scale of a z-score of one image's activation
        n_img = max(self.num_images, 1)
        mean_all = self.fire_sum.cpu() / n_img
        std_all = (self.fire_sq.cpu() / n_img - mean_all.pow(2)).clamp_min(0).sqrt().float()
        return {"top_image_ids": ids, "top_activations": vals.float(), "top_labels": labels,
                "frequency": frequency, "mean_activation": mean_act, "activation_std": std_all, "fire_count": count}


def _purity_and_entropy(top_labels: torch.Tensor, num_classes: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Purity (std of class ids) and entropy over each neuron's filled top slots (at most ``top``).

    Uses :func:`revelio_hub.interpret.metrics.label_purity` / ``label_entropy`` on groups of
    neurons with the same number of labelled top images, so a neuron that
    fired on only 4 images is judged on those 4 (NaN when it has none).
    """
    labels = top_labels[:, :top]
    n = labels.shape[0]
    purity = torch.full((n,), math.nan, dtype=torch.float32)
    entropy = torch.full((n,), math.nan, dtype=torch.float32)
    filled = labels >= 0
    # Slots fill from the front (sorted by activation), except when labels are unknown (-1) mid-list.
    counts = filled.sum(1)
    contiguous = (filled == (torch.arange(labels.shape[1]) < counts.unsqueeze(1))).all(1)
    for m in range(1, labels.shape[1] + 1):
        rows = torch.nonzero((counts == m) & contiguous).flatten()
        if rows.numel():
            sub = labels[rows, :m]
            purity[rows] = M.label_purity(sub, top=m).float()
            entropy[rows] = M.label_entropy(sub, num_classes=max(num_classes, 1), top=m).float()
    for row in torch.nonzero(~contiguous & (counts > 0)).flatten().tolist():
        sub = labels[row][filled[row]].unsqueeze(0)
        purity[row] = M.label_purity(sub, top=sub.shape[1]).float()
        entropy[row] = M.label_entropy(sub, num_classes=max(num_classes, 1), top=sub.shape[1]).float()
    return purity, entropy


@dataclass
class NeuronInfo:
    """Everything the atlas knows about one neuron."""

    index: int
    frequency: float
    mean_activation: float
    purity: float
    entropy: float
    top_image_ids: list[int]
    top_activations: list[float]
    top_labels: list[Optional[str]]
    dead: bool
    summary: str
    #: per label column, its best value's evidence (``ValueEvidence.to_dict()``), strongest first
    label_values: list[dict[str, Any]] = field(default_factory=list)
    #: the values the summary names (empty: "mixed")
    named_values: list[dict[str, Any]] = field(default_factory=list)
    dense: bool = False
    best_auroc: float = math.nan
    #: where its top images peak (token SAEs): "top-left", "centre", "anywhere", ...; None when not recorded
    where: Optional[str] = None

    @property
    def fire_rate_percent(self) -> float:
        return 100.0 * self.frequency


@dataclass
class NeuronAtlas:
    """Per-neuron statistics and top images of one SAE on one dataset.

    Create with :func:`build_atlas` or :meth:`load`; write with :meth:`save`.
    ``stats`` holds the tensors of ``stats.safetensors``; ``meta`` the content
    of ``atlas.json``.
    """

    stats: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Optional[Path] = None
    _thumbnails: dict[int, Any] = field(default_factory=dict, repr=False)
    _heatmaps: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)
    _evidence: Optional[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = field(
        default=None, repr=False)
    # summary(i) per (neuron, thresholds): the app lists ~10 neurons per request, and building each line
    # (evidence over every label column, thresholds parsed from meta) was 9% of a toy request's server time.
    _summaries: dict[tuple[int, str], str] = field(default_factory=dict, repr=False)
    _calibration: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ basic properties
    @property
    def num_neurons(self) -> int:
        return int(self.stats["frequency"].shape[0])

    @property
    def num_images(self) -> int:
        return int(self.meta.get("num_images", 0))

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def label_columns(self) -> dict[str, list[str]]:
        """Label column → its value names, in order; the first is the main class column (:attr:`class_names`).

        Format-1 atlases have one column, named ``"class"``.
        """
        cols = self.meta.get("label_columns")
        if cols:
            return {str(k): [str(v) for v in vals] for k, vals in cols.items()}
        return {"class": self.class_names} if self.class_names else {}

    @property
    def summary_stats(self) -> dict[str, Any]:
        """Per-layer summary: dead count/fraction, sigma_label (the paper's), mean entropy, ..."""
        return dict(self.meta.get("summary") or {})

    @property
    def thresholds(self) -> SummaryThresholds:
        """When a summary names a value (stored in atlas.json; see :class:`SummaryThresholds`)."""
        return SummaryThresholds.from_dict(self.meta.get("summary_thresholds"))

    @thresholds.setter
    def thresholds(self, value: SummaryThresholds) -> None:
        self.meta["summary_thresholds"] = SummaryThresholds.from_dict(value.to_dict()).to_dict()

    @property
    def calibration(self) -> Optional[ClaimCalibration]:
        """The measured precision of claims per band (``None`` for atlases built without it)."""
        if self._calibration is None:
            self._calibration = ClaimCalibration.from_dict(self.meta.get("claim_calibration")) or False
        return self._calibration or None

    @property
    def dense_frequency(self) -> float:
        """Neurons firing on more than this share of the atlas images are flagged dense."""
        return float(self.meta.get("dense_frequency", 0.5))

    @property
    def dead_neurons(self) -> list[int]:
        """Neurons that never fired on the atlas images."""
        return torch.nonzero(self.stats["frequency"] <= 0).flatten().tolist()

    @property
    def dense_mask(self) -> torch.Tensor:
        """Bool n: neurons that fire on more than :attr:`dense_frequency` of the atlas images."""
        return self.stats["frequency"] > self.dense_frequency

    def __len__(self) -> int:
        return self.num_neurons

    def __repr__(self) -> str:
        s = self.summary_stats
        return (f"NeuronAtlas(neurons={self.num_neurons}, images={self.num_images}, dead={s.get('dead_count')}, "
                f"sigma_label={s.get('sigma_label')}, columns={list(self.label_columns)}, path={str(self.path)!r})")

    def _check(self, i: int) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise ValueError(f"neuron index must be an integer, got {i!r}") from None
        if not 0 <= i < self.num_neurons:
            raise ValueError(f"neuron {i} does not exist: this atlas has neurons 0..{self.num_neurons - 1}")
        return i

    def _label_name(self, label: int) -> Optional[str]:
        names = self.class_names
        return names[label] if 0 <= label < len(names) else None

    def _filled(self, i: int) -> int:
        return int((self.stats["top_image_ids"][i] >= 0).sum())

    def _check_column(self, column: str) -> str:
        cols = self.label_columns
        if column not in cols:
            raise ValueError(f"unknown label column {column!r}; this atlas has: {', '.join(cols) or '(none)'}")
        return column

    def top_labels(self, column: Optional[str] = None) -> torch.Tensor:
        """n×K label ids of ``column`` (default: the class column) for each neuron's top images (-1 = empty)."""
        cols = list(self.label_columns)
        if column is None or (cols and column == cols[0]):
            return self.stats["top_labels"]
        self._check_column(column)
        key = TOP_LABELS_PREFIX + column
        if key not in self.stats:
            return torch.full_like(self.stats["top_labels"], -1)
        return self.stats[key]

    def value_auroc(self, column: str) -> torch.Tensor:
        """n_neurons × n_values AUROC (float32) of each neuron's image activation for "image has this value".

        Over all atlas images; NaN where undefined (a value absent from, or
        present on every, atlas image) and everywhere for format-1 atlases.
        """
        self._check_column(column)
        a, b = column_offsets(self.label_columns)[column]
        full = self.stats.get("value_auroc")
        if full is None or full.shape[1] < b:
            return torch.full((self.num_neurons, b - a), math.nan, dtype=torch.float32)
        return full[:, a:b].float()

    def _top_counts(self, column: str, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n × V counts of each value among the top ``top`` images, n filled slots)."""
        labels = self.top_labels(column)[:, :top]
        n_values = len(self.label_columns[column])
        valid = (labels >= 0) & (labels < n_values)
        counts = torch.zeros(labels.shape[0], max(n_values, 1), dtype=torch.long)
        counts.scatter_add_(1, labels.clamp(0, max(n_values - 1, 0)), valid.long())
        filled = (self.stats["top_image_ids"][:, :top] >= 0).sum(1)
        return counts[:, :n_values], filled

    def _evidence_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per column: (best value id, its AUROC, its top-image hits, filled top slots), all n-vectors; cached."""
        if self._evidence is None:
            top = int(self.meta.get("purity_top", 10))
            tables = {}
            for column in self.label_columns:
                auc = self.value_auroc(column)
                counts, filled = self._top_counts(column, top)
                if auc.shape[1] == 0:
                    continue
                has_auc = ~torch.isnan(auc).all(1)
                # best value: highest AUROC; without AUROC (format 1) the most common top-image value
                best = torch.where(has_auc, torch.nan_to_num(auc, nan=-1.0).argmax(1), counts.argmax(1))
                best_auc = auc.gather(1, best[:, None])[:, 0]
                hits = counts.gather(1, best[:, None])[:, 0]
                tables[column] = (best, best_auc, hits, filled)
            self._evidence = tables
        return self._evidence

    def evidence(self, i: int) -> list[ValueEvidence]:
        """Each label column's best value for neuron ``i`` with its AUROC and top-image count, strongest first."""
        i = self._check(i)
        out = []
        for column, (best, auc, hits, filled) in self._evidence_tables().items():
            names = self.label_columns[column]
            out.append(ValueEvidence(column, names[int(best[i])], float(auc[i]), int(hits[i]), int(filled[i])))
        out.sort(key=lambda e: e.strength(), reverse=True)
        return out

    def explanation(self, i: int) -> list[ValueEvidence]:
        """The label values :meth:`summary` names for neuron ``i`` (empty when it says ``mixed``/``unsure`` or is dead).

        With a claim calibration: the values (of different columns, at most its
        ``max_values``) whose band measured at least its ``min_precision`` on
        held-out images, each carrying that figure (``held_out``); otherwise the
        uncalibrated rule (:class:`SummaryThresholds`).
        """
        return self._claims(i)[0]

    def _claims(self, i: int) -> tuple[list[ValueEvidence], Optional[ValueEvidence]]:
        """(named values, the best unnamed candidate: "unsure") of neuron ``i``."""
        freq = float(self.stats["frequency"][self._check(i)])
        if freq <= 0:
            return [], None
        cal = self.calibration
        if cal is None:
            return explain(self.evidence(i), self.thresholds), None
        dense = freq > self.dense_frequency
        candidates = []
        for e in self.evidence(i):
            if e.filled < cal.config.min_top_images or cal.band(e.auroc, e.precision) is None:
                continue
            p = cal.precision(e.auroc, e.precision, dense)
            candidates.append(replace(e, held_out=math.nan if p is None else p))
        named = [e for e in candidates if e.held_out >= cal.config.min_precision]
        named.sort(key=lambda e: (e.held_out, e.strength()), reverse=True)
        unsure = max(candidates, key=lambda e: (-1.0 if math.isnan(e.held_out) else e.held_out, e.strength()),
                     default=None)
        return named[: cal.config.max_values], (None if named else unsure)

    def where(self, i: int) -> Optional[str]:
        """Where neuron ``i``'s top images peak ("top-left", "centre", "anywhere", ...); ``None`` when not recorded.

        Token-level SAEs only: the atlas keeps each top image's peak position
        (``top_peak_positions``) on the feature map's grid (``peak_grid``).
        """
        i = self._check(i)
        grid = self.meta.get("peak_grid")
        if not grid or "top_peak_positions" not in self.stats:
            return None
        top = int(self.meta.get("purity_top", 10))
        return where_label(self.stats["top_peak_positions"][i, :top].tolist(), grid)

    def best_auroc(self) -> torch.Tensor:
        """n: each neuron's highest value AUROC over all columns (NaN without AUROC)."""
        tables = self._evidence_tables()
        if not tables:
            return torch.full((self.num_neurons,), math.nan)
        stacked = torch.stack([t[1] for t in tables.values()], 1)
        best = torch.nan_to_num(stacked, nan=-1.0).max(1).values
        best[best < 0] = math.nan
        return best

    # ------------------------------------------------------------------ per-neuron queries
    def neuron(self, i: int) -> NeuronInfo:
        i = self._check(i)
        m = self._filled(i)
        freq = float(self.stats["frequency"][i])
        ev = self.evidence(i)
        return NeuronInfo(
            index=i,
            frequency=freq,
            mean_activation=float(self.stats["mean_activation"][i]),
            purity=float(self.stats["purity"][i]),
            entropy=float(self.stats["entropy"][i]),
            top_image_ids=self.stats["top_image_ids"][i, :m].tolist(),
            top_activations=self.stats["top_activations"][i, :m].tolist(),
            top_labels=[self._label_name(int(c)) for c in self.stats["top_labels"][i, :m]],
            dead=freq <= 0,
            summary=self.summary(i),
            label_values=[e.to_dict() for e in ev],
            where=self.where(i),
            named_values=[e.to_dict() for e in self.explanation(i)],
            dense=freq > self.dense_frequency,
            best_auroc=max((e.auroc for e in ev if not math.isnan(e.auroc)), default=math.nan),
        )

    def label_histogram(self, i: int, top: Optional[int] = None, column: Optional[str] = None) -> dict[str, int]:
        """Value name → count among the neuron's top images (``top`` defaults to ``purity_top``), most common first.

        ``column`` defaults to the class column.
        """
        i = self._check(i)
        top = int(top or self.meta.get("purity_top", 10))
        names = self.label_columns.get(column, []) if column is not None else self.class_names
        labels = self.top_labels(column)[i, : min(top, self._filled(i))].tolist()
        counts = Counter(names[c] if 0 <= c < len(names) else "unlabelled" for c in labels)
        return dict(counts.most_common())

    def summary(self, i: int) -> str:
        """One honest line: the label value(s) the neuron detects, ``unsure`` or ``mixed``, e.g.

        ``"cyan (color) · true on 94% of held-out images it fires strongly on · where: top-left · fires on 4.1% of
        images"``.

        With a claim calibration a value is named only where claims like it
        (same AUROC band, top-image agreement and density) were true on at least
        90% of held-out images the neuron fired strongly on
        (:mod:`~revelio_hub.interpret.claim_calibration`); older atlases name a
        value that passes :attr:`thresholds` and quote AUROC and top images. The
        same text is shown in the app, the JSON API and the card.
        """
        i = self._check(i)
        key = (i, json.dumps(self.meta.get("summary_thresholds"), sort_keys=True, default=str))
        text = self._summaries.get(key)
        if text is None:
            freq = float(self.stats["frequency"][i])
            named, unsure = self._claims(i)
            text = summary_text(named, freq, self.num_images, single_column=len(self.label_columns) <= 1,
                                unsure=unsure, where=self.where(i))
            self._summaries[key] = text
        return text

    def search(self, value: str, column: Optional[str] = None, limit: int = 20) -> list[dict[str, Any]]:
        """Neurons that detect a label value, best first: ``[{"neuron", "column", "value", "auroc", "precision"}]``.

        Sorted by AUROC (descending); ``precision`` is the share of the neuron's
        top ``purity_top`` images carrying the value. Without ``column`` every
        column having a value of that name is searched. Dead neurons and
        neurons without an AUROC are left out. Unknown value → ``ValueError``
        listing the valid ones.
        """
        if limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {limit}")
        cols = self.label_columns
        if column is not None:
            self._check_column(column)
            candidates = [column] if value in cols[column] else []
            pool = cols[column]
        else:
            candidates = [c for c, names in cols.items() if value in names]
            pool = [v for names in cols.values() for v in names]
        if not candidates:
            unique = list(dict.fromkeys(pool))
            shown = ", ".join(unique[:30]) + (f", ... ({len(unique)} in all)" if len(unique) > 30 else "")
            where = f"column {column!r}" if column is not None else "this atlas"
            raise ValueError(f"unknown label value {value!r}; {where} knows: {shown or '(no label values)'}")
        top = int(self.meta.get("purity_top", 10))
        alive = self.stats["frequency"] > 0
        rows = []
        for c in candidates:
            v = cols[c].index(value)
            auc = self.value_auroc(c)[:, v]
            counts, filled = self._top_counts(c, top)
            prec = counts[:, v].double() / filled.clamp_min(1).double()
            ok = alive & ~torch.isnan(auc)
            for i in torch.nonzero(ok).flatten().tolist():
                rows.append({"neuron": int(i), "column": c, "value": value, "auroc": round(float(auc[i]), 4),
                             "precision": round(float(prec[i]), 4)})
        rows.sort(key=lambda r: (r["auroc"], r["precision"]), reverse=True)
        return rows[:limit]

    def relevance(self, activations: torch.Tensor) -> torch.Tensor:
        """How unusual each activation is for its neuron: activation / the neuron's mean activation when firing.

        1 = a typical firing; 3 = three times as strong as usual. Neurons that
        never fired on the atlas images get their raw activation.
        """
        mean = self.stats["mean_activation"].to(activations.device, torch.float32)
        return torch.where(mean > 0, activations.float() / mean.clamp_min(1e-12), activations.float())

    def top_relative(self, activations: torch.Tensor) -> torch.Tensor:
        """Activation / the neuron's weakest top image (its ``purity_top``-th highest activation).

        ≥ 1 means the image would enter the neuron's top images, the regime its
        summary describes; neurons without top images get their raw activation.
        """
        top = int(self.meta.get("purity_top", 10))
        acts_top = self.stats["top_activations"][:, :top]
        filled = acts_top > 0
        low = torch.where(filled, acts_top, torch.full_like(acts_top, math.inf)).min(1).values
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low)).to(activations.device, torch.float32)
        return torch.where(low > 0, activations.float() / low.clamp_min(1e-12), activations.float())

    def zscore(self, activations: torch.Tensor) -> torch.Tensor:
        """(activation − mean over all atlas images) / std over them; NaN-free (0 where the std is 0)."""
        freq = self.stats["frequency"].to(activations.device, torch.float32)
        mean_all = freq * self.stats["mean_activation"].to(activations.device, torch.float32)
        std = self.stats.get("activation_std")
        if std is None:
            return self.relevance(activations)
        std = std.to(activations.device, torch.float32)
        return torch.where(std > 0, (activations.float() - mean_all) / std.clamp_min(1e-12), torch.zeros_like(mean_all))

    def error_percentile(self, error: float) -> Optional[float]:
        """Percentile (0–100) of an image's SAE reconstruction error among the atlas images; None if not recorded.

        Linear interpolation between the stored quantiles (evenly spaced levels
        from 0 to 100). Plain floats and ``bisect``: the app asks this for
        every layer of every analysed image.
        """
        q = (self.meta.get("reconstruction_error") or {}).get("quantiles")
        if not q:
            return None
        e = float(error)
        if e <= float(q[0]):
            return 0.0
        if e >= float(q[-1]):
            return 100.0
        j = bisect.bisect_right(q, e)
        lo, hi = float(q[j - 1]), float(q[j])
        frac = 0.0 if hi <= lo else (e - lo) / (hi - lo)
        step = 100.0 / (len(q) - 1)
        return (j - 1) * step + frac * step

    def thumbnail(self, image_id: int):
        """The stored thumbnail of ``image_id`` (PIL), or a grey placeholder if it is missing."""
        from PIL import Image

        image_id = int(image_id)
        if image_id in self._thumbnails:
            return self._thumbnails[image_id]
        if self.path is not None:
            file = self.path / THUMBNAIL_DIR / f"{image_id}.webp"
            if file.is_file():
                with Image.open(file) as im:
                    im.load()
                    image = im.convert("RGB")
                self._thumbnails[image_id] = image
                return image
        size = int(self.meta.get("thumbnail_size", 128))
        return Image.new("RGB", (size, size), (128, 128, 128))

    def heatmap(self, i: int, image_id: int):
        """Overlay thumbnail of neuron ``i``'s spatial activation on ``image_id``, or ``None`` if not stored."""
        from PIL import Image

        i = self._check(i)
        key = (i, int(image_id))
        if key in self._heatmaps:
            return self._heatmaps[key]
        if self.path is not None:
            file = self.path / HEATMAP_DIR / str(i) / f"{int(image_id)}.webp"
            if file.is_file():
                with Image.open(file) as im:
                    im.load()
                    return im.convert("RGB")
        return None

    def top_images(self, i: int, n: int = 10, heatmaps: bool = False) -> list[tuple[Any, Optional[str], float]]:
        """Up to ``n`` top images of neuron ``i`` as ``(PIL thumbnail, label name, activation)``.

        With ``heatmaps=True`` the stored heat-map overlay replaces the plain
        thumbnail where one exists.
        """
        i = self._check(i)
        if n < 1:
            raise ValueError(f"n must be ≥ 1, got {n}")
        m = min(n, self._filled(i))
        out = []
        for slot in range(m):
            image_id = int(self.stats["top_image_ids"][i, slot])
            image = self.heatmap(i, image_id) if heatmaps else None
            out.append((image if image is not None else self.thumbnail(image_id),
                        self._label_name(int(self.stats["top_labels"][i, slot])),
                        float(self.stats["top_activations"][i, slot])))
        return out

    # ------------------------------------------------------------------ whole-atlas queries
    def sorted_neurons(self, by: str = "frequency", descending: Optional[bool] = None,
                       include_dead: bool = False, limit: Optional[int] = None) -> list[int]:
        """Neuron ids ordered by a statistic.

        ``descending`` defaults to the useful direction: most frequent / strongest
        / highest best-value AUROC first, purest (lowest purity or entropy) first.
        Neurons without a value (dead, or unlabelled) come last; dead ones are
        dropped unless ``include_dead``.
        """
        if by not in SORT_KEYS:
            raise ValueError(f"cannot sort by {by!r}; choose one of {list(SORT_KEYS)}")
        if descending is None:
            descending = by in ("frequency", "mean_activation", "auroc")
        values = (self.best_auroc() if by == "auroc" else self.stats[by]).double().clone()
        keep = torch.ones(self.num_neurons, dtype=torch.bool) if include_dead else self.stats["frequency"] > 0
        missing = torch.isnan(values)
        values[missing] = -math.inf if descending else math.inf
        order = torch.sort(values, descending=descending, stable=True).indices
        order = order[keep[order]]
        ids = order.tolist()
        return ids[:limit] if limit is not None else ids

    def neurons_for_class(self, name: str, min_fraction: float = 0.5, top: Optional[int] = None) -> list[int]:
        """Neurons whose top images are at least ``min_fraction`` of class ``name``.

        Ordered by that fraction, then by firing frequency. ``top`` (default
        ``purity_top``) is how many top images are counted.
        """
        names = self.class_names
        if name not in names:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise ValueError(f"unknown class {name!r}; this atlas knows: {shown or '(no class names)'}")
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction must lie in (0, 1], got {min_fraction}")
        top = int(top or self.meta.get("purity_top", 10))
        label = names.index(name)
        labels = self.stats["top_labels"][:, :top]
        filled = (labels >= 0).sum(1)
        hits = (labels == label).sum(1)
        fraction = hits.double() / filled.clamp_min(1).double()
        ok = (filled > 0) & (fraction >= min_fraction)
        ids = torch.nonzero(ok).flatten()
        ids = ids[torch.argsort(self.stats["frequency"][ids], descending=True, stable=True)]  # ties: most frequent
        return ids[torch.argsort(fraction[ids], descending=True, stable=True)].tolist()

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike) -> Path:
        """Write the folder format (stats, atlas.json, thumbnails, heat maps)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Ids and labels fit int32: halves the largest tensors (n×K) of a release's atlases.
        save_file({k: (v.int() if _is_int_key(k) else v).contiguous() for k, v in self.stats.items()},
                  str(path / STATS_FILE))
        (path / ATLAS_FILE).write_text(json.dumps(self.meta, indent=2))
        quality = int(self.meta.get("thumbnail_quality", 80))
        if self._thumbnails:
            (path / THUMBNAIL_DIR).mkdir(exist_ok=True)
            for image_id, image in self._thumbnails.items():
                image.save(path / THUMBNAIL_DIR / f"{image_id}.webp", format="WEBP", quality=quality)
        for (i, image_id), image in self._heatmaps.items():
            folder = path / HEATMAP_DIR / str(i)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{image_id}.webp", format="WEBP", quality=quality)
        self.path = path
        return path

    @classmethod
    def load(cls, path: PathLike) -> "NeuronAtlas":
        """Read an atlas folder; missing or corrupt files raise an error naming the file."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"No neuron atlas at {path}: the folder does not exist")
        meta_file, stats_file = path / ATLAS_FILE, path / STATS_FILE
        for file in (meta_file, stats_file):
            if not file.is_file():
                raise FileNotFoundError(f"Neuron atlas {path} is incomplete: {file} is missing")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{meta_file} is not valid JSON: {error}") from error
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_file} must hold a JSON object, got {type(meta).__name__}")
        try:
            stats = load_file(str(stats_file))
        except Exception as error:  # safetensors raises its own error types for truncation/garbage
            raise ValueError(f"{stats_file} is corrupt or truncated ({type(error).__name__}: {error})") from error
        required = ("frequency", "mean_activation", "purity", "entropy", "top_image_ids", "top_activations",
                    "top_labels")
        missing = [k for k in required if k not in stats]
        if missing:
            raise ValueError(f"{stats_file} lacks the tensors {missing}; rebuild the atlas with build_atlas")
        stats = {k: (v.long() if _is_int_key(k) else v) for k, v in stats.items()}
        n = stats["frequency"].shape[0]
        bad = [k for k in required if stats[k].shape[0] != n]
        bad += [k for k in stats if (k.startswith(TOP_LABELS_PREFIX) or k == "top_peak_positions")
                and stats[k].shape != stats["top_image_ids"].shape]
        if "value_auroc" in stats:
            n_values = sum(len(v) for v in (meta.get("label_columns") or {}).values())
            if stats["value_auroc"].shape != (n, n_values):
                bad.append("value_auroc")
        if bad or stats["top_image_ids"].shape != stats["top_labels"].shape:
            raise ValueError(f"{stats_file} is inconsistent: tensors {bad} do not have {n} neurons")
        return cls(stats=stats, meta=meta, path=path)


# ---------------------------------------------------------------------- building


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def _make_thumbnail(image: Any, size: int):
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        raise ValueError(f"thumbnails(image_id) must return a PIL image or None, got {type(image).__name__}")
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def _overlay(thumb: Any, heat: torch.Tensor, vmax: float):
    """Blend a red-yellow heat map (H×W, scaled by ``vmax``) over a thumbnail."""
    from PIL import Image

    h = (heat.float().clamp_min(0) / max(vmax, 1e-12)).clamp(0, 1)
    size = thumb.size
    h = torch.nn.functional.interpolate(h[None, None], size=(size[1], size[0]), mode="bilinear",
                                        align_corners=False)[0, 0].clamp(0, 1)
    rgb = torch.stack([torch.ones_like(h), h, torch.zeros_like(h)], -1)  # red -> yellow
    colour = Image.fromarray((rgb * 255).byte().numpy(), "RGB")
    alpha = Image.fromarray((h * 0.6 * 255).byte().numpy(), "L")
    out = thumb.copy()
    out.paste(colour, (0, 0), alpha)
    return out


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
    from revelio_hub.interpret.ood import image_reconstruction_error

    config = config or AtlasConfig()
    columns = _label_columns(class_names, label_columns)
    class_names = list(next(iter(columns.values()))) if columns else []
    first = next(iter(columns), None)
    if device is None:
        device = next(sae.parameters()).device if sae is not None else "cpu"
    acc = accumulator
    pre_topk: Optional[TopKAccumulator] = None
    log: Optional[ActivationLog] = None
    peak_grid: Optional[tuple[int, ...]] = None
    iterator: Iterator = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        iterator = iter(tqdm(batches, desc="atlas", unit="batch"))
    with torch.no_grad():
        for batch in iterator:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise ValueError("each batch must be a tuple (x, labels, image_ids)")
            x, labels, image_ids = batch
            x = _as_tensor(x, torch.float32)
            errors = dense = peaks = None
            if sae is not None:
                xs = x.to(device=device, dtype=next(sae.parameters()).dtype)
                acts, dense = (a.float() for a in sae.image_codes(xs))
                errors = image_reconstruction_error(sae, xs)
                if xs.dim() == 4 and getattr(sae, "granularity", "pooled") != "pooled":
                    peaks, peak_grid = peak_positions(sae, xs), tuple(xs.shape[2:])
            else:
                acts = x
            ids = _as_tensor(image_ids, torch.long).reshape(-1)
            by_column = _batch_labels(labels, columns, ids)
            labs = by_column.get(first, torch.full_like(ids, -1)) if first else torch.full_like(ids, -1)
            for name, lab in by_column.items():
                if lab.numel() and int(lab.max()) >= len(columns[name]):
                    what = "class names" if name == first else f"values in column {name!r}"
                    raise ValueError(f"label {int(lab.max())} has no name: only {len(columns[name])} {what} given")
            if acc is None:
                acc = TopKAccumulator(acts.shape[1], config.top_n, config.threshold, device=device)
            if log is None:
                log = ActivationLog(acts.shape[1], list(columns), config.threshold)
            if dense is not None:
                if pre_topk is None:
                    pre_topk = pre_topk_accumulator(acts.shape[1], config, device)
                pre_topk.update(dense, labs, ids)
            acc.update(acts, labs, ids)
            log.update(acts, ids, by_column, errors, peaks)
    if acc is None:
        raise ValueError("build_atlas got no batches: there is nothing to build an atlas from")
    return finalize_atlas(acc, class_names, config=config, sae=sae, thumbnails=thumbnails,
                          heatmap_maps=heatmap_maps, heatmap_neurons=heatmap_neurons, out=out,
                          extra_meta=extra_meta, progress=progress, log=log, label_columns=columns,
                          pre_topk=pre_topk, peak_grid=peak_grid)


def pre_topk_accumulator(n_latents: int, config: AtlasConfig, device: Union[str, torch.device]) -> TopKAccumulator:
    """The accumulator of the paper's σ_label: ReLU(pre-TopK) activations, top ``purity_top`` images per neuron."""
    return TopKAccumulator(n_latents, config.purity_top, 0.0, device=device)


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
    purity, entropy = _purity_and_entropy(res["top_labels"], len(class_names), config.purity_top)
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
        ids = res["top_image_ids"]
        size = int(max(int(ids.max()) if ids.numel() else -1, int(log.all_image_ids().max()) if log.num_images else -1)) + 1
        for c in list(columns)[1:]:
            table = log.labels_by_image_id(c, size)
            stats[TOP_LABELS_PREFIX + c] = torch.where(ids >= 0, table[ids.clamp_min(0)], torch.full_like(ids, -1))
        stats["value_auroc"] = value_auroc(log, columns)
        if config.claim_calibration is not None:
            meta_extra["claim_calibration"] = calibrate_claims(
                log, columns, top=config.purity_top, dense_frequency=config.dense_frequency,
                config=config.claim_calibration).to_dict()
    if log is not None and peak_grid is not None:
        peaks = log.peak_lookup(res["top_image_ids"], torch.arange(acc.n_latents)[:, None].expand_as(
            res["top_image_ids"]))
        if peaks is not None:
            stats["top_peak_positions"] = peaks
            meta_extra["peak_grid"] = [int(g) for g in peak_grid]
    errors = log.reconstruction_errors() if log is not None else None
    if errors is not None and errors.numel():
        q = torch.quantile(errors.double(), torch.linspace(0, 1, min(ERROR_QUANTILES, max(errors.numel(), 2)),
                                                            dtype=torch.float64))
        meta_extra["reconstruction_error"] = {
            "quantiles": [float(v) for v in q], "num_images": int(errors.numel()),
            "median": float(errors.median()),
            "definition": "Σ‖x − x̂‖² / Σ‖x − b_pre‖² over an image's SAE inputs (tokens or its pooled vector)",
        }
    freq = res["frequency"]
    alive = freq > 0
    order = torch.sort(freq.double(), descending=True, stable=True).indices
    order = order[alive[order]][: config.summary_neurons]
    chosen_purity = purity[order]
    chosen_purity = chosen_purity[~torch.isnan(chosen_purity)]
    chosen_entropy = entropy[order]
    chosen_entropy = chosen_entropy[~torch.isnan(chosen_entropy)]
    n = acc.n_latents
    dead = int((~alive).sum())
    summary = {
        "num_neurons": n,
        "dead_count": dead,
        "dead_fraction": dead / n,
        "summary_neurons": config.summary_neurons,
        **_sigma_labels(res, pre_topk, log, columns, config, stats),
        "mean_purity": float(chosen_purity.mean()) if chosen_purity.numel() else None,
        "mean_entropy": float(chosen_entropy.mean()) if chosen_entropy.numel() else None,
        "mean_frequency": float(freq.mean()),
        "median_frequency_alive": float(freq[alive].median()) if alive.any() else None,
        "dense_count": int((freq > config.dense_frequency).sum()),
    }
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
                                  "topk_sigma_label: the same on the TopK codes" if pre_topk is not None
                                  else "on the activations given") + "; *_shuffled: labels permuted across images"),
        "top_images_activations": "topk_code" if sae is not None else "given",
        "purity_metric": "per neuron: population std of the class ids of its top images (lower = more class-specific)",
        "entropy_unit": "bits",
        **meta_extra,
    }
    if sae is not None and getattr(sae, "recipe", None):
        meta["recipe"] = dict(sae.recipe)
    meta.update(extra_meta or {})
    atlas = NeuronAtlas(stats=stats, meta=meta)
    if atlas.label_columns and "value_auroc" in stats:
        named = sum(1 for i in range(n) if alive[i] and atlas.explanation(i))
        summary["named_fraction_alive"] = named / max(int(alive.sum()), 1)
        # a few summaries for the card, written by the same code the app uses
        best = atlas.best_auroc().nan_to_num(-1.0)
        best[~alive] = -2.0
        picks = [int(i) for i in torch.argsort(best, descending=True, stable=True)[:5] if best[i] > 0]
        meta["example_summaries"] = [{"neuron": i, "summary": atlas.summary(i)} for i in picks]

    if thumbnails is not None:
        ids = torch.unique(res["top_image_ids"])
        ids = ids[ids >= 0].tolist()
        missing = []
        iterator: Iterable[int] = ids
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(ids, desc="thumbnails", unit="img")
        for image_id in iterator:
            image = thumbnails(int(image_id))
            if image is None:
                missing.append(int(image_id))
                continue
            atlas._thumbnails[int(image_id)] = _make_thumbnail(image, config.thumbnail_size)
        meta["thumbnails"] = len(atlas._thumbnails)
        meta["missing_thumbnails"] = missing
        if heatmap_maps is not None and sae is not None:
            _add_heatmaps(atlas, sae, heatmap_maps, heatmap_neurons, config)
    if out is not None:
        atlas.save(out)
    return atlas


def _sigma_labels(res: dict[str, torch.Tensor], pre_topk: Optional[TopKAccumulator], log: Optional[ActivationLog],
                  columns: Mapping[str, Sequence[str]], config: AtlasConfig,
                  stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """σ_label (the paper's: on ``pre_topk`` when given) and its value for shuffled labels; the TopK one beside.

    Also stores the pre-TopK top image ids, frequency and mean activation in
    ``stats`` (``pre_topk_*``), so the number can be recomputed from the atlas.
    """
    if not columns:
        return {"sigma_label": None, "sigma_label_neurons": 0, "sigma_label_shuffled": None}
    first = next(iter(columns))
    kw = dict(n_neurons=config.summary_neurons, top=config.purity_top, min_images=config.sigma_min_images)

    def both(r: dict[str, torch.Tensor]) -> tuple[Optional[float], int, Optional[float]]:
        sigma, used = M.sigma_label(r["top_labels"], r["fire_count"], r["mean_activation"], **kw)
        shuffled = None
        if log is not None and log.num_images and sigma is not None:
            ids = r["top_image_ids"]
            size = max(int(ids.max()), int(log.all_image_ids().max())) + 1
            shuffled = M.shuffled_sigma_label(ids, log.labels_by_image_id(first, size), r["fire_count"],
                                              r["mean_activation"], **kw)
        return sigma, used, shuffled

    topk = both(res)
    if pre_topk is None:
        return {"sigma_label": topk[0], "sigma_label_neurons": topk[1], "sigma_label_shuffled": topk[2]}
    pre = pre_topk.result()
    stats["pre_topk_top_image_ids"] = pre["top_image_ids"]
    stats["pre_topk_frequency"] = pre["frequency"]
    stats["pre_topk_mean_activation"] = pre["mean_activation"]
    paper = both(pre)
    return {"sigma_label": paper[0], "sigma_label_neurons": paper[1], "sigma_label_shuffled": paper[2],
            "topk_sigma_label": topk[0], "topk_sigma_label_neurons": topk[1], "topk_sigma_label_shuffled": topk[2]}


def _add_heatmaps(atlas: NeuronAtlas, sae: Any, maps: Callable[[Sequence[int]], torch.Tensor],
                  neurons: Optional[Sequence[int]], config: AtlasConfig) -> None:
    """Store heat-map overlays of selected neurons on their top images (one feature-map read per image)."""
    neurons = list(neurons) if neurons is not None else atlas.sorted_neurons("frequency", limit=64)
    wanted: dict[int, list[int]] = {}
    for i in neurons:
        i = atlas._check(i)
        for image_id in atlas.stats["top_image_ids"][i, : config.purity_top].tolist():
            if image_id >= 0 and image_id in atlas._thumbnails:
                wanted.setdefault(image_id, []).append(i)
    device = next(sae.parameters()).device
    ids = sorted(wanted)
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            x = maps(chunk)
            if x.dim() != 4 or x.shape[0] != len(chunk):
                raise ValueError(f"heatmap_maps must return {len(chunk)}×d×H×W maps, got {tuple(x.shape)}")
            for row, image_id in enumerate(chunk):
                ns = wanted[image_id]
                heat = sae.activation_map(x[row : row + 1].to(device=device, dtype=torch.float32), ns)[0].cpu()
                for j, i in enumerate(ns):
                    vmax = float(heat[j].max())
                    if vmax > 0:
                        atlas._heatmaps[(i, image_id)] = _overlay(atlas._thumbnails[image_id], heat[j], vmax)
    atlas.meta["heatmap_neurons"] = sorted({i for (i, _) in atlas._heatmaps})


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
