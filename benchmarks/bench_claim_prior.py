#!/usr/bin/env python
"""Choose how much a neuron's own held-out record counts against its band's (``CalibrationConfig.prior_pairs``),
and in which firing regimes claims are checked (``CalibrationConfig.regimes``).

On tuning images of the toy generator (seed 5 by default: neither the release's
train/test seeds 0/1 nor the reporting seed 7 of ``bench_explain.py``), every
t = 25 entry of the release lists its neurons as the app does (computed once),
then for each ``--priors`` value the atlas' claims are recalibrated from the
toy build's stored test features (the atlas images) and scored as
``bench_explain.py`` scores them: coverage and precision of the listed
neurons' names, and "Why this class?" (one of the top-3 neurons pushing the
predicted class names it; dense neurons hidden, and shown). A very large prior
is the band-only calibration of table version 1. ``--regimes`` tries sets of
firing-regime edges (comma-separated, strongest first; ``1.5`` alone is the
version-2 rule: names only on strong firings), each with every prior.

Examples:
    python benchmarks/bench_claim_prior.py --work runs/toy-build --priors 1e9 40 20 10 5 --json
    python benchmarks/bench_claim_prior.py --work runs/toy-build --priors 10 --regimes 1.5 1.5,1.0 1.5,1.0,0.5 \
        1.5,1.2,1.0,0.75 1.5,1.0,0.75,0.5 --json
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path
from typing import Any

import datasets

from revelio_hub.app import analysis, attribution_view
from revelio_hub.app.state import AppConfig, AppState
from revelio_hub.features import FeatureStore
from revelio_hub.interpret.atlas_builder import activation_log
from revelio_hub.interpret.claim_calibration import CalibrationConfig, calibrate_claims
from revelio_hub.toy.pipeline import factor_labels
from revelio_hub.toy.shapes import FACTORS

HERE = Path(__file__).resolve().parent
EXPLAIN = runpy.run_path(str(HERE / "bench_explain.py"))


def atlas_log(entry: Any, store: FeatureStore, rows: Any, layer: str, t: int, n: int):
    """The atlas' activation log of one entry, rebuilt from the stored test features (the atlas images)."""
    fs = store.load(layer, t, kind="spatial", views=0, image_ids=range(n))
    factors = factor_labels(rows, fs.image_ids)
    batches = ((fs.features[i:i + 100].float(), {f: v[i:i + 100] for f, v in factors.items()}, fs.image_ids[i:i + 100])
               for i in range(0, len(fs.image_ids), 100))
    return activation_log(batches, entry.sae, FACTORS)


def listings(state: AppState, layer: str, t: int, images, why: int) -> tuple[list, list]:
    """(listed neuron ids + truth per image, "why" rows per correctly-or-not classified image)."""
    listed = [([(n["id"], n["activation"]) for n in EXPLAIN["_listed"](analysis.analyze(state, img, layer, t).to_json(), 5)],
               truth) for img, truth in images]
    rows = []
    if state.get_release().entry(layer, t).diffc is not None:
        for img, truth in images[:why]:
            view = attribution_view.attribute_image(state, img, layer, t)
            view.show_dense = True
            rows.append((view.attribution.target_name, truth,
                         [(r["neuron"], r["effect_prob"], r["neuron"] in view.dense, r["activation"])
                          for r in attribution_view._chart_rows(view, attribution_view.WHY_TOP)]))
    return listed, rows


