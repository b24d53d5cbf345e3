#!/usr/bin/env python
"""Ground-truth monosemanticity of a toy release: the best single neuron's AUROC per factor value.

On held-out shape images (a seed no build stage trained on), for every factor
value (shape=star, color=red, ...) and every layer × timestep entry of the
release, the AUROC of the single best token-level SAE neuron (image activation
= max over positions) at detecting it, next to the best single raw feature
channel (max- or mean-pooled, either sign) and the same architecture with
random weights (SAE trained the same way). Also the release's Diff-C shape
accuracy. Prints a table (or JSON with --json) and writes a heat-map PNG.

Example:
    python benchmarks/bench_monosemanticity.py --release releases/toy-shapes --out outputs/mono
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default="releases/toy-shapes", help="toy release folder (default: %(default)s)")
    p.add_argument("--images", type=int, default=1000, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2, help="seed of the held-out shapes (default: %(default)s)")
    p.add_argument("--random-train-images", type=int, default=1000,
                   help="images the random-weights control's SAEs train on (default: %(default)s)")
    p.add_argument("--no-random", action="store_true", help="skip the random-weights control (faster)")
    p.add_argument("--out", default=None, help="folder for report.json and heatmap.png (default: outputs/monosemanticity)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from revelio_hub.toy.monosemanticity import BenchmarkConfig, run_benchmark, save_heatmap
    from revelio_hub.toy.shapes import FACTORS

    cfg = BenchmarkConfig(num_images=a.images, seed=a.seed, random_baseline=not a.no_random,
                          random_train_images=a.random_train_images)
    log = (lambda *_: None) if a.json else print
    report = run_benchmark(a.release, cfg, log=lambda m: print(m, file=sys.stderr) if not a.json else None)
    results = report.pop("_results")
    out = a.out or os.path.join("outputs", "monosemanticity")
    os.makedirs(out, exist_ok=True)
    save_heatmap(results, list(FACTORS), os.path.join(out, "heatmap.png"))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if a.json:
        print(json.dumps({"summary": report["summary"], "checks": report["checks"],
                          "diffc_shape_accuracy": report["diffc_shape_accuracy"]}, indent=2))
        return 0
    s = report["summary"]
    log(f"{'factor':<12}" + "".join(f"{k:>22}" for k in s))
    for f in FACTORS:
        row = f"{f:<12}"
        for kind in s:
            v = s[kind].get(f)
            row += f"{(v['auroc'] if v else float('nan')):>10.3f} @ {(v['best_entry'] if v else '-'):<10}"
        log(row)
    for name, c in report["checks"].items():
        log(f"{'PASS' if c['pass'] else 'FAIL'}  {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                           for k, v in c.items() if k != "pass"))
    log(f"heat map: {os.path.join(out, 'heatmap.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
