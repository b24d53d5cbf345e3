"""What a neuron's activation says about an image's labels, for every label column a dataset has.

The atlas' top images tell what a neuron fires on *most*; they do not tell
whether it fires on that value *only*. A neuron whose ten top images are
magenta could also fire, a little less, on every other colour. So for every
label column (shape, colour, background, ... or a dataset's class column) and
every value of it, the atlas scores the neuron's image-level activation as a
detector of "the image has this value" over **all** atlas images: the AUROC.
A summary then names a value only when both views agree (high AUROC *and*
most top images carry the value), and says ``mixed`` otherwise: an honest
"no single label explains this neuron" costs a user less than a confident
wrong one.

This module holds the pieces that do not depend on the atlas folder format:

* :class:`ActivationLog`: every image's non-zero activations (sparse), its
  labels per column and, optionally, its SAE reconstruction error, streamed
  batch by batch while the atlas is built.
* :func:`value_auroc`: AUROC of every neuron for every value of every column,
  in neuron chunks so memory stays O(n_images × chunk).
* :class:`SummaryThresholds` and :func:`explain`: which values a neuron's
  summary may name, and the one-line text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

__all__ = [
    "ActivationLog",
    "SummaryThresholds",
    "ValueEvidence",
    "value_auroc",
    "explain",
    "summary_text",
    "HELD_OUT_PHRASE",
    "column_offsets",
    "chunk_auroc",
    "label_onehots",
]


def column_offsets(label_columns: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, int]]:
    """Column → (start, stop) of its values in the concatenated value axis of ``value_auroc``."""
    out, start = {}, 0
    for name, values in label_columns.items():
        out[name] = (start, start + len(values))
        start += len(values)
    return out


@dataclass
class ActivationLog:
    """Per-image activations (sparse), labels per column and reconstruction errors, in arrival order.

    Only activations above ``threshold`` are kept, as (row, neuron, value)
    triples: a k-SAE's image codes are sparse, so 100k images of an
    80k-latent SAE cost a few hundred MB at most instead of 32 GB dense.
    """

    n_latents: int
    columns: Sequence[str]
    threshold: float = 0.0
    rows: list[torch.Tensor] = field(default_factory=list)
    neurons: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    image_ids: list[torch.Tensor] = field(default_factory=list)
    labels: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    errors: list[torch.Tensor] = field(default_factory=list)
    #: per kept activation, the flattened position of its peak on the feature map (token SAEs; see interpret/where.py)
    peaks: list[torch.Tensor] = field(default_factory=list)
    num_images: int = 0

    def __post_init__(self) -> None:
        self.columns = list(self.columns)
        for c in self.columns:
            self.labels.setdefault(c, [])

    def update(self, acts: torch.Tensor, image_ids: torch.Tensor, labels: Mapping[str, torch.Tensor],
               errors: Optional[torch.Tensor] = None, peaks: Optional[torch.Tensor] = None) -> None:
        """Fold in one batch: ``acts`` B×n, ``image_ids`` B, ``labels`` column → B ids (-1 = unknown).

        ``peaks`` (B×n, optional): where on the map each activation peaks (:func:`~revelio_hub.interpret.where.peak_positions`).
        """
        b = acts.shape[0]
        acts = acts.detach().float().cpu()
        row, neuron = torch.nonzero(acts > self.threshold, as_tuple=True)
        self.rows.append((row + self.num_images).int())
        self.neurons.append(neuron.int())
        self.values.append(acts[row, neuron])
        if peaks is not None:
            self.peaks.append(peaks.detach().cpu()[row, neuron].int())
        self.image_ids.append(image_ids.detach().reshape(-1).long().cpu())
        for c in self.columns:
            lab = labels.get(c)
            lab = torch.full((b,), -1, dtype=torch.long) if lab is None else lab.detach().reshape(-1).long().cpu()
            if lab.shape[0] != b:
                raise ValueError(f"label column {c!r} has {lab.shape[0]} entries for a batch of {b} images")
            self.labels[c].append(lab)
        if errors is not None:
            self.errors.append(errors.detach().reshape(-1).float().cpu())
        self.num_images += b

    def merge(self, other: "ActivationLog") -> None:
        """Append another log (e.g. another process's images); its rows are renumbered after ours."""
        if other.n_latents != self.n_latents or list(other.columns) != list(self.columns):
            raise ValueError("can only merge activation logs of the same SAE and label columns")
        for r, n, v in zip(other.rows, other.neurons, other.values):
            self.rows.append(r + self.num_images)
            self.neurons.append(n)
            self.values.append(v)
        self.image_ids.extend(other.image_ids)
        for c in self.columns:
            self.labels[c].extend(other.labels[c])
        self.errors.extend(other.errors)
        self.peaks.extend(other.peaks)
        self.num_images += other.num_images

    # ------------------------------------------------------------------ read back
    def column_labels(self, column: str) -> torch.Tensor:
        """Labels of every logged image (in arrival order) for ``column``."""
        parts = self.labels[column]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def all_image_ids(self) -> torch.Tensor:
        return torch.cat(self.image_ids) if self.image_ids else torch.zeros(0, dtype=torch.long)

    def reconstruction_errors(self) -> Optional[torch.Tensor]:
        if not self.errors:
            return None
        err = torch.cat(self.errors)
        return err if err.shape[0] == self.num_images else None

    def peak_lookup(self, image_ids: torch.Tensor, neurons: torch.Tensor) -> Optional[torch.Tensor]:
        """Peak position of each (image id, neuron) pair (same shapes; -1 where it did not fire or is unknown).

        ``None`` when peaks were not logged for every batch.
        """
        if not self.peaks or len(self.peaks) != len(self.rows):
            return None
        rows, neurons_all = torch.cat(self.rows).long(), torch.cat(self.neurons).long()
        keys = rows * self.n_latents + neurons_all
        order = torch.argsort(keys)
        keys, peaks = keys[order], torch.cat(self.peaks).long()[order]
        if not keys.numel() or not image_ids.numel():
            return torch.full(image_ids.shape, -1, dtype=torch.long)
        ids = self.all_image_ids()
        row_of = torch.full((int(max(int(ids.max()), int(image_ids.max()))) + 1,), -1, dtype=torch.long)
        row_of[ids] = torch.arange(ids.numel())
        wanted_rows = torch.where(image_ids >= 0, row_of[image_ids.clamp_min(0)], torch.full_like(image_ids, -1))
        wanted = wanted_rows * self.n_latents + neurons
        at = torch.searchsorted(keys, wanted.reshape(-1)).clamp_max(keys.numel() - 1).reshape(wanted.shape)
        found = (wanted_rows >= 0) & (keys[at] == wanted)
        return torch.where(found, peaks[at], torch.full_like(wanted, -1))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, neurons, values) of every kept activation, sorted by neuron."""
        if not self.rows:
            z = torch.zeros(0, dtype=torch.long)
            return z, z, torch.zeros(0)
        rows, neurons, values = torch.cat(self.rows).long(), torch.cat(self.neurons).long(), torch.cat(self.values)
        order = torch.argsort(neurons, stable=True)
        return rows[order], neurons[order], values[order]

    def dense_chunks(self, chunk: int = 256) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, images × (stop − start) dense activations) over neuron chunks: O(n_images × chunk) memory."""
        rows, neurons, values = self.entries()
        n = self.n_latents
        bounds = torch.searchsorted(neurons, torch.arange(0, n + chunk, chunk).clamp_max(n))
        for ci, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            lo, hi = int(bounds[ci]), int(bounds[ci + 1])
            dense = torch.zeros(self.num_images, stop - start, dtype=torch.float32)
            dense[rows[lo:hi], neurons[lo:hi] - start] = values[lo:hi]
            yield start, stop, dense

    def labels_by_image_id(self, column: str, size: Optional[int] = None) -> torch.Tensor:
        """A lookup table image_id → label of ``column`` (-1 where the image was not logged)."""
        ids = self.all_image_ids()
        n = int(size if size is not None else (int(ids.max()) + 1 if ids.numel() else 0))
        table = torch.full((n,), -1, dtype=torch.long)
        if ids.numel():
            keep = ids < n
            table[ids[keep]] = self.column_labels(column)[keep]
        return table


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based average ranks along dim 0 (ties share their mean rank), float64."""
    s = scores.t().contiguous().double()  # C×N
    srt = s.sort(dim=1).values
    left = torch.searchsorted(srt, s, right=False)
    right = torch.searchsorted(srt, s, right=True)
    return ((left + right + 1).double() / 2).t()  # N×C


def label_onehots(labels: Mapping[str, torch.Tensor], label_columns: Mapping[str, Sequence[str]],
                  n_images: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per column: (known mask n_images, one-hot n_images × V float64) of image labels (-1 = unknown)."""
    out = {}
    for c, names in label_columns.items():
        lab = labels[c]
        known = lab >= 0
        m = len(names)
        oh = torch.zeros(n_images, m, dtype=torch.float64)
        if m:
            oh[known.nonzero().flatten(), lab[known].clamp_max(m - 1)] = 1.0
        out[c] = (known, oh)
    return out


