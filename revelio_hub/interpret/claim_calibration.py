"""How often a neuron's claim ("this neuron means cyan") is true on images the claim was not made from.

A summary that names a value from weak evidence reads exactly like one from
strong evidence. So at atlas build time the atlas' images are cut into
``folds`` parts (seeded). For each part, every neuron's claims are made from
the *other* parts, as the summary makes them: per label column, the value with
the highest AUROC, with the share of the neuron's top images that carry it. On
the held-out part we count, for every claim, the images the neuron **fires
strongly on** (activation at least ``regimes[0]`` × its mean activation when
firing on the claim images; the app lists an image's neurons by that ratio, its
"relevance") and how many of them carry the claimed value. Pooled over the claims of one *band* (AUROC band ×
top-image agreement × dense or not), that share is the band's measured
precision. A band pools neurons of very different quality, so each neuron's
own held-out record (the same count, for its claims only) is kept too, and
what a summary quotes is that record shrunk towards the band's precision
(``prior_pairs`` pseudo-pairs at the band's rate): a neuron with few strong
held-out firings keeps its band's figure, one with many earns its own. A
summary then names a value only when that figure is at least ``min_precision``
(0.9) and quotes it; otherwise it says "unsure".

The same count is kept for weaker firing **regimes** (``regimes[1:]``; by
default images where the neuron fires 1–1.5× its mean): a name checked on
strong firings says nothing about a typical one, where it was often false
(docs/benchmarks.md, "Per-neuron claim records"), yet some neurons' names hold
there too. On an image, the app names a value only where the image's regime
measured at least ``min_precision`` for it, and quotes that regime's figure
(:meth:`NeuronAtlas.names_on_image`). A neuron that seldom fires strongly
(a clean detector of a common value fires about equally wherever it fires, as
pooled SAEs' neurons do) may have no measured claim on strong firings at all;
its summary is then judged and quoted in the strongest regime where one was
measured, instead of saying "unsure" for want of checks.

The table is stored in ``atlas.json`` (``claim_calibration``, see
docs/CONTRACTS.md); atlases built before it keep their uncalibrated summaries.
Summaries of the finished atlas use all its images, so they rest on twice the
evidence the calibration's claims had: the quoted precision is, if anything,
conservative.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from revelio_hub.interpret.neuron_labels import (
    HELD_OUT_PHRASE,
    ActivationLog,
    chunk_auroc,
    column_offsets,
    label_onehots,
)

__all__ = ["CalibrationConfig", "ClaimCalibration", "calibrate_claims", "CALIBRATION_VERSION"]

#: Version of the stored table; a reader ignores tables of a version it does not know (summaries stay uncalibrated).
#: 2 adds each neuron's own record (``neuron_true``/``neuron_pairs``); 3 adds the weaker firing regimes (a leading
#: regime axis on ``true``/``pairs``/``neuron_true``/``neuron_pairs``). Versions 1 and 2 still load (one regime).
CALIBRATION_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)


@dataclass
class CalibrationConfig:
    """How claims are calibrated at atlas build time.

    Attributes:
        auroc_edges: lower edges of the AUROC bands (a claim below the first is never made).
        agreement_edges: lower edges of the top-image agreement bands (share of the
            top ``purity_top`` images carrying the value); below the first, no claim.
        min_precision: a band's measured precision needed to name a value (the issue's floor: 0.9).
        min_pairs: a band needs at least this many (claim, held-out strong firing) pairs to count as measured.
        min_top_images: a claim needs at least this many filled top images.
        max_values: values of different label columns a summary may name.
        folds: parts the images are cut into; claims come from all parts but one, checked on that one.
        regimes: lower edges of the firing regimes claims are checked in, as activation / the neuron's mean
            activation when firing, strongest first. The first is "fires strongly", where a summary's own
            figure is measured: 1.5 measured the regime of the neurons the app lists first for an image
            (docs/benchmarks.md, "Calibrated claims"); at 1.0 a neuron's many middling firings dominate.
            Each later edge opens a regime up to the previous edge, checked on its own (1.0: typical
            firings; on tuning images, edges under 1.0 named nothing more and splitting 1–1.5× at 1.2
            added at most 0.03 coverage, docs/benchmarks.md, "Names on typical firings"). Below the last
            edge nothing is named.
        seed: of the split into parts.
        prior_pairs: weight of the band's precision in a neuron's figure, in pairs: the figure is
            (neuron's true + prior_pairs × band precision) / (neuron's pairs + prior_pairs). 0 trusts a
            neuron's own record alone; a very large value gives the band's figure to every neuron (version 1).
            10 was chosen on tuning images (generator seed 5, not the reporting seed) with
            ``benchmarks/bench_explain.py`` (docs/benchmarks.md, "Per-neuron claim records").
    """

    auroc_edges: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    agreement_edges: Sequence[float] = (0.8, 0.9, 1.0)
    min_precision: float = 0.9
    min_pairs: int = 30
    min_top_images: int = 5
    max_values: int = 2
    folds: int = 5
    regimes: Sequence[float] = (1.5, 1.0)
    seed: int = 0
    prior_pairs: float = 10.0

    def __post_init__(self) -> None:
        self.auroc_edges = [float(e) for e in self.auroc_edges]
        self.agreement_edges = [float(e) for e in self.agreement_edges]
        self.regimes = [float(e) for e in self.regimes]
        if not self.regimes or sorted(self.regimes, reverse=True) != self.regimes or len(set(self.regimes)) < len(
                self.regimes) or self.regimes[-1] <= 0:
            raise ValueError(f"regimes must be distinct positive ratios, strongest first, got {self.regimes}")
        for name, edges in (("auroc_edges", self.auroc_edges), ("agreement_edges", self.agreement_edges)):
            if not edges or sorted(edges) != edges or not 0 <= edges[0] <= edges[-1] <= 1:
                raise ValueError(f"{name} must be ascending values in [0, 1], got {edges}")
        if not 0 < self.min_precision <= 1:
            raise ValueError(f"min_precision must lie in (0, 1], got {self.min_precision}")
        if self.folds < 2:
            raise ValueError(f"folds must be ≥ 2 (claims and their check need different images), got {self.folds}")
        if self.min_pairs < 1 or self.min_top_images < 1 or self.max_values < 1:
            raise ValueError("min_pairs, min_top_images and max_values must be ≥ 1")
        if not self.prior_pairs >= 0:
            raise ValueError(f"prior_pairs must be ≥ 0, got {self.prior_pairs}")

    @property
    def strong(self) -> float:
        """Where a neuron "fires strongly": the first regime's edge, on which its summary's figure is measured."""
        return self.regimes[0]

    def regime_of(self, ratio: float) -> Optional[int]:
        """The regime (index into ``regimes``) a firing of ``ratio`` × the neuron's mean falls in; ``None`` below
        the last edge (never checked)."""
        for r, edge in enumerate(self.regimes):
            if ratio >= edge:
                return r
        return None

    def regime_span(self, r: int) -> str:
        """Regime ``r``'s firings as activation over the neuron's usual: "≥ 1.5×" or "1–1.5×"."""
        return f"≥ {self.regimes[0]:g}×" if r == 0 else f"{self.regimes[r]:g}–{self.regimes[r - 1]:g}×"

    def regime_phrase(self, r: int) -> str:
        """How a summary says what regime ``r``'s figure counts: "of held-out images it fires strongly on" or
        "of held-out images it fires 1–1.5× its usual on"."""
        if r == 0:
            return HELD_OUT_PHRASE
        return f"of held-out images it fires {self.regimes[r]:g}–{self.regimes[r - 1]:g}× its usual on"


@dataclass
class ClaimCalibration:
    """The measured precision of claims per band, as stored in ``atlas.json``.

    ``true``/``pairs`` are indexed ``[regime][dense][auroc band][agreement band]``;
    precision = true / pairs, ``None`` where the band has fewer than
    ``min_pairs`` pairs (unmeasured: no claim is made there). ``claims``
    (``[dense][auroc band][agreement band]``) counts the claims made.
    ``neuron_true``/``neuron_pairs`` (version 2) are the same counts per regime,
    neuron and label column (``[regime][neuron][column]``, ``columns`` order),
    for that neuron's claims only. Tables of versions 1 and 2 are read as one regime.
    """

    config: CalibrationConfig
    true: list[list[list[list[int]]]]
    pairs: list[list[list[list[int]]]]
    claims: list[list[list[int]]]
    held_out_images: int
    dense_frequency: float
    version: int = CALIBRATION_VERSION
    firing: str = ("held-out images on which the neuron's activation, over its mean activation when firing on the "
                   "claim images, lies in the regime: at least `regimes[r]` and below `regimes[r - 1]`")
    columns: Optional[list[str]] = None
    neuron_true: Optional[list[list[list[int]]]] = None
    neuron_pairs: Optional[list[list[list[int]]]] = None

    def band(self, auroc: float, agreement: float) -> Optional[tuple[int, int]]:
        """(AUROC band, agreement band) of a claim, or ``None`` when it is below the first edges (never claimed)."""
        if math.isnan(auroc) or math.isnan(agreement):
            return None
        a = bisect.bisect_right(self.config.auroc_edges, auroc + 1e-9) - 1
        g = bisect.bisect_right(self.config.agreement_edges, agreement + 1e-9) - 1
        return None if a < 0 or g < 0 else (a, g)

    def precision(self, auroc: float, agreement: float, dense: bool, neuron: Optional[int] = None,
                  column: Optional[str] = None, regime: int = 0) -> Optional[float]:
        """Measured precision of claims like this one on firings of ``regime``; ``None`` when unmeasured (too few
        pairs) or below the edges.

        With ``neuron`` and ``column`` (and a version-2 table), the band's
        figure shrunk towards that neuron's own held-out record (module docstring).
        """
        b = self.band(auroc, agreement)
        if b is None or not 0 <= regime < len(self.pairs):
            return None
        n = self.pairs[regime][int(dense)][b[0]][b[1]]
        if n < self.config.min_pairs:
            return None
        band = self.true[regime][int(dense)][b[0]][b[1]] / n
        own = self.neuron_record(neuron, column, regime)
        if own is None:
            return band
        m = self.config.prior_pairs
        return (own[0] + m * band) / (own[1] + m) if own[1] + m > 0 else band

    def neuron_record(self, neuron: Optional[int], column: Optional[str], regime: int = 0) -> Optional[tuple[int, int]]:
        """(true, pairs) of one neuron's claims in ``column`` on held-out firings of ``regime``; ``None`` without a
        version-2 table."""
        if neuron is None or column is None or self.neuron_pairs is None or not self.columns:
            return None
        if column not in self.columns or not 0 <= regime < len(self.neuron_pairs):
            return None
        if not 0 <= neuron < len(self.neuron_pairs[regime]):
            return None
        c = self.columns.index(column)
        return int(self.neuron_true[regime][neuron][c]), int(self.neuron_pairs[regime][neuron][c])

    def to_dict(self) -> dict[str, Any]:
        """The stored form; a table read from an older version is written back in that version's layout."""
        one = self.version < 3  # versions 1 and 2: one regime, no regime axis, config field "strong"
        unwrap = (lambda x: x[0]) if one else (lambda x: x)  # noqa: E731
        config = asdict(self.config)
        if one:
            config["strong"] = config.pop("regimes")[0]
        out = {"version": self.version, "config": config, "true": unwrap(self.true), "pairs": unwrap(self.pairs),
               "claims": self.claims, "held_out_images": self.held_out_images,
               "dense_frequency": self.dense_frequency, "firing": self.firing}
        if self.neuron_pairs is not None:
            out.update(columns=self.columns, neuron_true=unwrap(self.neuron_true),
                       neuron_pairs=unwrap(self.neuron_pairs))
        return out

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> Optional["ClaimCalibration"]:
        """The stored table, or ``None`` when absent or of an unknown version (uncalibrated summaries)."""
        if not data or data.get("version") not in _READABLE_VERSIONS:
            return None
        version = int(data["version"])
        cfg = dict(data.get("config") or {})
        if version < 3:  # one regime: "fires strongly" was the field ``strong``
            cfg["regimes"] = [cfg.pop("strong", CalibrationConfig.regimes[0])]
        known = set(CalibrationConfig.__dataclass_fields__)
        wrap = (lambda x: [x]) if version < 3 else (lambda x: x)  # noqa: E731
        per_neuron = data.get("neuron_pairs") is not None and version >= 2
        return cls(CalibrationConfig(**{k: v for k, v in cfg.items() if k in known}),
                   _ints(wrap(data["true"])), _ints(wrap(data["pairs"])),
                   _ints(data.get("claims", wrap(data["pairs"])[0])),
                   int(data.get("held_out_images", 0)), float(data.get("dense_frequency", 0.5)),
                   version=version, firing=str(data.get("firing", cls.firing)),
                   columns=list(data["columns"]) if per_neuron else None,
                   neuron_true=_ints(wrap(data["neuron_true"])) if per_neuron else None,
                   neuron_pairs=_ints(wrap(data["neuron_pairs"])) if per_neuron else None)

    def table(self) -> list[dict[str, Any]]:
        """Rows ``{regime_from, dense, auroc_from, agreement_from, claims, pairs, precision}`` for cards and docs."""
        a_edges, g_edges = self.config.auroc_edges, self.config.agreement_edges
        rows = []
        for r, edge in enumerate(self.config.regimes):
            for d in (0, 1):
                for a in range(len(a_edges)):
                    for g in range(len(g_edges)):
                        n = self.pairs[r][d][a][g]
                        rows.append({"regime_from": edge, "dense": bool(d), "auroc_from": a_edges[a],
                                     "agreement_from": g_edges[g], "claims": self.claims[d][a][g], "pairs": n,
                                     "precision": round(self.true[r][d][a][g] / n, 4) if n else None})
        return rows


