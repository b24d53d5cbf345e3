#!/usr/bin/env python
"""Which activations should rank a neuron's top images: the TopK code or ReLU of the pre-TopK activations?

The original Revelio code ranks top images (and computes σ_label) by ReLU of
the SAE's dense pre-TopK activations; the atlas and the app rank them by the
TopK code, the activation the app reports for an uploaded image. For every
entry of a toy release, on the release's atlas images (the test stream, seed 1),
this compares the two rankings per neuron (neurons firing on more than 10
images under both): the purity of its top-10 images (share carrying the most
common value, best factor), the shuffled-label purity as the floor, and how many
of the top-10 the two rankings share.

Example:
    python benchmarks/bench_top_images.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default="releases/toy-shapes", help="toy release (default: %(default)s)")
    p.add_argument("--images", type=int, default=300, help="atlas images of the test stream (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def purity(top_ids: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per neuron: the largest share of its top images carrying one value of one factor."""
    best = torch.zeros(top_ids.shape[0])
    for lab in labels.values():
        vals = lab[top_ids]  # n × 10
        counts = torch.zeros(top_ids.shape[0], int(lab.max()) + 1).scatter_add_(1, vals, torch.ones_like(vals,
                                                                                                       dtype=torch.float))
        best = torch.maximum(best, counts.max(1).values / top_ids.shape[1])
    return best


def compare(sae, maps: torch.Tensor, labels: dict[str, torch.Tensor], top: int = 10) -> dict[str, float]:
    with torch.no_grad():
        codes, dense = sae.image_codes(maps)
    ok = ((codes > 0).sum(0) > top) & ((dense > 0).sum(0) > top)
    code_top = codes[:, ok].topk(top, dim=0).indices.T
    dense_top = dense[:, ok].topk(top, dim=0).indices.T
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(maps.shape[0], generator=g)
    shuffled = {f: lab[perm] for f, lab in labels.items()}
    overlap = (code_top.unsqueeze(2) == dense_top.unsqueeze(1)).any(2).float().mean()
    return {"neurons": int(ok.sum()), "purity_topk_code": float(purity(code_top, labels).mean()),
            "purity_pre_topk": float(purity(dense_top, labels).mean()),
            "purity_shuffled_labels": float(purity(code_top, shuffled).mean()),
            "top10_overlap": float(overlap)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from revelio_hub import Release
    from revelio_hub.toy.shapes import FACTORS, make_shapes_dataset

    release = Release.from_pretrained(args.release)
    backbone = release.load_backbone()
    ds = make_shapes_dataset(args.images, seed=1, image_size=backbone.image_size)
    images = [ds[i]["image"] for i in range(args.images)]
    labels = {f: torch.tensor(ds[f], dtype=torch.long) for f in FACTORS}
    rows = {}
    for layer, t in release.entries:
        entry = release.load(layer, t)
        maps = backbone.extract(images, [layer], [t], pool=None, batch_size=100)[(layer, t)]
        rows[f"{layer}/t{t}"] = compare(entry.sae, maps, labels)
        print(f"{layer} t={t}: {rows[f'{layer}/t{t}']}", file=sys.stderr)
    keys = ["purity_topk_code", "purity_pre_topk", "purity_shuffled_labels", "top10_overlap"]
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    report = {"entries": rows, "mean": mean, "release": str(Path(args.release)), "images": args.images}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("| entry | neurons | top-10 purity, TopK code | top-10 purity, pre-TopK | shuffled | overlap |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['neurons']} | {r['purity_topk_code']:.3f} | {r['purity_pre_topk']:.3f} | "
                  f"{r['purity_shuffled_labels']:.3f} | {r['top10_overlap']:.2f} |")
        print(f"| mean | | {mean['purity_topk_code']:.3f} | {mean['purity_pre_topk']:.3f} | "
              f"{mean['purity_shuffled_labels']:.3f} | {mean['top10_overlap']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
