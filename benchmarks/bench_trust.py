#!/usr/bin/env python
"""Does the app warn where Diff-C fails, and only there? The calibrated reliability score, measured on new images.

For every entry (default: t = 25) whose Diff-C has a stored calibration
(``training/calibrate_release.py`` or the toy build's ``reliability`` stage),
on images the calibration never saw:

* **held-out flagged** — share of the release's held-out images flagged (goal ≤ 5 %);
  for the toy release, test-split rows after the calibration's (``--skip``, default 300);
* **photos flagged** — real photographs that ship with installed packages
  (matplotlib's Grace Hopper, Gradio's sample photos), each whole and as random
  square crops (goal ≥ 95 %);
* **AUROC** of the score for "Diff-C is wrong", pooled over the held-out images and
  this script's own shift suite, drawn from ``--seed`` (default 1; the calibration's is
  stored and must differ) (goal ≥ 0.9), with the AUROC of every signal alone;
* **wrong answers unflagged** — share of wrong Diff-C answers the score lets through
  (goal ≤ 20 %);
* **toy check** (toy release only): the generator's own shifted shapes, which the
  calibration never uses — squares etc. rotated 45°, objects 1.5× larger, JPEG
  quality 20, a second object — Diff-C's error rate and what is flagged;
* **baseline**: the same rates for the previous rule (an SAE reconstruction error
  beyond the 99.5th percentile of the atlas images at any checked layer).

Examples:
    python benchmarks/bench_trust.py --json
    python benchmarks/bench_trust.py --release runs/release/sd15-pets --dataset timm/oxford-iiit-pet --skip 300
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from revelio_hub.interpret.calibration import (
    Sample, calibration_set, CalibrationConfig, entry_signals, measure, wrong_answers, held_out_images,
)
from revelio_hub.interpret.ood import OODConfig
from revelio_hub.interpret.reliability import auroc
from revelio_hub.release import Release

REPO = Path(__file__).resolve().parents[1]

#: Generator seed of the toy check's shapes: neither the release's train (0) nor test (1) stream.
TOY_CHECK_SEED = 11
GOALS = {"held_out_flagged": ("≤", 0.05), "photos_flagged": ("≥", 0.95), "auroc_wrong": ("≥", 0.9),
         "wrong_unflagged": ("≤", 0.20)}


def photo_files() -> list[Path]:
    """Photographs installed with matplotlib and Gradio (no download): which ones the report names."""
    import matplotlib

    found = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    try:
        import gradio

        root = Path(gradio.__file__).parent
        found += sorted((root / "media_assets" / "images").glob("*.jp*g")) + [root / "media_assets" / "images" / "bus.png"]
        found += [root / "test_data" / "cheetah2.jpg"]
    except ImportError:
        pass
    return [f for f in found if f.is_file()]


def photos(crops: int, seed: int) -> list[Image.Image]:
    """Each photograph whole and as ``crops`` random square crops (¼ to ¾ of its short side)."""
    rng = random.Random(seed)
    out = []
    for file in photo_files():
        img = Image.open(file).convert("RGB")
        out.append(img)
        for _ in range(crops):
            side = int(min(img.size) * rng.uniform(0.25, 0.75))
            x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
            out.append(img.crop((x, y, x + side, y + side)))
    return out


def toy_shifted(n: int, seed: int, start: int, size: int) -> dict[str, tuple[list[Image.Image], list[int]]]:
    """The toy generator's own shifted shapes (never used by the calibration) and their main shape ids."""
    from revelio_hub.toy.shapes import SHAPES, _background, image_spec, object_mask, render

    out: dict[str, tuple[list[Image.Image], list[int]]] = {k: ([], []) for k in
                                                           ("rotated_45", "larger_1.5x", "jpeg_20", "two_objects")}

    def add(kind: str, img: Image.Image, spec: Any) -> None:
        out[kind][0].append(img.convert("RGB"))
        out[kind][1].append(SHAPES.index(spec.shape))

    for i in range(start, start + n):
        spec = image_spec(i, seed)
        big = size * 4
        bg = _background(spec.background, big, spec.background_seed)
        obj = render(spec, big, 1)
        mask = Image.fromarray(object_mask(spec, big).astype("uint8") * 255)
        centre = (spec.cx * big, spec.cy * big)
        rotated = bg.copy()
        rotated.paste(obj.rotate(45, center=centre), (0, 0), mask.rotate(45, center=centre))
        add("rotated_45", rotated.resize((size, size), Image.Resampling.BOX), spec)
        add("larger_1.5x", render(dataclasses.replace(spec, radius=spec.radius * 1.5), size), spec)
        buf = io.BytesIO()
        render(spec, size).save(buf, format="JPEG", quality=20)
        add("jpeg_20", Image.open(io.BytesIO(buf.getvalue())), spec)
        two = image_spec(i, seed, distractor=True)
        add("two_objects", render(two, size), two)
    return out