def _ints(x: Any) -> Any:
    """Nested lists of whole numbers, as stored (JSON gives ints already; this also checks the nesting)."""
    return [_ints(v) for v in x] if isinstance(x, list) else int(x)


def _folds(n: int, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(claim images, held-out images) per fold: a seeded permutation cut into ``folds`` parts."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [p.sort().values for p in perm.tensor_split(folds)]
    return [(torch.cat(parts[:i] + parts[i + 1 :]).sort().values, parts[i]) for i in range(folds)]


def calibrate_claims(log: ActivationLog, label_columns: Mapping[str, Sequence[str]], *, top: int,
                     dense_frequency: float, config: Optional[CalibrationConfig] = None,
                     chunk: int = 256) -> ClaimCalibration:
    """Measure claim precision per band on the two halves of the logged images (see the module docstring).

    The images of one neuron chunk are cut into ``config.folds`` parts; works in neuron chunks (O(n_images × chunk) memory), as :func:`value_auroc`.
    """
    config = config or CalibrationConfig()
    shape = (len(config.regimes), 2, len(config.auroc_edges), len(config.agreement_edges))
    true, pairs = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    claims = torch.zeros(shape[1:], dtype=torch.long)
    # [true | pairs] × regimes × neurons × columns
    own = torch.zeros(2, len(config.regimes), log.n_latents, len(label_columns), dtype=torch.long)
    n_img = log.num_images
    labels = {c: log.column_labels(c) for c in label_columns}
    if n_img >= 2 * config.folds and label_columns:
        for start, stop, dense in log.dense_chunks(chunk):
            for made, held in _folds(n_img, config.folds, config.seed):
                _count_fold(dense[made], dense[held], {c: v[made] for c, v in labels.items()},
                            {c: v[held] for c, v in labels.items()}, label_columns, top, dense_frequency, config,
                            (true, pairs, claims, own[:, :, start:stop]))
    return ClaimCalibration(config, true.tolist(), pairs.tolist(), claims.tolist(), n_img, dense_frequency,
                            columns=list(label_columns), neuron_true=own[0].tolist(), neuron_pairs=own[1].tolist())


def _count_fold(made: torch.Tensor, held: torch.Tensor, made_labels: Mapping[str, torch.Tensor],
                held_labels: Mapping[str, torch.Tensor], label_columns: Mapping[str, Sequence[str]], top: int,
                dense_frequency: float, config: CalibrationConfig, out: tuple[torch.Tensor, ...]) -> None:
    """Make every neuron's claims on ``made`` (images × neurons) and check them on ``held``; add to ``out``.

    ``out`` = (true, pairs) per regime and band, claims per band, and 2 × regimes × neurons × columns: each
    neuron's own (true, pairs).
    """
    true, pairs, claims, own = out
    fired = made > 0
    count = fired.sum(0)
    freq = count.float() / max(made.shape[0], 1)
    mean = made.sum(0) / count.clamp_min(1)
    regimes = _regime_masks(held, mean, config.regimes)  # regimes × held-out images × neurons
    k = min(top, made.shape[0])
    top_vals, top_rows = made.topk(k, dim=0)
    filled = (top_vals > 0).sum(0)
    is_dense = (freq > dense_frequency).long()
    auc = chunk_auroc(made, label_onehots(made_labels, label_columns, made.shape[0]), label_columns)
    a_edges = torch.tensor(config.auroc_edges) - 1e-9
    g_edges = torch.tensor(config.agreement_edges) - 1e-9
    for c_index, (column, (a, b)) in enumerate(column_offsets(label_columns).items()):
        if b == a:
            continue
        col_auc = auc[:, a:b]
        best = torch.nan_to_num(col_auc, nan=-1.0).argmax(1)
        best_auc = col_auc.gather(1, best[:, None])[:, 0]
        top_labels = made_labels[column][top_rows]  # k × neurons
        hits = ((top_labels == best[None]) & (top_vals > 0)).sum(0)
        agreement = hits.float() / filled.clamp_min(1)
        a_band = torch.bucketize(best_auc, a_edges, right=True) - 1
        g_band = torch.bucketize(agreement, g_edges, right=True) - 1
        ok = (count > 0) & (filled >= config.min_top_images) & (a_band >= 0) & (g_band >= 0) & ~torch.isnan(best_auc)
        idx = ok.nonzero().flatten()
        if not idx.numel():
            continue
        held_col = held_labels[column]
        hit_img = held_col[:, None] == best[idx][None]  # held × claims
        flat = is_dense[idx] * claims.stride(0) + a_band[idx] * claims.stride(1) + g_band[idx]
        claims.view(-1).index_add_(0, flat, torch.ones_like(flat))
        for r, in_regime in enumerate(regimes):
            s = in_regime[:, idx] & (held_col >= 0)[:, None]  # images without a label in this column say nothing
            true[r].view(-1).index_add_(0, flat, (s & hit_img).sum(0))
            pairs[r].view(-1).index_add_(0, flat, s.sum(0))
            own[0, r, idx, c_index] += (s & hit_img).sum(0)
            own[1, r, idx, c_index] += s.sum(0)


def _regime_masks(held: torch.Tensor, mean: torch.Tensor, edges: Sequence[float]) -> list[torch.Tensor]:
    """Per regime, held-out images × neurons: the neuron fires there at ``edges[r]`` × ``mean`` or more, and below
    the previous edge (the first regime has no ceiling)."""
    masks = []
    ceiling = torch.full_like(held, math.inf)
    for edge in edges:
        floor = edge * mean[None]
        masks.append((held > 0) & (held >= floor) & (held < ceiling))
        ceiling = floor.expand_as(held)
    return masks
