"""What an atlas is built with and how it lies on disk: :class:`AtlasConfig` and the folder format's names.

Both the builder (:mod:`~revelio_hub.interpret.atlas_builder`) and the read
model (:mod:`~revelio_hub.interpret.atlas_model`) need the file names and the
config, so they live here, below both, and neither imports the other to get them.

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

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from revelio_hub.interpret.claim_calibration import CalibrationConfig
from revelio_hub.interpret.neuron_labels import SummaryThresholds

__all__ = [
    "AtlasConfig",
    "STATS_FILE",
    "ATLAS_FILE",
    "THUMBNAIL_DIR",
    "HEATMAP_DIR",
    "FORMAT_VERSION",
    "SORT_KEYS",
    "TOP_LABELS_PREFIX",
    "ERROR_QUANTILES",
    "PathLike",
    "is_int_key",
]

STATS_FILE = "stats.safetensors"
ATLAS_FILE = "atlas.json"
THUMBNAIL_DIR = "thumbnails"
HEATMAP_DIR = "heatmaps"
FORMAT_VERSION = 2
SORT_KEYS = ("frequency", "auroc", "entropy", "mean_activation", "purity")
TOP_LABELS_PREFIX = "top_labels."
#: Quantiles of the reconstruction error kept in atlas.json (0%, 0.1%, ..., 100%).
ERROR_QUANTILES = 1001
#: Stats tensors of ids and labels (with every ``top_labels.<column>``).
INT_KEYS = ("top_image_ids", "top_labels", "pre_topk_top_image_ids", "top_peak_positions")


def is_int_key(key: str) -> bool:
    """Whether a stats tensor holds ids or labels: int32 on disk (half the size of int64), int64 in memory."""
    return key in INT_KEYS or key.startswith(TOP_LABELS_PREFIX)


PathLike = Union[str, os.PathLike]


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