def baseline_flags(release: Release, t: int, layer: str, errors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The previous rule: any checked layer's SAE error beyond the 99.5th percentile of its atlas images."""
    limit = OODConfig().max_percentile
    flags = torch.zeros(len(next(iter(errors.values()))), dtype=torch.bool)
    for name, err in errors.items():
        atlas = release.load(name, t).atlas
        if atlas is None:
            continue
        pct = torch.tensor([atlas.error_percentile(float(e)) or 0.0 for e in err])
        flags |= pct > limit
    return flags


def rates(scores: torch.Tensor, flagged: torch.Tensor, wrong: torch.Tensor) -> dict[str, Any]:
    return {"images": len(wrong), "diffc_wrong": round(float(wrong.float().mean()), 4),
            "flagged": round(float(flagged.float().mean()), 4),
            "wrong_unflagged": round(float((~flagged[wrong]).float().mean()), 4) if wrong.any() else None,
            "auroc_wrong": round(auroc(scores, wrong), 4)}


def score_entry(release: Release, layer: str, t: int, m, samples: list[Sample], labels: list[int],
                groups: dict[str, slice]) -> dict[str, Any]:
    """Every figure of one entry from the measurements ``m`` of all images (groups: slices of ``m``)."""
    model = release.load(layer, t).reliability
    signals = entry_signals(m, layer, model.layers, model.views, (model.references, model.centre),
                            class_references=model.class_references)
    scores = model.score(signals)
    flagged = scores > model.threshold
    preds = m.logits[layer].argmax(-1)
    old = baseline_flags(release, t, layer, {l: m.errors[l] for l in model.layers})
    suite = groups["suite"]
    wrong_suite = wrong_answers(preds[suite], [s.sources for s in samples], labels)
    held = torch.tensor([s.kind == "held_out" for s in samples])
    photo = groups["photos"]
    res: dict[str, Any] = {
        "held_out_flagged": round(float(flagged[suite][held].float().mean()), 4),
        "photos_flagged": round(float(flagged[photo].float().mean()), 4),
        "auroc_wrong": round(auroc(scores[suite], wrong_suite), 4),
        "wrong_unflagged": round(float((~flagged[suite][wrong_suite]).float().mean()), 4),
        "signal_auroc": {s: round(auroc(signals[s][suite], wrong_suite), 4) for s in model.signals},
        "per_shift": {},
        "baseline_previous_rule": {
            "held_out_flagged": round(float(old[suite][held].float().mean()), 4),
            "photos_flagged": round(float(old[photo].float().mean()), 4),
            "wrong_unflagged": round(float((~old[suite][wrong_suite]).float().mean()), 4)},
    }
    kinds = [s.kind for s in samples]
    for kind in dict.fromkeys(kinds):
        sel = torch.tensor([k == kind for k in kinds])
        res["per_shift"][kind] = rates(scores[suite][sel], flagged[suite][sel], wrong_suite[sel])
    res["toy_check"] = {}
    for kind, (sl, kind_labels) in groups.get("toy", {}).items():
        wrong = preds[sl] != torch.tensor(kind_labels)
        res["toy_check"][kind] = {**rates(scores[sl], flagged[sl], wrong),
                                  "previous_rule_flagged": round(float(old[sl].float().mean()), 4)}
    res["goals_met"] = {k: (res[k] <= g if op == "≤" else res[k] >= g) for k, (op, g) in GOALS.items()}
    return res


def analysis_latency(release_dir: str, layer: str, t: int, images: list[Image.Image], tmp: Path) -> dict[str, Any]:
    """What the check costs a user: ``analyze`` on new images (cold feature cache) with the stored calibration,
    against the same release with the calibration ignored (the previous rule: no mirrored pass), same process."""
    from revelio_hub.app import analysis
    from revelio_hub.app.state import AppConfig, AppState

    paths = []
    for i, img in enumerate(images):
        paths.append(tmp / f"latency-{i}.png")
        img.save(paths[-1])
    out = {}
    for name in ("previous_rule", "calibrated", "previous_rule_again"):
        state = AppState.from_config(AppConfig(releases=[release_dir], workers=0, feature_cache_size=2 * len(paths)))
        rel = state.get_release()
        analysis.analyze(state, str(paths[0]), layer, t)  # loads the backbone and the entries: not timed
        if name != "calibrated":
            rel.entry(layer, t).reliability = None
        start = time.perf_counter()
        for path in paths[1:]:
            analysis.analyze(state, str(path), layer, t)
        out[f"{name}_ms"] = round(1000 * (time.perf_counter() - start) / (len(paths) - 1), 2)
        state.close()
    out["ratio"] = round(out["calibrated_ms"] / ((out["previous_rule_ms"] + out["previous_rule_again_ms"]) / 2), 2)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(REPO / "releases" / "toy-shapes"), help="calibrated release folder")
    p.add_argument("--dataset", default=None, help="held-out images (default for a toy release: its test split)")
    p.add_argument("--split", default="test", help="dataset split (default: %(default)s)")
    p.add_argument("--label-column", default=None, help="label column (default: auto)")
    p.add_argument("--skip", type=int, default=300, help="first held-out row (after the calibration's; default: 300)")
    p.add_argument("--images", type=int, default=300, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="shift-suite seed; must differ from the calibration's (default: 1)")
    p.add_argument("--timesteps", type=int, nargs="*", default=[25], help="entries at these t (default: 25)")
    p.add_argument("--crops", type=int, default=5, help="random crops per photograph (default: %(default)s)")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="also time analyze() on N new images with and without the calibration (default: skip)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)

    release = Release.from_pretrained(a.release)
    entries = [(l, t) for l, t in release.diffc_entries if t in a.timesteps]
    calibrated = [(l, t) for l, t in entries if release.load(l, t, load_atlas=False).reliability is not None]
    if not calibrated:
        p.error(f"{a.release} has no calibrated entry at t in {a.timesteps}; run training/calibrate_release.py first")
    cal_seed = release.load(*calibrated[0], load_atlas=False).reliability.metrics.get("config", {}).get("seed")
    if cal_seed == a.seed:
        p.error(f"--seed {a.seed} is the calibration's own shift seed; pick another")
    toy = (Path(a.release) / "toy_build.json").is_file()
    size = int(release.config.get("image_size") or 32)
    t0 = time.perf_counter()
    if a.dataset is None and toy:
        from revelio_hub.toy.shapes import make_shapes_dataset

        test_seed = json.loads((Path(a.release) / "toy_build.json").read_text()).get("test_seed", 1)
        ds = make_shapes_dataset(a.images, seed=test_seed, image_size=size, start_index=a.skip)
        images, labels = [im.convert("RGB") for im in ds["image"]], list(ds["shape"])
    else:
        from revelio_hub.data import open_image_dataset

        if a.dataset is None:
            p.error("give the held-out images with --dataset")
        source = open_image_dataset(a.dataset, split=a.split, label_column=a.label_column)
        images, labels = held_out_images(source, release.class_names, a.skip, a.images)
    samples = calibration_set(images, CalibrationConfig(seed=a.seed, max_images=len(images)))
    all_images = [s.image for s in samples]
    groups: dict[str, Any] = {"suite": slice(0, len(all_images))}
    shots = photos(a.crops, a.seed)
    groups["photos"] = slice(len(all_images), len(all_images) + len(shots))
    all_images += shots
    if toy:
        groups["toy"] = {}
        for kind, (imgs, kind_labels) in toy_shifted(a.images, TOY_CHECK_SEED, 0, size).items():
            groups["toy"][kind] = (slice(len(all_images), len(all_images) + len(imgs)), kind_labels)
            all_images += imgs
    report: dict[str, Any] = {
        "release": str(a.release), "held_out_images": len(images), "skip": a.skip, "shift_seed": a.seed,
        "calibration_seed": cal_seed, "photos": [f.name for f in photo_files()], "photo_images": len(shots),
        "machine": f"{platform.machine()} {platform.system()}", "date": time.strftime("%Y-%m-%d"), "entries": {},
    }
    for t in sorted({t for _, t in calibrated}):
        here = [l for l, tt in calibrated if tt == t]
        models = {l: release.load(l, t, load_atlas=False).reliability for l in here}
        layers = sorted({x for l in here for x in models[l].layers})
        saes = {l: release.load(l, t, load_atlas=False).sae.eval() for l in layers}
        diffcs = {l: release.load(l, t, load_atlas=False).diffc.eval() for l in here}
        views = sorted({v for mdl in models.values() for v in mdl.views})
        backbone = release.load_backbone(image_size=size)
        m = measure(all_images, t, saes, diffcs, lambda _size: backbone, views)
        for layer in here:
            report["entries"][f"{layer}/t{t}"] = score_entry(release, layer, t, m, samples, labels, groups)
    if a.latency:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report["latency"] = analysis_latency(a.release, *calibrated[0], images[: a.latency + 1], Path(tmp))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _print(report, a.json)
    return report


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if "latency" in report:
        lat = report["latency"]
        print(f"analyze() per new image: {lat['calibrated_ms']} ms with the calibrated check, "
              f"{lat['previous_rule_ms']} / {lat['previous_rule_again_ms']} ms with the previous rule ({lat['ratio']}x)")
    print(f"{report['held_out_images']} held-out images, shift seed {report['shift_seed']}, "
          f"{report['photo_images']} photo images ({', '.join(report['photos'])}); {report['seconds']} s")
    for key, r in report["entries"].items():
        base = r["baseline_previous_rule"]
        print(f"{key}: AUROC {r['auroc_wrong']:.3f}, held-out flagged {r['held_out_flagged']:.1%} "
              f"(previous rule {base['held_out_flagged']:.1%}), photos flagged {r['photos_flagged']:.1%} "
              f"({base['photos_flagged']:.1%}), wrong unflagged {r['wrong_unflagged']:.1%} "
              f"({base['wrong_unflagged']:.1%}); goals met: {r['goals_met']}")
        for kind, v in r.get("toy_check", {}).items():
            print(f"   toy {kind}: Diff-C wrong {v['diffc_wrong']:.1%}, flagged {v['flagged']:.1%}, "
                  f"wrong unflagged {v['wrong_unflagged'] if v['wrong_unflagged'] is None else format(v['wrong_unflagged'], '.1%')}")


if __name__ == "__main__":
    main()
