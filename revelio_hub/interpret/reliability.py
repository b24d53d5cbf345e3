"""Will Diff-C be wrong on this image? A calibrated reliability score, stored with each release entry.

The older check (:mod:`revelio_hub.interpret.ood`) flags an image when one
SAE rebuilds it worse than the atlas images. Tried on shifted images it both
cried wolf (13–24 % of ordinary held-out shapes) and stayed silent where Diff-C
failed (a square rotated 45°, called ``cross`` at 99.6 %). What matters to a
user is not "is this image unusual" but "is the answer wrong", so this module
scores exactly that, from a few cheap signals measured on the image:

* ``sae_error:<layer>`` — log10 relative reconstruction error of the SAE of each
  layer at the entry's t (every layer, not only the analysed one: a rotated
  shape is rebuilt well at one depth and badly at another);
* ``nearest_distance`` — cosine distance from the image's pooled features to
  the nearest held-out image of the release (:attr:`ReliabilityModel.references`);
* ``diffc_entropy``, ``diffc_energy`` — how spread Diff-C's answer is, and the
  negative log-sum-exp of its logits (low energy = in-distribution);
* ``view_disagreement:<view>`` — 1 − the probability Diff-C gives its own
  answer on a mirrored (``flip``) copy of the image;
* ``trust:<layer>`` — a trust-score ratio (format 2): log of the distance from
  the image's max-pooled features at ``layer`` to the nearest held-out image
  *of the class Diff-C picked*, over the distance to the nearest held-out image
  of any other class. The other signals measure "far from the data"; this one
  asks whether the data near the image agrees with the answer, which is what
  "Diff-C is wrong" means. Every layer counts, as for the SAE errors: the
  answer comes from one layer, its neighbours may be clearer at another.

A logistic regression on the standardised signals, fitted at release time on
the release's held-out images plus generic shifts of them
(:mod:`revelio_hub.interpret.shifts`; target: Diff-C's answer is wrong), turns
them into one score; the flagging threshold is the score that flags a chosen
share of the held-out images (the false-alarm budget). Fitting and measuring
live in :mod:`revelio_hub.interpret.calibration`; this module only scores and
stores, so the app needs no training code.

Storage (``<entry>/reliability/``, format :data:`FORMAT_VERSION`, documented in
``docs/CONTRACTS.md``): ``reliability.json`` (signals, standardisation,
weights, threshold, per-signal held-out quantiles, calibration metrics) and
``references.safetensors`` (``references``: N×C centred pooled features of the
held-out images, ``centre``: C; format 2 adds ``labels``: their N class ids,
and per layer ``maxpool:<layer>`` / ``maxpool_centre:<layer>``: the centred
max-pooled features the ``trust:<layer>`` signals compare with). Format 1
files (no ``trust`` signals) still load and score as before.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image, ImageOps

__all__ = [
    "VIEWS", "FORMAT_VERSION", "READABLE_VERSIONS", "RELIABILITY_DIR", "RELIABILITY_FILE", "REFERENCES_FILE",
    "UNRELIABLE_MESSAGE", "ClassReferences", "ReliabilityModel", "Verdict", "image_signals", "nearest_distance",
    "trust_ratio", "auroc",
]

FORMAT_VERSION = 2
#: Formats this module reads: 1 (no ``trust:<layer>`` signals, no labelled references) and 2.
READABLE_VERSIONS = (1, 2)
RELIABILITY_DIR = "reliability"
RELIABILITY_FILE = "reliability.json"
REFERENCES_FILE = "references.safetensors"
#: The one line a flagged image gets in the app (the issue's wording: short, and says what it affects).
UNRELIABLE_MESSAGE = "Unlike the release's data: its predictions and neuron names are unreliable here."
#: Cheap transformed copies whose Diff-C answer is compared with the image's own (one backbone pass each).
VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {"flip": ImageOps.mirror}


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count one half); NaN if one class is empty."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # average ranks of ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def nearest_distance(pooled: torch.Tensor, references: torch.Tensor, centre: torch.Tensor,
                     exclude: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """1 − the highest cosine similarity of each row of ``pooled`` (B×C) to a reference row, after centring.

    ``exclude[b]`` lists reference rows image ``b`` may not match (itself, or
    the held-out images it was made from during calibration: an uploaded image
    has no copy among the references).
    """
    x = torch.nn.functional.normalize(pooled.float() - centre, dim=1)
    refs = torch.nn.functional.normalize(references.float(), dim=1)
    sims = x @ refs.T
    if exclude is not None:
        for b, rows in enumerate(exclude):
            if rows:
                sims[b, list(rows)] = -2.0
    return 1 - sims.max(dim=1).values


@dataclass
class ClassReferences:
    """Labelled reference features of one layer for the ``trust:<layer>`` signal.

    ``features``: N×C max-pooled features of the release's held-out images,
    centred on ``centre`` (C); ``labels``: their N class ids (Diff-C's order).
    """

    features: torch.Tensor
    centre: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # unit rows once, not per uploaded image
        self.unit = torch.nn.functional.normalize(self.features.float(), dim=1)

    @classmethod
    def of(cls, maxpooled: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> "ClassReferences":
        centre = maxpooled.float().mean(0)
        return cls(maxpooled.float() - centre, centre, torch.as_tensor(labels, dtype=torch.long))


def trust_ratio(features: torch.Tensor, predicted: torch.Tensor, refs: ClassReferences,
                exclude: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """log(d_picked / d_other) per image: high when held-out images of other classes lie nearer than any of its own.

    ``d_picked``: 1 − the highest cosine similarity (after centring) to a
    reference of the ``predicted`` class; ``d_other``: the same over every
    other class (Jiang et al.'s trust score, inverted so that high means
    "likely wrong", like every other signal). ``exclude[b]``: reference rows
    image ``b`` may not match (itself and its sources during calibration). A
    class with no reference counts as infinitely far (distance 2).
    """
    x = torch.nn.functional.normalize(features.float() - refs.centre, dim=1)
    sims = x @ refs.unit.T
    if exclude is not None:
        for b, rows in enumerate(exclude):
            if rows:
                sims[b, list(rows)] = -1.0
    same = refs.labels[None, :] == predicted.long()[:, None]
    floor = torch.full_like(sims, -1.0)
    d_picked = 1 - torch.where(same, sims, floor).max(dim=1).values
    d_other = 1 - torch.where(~same, sims, floor).max(dim=1).values
    return (torch.log(d_picked.double().clamp_min(1e-6)) - torch.log(d_other.double().clamp_min(1e-6))).float()


@torch.no_grad()
def diffc_signals(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy (nats) and energy (−logsumexp) of Diff-C's logits, per image."""
    logits = logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    return {"diffc_entropy": -(logp.exp() * logp).sum(-1).float(),
            "diffc_energy": (-torch.logsumexp(logits, dim=-1)).float()}


def view_disagreement(probs: torch.Tensor, view_probs: torch.Tensor) -> torch.Tensor:
    """1 − the probability a view gives the class Diff-C picked on the image itself."""
    picked = probs.argmax(dim=-1)
    return 1 - view_probs.gather(1, picked[:, None])[:, 0]


def image_signals(errors: dict[str, torch.Tensor], logits: torch.Tensor,
                  view_logits: Optional[dict[str, torch.Tensor]] = None,
                  nearest: Optional[torch.Tensor] = None,
                  trust: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Every signal of a batch of images, by name (see the module docstring), each a length-B float tensor.

    ``errors``: layer → relative SAE reconstruction error; ``logits``: Diff-C's
    logits on the images; ``view_logits``: view name → its logits on the
    transformed images; ``nearest``: :func:`nearest_distance`; ``trust``:
    layer → :func:`trust_ratio`.
    """
    out = {f"sae_error:{layer}": torch.log10(e.double().clamp_min(1e-8)).float() for layer, e in errors.items()}
    if nearest is not None:
        out["nearest_distance"] = nearest.float()
    out.update(diffc_signals(logits))
    probs = torch.softmax(logits.double(), dim=-1)
    for view, vl in (view_logits or {}).items():
        out[f"view_disagreement:{view}"] = view_disagreement(probs, torch.softmax(vl.double(), -1)).float()
    for layer, ratio in (trust or {}).items():
        out[f"trust:{layer}"] = ratio.float()
    return out


def describe(signal: str, percentile: float) -> str:
    """A reason in words: which signal, and where the image lies among the release's held-out images."""
    where = "beyond every held-out image" if percentile >= 100 else f"at the {_ordinal(percentile)} percentile"
    kind, _, detail = signal.partition(":")
    words = {
        "sae_error": f"the SAE at layer {detail} rebuilds its features poorly",
        "nearest_distance": "it is far from every held-out image of the release",
        "diffc_entropy": "Diff-C is unsure",
        "diffc_energy": "Diff-C's logits are unlike those on the release's images",
        "view_disagreement": f"Diff-C changes its answer on a {'mirrored' if detail == 'flip' else detail} copy",
        "trust": f"at layer {detail}, held-out images of other classes lie about as near as, or nearer than, "
                 "those of the predicted class",
    }.get(kind, signal)
    return f"{words} ({signal} {where} of the release's held-out images)"


def _ordinal(p: float) -> str:
    n = int(round(p))
    return f"{n}{'th' if n % 100 in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


@dataclass(frozen=True)
class Verdict:
    """The reliability verdict on one image.

    ``score``: the calibrated probability that Diff-C is wrong; ``reliable``:
    ``score`` ≤ the stored threshold; ``reasons``: the signals that pushed the
    score up most, in words (empty when reliable); ``decided_by``: the signal
    with the largest contribution; ``signals``: raw values and their
    percentiles among the release's held-out images.
    """

    reliable: bool
    score: float
    threshold: float
    reasons: list[str]
    decided_by: str
    signals: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"reliable": self.reliable, "score": round(self.score, 6), "threshold": round(self.threshold, 6),
                "reasons": list(self.reasons), "decided_by": self.decided_by,
                "signals": {k: {"value": round(v["value"], 6), "percentile": round(v["percentile"], 2)}
                            for k, v in self.signals.items()}}


@dataclass
class ReliabilityModel:
    """A fitted reliability score for one release entry (see the module docstring).

    ``layers`` are the layers whose SAE errors it reads; ``reference_layer``
    the layer of ``references``; ``views`` the transformed copies it needs
    (each costs one more backbone pass); ``quantiles[signal]`` the 0th…100th
    percentiles of the signal over the held-out images (for reasons);
    ``class_references[layer]`` the labelled held-out features the
    ``trust:<layer>`` signals compare with; ``pairs``/``pair_weights``
    (format 2, optional) the products of two standardised signals (indices
    into ``signals``) the regression also weighs, so that one signal may
    matter more when another is high.
    """

    layer: str
    timestep: int
    signals: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float
    quantiles: dict[str, list[float]]
    layers: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    reference_layer: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    references: Optional[torch.Tensor] = field(default=None, repr=False)
    centre: Optional[torch.Tensor] = field(default=None, repr=False)
    pairs: list[list[int]] = field(default_factory=list)
    pair_weights: list[float] = field(default_factory=list)
    class_references: dict[str, ClassReferences] = field(default_factory=dict, repr=False)
    format_version: int = FORMAT_VERSION

    @property
    def trust_layers(self) -> list[str]:
        """The layers whose ``trust:<layer>`` signal the score reads (none in a format-1 calibration)."""
        return [s.partition(":")[2] for s in self.signals if s.startswith("trust:")]

    def score(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probability that Diff-C is wrong, per image, from the signals by name (all of :attr:`signals` needed)."""
        missing = [s for s in self.signals if s not in values]
        if missing:
            raise ValueError(f"reliability score needs the signals {missing}")
        return torch.sigmoid(self._contributions(self._standardised(values)).sum(1) + self.bias).float()

    def _contributions(self, z: torch.Tensor) -> torch.Tensor:
        """B×S: each signal's share of the logit, w_i·z_i plus half of every pairwise term z_i·z_j it is in."""
        out = z * torch.tensor(self.weights, dtype=torch.float64)
        if self.pairs:
            i, j = torch.tensor(self.pairs, dtype=torch.long).T
            half = 0.5 * torch.tensor(self.pair_weights, dtype=torch.float64) * z[:, i] * z[:, j]
            out.index_add_(1, i, half).index_add_(1, j, half)
        return out

    def image_values(self, errors: dict[str, float], logits: torch.Tensor,
                     view_logits: Optional[dict[str, torch.Tensor]] = None,
                     pooled: Optional[torch.Tensor] = None,
                     maxpooled: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
        """The signals of one image from what the app has: SAE errors by layer, Diff-C logits (1×K), the
        views' logits, the entry layer's pooled features (1×C), every layer's max-pooled features (layer → 1×C,
        for the ``trust`` signals). Missing inputs are a clear error."""
        nearest = None
        if "nearest_distance" in self.signals:
            if pooled is None or self.references is None:
                raise ValueError("the nearest_distance signal needs the pooled features and the stored references")
            nearest = nearest_distance(pooled.reshape(1, -1), self.references, self.centre)
        missing = [l for l in self.layers if l not in errors] + [v for v in self.views if v not in (view_logits or {})]
        missing += [f"max-pooled features of {l}" for l in self.trust_layers
                    if l not in (maxpooled or {}) or l not in self.class_references]
        if missing:
            raise ValueError(f"the reliability score of {self.layer} t={self.timestep} needs {missing}")
        logits = logits.reshape(1, -1)
        trust = {l: trust_ratio(maxpooled[l].reshape(1, -1), logits.argmax(-1), self.class_references[l])
                 for l in self.trust_layers}
        values = image_signals({l: torch.tensor([float(errors[l])]) for l in self.layers}, logits,
                               {v: view_logits[v].reshape(1, -1) for v in self.views}, nearest, trust)
        return {k: float(v[0]) for k, v in values.items() if k in self.signals}

    def _standardised(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.stack([values[s].double().flatten() for s in self.signals], dim=1)
        return (x - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)

    def percentile(self, signal: str, value: float) -> float:
        """Where ``value`` lies among the held-out images' values of ``signal`` (0–100, linear between quantiles)."""
        q = self.quantiles.get(signal) or []
        if len(q) < 2:
            return float("nan")
        if value > q[-1]:
            return 100.0
        i = bisect.bisect_left(q, value)
        if i == 0:
            return 0.0
        lo, hi = q[i - 1], q[i]
        frac = (value - lo) / (hi - lo) if hi > lo else 1.0
        return float((i - 1 + frac) * 100 / (len(q) - 1))

    def verdict(self, values: dict[str, float], max_reasons: int = 2) -> Verdict:
        """The verdict on one image whose signals are ``values`` (floats by name)."""
        missing = [s for s in self.signals if s not in values]
        if missing:
            raise ValueError(f"reliability score needs the signals {missing}")
        contributions = self._contributions(self._standardised({k: torch.tensor([float(v)]) for k, v in values.items()}))
        score = float(torch.sigmoid(contributions.sum(1) + self.bias)[0])
        contrib = contributions[0].tolist()
        order = sorted(range(len(self.signals)), key=lambda i: contrib[i], reverse=True)
        decided = self.signals[order[0]]
        pct = {s: self.percentile(s, float(values[s])) for s in self.signals}
        reliable = score <= self.threshold
        reasons = [] if reliable else [describe(self.signals[i], pct[self.signals[i]])
                                       for i in order[:max_reasons] if contrib[i] > 0]
        return Verdict(reliable, score, self.threshold, reasons, decided,
                       {s: {"value": float(values[s]), "percentile": pct[s]} for s in self.signals})

    # -------------------------------------------------------------- storage

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("references"), d.pop("centre"), d.pop("class_references")
        return d

    def save(self, folder: str | Path) -> Path:
        """Write ``reliability.json`` (+ ``references.safetensors``) into ``folder`` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RELIABILITY_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tensors = {} if self.references is None else {"references": self.references.float().contiguous(),
                                                      "centre": self.centre.float().contiguous()}
        labels = {tuple(r.labels.tolist()) for r in self.class_references.values()}
        if len(labels) > 1:
            raise ValueError("every layer's class references must be the same held-out images (one label list)")
        for layer, refs in self.class_references.items():
            tensors[f"maxpool:{layer}"] = refs.features.float().contiguous()
            tensors[f"maxpool_centre:{layer}"] = refs.centre.float().contiguous()
            tensors["labels"] = refs.labels.long().contiguous()
        if tensors:
            save_file(tensors, str(folder / REFERENCES_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ReliabilityModel":
        """Read a stored calibration; a newer format, a missing field or a bad number is a clear error."""
        from safetensors.torch import load_file

        folder = Path(folder)
        file = folder / RELIABILITY_FILE
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the reliability calibration {file}: {exc}") from exc
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{file} has format_version {version!r}; this revelio_hub reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}")
        known = set(cls.__dataclass_fields__) - {"references", "centre", "class_references"}
        try:
            model = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"{file} is incomplete: {exc}") from exc
        numbers = [*model.mean, *model.std, *model.weights, *model.pair_weights, model.bias]
        if not (len(model.signals) == len(model.mean) == len(model.std) == len(model.weights)) or \
                len(model.pairs) != len(model.pair_weights) or \
                any(len(p) != 2 or not all(0 <= int(i) < len(model.signals) for i in p) for p in model.pairs) or \
                not all(math.isfinite(float(v)) for v in numbers):
            raise ValueError(f"{file} is inconsistent: signals, mean, std and weights (or pairs and pair_weights) "
                             "differ in length, a pair names no signal, or a number is not finite")
        tensors = load_file(str(folder / REFERENCES_FILE)) if (folder / REFERENCES_FILE).is_file() else {}
        if "references" in tensors:
            model.references, model.centre = tensors["references"], tensors["centre"]
        elif "nearest_distance" in model.signals:
            raise ValueError(f"{folder} lacks {REFERENCES_FILE}, which its nearest_distance signal needs")
        for layer in model.trust_layers:
            if not {f"maxpool:{layer}", f"maxpool_centre:{layer}", "labels"} <= set(tensors):
                raise ValueError(f"{folder}/{REFERENCES_FILE} lacks the labelled references of layer {layer}, "
                                 f"which its trust:{layer} signal needs")
            model.class_references[layer] = ClassReferences(
                tensors[f"maxpool:{layer}"], tensors[f"maxpool_centre:{layer}"], tensors["labels"].long())
        return model
