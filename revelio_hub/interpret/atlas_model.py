"""The neuron atlas read model: what makes each k-SAE neuron fire, readable without the dataset.

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

This module reads, queries and writes an atlas; it is built by
:mod:`~revelio_hub.interpret.atlas_builder`, and its folder format is described in
:mod:`~revelio_hub.interpret.atlas_config`.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from revelio_hub.interpret.atlas_config import (
    ATLAS_FILE,
    HEATMAP_DIR,
    SORT_KEYS,
    STATS_FILE,
    THUMBNAIL_DIR,
    TOP_LABELS_PREFIX,
    PathLike,
    is_int_key,
)
from revelio_hub.interpret.claim_calibration import ClaimCalibration
from revelio_hub.interpret.neuron_labels import (
    HELD_OUT_PHRASE,
    SummaryThresholds,
    ValueEvidence,
    column_offsets,
    explain,
    summary_text,
)
from revelio_hub.interpret.where import where_label

__all__ = ["NeuronInfo", "NeuronAtlas"]


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

    Create with :func:`~revelio_hub.interpret.atlas_builder.build_atlas` or :meth:`load`; write with :meth:`save`.
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
    # _claims(i) per (neuron, thresholds): the request path asks for a listed neuron's names once per image
    # (summary_on_image, concept groups), each time over every label column
    _claim_cache: dict[tuple[int, str], tuple[list[ValueEvidence], Optional[ValueEvidence]]] = field(
        default_factory=dict, repr=False)
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

    def set_calibration(self, calibration: Optional[ClaimCalibration]) -> None:
        """Replace the claim table (``None``: uncalibrated summaries), e.g. to study other calibration settings;
        cached summaries and claims are dropped."""
        self.meta["claim_calibration"] = calibration.to_dict() if calibration is not None else None
        self._calibration = None
        self._summaries.clear()
        self._claim_cache.clear()

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

    def _cache_key(self, i: int) -> tuple[int, str]:
        return i, self._thresholds_key()

    def _thresholds_key(self) -> str:
        """The summary thresholds as cached results depend on them (the ``thresholds`` setter may change them)."""
        return json.dumps(self.meta.get("summary_thresholds"), sort_keys=True, default=str)

    def _claims(self, i: int) -> tuple[list[ValueEvidence], Optional[ValueEvidence], int]:
        """(named values, the best unnamed candidate: "unsure", the firing regime their figures count); cached."""
        key = self._cache_key(self._check(i))
        found = self._claim_cache.get(key)
        if found is None:
            found = self._claim_cache[key] = self._make_claims(key[0])
        return found

    def _make_claims(self, i: int) -> tuple[list[ValueEvidence], Optional[ValueEvidence], int]:
        """Calibrated claims are judged in the strongest firing regime where any of them was measured.

        Usually that is "fires strongly". A neuron that fires about equally on every image it fires on (a clean
        detector of a common value, as pooled SAEs have) seldom fires 1.5× its usual, so its claims are unmeasured
        there; they are then judged, and quoted, on its typical firings instead of being called unsure.
        """
        if float(self.stats["frequency"][i]) <= 0:
            return [], None, 0
        cal = self.calibration
        if cal is None:
            return explain(self.evidence(i), self.thresholds), None, 0
        regimes = range(len(cal.config.regimes))
        regime = next((r for r in regimes if any(not math.isnan(e.held_out) for e in self._regime_claims(i, r)[1])), 0)
        named, candidates = self._regime_claims(i, regime)
        unsure = max(candidates, key=lambda e: (-1.0 if math.isnan(e.held_out) else e.held_out, e.strength()),
                     default=None)
        return named, (None if named else unsure), regime

    def _regime_claims(self, i: int, regime: int) -> tuple[list[ValueEvidence], list[ValueEvidence]]:
        """(values named, every candidate claim) of neuron ``i`` judged on held-out firings of ``regime``, each
        carrying that regime's figure (NaN: unmeasured); cached. Per label column the candidate is the summary's
        (best AUROC, with its top-image share); named are those at ``min_precision`` or more, best first."""
        key = (self._cache_key(i), regime)
        found = self._claim_cache.get(key)
        if found is None:
            cal = self.calibration
            dense = float(self.stats["frequency"][i]) > self.dense_frequency
            candidates = []
            for e in self.evidence(i):
                if e.filled < cal.config.min_top_images or cal.band(e.auroc, e.precision) is None:
                    continue
                p = cal.precision(e.auroc, e.precision, dense, neuron=i, column=e.column, regime=regime)
                candidates.append(replace(e, held_out=math.nan if p is None else p))
            named = sorted((e for e in candidates if e.held_out >= cal.config.min_precision),
                           key=lambda e: (e.held_out, e.strength()), reverse=True)
            found = self._claim_cache[key] = (named[: cal.config.max_values], candidates)
        return found

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
        key = self._cache_key(i)
        text = self._summaries.get(key)
        if text is None:
            freq = float(self.stats["frequency"][i])
            named, unsure, regime = self._claims(i)
            phrase = self.calibration.config.regime_phrase(regime) if self.calibration is not None else HELD_OUT_PHRASE
            text = summary_text(named, freq, self.num_images, single_column=len(self.label_columns) <= 1,
                                unsure=unsure, where=self.where(i), phrase=phrase)
            self._summaries[key] = text
        return text

    def _regime(self, i: int, activation: float) -> Optional[int]:
        """The calibration's firing regime of an image where neuron ``i`` fires with ``activation`` (0 = strongly;
        ``None`` = weaker than any regime its claims were checked in)."""
        mean = float(self.stats["mean_activation"][i])
        return 0 if mean <= 0 else self.calibration.config.regime_of(activation / mean)

    def names_on_image(self, i: int, activation: float) -> list[ValueEvidence]:
        """The values neuron ``i`` names on an image where it fires with ``activation``, each with the figure
        measured for firings like it.

        A calibrated claim's figure was measured on held-out images where the
        neuron fired in one regime (``CalibrationConfig.regimes``: strongly,
        typically); on a firing of another regime it says nothing, and on weaker
        firings names were often false (docs/benchmarks.md, "Per-neuron claim
        records"). So an image gets the values whose claims held (at least
        ``min_precision``) in the regime of its own firing, with that regime's
        figure: the summary's names on a firing of the regime the summary counts,
        that regime's own names otherwise (a background detector whose strong
        firings are all small shapes names "small" there and "dark background"
        on its typical firings). Weaker than every regime, nothing applies.
        Uncalibrated atlases: the summary's values, always.
        """
        if self.calibration is None or float(self.stats["frequency"][self._check(i)]) <= 0:
            return self.explanation(i)
        return self._names_in_regime(i, self._regime(i, activation), self._claims(i))

    def _names_in_regime(self, i: int, r: Optional[int],
                         claims: tuple[list[ValueEvidence], Optional[ValueEvidence], int]) -> list[ValueEvidence]:
        """The values neuron ``i`` names on firings of regime ``r`` (see :meth:`names_on_image`); ``claims`` is
        :meth:`_claims` of ``i``, passed in so a request looks it up once per neuron."""
        if r is None:
            return []
        named, _, summary_regime = claims
        if r == summary_regime:  # the regime the summary's own figures count
            return named
        return self._regime_claims(i, r)[0]

    def summary_on_image(self, i: int, activation: float) -> str:
        """:meth:`summary` as it applies to an image where neuron ``i`` fires with ``activation``.

        A firing of the regime the summary counts (usually strong): the summary itself. Another regime's
        firing: the names that held in that regime, with its figure
        (``"red (colour) · true on 92% of held-out images it fires 1–1.5× its usual on · ..."``). Otherwise a line
        that names nothing for this image: ``"not named here: fires weakly (0.6× its usual); where it fires ≥
        1.5×: <summary>"``, or the summary itself when it names nothing either (``unsure``/``mixed``).
        """
        i = self._check(i)
        text = self.summary(i)
        cal = self.calibration
        if cal is None or float(self.stats["frequency"][i]) <= 0:
            return text
        r = self._regime(i, activation)
        claims = self._claims(i)
        summary_regime = claims[2]
        if r == summary_regime:
            return text
        names = self._names_in_regime(i, r, claims)
        if names:
            return summary_text(names, float(self.stats["frequency"][i]), self.num_images,
                                single_column=len(self.label_columns) <= 1, where=self.where(i),
                                phrase=cal.config.regime_phrase(r))
        if not claims[0]:
            return text
        # floored, not rounded: 0.996× is a weak firing and must not read "1.0×", the typical regime's edge
        ratio = math.floor(activation / float(self.stats["mean_activation"][i]) * 10 + 1e-6) / 10
        unchecked = r is not None and all(math.isnan(e.held_out) for e in self._regime_claims(i, r)[1])
        why = (f"fires weakly ({ratio:.1f}× its usual)" if r is None else
               f"fires {ratio:.1f}× its usual, where too few held-out images checked its names" if unchecked else
               f"fires {ratio:.1f}× its usual, where its names held too rarely on held-out images")
        return f"not named here: {why}; where it fires {cal.config.regime_span(summary_regime)}: {text}"

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

    def neurons_naming(self, value: str) -> list[int]:
        """Neurons that name ``value`` on some firing: their checked claims name it in at least one firing regime
        (uncalibrated atlases: their summary names it); ascending ids, cached.

        :meth:`search` ranks every neuron by its AUROC for a value; this says which ones the app will ever *call*
        that value. "Why this class?" uses it to tell a user when no neuron of a layer is named for the class, so
        no bar can be (a layer whose neurons carry colour and size, while Diff-C reads shape from their mix).
        """
        key = ("naming", value, self._thresholds_key())
        found = self._claim_cache.get(key)
        if found is None:
            cal = self.calibration
            alive = torch.nonzero(self.stats["frequency"] > 0).flatten().tolist()
            if cal is None:
                found = [i for i in alive if any(e.value == value for e in self.explanation(i))]
            else:  # the summary's names are those of one of the regimes
                found = [i for i in alive if any(e.value == value for r in range(len(cal.config.regimes))
                                                 for e in self._regime_claims(i, r)[0])]
            self._claim_cache[key] = found
        return list(found)

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
        save_file({k: (v.int() if is_int_key(k) else v).contiguous() for k, v in self.stats.items()},
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
        stats = {k: (v.long() if is_int_key(k) else v) for k, v in stats.items()}
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
