"""Ground-truth monosemanticity: how well does the single best neuron detect one factor value?

On the shapes data every image's factors are known, so for every factor value
(e.g. ``shape=star``) we can ask: is there one SAE neuron whose image-level
activation ranks the stars above everything else? The score is that neuron's
AUROC (1.0 = a perfect detector, 0.5 = chance). Comparing against the best
single *raw* channel of the same feature map tells whether the SAE made the
representation more monosemantic than the backbone's own basis, and comparing a
trained backbone against the same architecture with random weights tells how
much of it the diffusion training put there.

The functions here take plain tensors so they can be checked on planted data;
:func:`evaluate_entry` wires them to a backbone and an SAE.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from revelio_hub.interpret.metrics import auroc
from revelio_hub.release import Release
from revelio_hub.toy.backbone_training import ToyBackboneConfig, random_backbone
from revelio_hub.toy.build_recipe import TOY_BUILD_FILE, ToyBuildConfig, load_toy_backbone, train_toy_sae
from revelio_hub.toy.shapes import FACTORS, make_shapes_dataset


@dataclass
class FactorScores:
    """Best single-unit AUROC for every value of every factor (one layer × timestep, one unit set)."""

    #: factor -> value name -> best AUROC over units
    best: dict[str, dict[str, float]] = field(default_factory=dict)
    #: factor -> value name -> index of the best unit
    unit: dict[str, dict[str, int]] = field(default_factory=dict)

    def mean(self, factor: str) -> float:
        vals = list(self.best[factor].values())
        return float(sum(vals) / len(vals))

    def means(self) -> dict[str, float]:
        return {f: self.mean(f) for f in self.best}

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "unit": self.unit, "mean": self.means()}


def best_unit_auroc(
    activations: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    class_names: Mapping[str, Sequence[str]],
    chunk: int = 4096,
) -> FactorScores:
    """For each factor value, the max over units (columns) of AUROC(activation, value indicator).

    Args:
        activations: N×M image-level activations (N images, M neurons or channels).
        labels: factor -> N integer class ids.
        class_names: factor -> names of the class ids.
        chunk: columns scored at once (bounds memory for large dictionaries).

    Values absent from the labels (or present in every image) are skipped, since
    AUROC needs both positives and negatives.
    """
    if activations.dim() != 2:
        raise ValueError(f"activations must be N×M, got shape {tuple(activations.shape)}")
    n = activations.shape[0]
    scores = FactorScores()
    for factor, ids in labels.items():
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() != n:
            raise ValueError(f"factor {factor!r} has {ids.numel()} labels for {n} images")
        names = list(class_names[factor])
        scores.best[factor], scores.unit[factor] = {}, {}
        for value, name in enumerate(names):
            positive = ids == value
            if not 0 < int(positive.sum()) < n:
                continue
            best, best_i = -1.0, -1
            for start in range(0, activations.shape[1], chunk):
                a = auroc(activations[:, start : start + chunk].float(), positive)
                a = torch.as_tensor(a).reshape(-1)
                j = int(a.argmax())
                if float(a[j]) > best:
                    best, best_i = float(a[j]), start + j
            scores.best[factor][name] = best
            scores.unit[factor][name] = best_i
    return scores


def pooled_channels(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two natural image-level readouts of raw channels: max- and mean-pooled, N×C each."""
    if maps.dim() != 4:
        raise ValueError(f"feature maps must be N×C×H×W, got shape {tuple(maps.shape)}")
    return {"max": maps.amax(dim=(2, 3)), "mean": maps.mean(dim=(2, 3))}


def best_raw_channel_auroc(maps: torch.Tensor, labels: Mapping[str, torch.Tensor],
                           class_names: Mapping[str, Sequence[str]], either_sign: bool = False) -> FactorScores:
    """Best single raw channel per factor value, taking the better of max- and mean-pooling.

    With ``either_sign`` a channel may also detect a value by being *low*
    (negated channels are scored too), which gives raw channels every benefit
    of the doubt over the SAE, whose neurons are non-negative and scored as they are.
    """
    pools = pooled_channels(maps)
    units = [pools["max"], pools["mean"]]
    if either_sign:
        units += [-pools["max"], -pools["mean"]]
    return best_unit_auroc(torch.cat(units, dim=1), labels, class_names)


