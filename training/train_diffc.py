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

from revelio_hub.cli import HelpFormatter, error_line, usage_error
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
    from revelio_hub.training_recipes import DEFAULT_RECIPE, RECIPE_NAMES

    d, s = DiffCTrainConfig(), SweepConfig()
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
    t.add_argument("--head", choices=["conv", "linear"], default=d.head, help="classifier head (default: %(default)s)")
    t.add_argument("--hidden", type=int, default=d.hidden, help="conv head width (default: %(default)s)")
    t.add_argument("--recipe", choices=list(RECIPE_NAMES), default=DEFAULT_RECIPE,
                   help="paper: the original Revelio code's training (dropout 0, CosineAnnealingLR(T_max=90) per "
                        "epoch, no warm-up, every training image, last epoch kept, fresh augmentation and noise "
                        "every epoch: needs --online); default: the same, and also allows cached views (--train-store), "
                        "measured less accurate. Options below override single choices "
                        "(default: %(default)s)")
    t.add_argument("--dropout", type=float, default=None,
                   help="conv head dropout (default: the recipe's, 0.0)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    t.add_argument("--schedule", choices=["cosine_per_epoch", "warmup_cosine_per_step"], default=None,
                   help="learning-rate schedule (default: the recipe's, cosine_per_epoch: CosineAnnealingLR(T_max=90) "
                        "stepped per epoch)")
    t.add_argument("--warmup-fraction", type=float, default=None,
                   help="share of steps in linear warm-up before a per-step cosine decay (default: the recipe's "
                        "per-epoch cosine, which has none)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="training images per class held out for model selection (default: the recipe's, 0: every "
                        "image trains, the last epoch is kept)")
    t.add_argument("--view-mode", choices=["sample", "all"], default=d.views,
                   help="'sample': one cached view per image per epoch; 'all': every view (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    t.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=d.mixed_precision,
                   help="autocast precision of the head")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints")
    t.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint/ (model, optimizer and scheduler state) after the run finishes")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")

    w = sub.add_parser("sweep", help="linear probes for every cached (layer, t): table + heat map",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    w.add_argument("--train-store", required=True, help="feature store of the training split (pooled is enough)")
    w.add_argument("--test-store", default=None, help="feature store of the test split (else validation accuracy)")
    w.add_argument("--out", required=True, help="output folder for sweep.json, sweep.csv, sweep.png")
    w.add_argument("--layers", nargs="+", type=canonical_layer, default=None, help="subset of layers (default: all in the store)")
    w.add_argument("--timesteps", nargs="+", type=int, default=None, help="subset of timesteps (default: all)")
    w.add_argument("--steps", type=int, default=s.steps, help="optimiser steps per probe (default: %(default)s)")
    w.add_argument("--batch-size", type=int, default=s.batch_size, help="default: %(default)s")
    w.add_argument("--lr", type=float, default=s.lr, help="default: %(default)s")
    w.add_argument("--val-fraction", type=float, default=s.val_fraction, help="default: %(default)s")
    w.add_argument("--seed", type=int, default=s.seed, help="default: %(default)s")
    w.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def _train(a: argparse.Namespace, acc: Any) -> dict:
    from revelio_hub.diffc.training import DiffCTrainConfig, train_diffc_from_store, train_diffc_online

    config = DiffCTrainConfig(
        recipe=a.recipe, head=a.head, hidden=a.hidden, dropout=a.dropout, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        weight_decay=a.weight_decay, schedule=a.schedule, warmup_fraction=a.warmup_fraction, val_fraction=a.val_fraction,
        views=a.view_mode, seed=a.seed, mixed_precision=a.mixed_precision, checkpoint_every=a.checkpoint_every,
        keep_checkpoint=a.keep_checkpoint,
    )
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

    config = SweepConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, val_fraction=a.val_fraction, seed=a.seed)
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
