"""Memory an app request costs for a large photo: peak and retained RSS growth.

A 36-megapixel JPEG (a phone or DSLR photo) is analysed by the app function
behind ``/analyze_json`` (``revelio_hub.app.analysis.analyze``) on the bundled
toy release, after a warm-up analysis has loaded the backbone and the entry.
Each variant runs in a fresh process, and the resident set size (RSS, read
from ``/proc/self/statm`` every millisecond by a sampling thread) is compared
with its value just before the request:

* ``draft`` - the app's path: the JPEG is decoded at reduced scale
  (``load_image(max_side=...)``, Pillow ``Image.draft``) and shrunk to the
  app's ``max_side``;
* ``full`` - the baseline, what the app did before: decode at full size, then
  shrink (``load_image`` without ``max_side``, then ``thumbnail``).

Pillow allocates pixels outside Python's allocator, so ``tracemalloc`` does not
see them; RSS does. "retained" is RSS after the request (and a ``gc.collect``)
minus RSS before it, after ``--repeats`` requests on different photos.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --megapixels 36 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakSampler:
    """Highest RSS seen while the ``with`` block runs (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> "_PeakSampler":
        self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def make_photo(path: Path, megapixels: float, seed: int) -> Path:
    """A 3:2 JPEG of ``megapixels`` with photo-like content (gradients, shapes, fine noise), quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    h = int(round((megapixels * 1e6 / 1.5) ** 0.5))
    w = int(round(h * 1.5))
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)  # smooth colour fields
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(h // 40, h // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img.save(path, quality=90)
    return path


def _measure(variant: str, photos: list[str], warm: str) -> dict:
    """Run in a fresh process: warm up, then analyse each photo and report RSS growth (MB)."""
    import torch

    from revelio_hub.app import analysis
    from revelio_hub.app.state import AppConfig, AppState, default_threads
    from revelio_hub.app.validation import ImageLimits
    from revelio_hub.images import load_image

    config = AppConfig(feature_cache_size=64)
    torch.set_num_threads(default_threads(config.concurrency))
    state = AppState.from_config(config)
    limits = ImageLimits()
    analysis.analyze(state, warm)  # loads the backbone and the default entry
    gc.collect()

    def request(path: str) -> None:
        if variant == "draft":
            analysis.analyze(state, path, limits=limits)
        else:
            img = load_image(path, max_pixels=limits.max_pixels, min_side=limits.min_side)
            img.thumbnail((limits.max_side, limits.max_side))
            analysis.analyze(state, img, limits=limits)
            del img

    before = _rss()
    peaks = []
    for path in photos:
        with _PeakSampler() as sampler:
            request(path)
        peaks.append(sampler.peak - before)
    gc.collect()
    after = _rss()
    mb = 1 / 2**20
    return {"variant": variant, "peak_growth_mb": round(max(peaks) * mb, 1),
            "peak_growth_per_request_mb": [round(p * mb, 1) for p in peaks],
            "retained_mb": round((after - before) * mb, 1), "requests": len(photos)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=36.0, help="size of the test photos")
    parser.add_argument("--repeats", type=int, default=3, help="requests (different photos) per variant")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: variant, warm image, photos...
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[2:], args.child[1])))
        return {}
    if args.repeats < 1 or args.megapixels <= 0:
        parser.error("--repeats and --megapixels must be positive")

    from revelio_hub.toy.shapes import image_spec, render

    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.png"
        render(image_spec(0, seed=1), image_size=96).save(warm)
        photos = [str(make_photo(Path(tmp) / f"photo_{i}.jpg", args.megapixels, seed=i)) for i in range(args.repeats)]
        sizes = [os.path.getsize(p) / 2**20 for p in photos]
        runs = {}
        for variant in ("full", "draft"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(warm), *photos],
                                 capture_output=True, text=True, cwd=str(REPO), check=False)
            if out.returncode != 0:
                raise SystemExit(f"bench_memory: the {variant} run failed:\n{out.stderr[-2000:]}")
            runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "photo": {"megapixels": args.megapixels, "file_mb": round(max(sizes), 1), "requests": args.repeats},
        "full_decode": runs["full"],
        "draft_decode": runs["draft"],
        "peak_ratio_draft_vs_full": round(runs["draft"]["peak_growth_mb"] / max(runs["full"]["peak_growth_mb"], 1e-9), 3),
        "targets": {"draft_peak_growth_mb": 100, "draft_retained_mb": 0},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.repeats} requests, {args.megapixels} MP JPEGs (up to {result['photo']['file_mb']} MB each)")
        for name in ("full_decode", "draft_decode"):
            r = result[name]
            print(f"{name:13s} peak growth {r['peak_growth_mb']:7.1f} MB   retained {r['retained_mb']:7.1f} MB   "
                  f"(per request peaks {r['peak_growth_per_request_mb']})")
        print(f"peak draft / full: {result['peak_ratio_draft_vs_full']}× (target: draft peak ≤ 100 MB, nothing retained)")
    return result


if __name__ == "__main__":
    main()