def sae_image_activations(sae: Any, maps: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """N×n_latents image-level activations of ``sae`` (max over positions for token SAEs), chunked."""
    outs = []
    with torch.no_grad():
        for i in range(0, maps.shape[0], batch_size):
            outs.append(sae.image_activations(maps[i : i + batch_size].float()))
    return torch.cat(outs)


def summarize(results: Mapping[str, Mapping[str, FactorScores]], factors: Sequence[str]) -> dict[str, Any]:
    """Per factor: the best entry (layer/t) and its mean best-unit AUROC, for each unit set.

    ``results``: unit set (``sae``, ``raw``, ``random_sae`` ...) -> entry name -> scores.
    For unit sets other than ``sae`` we also report their value at the SAE's best entry.
    """
    out: dict[str, Any] = {}
    for kind, per_entry in results.items():
        out[kind] = {}
        for f in factors:
            means = {e: s.mean(f) for e, s in per_entry.items() if f in s.best and s.best[f]}
            if not means:
                continue
            best_entry = max(means, key=means.get)
            out[kind][f] = {"best_entry": best_entry, "auroc": means[best_entry], "per_entry": means}
    return out


def save_heatmap(results: Mapping[str, Mapping[str, FactorScores]], factors: Sequence[str], path: str,
                 title: str = "Mean best-unit AUROC per factor") -> None:
    """One panel per unit set: factor (rows) × layer/timestep (columns), annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(results)
    entries = list(next(iter(results.values())))
    # One row of panels per unit set, stacked, so the figure stays readable in a model card.
    fig, axes = plt.subplots(len(kinds), 1, figsize=(2.0 + 0.6 * len(entries), 0.6 + (0.45 * len(factors) + 0.9) * len(kinds)),
                             squeeze=False, constrained_layout=True)
    for ax, kind in zip(axes[:, 0], kinds):
        grid = np.array([[results[kind][e].mean(f) if e in results[kind] else np.nan for e in entries] for f in factors])
        im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(entries)), entries if kind == kinds[-1] else [""] * len(entries), rotation=45,
                      ha="right", fontsize=7)
        ax.set_yticks(range(len(factors)), factors, fontsize=8)
        ax.set_title(kind, fontsize=9)
        for i in range(len(factors)):
            for j in range(len(entries)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < 0.8 else "black")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.6, label="AUROC")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the benchmark on a release


@dataclass
class BenchmarkConfig:
    """Held-out evaluation settings (seeds differ from every training stream of the build)."""

    num_images: int = 1000
    seed: int = 2
    random_train_images: int = 1000
    random_train_seed: int = 3
    random_backbone_seed: int = 12345
    batch_size: int = 64
    random_baseline: bool = True


def _entry_name(layer: str, t: int) -> str:
    return f"{layer}/t{t}"


def run_benchmark(release_path: str, config: Optional[BenchmarkConfig] = None, *, progress: bool = False,
                  log=print) -> dict[str, Any]:
    """Score every entry of a toy release on held-out shapes; returns a JSON-able report.

    Unit sets: ``sae`` (the release's token-level SAE neurons, image activation =
    max over positions), ``raw`` (best single raw channel, max- or mean-pooled,
    either sign), ``random_sae`` (an SAE with the same settings trained on the
    same architecture with random weights) and ``random_raw``.
    """
    cfg = config or BenchmarkConfig()
    release = Release.from_pretrained(release_path)
    build_file = Path(release.path) / TOY_BUILD_FILE
    build = ToyBuildConfig.from_dict(json.loads(build_file.read_text())) if build_file.exists() else None
    backbone = release.load_backbone()
    entries = [(e.layer, e.timestep) if hasattr(e, "layer") else tuple(e) for e in release.entries]
    layers = sorted({l for l, _ in entries}, key=backbone.layers.index)
    timesteps = sorted({t for _, t in entries})
    class_names = {f: list(v) for f, v in FACTORS.items()}
    test = make_shapes_dataset(cfg.num_images, seed=cfg.seed, image_size=backbone.image_size)
    labels = {f: torch.tensor(test[f]) for f in FACTORS}
    images = list(test["image"])
    noise_seed = int(getattr(release, "noise_seed", 0) or 0)
    maps = backbone.extract(images, layers, timesteps, seed=noise_seed, batch_size=cfg.batch_size, progress=progress)

    results: dict[str, dict[str, FactorScores]] = {"sae": {}, "raw": {}, "raw_either_sign": {}}
    diffc_acc: dict[str, float] = {}
    for layer, t in entries:
        name = _entry_name(layer, t)
        entry = release.load(layer, t)
        m = maps[(layer, t)]
        acts = sae_image_activations(entry.sae, m)
        results["sae"][name] = best_unit_auroc(acts, labels, class_names)
        results["raw"][name] = best_raw_channel_auroc(m, labels, class_names)
        results["raw_either_sign"][name] = best_raw_channel_auroc(m, labels, class_names, either_sign=True)
        if getattr(entry, "diffc", None) is not None:
            with torch.no_grad():
                pred = entry.diffc.predict_proba(m).argmax(1)
            diffc_acc[name] = float((pred == labels["shape"]).float().mean())
        log(f"{name}: " + ", ".join(f"{f} {results['sae'][name].mean(f):.3f}/{results['raw'][name].mean(f):.3f}"
                                     for f in FACTORS) + " (SAE/raw)")

    if cfg.random_baseline and build is not None:
        results["random_sae"], results["random_raw"] = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            bb_cfg = ToyBackboneConfig.from_dict(build.backbone.to_dict())
            random_backbone(bb_cfg, Path(tmp) / "random", seed=cfg.random_backbone_seed)
            rnd = load_toy_backbone(Path(tmp) / "random", name="random-weights-toy")
            train = make_shapes_dataset(cfg.random_train_images, seed=cfg.random_train_seed, image_size=rnd.image_size)
            rtrain = rnd.extract(list(train["image"]), layers, timesteps, seed=noise_seed, batch_size=cfg.batch_size)
            rtest = rnd.extract(images, layers, timesteps, seed=noise_seed, batch_size=cfg.batch_size)
            for layer, t in entries:
                name = _entry_name(layer, t)
                recipe = rnd.recipe(layer, t, build.sae_granularity(layer)).to_dict()
                sae = train_toy_sae(build, layer, rtrain[(layer, t)], recipe).model
                results["random_sae"][name] = best_unit_auroc(sae_image_activations(sae, rtest[(layer, t)]), labels,
                                                              class_names)
                results["random_raw"][name] = best_raw_channel_auroc(rtest[(layer, t)], labels, class_names)
                log(f"{name} random weights: shape SAE {results['random_sae'][name].mean('shape'):.3f}")

    factors = list(FACTORS)
    summary = summarize(results, factors)
    report: dict[str, Any] = {
        "release": str(release_path),
        "num_images": cfg.num_images,
        "seed": cfg.seed,
        "summary": summary,
        "entries": {kind: {e: s.to_dict() for e, s in per.items()} for kind, per in results.items()},
        "diffc_shape_accuracy": diffc_acc,
    }
    report["checks"] = _targets(summary, diffc_acc)
    report["_results"] = results
    return report


#: Targets from the issue, at each factor's best layer × timestep.
TARGETS = {"color": 0.95, "size": 0.95, "background": 0.95, "shape": 0.85}


def _targets(summary: dict[str, Any], diffc_acc: dict[str, float]) -> dict[str, Any]:
    sae, raw = summary.get("sae", {}), summary.get("raw", {})
    checks: dict[str, Any] = {}
    for f, target in TARGETS.items():
        if f in sae:
            checks[f"{f}_auroc>={target}"] = {"value": sae[f]["auroc"], "pass": sae[f]["auroc"] >= target}
    common = [f for f in sae if f in raw]
    if common:
        s = sum(sae[f]["auroc"] for f in common) / len(common)
        r = sum(raw[f]["auroc"] for f in common) / len(common)
        checks["sae_beats_raw_on_average"] = {"sae": s, "raw": r, "pass": s > r}
    rnd = summary.get("random_sae", {})
    if "shape" in sae and "shape" in rnd:
        gap = sae["shape"]["auroc"] - rnd["shape"]["auroc"]
        checks["trained_beats_random_on_shape_by>=0.15"] = {"gap": gap, "pass": gap >= 0.15}
    if diffc_acc:
        best = max(diffc_acc, key=diffc_acc.get)
        checks["diffc_shape_accuracy>=0.95"] = {"entry": best, "value": diffc_acc[best], "pass": diffc_acc[best] >= 0.95}
    return checks


def markdown_summary(report: dict[str, Any]) -> str:
    """The card's table: per factor, the best entry and mean best-unit AUROC of each unit set."""
    s = report["summary"]
    kinds = [k for k in ("sae", "raw", "raw_either_sign", "random_sae", "random_raw") if k in s]
    lines = [
        f"### Ground-truth monosemanticity ({report['num_images']} held-out images)",
        "",
        "Mean over a factor's values of the best single unit's AUROC at detecting that value, at the factor's "
        "best layer/timestep (`sae`: token k-SAE neurons, image activation = max over positions; `raw`: best raw "
        "channel, max- or mean-pooled; `random_*`: same architecture with random weights).",
        "",
        "| factor | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for f in FACTORS:
        cells = [f"{s[k][f]['auroc']:.3f} ({s[k][f]['best_entry']})" if f in s[k] else "–" for k in kinds]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    if report.get("diffc_shape_accuracy"):
        acc = report["diffc_shape_accuracy"]
        best = max(acc, key=acc.get)
        lines += ["", f"Diff-C shape accuracy on the same images: {acc[best]:.1%} at {best}."]
    return "\n".join(lines)
