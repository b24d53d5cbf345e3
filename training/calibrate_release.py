#!/usr/bin/env python
"""Calibrate a release's reliability score (will Diff-C be wrong on this image?) and store it in the release.

Thin command-line wrapper over :func:`revelio_hub.interpret.calibration.calibrate_release`:
for every entry with a Diff-C head, measure its signals on held-out images of the
release's dataset and on generic shifts of them (rotation, rescaling, pastes,
blur, noise, JPEG, colour), fit the score and pick the threshold that flags
``--false-alarm`` of the held-out images. Writes ``<entry>/reliability/`` into
the release folder and marks the entries in ``release.json`` (format in
docs/CONTRACTS.md). Runs on one process (GPU when there is one, through accelerate).
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  # the bundled toy release, on the first 300 images of its test split (never trained on)
  python training/calibrate_release.py --release releases/toy-shapes \\
      --dataset runs/toy-build/data/test --label-column shape

  # a Pets release, on 300 images of the test split
  python training/calibrate_release.py --release runs/release/sd15-pets --dataset timm/oxford-iiit-pet --split test
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revelio_hub.cli import HelpFormatter
    from revelio_hub.interpret.calibration import CalibrationConfig
    from revelio_hub.interpret.shifts import SHIFTS

    d = CalibrationConfig()
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--release", required=True, help="Release folder to calibrate (written in place).")
    p.add_argument("--dataset", default=None,
                   help="Held-out images with labels (Hub id or local folder; default: the release's dataset).")
    p.add_argument("--split", default=None, help="Dataset split (default: the release's, else test).")
    p.add_argument("--label-column", default=None, help="Label column (default: auto-detected).")
    p.add_argument("--skip", type=int, default=0, help="Start at this row (default: %(default)s).")
    p.add_argument("--max-images", type=int, default=d.max_images, help="Held-out images used (default: %(default)s).")
    p.add_argument("--seed", type=int, default=d.seed, help="Seed of the shift suite (default: %(default)s).")
    p.add_argument("--shifts", default=",".join(d.shifts),
                   help=f"Comma-separated shifts, from: {', '.join(SHIFTS)} (default: all).")
    p.add_argument("--views", default=",".join(d.views),
                   help="Comma-separated views compared with the image (flip; '' for none; default: %(default)s).")
    p.add_argument("--false-alarm", type=float, default=d.false_alarm,
                   help="Share of held-out images the threshold may flag (default: %(default)s).")
    p.add_argument("--timesteps", default=None, metavar="T,T,...",
                   help="Calibrate only the Diff-C entries at these timesteps (default: all).")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="Images per backbone pass (default: %(default)s).")
    p.add_argument("--report", default=None, help="Also write the calibration metrics to this JSON file.")
    p.add_argument("--push", default=None, metavar="REPO_ID",
                   help="Then upload the calibrated release to this Hub repo (make_release.py --push rebuilds the "
                        "folder from its inputs, without the calibration).")
    p.add_argument("--private", action="store_true", help="With --push: create the repo as private.")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN).")
    p.add_argument("--cpu", action="store_true", help="Run on the CPU even if a GPU is available.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from revelio_hub.data import open_image_dataset
    from revelio_hub.distributed import finish, make_accelerator
    from revelio_hub.interpret.calibration import CalibrationConfig, calibrate_release
    from revelio_hub.release import Release, push_release

    accelerator = make_accelerator(cpu=args.cpu)
    try:
        release = Release.from_pretrained(args.release)
        dataset = (release.config.get("dataset") or {})
        source_id = args.dataset or dataset.get("hub_id")
        if not source_id:
            raise ValueError("the release names no Hub dataset; give the held-out images with --dataset")
        source = open_image_dataset(source_id, split=args.split or dataset.get("split") or "test",
                                    label_column=args.label_column)
        config = CalibrationConfig(seed=args.seed, shifts=tuple(s for s in args.shifts.split(",") if s),
                                   views=tuple(v for v in args.views.split(",") if v), false_alarm=args.false_alarm,
                                   max_images=args.max_images, batch_size=args.batch_size,
                                   timesteps=None if not args.timesteps else
                                   tuple(int(t) for t in args.timesteps.split(",") if t.strip()))
        metrics = calibrate_release(args.release, source, config, skip=args.skip, device=accelerator.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, m in metrics.items():
        print(f"{key}: AUROC(Diff-C wrong) {m['auroc_wrong']:.3f}, held-out flagged {m['held_out_flagged']:.1%}, "
              f"wrong answers unflagged {m['wrong_unflagged']:.1%} ({m['images']} calibration images)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(metrics, f, indent=2)
    if args.push:
        print(f"pushed: {push_release(args.release, args.push, private=args.private, token=args.token)}")
    finish(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
