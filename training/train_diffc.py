#!/usr/bin/env python
"""Train a Diff-C classifier head on diffusion features, or sweep linear probes over layers × timesteps.

Thin command-line wrapper over :mod:`revelio_hub.diffc.training` and
:mod:`revelio_hub.diffc.sweep`; runs
under plain ``python``, ``accelerate launch`` or ``torchrun`` (``train``: one data-parallel run,
on CPU-only machines too).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from revelio_hub.cli import HelpFormatter, add_options, error_line, from_args, usage_error
from revelio_hub.layer_names import canonical_layer

EPILOG = """\
examples:
  # 1. cache spatial maps once: the plain view + 3 augmented views per training image
  python training/extract_features.py --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset timm/oxford-iiit-pet --split train --layers up_ft1 --timesteps 25 --image-size 512 \\
      --spatial --num-views 4 --out stores/pets-train
  python training/extract_features.py ... --split test --spatial --out stores/pets-test

  # 2. train the paper's head (30 epochs, AdamW 1e-4, batch 16; our recipe) and evaluate on the test store
  accelerate launch training/train_diffc.py train --train-store stores/pets-train \\
      --test-store stores/pets-test --layer up_ft1 --timestep 25 --out runs/diffc-pets

  # the paper's recipe exactly: fresh augmentation and noise every epoch (30x the backbone cost), dropout 0,
  # CosineAnnealingLR(T_max=90) per epoch, every training image, the last epoch kept
  python training/train_diffc.py train --recipe paper --online --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset timm/oxford-iiit-pet --layer up_ft1 --timestep 25 --image-size 512 --out runs/diffc-paper

  # 3. Figure-4 analysis: a linear probe for every cached (layer, t), table + heat map
  python training/train_diffc.py sweep --train-store stores/pets-train-pooled \\
      --test-store stores/pets-test-pooled --out runs/sweep-pets

