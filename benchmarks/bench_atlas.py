#!/usr/bin/env python
"""Atlas building: streaming per-neuron top-N (ours) vs the original-style dense activation matrix.

The original Revelio code computes every image's activations into one N × n_latents matrix and
takes ``topk`` over images; at 100k images × 81,920 latents that matrix is
32.8 GB (fp32). Ours merges each batch's top-N into a running top-N, so memory
is O(n_latents × (top_n + batch)) whatever N is. This script times both on the
same random SAE and features in one process, checks they pick the same top
images, and prints throughput and memory ratios (``--json`` for machines).

    python benchmarks/bench_atlas.py                       # paper-sized SAE, 1,024 images, CPU
    python benchmarks/bench_atlas.py --device cuda --images 16384 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time streaming atlas statistics against a dense N × n_latents baseline.")
    p.add_argument("--images", type=int, default=1024, help="Number of images (default: %(default)s).")
    p.add_argument("--d-in", type=int, default=1280, help="Feature dimension (default: %(default)s, SD1.5 up_ft1).")
    p.add_argument("--n-latents", type=int, default=81920, help="SAE latents (default: %(default)s = 64 × 1280).")
    p.add_argument("--k", type=int, default=32, help="Active latents per image (default: %(default)s).")
    p.add_argument("--batch-size", type=int, default=256, help="Images per batch (default: %(default)s).")
    p.add_argument("--top-n", type=int, default=20, help="Top images per neuron (default: %(default)s).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s).")
    p.add_argument("--repeats", type=int, default=2, help="Timed repetitions, best kept (default: %(default)s).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Time both on the settings in ``args`` (see :func:`parse_args`); the report as a dict."""
    import torch

    from revelio_hub.interpret.atlas_builder import build_atlas
    from revelio_hub.interpret.atlas_config import AtlasConfig
    from revelio_hub.sae.model import KSparseAutoencoder

    torch.manual_seed(0)
    device = torch.device(args.device)
    sae = KSparseAutoencoder(d_in=args.d_in, n_latents=args.n_latents, k=args.k).to(device).eval()
    features = torch.randn(args.images, args.d_in, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.images) % 37
    ids = torch.arange(args.images)
    batches = [(features[i : i + args.batch_size], labels[i : i + args.batch_size], ids[i : i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def seed_style():
        with torch.no_grad():
            dense = torch.cat([sae.image_activations(x.to(device)) for x, _, _ in batches])  # N × n
            vals, rows = torch.topk(dense, args.top_n, dim=0)
            freq = (dense > 0).float().mean(0)
        return rows.T.cpu(), vals.T.cpu(), freq.cpu()

    def ours():
        return build_atlas(batches, [str(c) for c in range(37)], sae=sae,
                           config=AtlasConfig(top_n=args.top_n, summary_neurons=1000), device=device)

    timings = {}
    results = {}
    for name, fn in (("original_style_dense", seed_style), ("ours_streaming", ours)):
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            results[name] = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best

    rows, vals, _ = results["original_style_dense"]
    atlas = results["ours_streaming"]
    fired = vals > 0
    same = torch.equal(atlas.stats["top_image_ids"], torch.where(fired, rows, torch.full_like(rows, -1)))
    dense_bytes = args.images * args.n_latents * 4
    stream_bytes = args.n_latents * (args.top_n * (4 + 8 + 8) + args.batch_size * 4 + 16)
    report = {
        "device": str(device),
        "images": args.images,
        "n_latents": args.n_latents,
        "d_in": args.d_in,
        "batch_size": args.batch_size,
        "original_style_s": round(timings["original_style_dense"], 4),
        "ours_s": round(timings["ours_streaming"], 4),
        "original_style_img_per_s": round(args.images / timings["original_style_dense"], 1),
        "ours_img_per_s": round(args.images / timings["ours_streaming"], 1),
        "speed_ratio_ours_over_seed": round(timings["original_style_dense"] / timings["ours_streaming"], 3),
        "dense_matrix_gb": round(dense_bytes / 1e9, 3),
        "streaming_state_gb": round(stream_bytes / 1e9, 3),
        "memory_ratio_dense_over_ours": round(dense_bytes / stream_bytes, 2),
        "dense_matrix_gb_at_100k_images": round(100_000 * args.n_latents * 4 / 1e9, 1),
        "same_top_images": bool(same),
        "ours_includes": "purity, entropy, summary (no thumbnails)",
    }
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:34s} {value}")
    return 0 if report["same_top_images"] else 1


if __name__ == "__main__":
    sys.exit(main())