def chunk_auroc(dense: torch.Tensor, onehots: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                label_columns: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """AUROC of each column of ``dense`` (images × neurons) for every label value: neurons × Σ values, NaN if undefined."""
    offsets = column_offsets(label_columns)
    total = sum(len(v) for v in label_columns.values())
    out = torch.full((dense.shape[1], total), math.nan, dtype=torch.float32)
    full_ranks = None
    for c, (known, oh) in onehots.items():
        a, b = offsets[c]
        if b == a:
            continue
        if bool(known.all()):
            if full_ranks is None:
                full_ranks = _ranks(dense)
            ranks, y = full_ranks, oh
        else:
            idx = known.nonzero().flatten()
            if idx.numel() < 2:
                continue
            ranks, y = _ranks(dense[idx]), oh[idx]
        pos = y.sum(0)  # V
        neg = y.shape[0] - pos
        rank_sum = y.t() @ ranks  # V×C
        auc = (rank_sum - (pos * (pos + 1) / 2)[:, None]) / (pos * neg).clamp_min(1)[:, None]
        auc[(pos == 0) | (neg == 0)] = math.nan
        out[:, a:b] = auc.t().float()
    return out


def value_auroc(log: ActivationLog, label_columns: Mapping[str, Sequence[str]], chunk: int = 256) -> torch.Tensor:
    """AUROC of every neuron's image activation as a score for every label value: n × Σ values (float32).

    Over all logged images; images whose label is unknown (-1) in a column are
    left out of that column. NaN where a value has no positive or no negative
    image. Rank-based (Mann-Whitney U, ties ½): the many exact zeros of sparse
    codes are handled exactly.
    """
    total = sum(len(v) for v in label_columns.values())
    n, n_img = log.n_latents, log.num_images
    out = torch.full((n, total), math.nan, dtype=torch.float32)
    if n_img == 0 or total == 0:
        return out
    onehots = label_onehots({c: log.column_labels(c) for c in label_columns}, label_columns, n_img)
    for start, stop, dense in log.dense_chunks(chunk):
        out[start:stop] = chunk_auroc(dense, onehots, label_columns)
    return out


@dataclass
class SummaryThresholds:
    """When a neuron's summary may name a label value (otherwise it says ``mixed``).

    A value passes when its top images mostly carry it (``min_precision`` of
    the top ``purity_top`` images, with at least ``min_top_images`` of them
    filled) *and* the neuron's activation is positively associated with it
    over all atlas images (``min_auroc``). At most ``max_values`` passing
    values are named, strongest first.

    The defaults were chosen with ``benchmarks/bench_explain.py --tune`` on toy
    images of a generator seed (5) used neither to build the release nor to
    report its figures (seed 7; docs/benchmarks.md). What the sweep showed:
    an image's most relevant neurons fire in the regime of their top images,
    so top-image precision predicts whether the named value is true; a global
    AUROC floor of 0.9 left 1–15% of listed neurons named, while 0.55 keeps the
    value from being merely common. Naming a second value lowered precision at
    every layer (both must be true), so ``max_values`` is 1.
    """

    min_auroc: float = 0.55
    min_precision: float = 0.8
    min_top_images: int = 5
    max_values: int = 1

    def __post_init__(self) -> None:
        if not 0.5 <= self.min_auroc <= 1:
            raise ValueError(f"min_auroc must lie in [0.5, 1], got {self.min_auroc}")
        if not 0 < self.min_precision <= 1:
            raise ValueError(f"min_precision must lie in (0, 1], got {self.min_precision}")
        if self.min_top_images < 1 or self.max_values < 1:
            raise ValueError("min_top_images and max_values must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "SummaryThresholds":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclass(frozen=True)
class ValueEvidence:
    """How well one label value explains a neuron: its best value in one column."""

    column: str
    value: str
    auroc: float  # NaN when the atlas has no AUROC (format 1)
    hits: int  # top images carrying the value
    filled: int  # top images considered
    #: measured precision of claims like this one on held-out images (claim calibration); NaN when not measured
    held_out: float = math.nan

    @property
    def precision(self) -> float:
        return self.hits / self.filled if self.filled else math.nan

    def passes(self, t: SummaryThresholds) -> bool:
        auroc_ok = math.isnan(self.auroc) or self.auroc >= t.min_auroc
        return self.filled >= t.min_top_images and self.precision >= t.min_precision and auroc_ok

    def strength(self) -> tuple[float, float]:
        return (-1.0 if math.isnan(self.auroc) else self.auroc, self.precision)

    def to_dict(self) -> dict[str, Any]:
        out = {"column": self.column, "value": self.value,
               "auroc": None if math.isnan(self.auroc) else round(self.auroc, 4),
               "precision": round(self.precision, 4) if self.filled else None,
               "top_hits": self.hits, "top_images": self.filled}
        if not math.isnan(self.held_out):
            out["held_out_precision"] = round(self.held_out, 4)
        return out


def explain(evidence: Sequence[ValueEvidence], thresholds: SummaryThresholds) -> list[ValueEvidence]:
    """The values a summary names: those that pass, strongest first, at most ``max_values``."""
    passing = [e for e in evidence if e.passes(thresholds)]
    passing.sort(key=lambda e: e.strength(), reverse=True)
    return passing[: thresholds.max_values]


#: How calibrated summaries say what their percentage counts (see interpret/claim_calibration.py).
HELD_OUT_PHRASE = "of held-out images it fires strongly on"


def _named_part(e: ValueEvidence, single_column: bool) -> str:
    return e.value if single_column else f"{e.value} ({e.column})"


def summary_text(named: Sequence[ValueEvidence], frequency: float, num_images: int, single_column: bool = False,
                 unsure: Optional[ValueEvidence] = None, where: Optional[str] = None,
                 phrase: str = HELD_OUT_PHRASE) -> str:
    """One line: ``cyan (color) · true on 94% of held-out images it fires strongly on · fires on 4% of images``.

    Calibrated values (``held_out`` set) quote their measured precision; two
    values of different columns read ``small (size) · cross (shape) · true on
    93% and 95% ...``. ``unsure`` (a value whose claims were too rarely true on
    held-out images, or could not be checked) is shown as a question, never as
    a name. Uncalibrated atlases (built before claim calibration) keep the
    older line: ``magenta (color) · AUROC 0.99 · 10/10 top images``. AUROC reads
    "higher = the neuron singles this value out better" (0.5 = chance). The
    column name is left out when the atlas has only one label column.
    ``where`` (token SAEs) says where the neuron's top images peak. ``phrase`` says
    which held-out firings a calibrated figure counts (another firing regime than
    "strongly": ``"of held-out images it fires 1–1.5× its usual on"``).
    """
    if frequency <= 0:
        return f"dead neuron (never fired on {num_images} images)"
    calibrated = [e for e in named if not math.isnan(e.held_out)]
    if calibrated:
        rates = " and ".join(f"{100 * e.held_out:.0f}%" for e in calibrated)
        head = " · ".join(_named_part(e, single_column) for e in calibrated) + f" · true on {rates} {phrase}"
    elif named:
        parts = []
        for e in named:
            bits = [_named_part(e, single_column)]
            if not math.isnan(e.auroc):
                bits.append(f"AUROC {e.auroc:.2f}")
            bits.append(f"{e.hits}/{e.filled} top images")
            parts.append(" · ".join(bits))
        head = "; ".join(parts)
    elif unsure is not None:
        # floored: a figure just under the floor (89.96%) must not read as the floor itself ("90%")
        checked = (f"claims like it held on {math.floor(100 * unsure.held_out):.0f}% {phrase}"
                   if not math.isnan(unsure.held_out) else "too few held-out images to check claims like it")
        head = f"unsure: {_named_part(unsure, single_column)}? {checked}"
    else:
        head = "mixed (no single label value explains its top images)"
    if where:
        head += f" · where: {where}"
    pct = 100 * frequency
    freq = f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"
    return f"{head} · fires on {freq} of images"
