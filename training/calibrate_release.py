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
from dataclasses import dataclass, field
from typing import Optional

from revelio_hub.cli import HelpFormatter, add_options, from_args, option
from revelio_hub.data import open_image_dataset
from revelio_hub.distributed import finish, make_accelerator
from revelio_hub.interpret.calibration import CalibrationConfig, calibrate_release
from revelio_hub.release import Release, push_release

EPILOG = """\
examples:
  # the bundled toy release, on the first 300 images of its test split (never trained on)
  python training/calibrate_release.py --release releases/toy-shapes \\
      --dataset runs/toy-build/data/test --label-column shape

  # a Pets release, on 300 images of the test split
  python training/calibrate_release.py --release runs/release/sd15-pets --dataset timm/oxford-iiit-pet --split test
"""


@dataclass(kw_only=True)
class CalibrationRun:
    """Which release and held-out images, and what happens to the result."""

    release: str = field(metadata=option("Release folder to calibrate (written in place)."))
    dataset: Optional[str] = field(default=None, metadata=option(
        "Held-out images with labels (Hub id or local folder; default: the release's dataset)."))
    split: Optional[str] = field(default=None, metadata=option("Dataset split (default: the release's, else test)."))
    label_column: Optional[str] = field(default=None, metadata=option("Label column (default: auto-detected)."))
    skip: int = field(default=0, metadata=option("Start at this row."))
    report: Optional[str] = field(default=None, metadata=option("Also write the calibration metrics to this JSON file."))
    push: Optional[str] = field(default=None, metadata=option(
        "Then upload the calibrated release to this Hub repo (make_release.py --push rebuilds the folder from its "
        "inputs, without the calibration).", metavar="REPO_ID"))
    private: bool = field(default=False, metadata=option("With --push: create the repo as private."))
    token: Optional[str] = field(default=None, metadata=option("Hub token (default: the saved login or HF_TOKEN)."))
    cpu: bool = field(default=False, metadata=option("Run on the CPU even if a GPU is available."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    add_options(p, CalibrationRun)
    add_options(p.add_argument_group("calibration"), CalibrationConfig, exclude=("max_sae_params", "l2"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = make_accelerator(cpu=args.cpu)
    try:
        release = Release.from_pretrained(args.release)
        dataset = (release.config.get("dataset") or {})
        source_id = args.dataset or dataset.get("hub_id")
        if not source_id:
            raise ValueError("the release names no Hub dataset; give the held-out images with --dataset")
        source = open_image_dataset(source_id, split=args.split or dataset.get("split") or "test",
                                    label_column=args.label_column)
        config = from_args(CalibrationConfig, args)
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