def score(atlas: Any, listed: list, why_rows: list) -> dict[str, Any]:
    """bench_explain's coverage/precision and "why" shares with the atlas' current claims (as the app shows them:
    none where the neuron fires too weakly on the image, :meth:`NeuronAtlas.names_on_image`)."""
    def names(i: int, activation: float) -> list[str]:
        return [e.value for e in atlas.names_on_image(i, activation)]

    n_listed, named, correct = EXPLAIN["name_counts"](listed, lambda neuron: names(*neuron))
    out = {"coverage": round(named / max(n_listed, 1), 4), "precision": round(correct / max(named, 1), 4)}
    right = [(name, rows) for name, truth, rows in why_rows if name in truth]
    for key, show in (("why", False), ("why_dense_shown", True)):
        if right:
            hits = sum(any(name in names(n, act) for n, _, _, act in [r for r in rows if (show or not r[2]) and r[1] > 0][:3])
                       for name, rows in right)
            out[key] = round(hits / len(right), 4)
    return out


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/toy-build", help="toy build work folder (features/test, data/test)")
    p.add_argument("--release", default=str(HERE.parent / "releases" / "toy-shapes"), help="toy release folder")
    p.add_argument("--seed", type=int, default=5, help="generator seed of the tuning images (default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="tuning images (default: %(default)s)")
    p.add_argument("--why", type=int, default=100, help="images scored for \"Why this class?\" (default: %(default)s)")
    p.add_argument("--timestep", type=int, default=25)
    p.add_argument("--priors", type=float, nargs="+", default=[1e9, 40, 20, 10, 5],
                   help="prior_pairs values tried (default: %(default)s)")
    p.add_argument("--regimes", type=_edges, nargs="+", default=[tuple(CalibrationConfig().regimes)],
                   help="firing-regime edge sets tried, each comma-separated, strongest first (default: the "
                        f"calibration's, {','.join(f'{r:g}' for r in CalibrationConfig().regimes)})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.seed in (0, 1, 7):
        p.error("--seed 0/1 are the release's own images and 7 is bench_explain's reporting seed; tune on another")
    t0 = time.perf_counter()
    state = AppState.from_config(AppConfig(releases=[a.release], feature_cache_size=8, top_neurons=10))
    rel = state.get_release()
    images = EXPLAIN["held_out"](a.images, a.seed, 32)
    store, rows = FeatureStore(Path(a.work) / "features" / "test"), datasets.load_from_disk(str(Path(a.work) / "data" / "test"))
    report: dict[str, Any] = {"seed": a.seed, "images": a.images, "priors": {}}
    arms = [(prior, regimes) for regimes in a.regimes for prior in a.priors]
    for layer in rel.layers:
        if a.timestep not in rel.timesteps(layer):
            continue
        entry = rel.entry(layer, a.timestep)
        atlas = entry.atlas
        log = atlas_log(entry, store, rows, layer, a.timestep, atlas.num_images)
        listed, why_rows = listings(state, layer, a.timestep, images, a.why)
        saved = atlas.calibration
        for prior, regimes in arms:
            atlas.set_calibration(calibrate_claims(log, atlas.label_columns, top=int(atlas.meta.get("purity_top", 10)),
                                                   dense_frequency=atlas.dense_frequency,
                                                   config=CalibrationConfig(prior_pairs=prior, regimes=regimes)))
            report["priors"].setdefault(_arm_name(prior, regimes, a.regimes), {})[f"{layer}/t{a.timestep}"] = \
                score(atlas, listed, why_rows)
        atlas.set_calibration(saved)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for prior, entries in report["priors"].items():
            print(f"prior_pairs {prior}: " + " | ".join(f"{k} {v}" for k, v in entries.items()))
    return report


def _edges(text: str) -> tuple[float, ...]:
    """``"1.5,1.0"`` → (1.5, 1.0); checked as the calibration checks it."""
    try:
        return tuple(CalibrationConfig(regimes=[float(x) for x in text.split(",")]).regimes)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _arm_name(prior: float, regimes: tuple[float, ...], tried: list) -> str:
    """The report key of one arm: the prior, and the regime edges when more than one set is tried."""
    return f"{prior:g}" if len(tried) == 1 else f"{prior:g} | regimes {','.join(f'{r:g}' for r in regimes)}"


if __name__ == "__main__":
    main()
