#!/usr/bin/env python
"""Are the app's neuron explanations true? Coverage and precision of summaries, and the OOD warning, on the toy release.

Held-out images come from the toy generator with a seed the release was not
built from (the build uses train seed 0 and test seed 1; the default here is
7), so every factor of every image is known. Each image goes through
:func:`revelio_hub.app.analysis.analyze` (what ``/analyze_json`` calls) at
every entry of the release; of the first ``--top`` neurons the app lists
(dense ones hidden, as in the app), we count

* **coverage**: the share whose summary names a label value (not ``mixed``, ``unsure``, nor ``not named
  here``, the app's line for a neuron firing on the image in a regime where its claims were not checked, or
  held too rarely: :meth:`NeuronAtlas.summary_on_image`);
* **precision**: of those, the share whose named value(s) are all true of the image;
* **unnamed**: the others counted by why their line names nothing (fires below every checked regime, its
  names did not hold in the regime it fires in, unsure, mixed, dead).

The summary *text* is parsed, so what is measured is what a user reads.
**oracle coverage** is what no labelling rule can beat on these neurons: a
labeller that knows every benchmark image's factors names each listed neuron
by the one value most common on the images it is listed for, when that value
holds on at least the given share of them (``oracle_coverage_at_0.85`` /
``_0.9``). Where it is below a coverage goal, the SAE's neurons, not the
summaries, are what falls short. Also
reported per entry: how often blank, noise and gradient images are flagged out
of distribution and how often held-out shapes are (false alarms); the SAE and
atlas dead fractions; the paper's sigma_label. ``--rankings`` compares neuron
rankings (relevance, z-score, raw activation); ``--tune`` sweeps the summary
thresholds on a separate tuning seed (never the reporting seed) to choose them.

``--why N`` also scores "Why this class?" (what ``/attribute_json`` returns) on
the first N held-out images at entries with a Diff-C: of the correctly
classified ones, the share where one of the top-3 neurons pushing the class up
(dense ones hidden, as in the app) names the predicted shape; the same with
dense neurons shown; the share where the largest by-concept group pushing
it up is that shape; and the share whose note says that no charted neuron
pushing it up (or no neuron of the layer) is named for it.

Examples:
    python benchmarks/bench_explain.py --json
    python benchmarks/bench_explain.py --timesteps 25 --why 100 --json
    python benchmarks/bench_explain.py --rankings relevance zscore activation --timesteps 25
    python benchmarks/bench_explain.py --tune --seed 5 --images 150
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# "value (column) · AUROC 0.99 · 10/10 top images" (one or two, "; "-separated), or the old "value 9/10 · ..."
_NEW = re.compile(r"(?:^|; )([^;·()]+?)(?: \(([^()]+)\))? · (?:AUROC [0-9.]+ · )?\d+/\d+ top images")
_OLD = re.compile(r"^(\S+) \d+/\d+ · ")
# calibrated: "small (size) · cross (shape) · true on 93% and 95% of held-out images ..."
_CALIBRATED = re.compile(r"^(.+?) · true on [0-9]+%")
_VALUE = re.compile(r"^([^()]+?)(?: \([^()]+\))?$")


#: Why a listed neuron's line names nothing, by the line's start (NeuronAtlas.summary_on_image / summary).
UNNAMED_REASONS = {"not named here: fires weakly": "fires_weakly", "not named here": "not_held_in_its_regime",
                   "unsure": "unsure", "mixed": "mixed", "dead": "dead"}


def named_values(summary: str) -> list[str]:
    """The label values a summary names (empty for ``mixed``/``unsure``/dead); reads every summary format so far."""
    if summary.startswith(tuple(UNNAMED_REASONS)) or not summary:
        return []
    m = _CALIBRATED.match(summary)
    if m:
        return [_VALUE.match(part.strip()).group(1).strip() for part in m.group(1).split(" · ")]
    found = [m.group(1).strip() for m in _NEW.finditer(summary)]
    if found:
        return found
    m = _OLD.match(summary)
    return [m.group(1)] if m else []


def held_out(n: int, seed: int, image_size: int) -> list[tuple[Image.Image, set[str]]]:
    """``n`` generator images with the set of their label values (shape, colour, size, position, background)."""
    from revelio_hub.toy.shapes import FACTORS, make_shapes_dataset

    ds = make_shapes_dataset(n, seed=seed, image_size=image_size)
    out = []
    for row in ds:
        out.append((row["image"].convert("RGB"), {FACTORS[f][row[f]] for f in FACTORS}))
    return out


def unlike_images(n_each: int, image_size: int, seed: int = 123) -> dict[str, list[Image.Image]]:
    """Images unlike any shape image: solid colours, pixel noise, linear colour gradients."""
    rng = np.random.default_rng(seed)
    s = image_size
    blank = [np.zeros((s, s, 3)), np.full((s, s, 3), 255.0), np.full((s, s, 3), 128.0)]
    while len(blank) < n_each:
        blank.append(np.ones((s, s, 3)) * rng.uniform(0, 255, 3))
    noise = []
    for i in range(n_each):
        noise.append(rng.uniform(0, 255, (s, s, 3)) if i % 2 == 0 else np.clip(rng.normal(128, 60, (s, s, 3)), 0, 255))
    grad = []
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    for _ in range(n_each):
        angle = rng.uniform(0, 2 * np.pi)
        w = (np.cos(angle) * xx + np.sin(angle) * yy)
        w = (w - w.min()) / max(w.max() - w.min(), 1e-9)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        grad.append(a * (1 - w[..., None]) + b * w[..., None])
    as_img = lambda arrs: [Image.fromarray(np.asarray(a, dtype=np.uint8), "RGB") for a in arrs]  # noqa: E731
    return {"blank": as_img(blank[:n_each]), "noise": as_img(noise), "gradient": as_img(grad)}


def _analyze(analysis, state, image, layer, t, ranking: Optional[str]):
    if ranking is None:
        return analysis.analyze(state, image, layer, t)
    return analysis.analyze(state, image, layer, t, ranking=ranking)


def _listed(payload: dict[str, Any], top: int) -> list[dict[str, Any]]:
    return [n for n in payload["neurons"] if not n.get("dense", False)][:top]


def unnamed_reason(summary: str) -> str:
    """Which of :data:`UNNAMED_REASONS` a line that names nothing gives (``"other"`` for none)."""
    return next((reason for start, reason in UNNAMED_REASONS.items() if summary.startswith(start)), "other")


def score_entry(analysis, state, images, layer: str, t: int, top: int, ranking: Optional[str]) -> dict[str, Any]:
    """Coverage and precision of the first ``top`` listed neurons' summaries over ``images``, why the rest name
    nothing, plus OOD false alarms."""
    listed = named = correct = 0
    unnamed: dict[str, int] = {}
    flagged = 0
    with_ood = 0
    seen: dict[int, list[set[str]]] = {}
    for image, truth in images:
        payload = _analyze(analysis, state, image, layer, t, ranking).to_json()
        for n in _listed(payload, top):
            listed += 1
            seen.setdefault(int(n["id"]), []).append(truth)
            values = named_values(n["summary"])
            if values:
                named += 1
                correct += all(v in truth for v in values)
            else:
                reason = unnamed_reason(n["summary"])
                unnamed[reason] = unnamed.get(reason, 0) + 1
        ood = payload.get("ood")
        if ood is not None and ood.get("error_percentile") is not None:
            with_ood += 1
            flagged += bool(ood.get("out_of_distribution"))
    return {
        "coverage": round(named / listed, 4) if listed else None,
        "precision": round(correct / named, 4) if named else None,
        "listed": listed, "named": named, "correct": correct, "unnamed": dict(sorted(unnamed.items())),
        "held_out_flagged": round(flagged / with_ood, 4) if with_ood else None,
        **{f"oracle_coverage_at_{p}": oracle_coverage(seen, p) for p in (0.85, 0.9)},
    }


def oracle_coverage(seen: dict[int, list[set[str]]], precision: float) -> Optional[float]:
    """Share of listings whose neuron an all-knowing single-value labeller could name at ``precision``.

    ``seen``: neuron → the value sets of the images it was listed for. The
    labeller names a neuron by its most common value there when that value
    holds on ≥ ``precision`` of them, an upper bound for any summary rule (it
    sees the answers, and a neuron listed once is always nameable).
    """
    total = sum(len(v) for v in seen.values())
    if not total:
        return None
    nameable = 0
    for truths in seen.values():
        counts: dict[str, int] = {}
        for truth in truths:
            for value in truth:
                counts[value] = counts.get(value, 0) + 1
        nameable += len(truths) * (max(counts.values(), default=0) >= precision * len(truths))
    return round(nameable / total, 4)


def ood_rates(analysis, state, kinds: dict[str, list[Image.Image]], layer: str, t: int) -> dict[str, Any]:
    out = {}
    for kind, imgs in kinds.items():
        flags = []
        for img in imgs:
            ood = analysis.analyze(state, img, layer, t).to_json().get("ood")
            if ood is None or ood.get("error_percentile") is None:
                break
            flags.append(bool(ood["out_of_distribution"]))
        out[kind] = round(sum(flags) / len(flags), 4) if flags else None
    return out


def why_scores(state, images, layer: str, t: int, top: int = 3) -> dict[str, Any]:
    """"Why this class?" on correctly classified images: does one of the first ``top`` neurons pushing the
    predicted class up name that class (shape)? With dense neurons hidden (the app's default) and shown;
    also whether the by-concept view's largest group names it, and how often the note under the chart says no
    charted neuron (or no neuron of the layer) is named for the class."""
    from revelio_hub.app import attribution_view

    counts = {"hidden": 0, "shown": 0, "concept": 0, "line": 0}
    correct = 0
    tops: list[tuple[str, list[int]]] = []
    for image, truth in images:
        view = attribution_view.attribute_image(state, image, layer, t)
        name = view.attribution.target_name
        if name not in truth:
            continue
        correct += 1
        for key, dense in (("hidden", False), ("shown", True)):
            view.show_dense = dense
            rows = [r for r in attribution_view._chart_rows(view, top) if r["effect_prob"] > 0][:top]
            counts[key] += any(name in named_values(r["summary"]) for r in rows)
            if not dense:
                tops.append((name, [int(r["neuron"]) for r in rows]))
        up = [c for c in view.concepts if c.effect_prob > 0]
        counts["concept"] += bool(up) and up[0].value == name
        view.show_dense = False
        note = attribution_view.why_note(view)
        counts["line"] += f"is named {name}" in note and ("None of the charted" in note or "No neuron of" in note)
    share = lambda k: round(counts[k] / correct, 4) if correct else None  # noqa: E731
    return {"correct_images": correct, f"top{top}_names_class": share("hidden"),
            f"top{top}_names_class_dense_shown": share("shown"), "largest_concept_names_class": share("concept"),
            f"oracle_top{top}_names_class": why_oracle(tops), "class_not_named_line": share("line")}


def why_oracle(tops: list[tuple[str, list[int]]], precision: float = 0.9) -> Optional[float]:
    """Upper bound of the "names the class" share: each neuron named by the class it is most often a top
    "why" neuron for (when that holds on ≥ ``precision`` of its appearances), by a labeller that sees the answers."""
    if not tops:
        return None
    classes: dict[int, list[str]] = {}
    for name, neurons in tops:
        for n in neurons:
            classes.setdefault(n, []).append(name)
    label = {}
    for n, names in classes.items():
        best = max(set(names), key=names.count)
        if names.count(best) >= precision * len(names):
            label[n] = best
    return round(sum(any(label.get(n) == name for n in neurons) for name, neurons in tops) / len(tops), 4)


def name_counts(lists: list[tuple[list[Any], set[str]]], names: Callable[[Any], list[str]]) -> tuple[int, int, int]:
    """(listed, named, correct) over per-image lists of neurons: ``names(neuron)`` are the values a neuron's line
    names for that image; a named line is correct when all its values are true of the image."""
    listed = named = correct = 0
    for neurons, truth in lists:
        for neuron in neurons:
            listed += 1
            values = names(neuron)
            if values:
                named += 1
                correct += all(v in truth for v in values)
    return listed, named, correct


def tune(analysis, state, images, entries, top: int, grid_auroc, grid_precision,
         ranking: Optional[str] = None, max_values: Optional[int] = None) -> list[dict[str, Any]]:
    """Coverage/precision of every threshold pair on the tuning images (rankings fixed, summaries recomputed)."""
    from revelio_hub.interpret.neuron_labels import SummaryThresholds

    lists = {}
    for layer, t in entries:
        lists[(layer, t)] = [
            ([n["id"] for n in _listed(_analyze(analysis, state, img, layer, t, ranking).to_json(), top)], truth)
            for img, truth in images]
    rows = []
    for a in grid_auroc:
        for p in grid_precision:
            per = {}
            for (layer, t), items in lists.items():
                atlas = state.get_release().entry(layer, t).atlas
                saved = atlas.thresholds
                atlas.thresholds = SummaryThresholds(min_auroc=a, min_precision=p, min_top_images=saved.min_top_images,
                                                     max_values=max_values or saved.max_values)
                listed, named, correct = name_counts(items, lambda i: [e.value for e in atlas.explanation(i)])
                atlas.thresholds = saved
                per[f"{layer}/t{t}"] = (named / listed if listed else 0.0, correct / named if named else 1.0)
            rows.append({"min_auroc": a, "min_precision": p, "max_values": max_values,
                         "min_coverage": round(min(c for c, _ in per.values()), 4),
                         "min_precision_measured": round(min(q for _, q in per.values()), 4),
                         "entries": {k: [round(c, 4), round(q, 4)] for k, (c, q) in per.items()}})
    return rows


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(REPO / "releases" / "toy-shapes"), help="toy release folder")
    p.add_argument("--images", type=int, default=200, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7,
                   help="generator seed of the held-out images; the release uses 0 (train) and 1 (test)")
    p.add_argument("--top", type=int, default=5, help="listed neurons scored per image (default: %(default)s)")
    p.add_argument("--timesteps", type=int, nargs="*", default=None, help="only these timesteps (default: all)")
    p.add_argument("--layers", nargs="*", default=None, help="only these layers (default: all)")
    p.add_argument("--rankings", nargs="*", default=None,
                   help="compare these neuron rankings (relevance, zscore, activation); default: the app's")
    p.add_argument("--ood-images", type=int, default=20, help="blank/noise/gradient images each (default: %(default)s)")
    p.add_argument("--tune", action="store_true", help="sweep the summary thresholds instead (use a tuning seed)")
    p.add_argument("--grid-auroc", type=float, nargs="*", default=[0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],
                   help="min_auroc values tried by --tune")
    p.add_argument("--grid-precision", type=float, nargs="*", default=[0.7, 0.8, 0.9, 1.0],
                   help="min_precision values tried by --tune")
    p.add_argument("--max-values", type=int, default=None, help="max_values tried by --tune (default: the atlas')")
    p.add_argument("--why", type=int, default=0, metavar="N",
                   help="also score \"Why this class?\" on the first N held-out images at entries with a Diff-C "
                        "(default: 0, skip)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.seed in (0, 1) and not a.tune:
        p.error("--seed 0 and 1 are the release's own train/test images; pick another (default 7)")

    from revelio_hub.app import analysis
    from revelio_hub.app.state import AppConfig, AppState

    state = AppState.from_config(AppConfig(releases=[a.release], feature_cache_size=8, top_neurons=max(a.top, 10)))
    rel = state.get_release()
    entries = [(layer, t) for layer in rel.layers for t in rel.timesteps(layer)
               if (a.layers is None or layer in a.layers) and (a.timesteps is None or t in a.timesteps)]
    size = int(json.loads((Path(a.release) / "release.json").read_text()).get("image_size") or 32)
    t0 = time.perf_counter()
    images = held_out(a.images, a.seed, size)
    report: dict[str, Any] = {
        "release": str(a.release), "images": a.images, "seed": a.seed, "top": a.top,
        "machine": f"{platform.machine()} {platform.system()}", "date": time.strftime("%Y-%m-%d"),
    }
    if a.tune:
        report["tuning"] = tune(analysis, state, images, entries, a.top, a.grid_auroc, a.grid_precision,
                                (a.rankings or [None])[0], a.max_values)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        _print(report, a.json)
        return report
    kinds = unlike_images(a.ood_images, size) if a.ood_images > 0 else {}
    rankings = a.rankings or [None]
    results = {}
    for layer, t in entries:
        key = f"{layer}/t{t}"
        entry = rel.entry(layer, t)
        res: dict[str, Any] = {}
        for ranking in rankings:
            res[ranking or "default"] = score_entry(analysis, state, images, layer, t, a.top, ranking)
        if kinds:
            res["ood_flagged"] = ood_rates(analysis, state, kinds, layer, t)
        metrics = next((e.get("metrics") or {} for e in rel.release.config.get("entries", [])
                        if e["layer"] == layer and int(e["timestep"]) == t), {})
        summary = entry.atlas.summary_stats if entry.atlas is not None else {}
        res["sae_dead_fraction"] = (metrics.get("sae") or {}).get("dead_fraction")
        res["atlas_dead_fraction"] = summary.get("dead_fraction")
        res["sigma_label"] = summary.get("sigma_label")
        res["sigma_label_neurons"] = summary.get("sigma_label_neurons")
        res["sigma_label_shuffled"] = summary.get("sigma_label_shuffled")
        if a.why > 0 and entry.diffc is not None:
            res["why"] = why_scores(state, images[: a.why], layer, t)
        results[key] = res
    report["entries"] = results
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _print(report, a.json)
    return report


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if "tuning" in report:
        for row in report["tuning"]:
            print(f"AUROC ≥ {row['min_auroc']:.2f}, precision ≥ {row['min_precision']:.1f}: worst-entry coverage "
                  f"{row['min_coverage']:.2f}, worst-entry precision {row['min_precision_measured']:.2f}")
        return
    print(f"{report['images']} held-out images (seed {report['seed']}), top {report['top']} listed neurons")
    for key, res in report["entries"].items():
        parts = []
        for name, r in res.items():
            if isinstance(r, dict) and "coverage" in r:
                parts.append(f"{name}: coverage {r['coverage']} precision {r['precision']} "
                             f"(held-out flagged {r['held_out_flagged']})")
        print(f"{key:>16}  " + " | ".join(parts) + f"  OOD {res.get('ood_flagged')}  sigma_label "
              f"{res.get('sigma_label')} (shuffled {res.get('sigma_label_shuffled')})  dead sae/atlas "
              f"{res.get('sae_dead_fraction')}/{res.get('atlas_dead_fraction')}" + (f"  why {res['why']}" if "why" in res else ""))


if __name__ == "__main__":
    main()