Outputs of `train`: config.json + model.safetensors (the best epoch on a validation split carved
from the training images; the test data is read only after training), metrics.jsonl, eval.json
(top-1/top-5/per-class test accuracy) and confusion.png. Killing a run and rerunning the same command
resumes from the last finished epoch (checkpoint/, removed when the run finishes unless --keep-checkpoint).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revelio_hub.diffc.sweep import SweepConfig
    from revelio_hub.diffc.training import DiffCTrainConfig

    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a Diff-C head (cached features by default, or --online)",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    t.add_argument("--out", required=True, help="output folder (model, metrics, eval.json, checkpoints)")
    t.add_argument("--layer", required=True, type=canonical_layer, help="layer to classify from, e.g. up_ft1")
    t.add_argument("--timestep", type=int, required=True, help="diffusion timestep, e.g. 25")
    t.add_argument("--train-store", help="feature store of the training split (spatial maps for --head conv; required unless --online)")
    t.add_argument("--test-store", help="feature store of the test split, read only after training (default: none, no test metrics)")
    t.add_argument("--online", action="store_true",
                   help="compute features from freshly augmented images every epoch instead of a store")
    t.add_argument("--backbone", help="--online: Hub id or folder of the diffusion model (required with --online)")
    t.add_argument("--revision", default=None, help="--online: backbone revision (default: main)")
    t.add_argument("--dataset", help="--online: Hub dataset id, image folder, parquet/arrow or save_to_disk folder (required with --online)")
    t.add_argument("--split", default="train", help="--online: training split (default: %(default)s)")
    t.add_argument("--test-split", default="test", help="--online: test split, '' for none (default: %(default)s)")
    t.add_argument("--label-column", default=None, help="--online: label column (default: auto-detected)")
    t.add_argument("--image-size", type=int, default=None, help="--online: input side in pixels (default: backbone's)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="--online: backbone precision (default: %(default)s)")
    t.add_argument("--max-images", type=int, default=None, help="--online: only the first N images of each split (default: all)")
    add_options(t.add_argument_group("head and optimisation (numbers: the paper's)"), DiffCTrainConfig)
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")

    w = sub.add_parser("sweep", help="linear probes for every cached (layer, t): table + heat map",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    w.add_argument("--train-store", required=True, help="feature store of the training split (pooled is enough)")
    w.add_argument("--test-store", default=None, help="feature store of the test split (else validation accuracy)")
    w.add_argument("--out", required=True, help="output folder for sweep.json, sweep.csv, sweep.png")
    w.add_argument("--layers", nargs="+", type=canonical_layer, default=None, help="subset of layers (default: all in the store)")
    w.add_argument("--timesteps", nargs="+", type=int, default=None, help="subset of timesteps (default: all)")
    add_options(w.add_argument_group("linear probes"), SweepConfig)
    w.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def _train(a: argparse.Namespace, acc: Any) -> dict:
    from revelio_hub.diffc.training import DiffCTrainConfig, train_diffc_from_store, train_diffc_online

    config = from_args(DiffCTrainConfig, a, online=None)  # the recipe fills it; --online picks the trainer below
    if a.recipe == "paper" and not a.online:
        raise SystemExit("train: the paper recipe recomputes features from a fresh augmentation and fresh noise "
                         "every epoch; add --online with --backbone and --dataset")
    if not a.online:  # cached views: recorded as such (measured: less accurate, 10x fewer backbone passes)
        from dataclasses import replace

        config = replace(config, online=False, fresh_noise=False)
    if not a.online:
        if not a.train_store:
            usage_error("train_diffc.py train", "--train-store is required (or use --online with --backbone and --dataset)")
        return train_diffc_from_store(a.train_store, a.out, a.layer, a.timestep, config, test_store=a.test_store,
                                      progress=not a.no_progress, accelerator=acc).eval
    if not (a.backbone and a.dataset):
        usage_error("train_diffc.py train", "--online needs --backbone and --dataset")
    import torch

    from revelio_hub.backbones import load_backbone
    from revelio_hub.data import open_image_dataset

    from revelio_hub.training_recipes import get_recipe

    device = acc.device
    backbone = load_backbone(a.backbone, device=device, dtype=getattr(torch, a.dtype), revision=a.revision,
                             image_size=a.image_size, resize=get_recipe(a.recipe).extraction.resize)
    train = open_image_dataset(a.dataset, a.split, label_column=a.label_column).limit(a.max_images)
    test_images = test_labels = None
    if a.test_split:
        test = open_image_dataset(a.dataset, a.test_split, label_column=a.label_column).limit(a.max_images)
        ids, test_images, _ = test.load_images(range(len(test)))
        test_labels = test.labels[ids]
    return train_diffc_online(backbone, train, train.labels, train.class_names, a.layer, a.timestep, a.out, config,
                              image_ids=range(len(train)), test_images=test_images, test_labels=test_labels,
                              progress=not a.no_progress, accelerator=acc).eval


def _sweep(a: argparse.Namespace) -> list:
    from revelio_hub.diffc.sweep import SweepConfig, sweep

    config = from_args(SweepConfig, a)
    return sweep(a.train_store, a.out, a.layers, a.timesteps, test_store=a.test_store, config=config,
                 progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from revelio_hub.distributed import check_launch, finish, make_accelerator

    check_launch()  # a CPU-only `accelerate launch --num_processes N` would run one process: say so
    try:
        if a.command == "train":
            acc = make_accelerator(mixed_precision=a.mixed_precision)  # one process group for torchrun's N processes
            result = _train(a, acc)
            if acc.is_main_process:
                keys = ("split", "top1", "top5", "best_epoch", "validation")
                print(json.dumps({k: result.get(k) for k in keys}, indent=2))
                print(f"saved Diff-C head, eval.json and confusion.png to {a.out} ({acc.num_processes} process(es))")
            finish(acc)
        else:
            rows = _sweep(a)
            metric = "test_top1" if a.test_store else "val_top1"
            for r in rows:
                print(f"{r['layer']:>12s}  t={r['timestep']:<4d}  {metric} {r.get(metric, float('nan')):.3f}")
            print(f"wrote {a.out}/sweep.json, sweep.csv and sweep.png")
    except (ValueError, FileNotFoundError) as err:
        return error_line(f"train_diffc.py {a.command}", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
