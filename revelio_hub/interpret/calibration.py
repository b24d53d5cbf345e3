"""Fit and measure the reliability score of a release's entries on its own held-out images and shifts of them.

Steps, each a function so the toy build, ``training/calibrate_release.py`` and
``benchmarks/bench_trust.py`` share them:

1. :func:`calibration_set` — the held-out images plus a generic shift suite of
   them (:func:`revelio_hub.interpret.shifts.shift_suite`, one seed), each with
   the labels of the images it was made from;
2. :func:`measure` — one backbone pass per image (and per view) at t, every
   layer's SAE error, Diff-C's logits, pooled features: the raw signals;
3. :func:`fit` — logistic regression on the standardised signals for "Diff-C is
   wrong", threshold = the score that flags ``false_alarm`` of the held-out images Diff-C gets right;
4. :func:`evaluate` — AUROC, false alarms, wrong answers left unflagged, per signal
   and per shift (the calibration's own numbers are stored in the model; the
   benchmark calls it on a suite drawn from another seed and other images).

"Diff-C is wrong" on a paste or mosaic of several images: the answer counts as
right only when every source image has the same label and Diff-C gives it (an
image showing two classes has no single right answer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from revelio_hub.cli import option
from revelio_hub.interpret.ood import image_reconstruction_error
from revelio_hub.interpret.reliability import (
    RELIABILITY_DIR, VIEWS, ClassReferences, ReliabilityModel, auroc, image_signals, nearest_distance, trust_ratio,
)
from revelio_hub.interpret.shifts import SHIFTS, shift_suite
from revelio_hub.release import Release, entry_path

logger = logging.getLogger(__name__)

__all__ = ["CalibrationConfig", "Sample", "Measurements", "calibration_set", "measure", "fit", "evaluate",
           "calibrate_entries", "calibrate_release", "held_out_images", "write_calibration", "VIEWS"]


@dataclass
class CalibrationConfig:
    """How a release's reliability score is calibrated.

    Attributes:
        seed: seed of the shift suite (the benchmark uses another).
        shifts: shift names (:data:`revelio_hub.interpret.shifts.SHIFTS`).
        per_image: shifted copies per held-out image and shift.
        views: transformed copies compared with the image (each one more backbone pass in the app; none:
            the option alone).
        false_alarm: share of the held-out images Diff-C gets right that the threshold may flag (the
            calibration's budget; the goal is at most 5 % of new held-out images, so the default 0.03 leaves
            room for sampling error and the few wrong answers among them).
        max_images: held-out images used (the first ones).
        max_sae_params: other layers' SAEs join only when this small (d_in × n_latents), as the app's check.
        l2: ridge penalty of the logistic regression (standardised signals).
        batch_size: images per backbone pass.
        timesteps: calibrate only the Diff-C entries at these t (``None``: all).
        trust: use the ``trust:<layer>`` signals (format 2; off: the format-1 signal set). On the bundled
            release they raised the AUROC for "Diff-C wrong" on new images by 0.007–0.033 (docs/benchmarks.md,
            "Trust signals and pairwise terms").
        pairwise: also weigh the product of every two standardised signals (a non-linear combiner that stays
            a ridge-penalised regression; off: linear in the signals); a further 0.005–0.008 there.
    """

    seed: int = 0
    shifts: tuple[str, ...] = tuple(SHIFTS)
    per_image: int = 1
    views: tuple[str, ...] = field(default=("flip",), metadata=option(nargs="*"))  # none: ``--views`` alone
    false_alarm: float = 0.03
    max_images: int = 300
    max_sae_params: int = 20_000_000
    l2: float = 1e-2
    batch_size: int = 64
    timesteps: Optional[tuple[int, ...]] = None
    trust: bool = True
    pairwise: bool = True

    def __post_init__(self) -> None:
        self.shifts, self.views = tuple(self.shifts), tuple(self.views)
        self.timesteps = None if self.timesteps is None else tuple(int(t) for t in self.timesteps)
        unknown = [s for s in self.shifts if s not in SHIFTS] + [v for v in self.views if v not in VIEWS]
        if unknown:
            raise ValueError(f"unknown shifts or views: {unknown}; shifts: {list(SHIFTS)}, views: {list(VIEWS)}")
        if not 0 < self.false_alarm < 0.5:
            raise ValueError(f"false_alarm must lie in (0, 0.5), got {self.false_alarm}")


@dataclass(frozen=True)
class Sample:
    """One calibration image: ``kind`` is ``"held_out"`` or a shift name; ``sources`` index the held-out rows."""

    image: Image.Image
    kind: str
    sources: tuple[int, ...]


def calibration_set(images: Sequence[Image.Image], config: CalibrationConfig) -> list[Sample]:
    """The held-out images themselves, then ``config.per_image`` copies under each shift."""
    held = [Sample(img.convert("RGB"), "held_out", (i,)) for i, img in enumerate(images)]
    shifted = shift_suite(images, config.seed, config.per_image, config.shifts)
    return held + [Sample(s.image, s.shift, s.sources) for s in shifted]


def wrong_answers(predicted: torch.Tensor, sources: Sequence[Sequence[int]], labels: Sequence[int]) -> torch.Tensor:
    """Boolean: Diff-C's ``predicted`` class is not the one label all of a sample's sources share."""
    out = []
    for p, src in zip(predicted.tolist(), sources):
        names = {int(labels[i]) for i in src}
        out.append(len(names) != 1 or p not in names)
    return torch.tensor(out)


@dataclass
class Measurements:
    """Raw per-image outputs at one t: SAE errors per layer, Diff-C logits (and per view), mean- and
    max-pooled features per layer."""

    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    view_logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    maxpooled: dict[str, torch.Tensor] = field(default_factory=dict)

    def extend(self, other: "Measurements") -> None:
        def cat(a: dict, b: dict) -> None:
            for k, v in b.items():
                a[k] = torch.cat([a[k], v]) if k in a else v
        cat(self.errors, other.errors)
        cat(self.logits, other.logits)
        cat(self.pooled, other.pooled)
        cat(self.maxpooled, other.maxpooled)
        for layer, views in other.view_logits.items():
            cat(self.view_logits.setdefault(layer, {}), views)


def _recipe(model: Any) -> dict[str, Any]:
    r = getattr(model, "recipe", None)
    return {} if r is None else (dict(r) if isinstance(r, dict) else r.to_dict())


def _passes(backbone_for: Callable[[Optional[int]], Any], images: list[Image.Image], layers: list[str], t: int,
            recipe: dict[str, Any], batch_size: int) -> dict[str, torch.Tensor]:
    """One backbone pass over ``images`` with ``recipe``'s size, noise seed and ensemble, noise as the app's (id 0)."""
    backbone = backbone_for(int(recipe.get("image_size") or 0) or None)
    with torch.inference_mode():
        out = backbone.extract(images, layers, [t], pool=None, seed=int(recipe.get("noise_seed") or 0),
                               ensemble=int(recipe.get("ensemble") or 1), image_ids=[0] * len(images),
                               batch_size=batch_size)
    return {layer: out[(layer, t)].float().cpu() for layer in layers}


@torch.inference_mode()
def measure_batch(images: list[Image.Image], t: int, saes: dict[str, Any], diffcs: dict[str, Any],
                  backbone_for: Callable[[Optional[int]], Any], views: Sequence[str] = (),
                  batch_size: int = 64) -> Measurements:
    """Every raw signal of ``images`` at ``t``: the SAEs' errors and pooled maps, each Diff-C's logits (and per view)."""
    m = Measurements()
    groups: dict[tuple, list[tuple[str, str, Any]]] = {}
    for kind, models in (("sae", saes), ("diffc", diffcs)):
        for layer, model in models.items():
            r = _recipe(model)
            key = (r.get("image_size"), r.get("noise_seed"), r.get("ensemble"))
            groups.setdefault(key, []).append((kind, layer, model))
    for items in groups.values():
        recipe = _recipe(items[0][2])
        layers = sorted({layer for _, layer, _ in items})
        maps = _passes(backbone_for, images, layers, t, recipe, batch_size)
        diffc_items = [(layer, model) for kind, layer, model in items if kind == "diffc"]
        for kind, layer, model in items:
            if kind == "sae":
                m.errors[layer] = image_reconstruction_error(model, maps[layer])
                m.pooled[layer] = maps[layer].mean(dim=(2, 3))
                m.maxpooled[layer] = maps[layer].amax(dim=(2, 3))
            else:
                m.logits[layer] = model(maps[layer]).float().cpu()
        for view in views:
            if not diffc_items:
                break
            vmaps = _passes(backbone_for, [VIEWS[view](img) for img in images], [l for l, _ in diffc_items], t,
                            recipe, batch_size)
            for layer, model in diffc_items:
                m.view_logits.setdefault(layer, {})[view] = model(vmaps[layer]).float().cpu()
    return m


def measure(images: Sequence[Image.Image], t: int, saes: dict[str, Any], diffcs: dict[str, Any],
            backbone_for: Callable[[Optional[int]], Any], views: Sequence[str] = (), batch_size: int = 64,
            log: Callable[[str], None] = lambda m: None) -> Measurements:
    """:func:`measure_batch` over ``images`` in chunks of ``batch_size`` (memory stays one chunk of maps)."""
    out = Measurements()
    for start in range(0, len(images), batch_size):
        out.extend(measure_batch(list(images[start:start + batch_size]), t, saes, diffcs, backbone_for, views,
                                 batch_size))
        log(f"measured {min(start + batch_size, len(images))}/{len(images)} images at t={t}")
    return out


def entry_signals(m: Measurements, layer: str, error_layers: Sequence[str], views: Sequence[str],
                  references: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                  exclude: Optional[Sequence[Sequence[int]]] = None,
                  class_references: Optional[dict[str, ClassReferences]] = None) -> dict[str, torch.Tensor]:
    """The signals of entry ``layer`` (a Diff-C layer) from measurements; ``references`` = (rows, centre);
    ``class_references``: layer → labelled held-out features, one ``trust:<layer>`` signal each."""
    nearest = None
    if references is not None and layer in m.pooled:
        nearest = nearest_distance(m.pooled[layer], references[0], references[1], exclude)
    predicted = m.logits[layer].argmax(-1)
    trust = {l: trust_ratio(m.maxpooled[l], predicted, refs, exclude) for l, refs in (class_references or {}).items()}
    return image_signals({l: m.errors[l] for l in error_layers if l in m.errors}, m.logits[layer],
                         {v: m.view_logits[layer][v] for v in views}, nearest, trust)


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Class-balanced, ridge-penalised logistic regression (LBFGS): weights and bias."""
    x, y = x.double(), y.double()
    pos = y.mean().clamp(1e-6, 1 - 1e-6)
    sample_w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=sample_w)
                + l2 * (w * w).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def fit(signals: dict[str, torch.Tensor], wrong: torch.Tensor, held_out: torch.Tensor, layer: str, t: int,
        config: CalibrationConfig, layers: Sequence[str]) -> ReliabilityModel:
    """Fit the score on all samples; threshold from the held-out ones (``held_out`` mask) Diff-C gets right.

    A false alarm is a warning on an ordinary image whose answer is right. Where
    Diff-C is often wrong on ordinary images (high t), a quantile over all of
    them would sit among those wrong answers, which the trust signals score
    highest, and let most wrong answers on shifted images through (89 % at
    down_ft1 t=100 on the toy release, against 30 % with format 1).
    """
    names = sorted(signals)
    x = torch.stack([signals[s].double() for s in names], dim=1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    pairs = [[i, j] for i in range(len(names)) for j in range(i + 1, len(names))] if config.pairwise else []
    w, b = _logistic(torch.cat([z, *(z[:, [i]] * z[:, [j]] for i, j in pairs)], dim=1), wrong.double(), config.l2)
    probe = torch.linspace(0, 1, 101, dtype=torch.float64)
    quantiles = {s: torch.quantile(signals[s][held_out].double(), probe).tolist() for s in names}
    model = ReliabilityModel(layer=layer, timestep=int(t), signals=names, mean=mean.tolist(), std=std.tolist(),
                             weights=w[: len(names)].tolist(), bias=b, threshold=0.0, quantiles=quantiles,
                             layers=list(layers), views=list(config.views), pairs=pairs,
                             pair_weights=w[len(names):].tolist())
    scores = model.score(signals)
    right = held_out & ~wrong.bool()
    model.threshold = float(torch.quantile(scores[right if right.any() else held_out].double(), 1 - config.false_alarm))
    return model


def evaluate(model: ReliabilityModel, signals: dict[str, torch.Tensor], wrong: torch.Tensor,
             kinds: Sequence[str]) -> dict[str, Any]:
    """The figures the issue asks for, on any labelled set: AUROC for "Diff-C wrong", false alarms, misses.

    ``kinds`` names each sample's origin (``held_out`` or a shift); AUROC and
    misses pool the shifts and the held-out images; false alarms are the share
    of held-out images flagged.
    """
    scores = model.score(signals)
    flagged = scores > model.threshold
    held = torch.tensor([k == "held_out" for k in kinds])
    out: dict[str, Any] = {
        "images": len(kinds),
        "wrong": int(wrong.sum()),
        "auroc_wrong": round(auroc(scores, wrong), 4),
        "held_out_flagged": round(float(flagged[held].float().mean()), 4) if held.any() else None,
        "wrong_unflagged": round(float((~flagged[wrong]).float().mean()), 4) if wrong.any() else None,
        "right_flagged": round(float(flagged[~wrong].float().mean()), 4) if (~wrong).any() else None,
        "signal_auroc": {s: round(auroc(signals[s], wrong), 4) for s in model.signals},
        "per_shift": {},
    }
    for kind in dict.fromkeys(kinds):
        sel = torch.tensor([k == kind for k in kinds])
        out["per_shift"][kind] = {"images": int(sel.sum()), "diffc_wrong": round(float(wrong[sel].float().mean()), 4),
                                  "flagged": round(float(flagged[sel].float().mean()), 4)}
    return out


def calibrate_entries(release: Any, images: Sequence[Image.Image], labels: Sequence[int],
                      config: CalibrationConfig = CalibrationConfig(),
                      backbone_for: Optional[Callable[[Optional[int]], Any]] = None,
                      log: Callable[[str], None] = print, device: Any = "cpu") -> dict[tuple[str, int], ReliabilityModel]:
    """Fit one reliability model per Diff-C entry of ``release`` (a :class:`revelio_hub.release.Release`).

    ``images``/``labels``: held-out images of the release and their class ids
    (Diff-C's class order). Models are returned, not written (see
    :func:`write_calibration`).
    """
    images = list(images)[: config.max_images]
    labels = list(labels)[: len(images)]
    samples = calibration_set(images, config)
    backbone_for = backbone_for or _backbone_loader(release, device)
    models: dict[tuple[str, int], ReliabilityModel] = {}
    for t in sorted({t for _, t in release.diffc_entries if config.timesteps is None or t in config.timesteps}):
        entries = {layer: release.load(layer, t, load_atlas=False, device=device) for layer, tt in release.entries if tt == t}
        diffcs = {l: e.diffc for l, e in entries.items() if e.diffc is not None}
        saes = {l: e.sae for l, e in entries.items() if e.sae is not None and
                (l in diffcs or e.sae.d_in * e.sae.n_latents <= config.max_sae_params)}
        for model in [*saes.values(), *diffcs.values()]:
            model.eval()
        log(f"[calibrate] t={t}: {len(samples)} images ({len(images)} held out), layers {sorted(saes)}")
        m = measure([s.image for s in samples], t, saes, diffcs, backbone_for, config.views, config.batch_size,
                    log=lambda msg: logger.info(msg))
        for layer, diffc in diffcs.items():
            models[(layer, t)] = _fit_entry(m, samples, labels, layer, t, saes, config)
            log(f"[calibrate] {layer} t={t}: {models[(layer, t)].metrics['calibration']}")
    return models


def _fit_entry(m: Measurements, samples: list[Sample], labels: Sequence[int], layer: str, t: int,
               saes: dict[str, Any], config: CalibrationConfig) -> ReliabilityModel:
    n = len(labels)
    held = torch.tensor([s.kind == "held_out" for s in samples])
    refs = None
    if layer in m.pooled:
        pooled = m.pooled[layer][:n]
        centre = pooled.mean(0)
        refs = (pooled - centre, centre)
    error_layers = sorted(l for l in saes if l == layer or l in m.errors)
    class_refs = {l: ClassReferences.of(m.maxpooled[l][:n], labels) for l in error_layers
                  if config.trust and l in m.maxpooled}
    signals = entry_signals(m, layer, error_layers, config.views, refs, [s.sources for s in samples], class_refs)
    wrong = wrong_answers(m.logits[layer].argmax(-1), [s.sources for s in samples], labels)
    model = fit(signals, wrong, held, layer, t, config, error_layers)
    model.class_references = class_refs
    if refs is not None:
        model.references, model.centre, model.reference_layer = refs[0], refs[1], layer
    model.metrics = {"calibration": evaluate(model, signals, wrong, [s.kind for s in samples]),
                     "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()}}
    return model


def _backbone_loader(release: Any, device: Any = "cpu") -> Callable[[Optional[int]], Any]:
    cache: dict[Optional[int], Any] = {}

    def load(size: Optional[int]) -> Any:
        if size not in cache:
            cache[size] = release.load_backbone(device=device, image_size=size)
        return cache[size]

    return load


def write_calibration(folder: str | Path, models: dict[tuple[str, int], ReliabilityModel]) -> list[Path]:
    """Store each model in ``<folder>/<layer>/t<t>/reliability/`` and mark the entries in ``release.json``."""
    folder = Path(folder)
    written = [m.save(folder / entry_path(l, t) / RELIABILITY_DIR) for (l, t), m in models.items()]
    config_file = folder / "release.json"
    config = json.loads(config_file.read_text())
    for item in config.get("entries", []):
        key = (str(item["layer"]), int(item["timestep"]))
        if key in models:
            item["reliability"] = True
            cal = models[key].metrics["calibration"]
            item.setdefault("metrics", {})["reliability"] = {
                k: cal[k] for k in ("auroc_wrong", "held_out_flagged", "wrong_unflagged", "images")}
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return written


CARD_HEADING = "## Reliability: when the app says its answer is unreliable"


def card_section(metrics: dict[str, dict[str, Any]], config: CalibrationConfig) -> str:
    """The model card's section on the reliability score: what it is, and its rates on the calibration images."""
    rows = "\n".join(
        f"| {key} | {m['auroc_wrong']:.3f} | {m['held_out_flagged']:.1%} | {m['wrong_unflagged']:.1%} | {m['images']} |"
        for key, m in metrics.items())
    return (
        f"{CARD_HEADING}\n\n"
        "Every entry with a Diff-C head carries a calibrated score of how likely Diff-C's answer is wrong "
        "(`<entry>/reliability/`). It combines the SAE reconstruction error of every layer at the entry's t, "
        "the distance to the nearest held-out image, Diff-C's entropy and energy, whether Diff-C keeps its "
        "answer on a mirrored copy"
        + (" and, per layer, whether the nearest held-out images share Diff-C's answer (a trust-score ratio)"
           if config.trust else "")
        + ", in a logistic regression fitted on held-out images of the release and generic "
        f"shifts of them ({', '.join(config.shifts)}; shift seed {config.seed}). The threshold flags "
        f"{config.false_alarm:.0%} of the held-out images Diff-C gets right; a flagged image's predictions and neuron names are "
        "shown greyed, and the JSON API answers `\"reliable\": false` with the reasons.\n\n"
        "Rates on the calibration images themselves (in-sample; rates on new images and shifts drawn from another "
        "seed: `python benchmarks/bench_trust.py --release <this folder>`):\n\n"
        "| entry | AUROC for \"Diff-C wrong\" | held-out images flagged | wrong answers not flagged | images |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )


def append_card_section(folder: str | Path, section: str) -> None:
    """Put ``section`` at the end of the release's ``README.md``, replacing an earlier reliability section."""
    card = Path(folder) / "README.md"
    text = card.read_text() if card.exists() else ""
    start = text.find(CARD_HEADING)
    if start != -1:
        end = text.find("\n## ", start + len(CARD_HEADING))
        text = text[:start] + (text[end + 1:] if end != -1 else "")
    card.write_text(text.rstrip("\n") + "\n\n" + section)


def held_out_images(source: Any, class_names: Sequence[str], skip: int = 0,
                    count: int = 300) -> tuple[list[Image.Image], list[int]]:
    """Rows ``skip`` … ``skip + count`` of an :class:`~revelio_hub.data.ImageSource` as RGB images and class ids
    in ``class_names``' order (the Diff-C heads'); a label outside ``class_names`` is a clear error."""
    index = {str(n): i for i, n in enumerate(class_names)}
    missing = sorted({str(n) for n in source.class_names} - set(index))
    if source.label_column is None or missing:
        raise ValueError(f"the held-out images need labels from the release's classes {list(class_names)}; "
                         + ("the dataset has no label column" if source.label_column is None
                            else f"the dataset's labels {missing[:5]} are not among them"))
    images, labels = [], []
    for row in range(skip, min(len(source), skip + count)):
        img = source.load_image(row)
        if img is not None:
            images.append(img.convert("RGB"))
            labels.append(index[str(source.class_names[int(source.labels[row])])])
    if len(images) < 20:
        raise ValueError(f"only {len(images)} usable held-out images; the calibration needs at least 20")
    return images, labels


def calibrate_release(folder: str | Path, source: Any, config: CalibrationConfig = CalibrationConfig(),
                      skip: int = 0, log: Callable[[str], None] = print, device: Any = "cpu") -> dict[str, Any]:
    """Calibrate every Diff-C entry of the release in ``folder`` on ``source``'s rows ``skip`` … and store the result.

    Returns ``{"layer/tT": calibration metrics}``. The release folder gains
    ``<entry>/reliability/`` and ``"reliability": true`` in ``release.json``.
    """
    release = Release.from_pretrained(str(folder))
    if not release.diffc_entries:
        raise ValueError(f"{folder} has no entry with a Diff-C head: nothing to calibrate")
    images, labels = held_out_images(source, release.class_names, skip, config.max_images)
    models = calibrate_entries(release, images, labels, config, log=log, device=device)
    write_calibration(folder, models)
    metrics = {f"{l}/t{t}": m.metrics["calibration"] for (l, t), m in models.items()}
    append_card_section(folder, card_section(metrics, config))
    return metrics
