#!/usr/bin/env python
"""Extract diffusion features of an image dataset into a resumable feature store.

Thin command-line wrapper over :func:`revelio_hub.features.extract_to_store`;
``accelerate launch`` splits the images over processes (each writes its own shards).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from revelio_hub.cli import HelpFormatter, add_options, option
from revelio_hub.layer_names import canonical_layer
from revelio_hub.training_recipes import DEFAULT_RECIPE, RECIPE_NAMES

EPILOG = """\
examples:
  # pooled features of Oxford Pets at two layers and two timesteps, on one GPU
  python training/extract_features.py --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset timm/oxford-iiit-pet --split train --layers bottleneck up_ft1 --timesteps 25 100 \\
      --image-size 256 --dtype bfloat16 --batch-size 32 --out stores/sd15-pets-train

  # spatial maps, the plain view + 3 augmented views per image (for Diff-C training), 4 GPUs
  accelerate launch --num_processes 4 training/extract_features.py --backbone ... \\
      --dataset ./my_images --layers up_ft1 --timesteps 25 --spatial --num-views 4 --out stores/diffc

  # two CPU processes on a local image folder (class subfolders become labels); on a CPU-only
  # machine use torchrun (or `accelerate launch --multi_gpu --num_processes 2`): with --cpu,
  # accelerate launch starts a single process unless MPI is set up
  torchrun --nproc_per_node 2 training/extract_features.py \\
      --backbone ./toy_backbone --dataset ./images --layers bottleneck --timesteps 25 --out stores/toy

Killing the job and rerunning the same command resumes where it stopped (no
duplicated or missing rows). A store extracted with different settings is never
mixed: the run stops with an error unless --overwrite is given.
"""


@dataclass(kw_only=True)
class ExtractionRun:
    """Every option of one extraction: the backbone, the images, what is read of them, and the store."""

    backbone: str = field(metadata=option("Hub id or local diffusers folder of the diffusion model."))
    revision: Optional[str] = field(default=None, metadata=option(
        "Hub revision of the backbone (branch, tag or commit; default: main)."))
    dataset: str = field(metadata=option(
        "Hub dataset id, local image folder (class subfolders), parquet/arrow file or folder, "
        "or a save_to_disk directory."))
    split: str = field(default="train", metadata=option("Dataset split."))
    image_column: Optional[str] = field(default=None, metadata=option("Image column (default: auto-detected)."))
    label_column: Optional[str] = field(default=None, metadata=option(
        "Label column (default: auto-detected ClassLabel or label/labels; 'none' for unlabelled)."))
    layers: list[str] = field(default_factory=lambda: ["bottleneck"], metadata=option(
        "Layers to read, e.g. bottleneck up_ft1 up_ft2 or DiT block13; diffusers names such as mid_block "
        "or up_blocks.1 mean the same layers.", parse=canonical_layer))
    timesteps: list[int] = field(default_factory=lambda: [25], metadata=option(
        "Diffusion timesteps t in [0, num_train_timesteps)."))
    image_size: Optional[int] = field(default=None, metadata=option(
        "Input side in pixels (default: the backbone's; the paper uses 256 for k-SAE, 512 for Diff-C)."))
    spatial: bool = field(default=False, metadata=option("Also store the unpooled maps (fp16; large)."))
    num_views: int = field(default=1, metadata=option(
        "Rows per image: view 0 is the plain image, views >= 1 are seeded RandomResizedCrop(0.8-1.0)"
        " + flip augmentations."))
    batch_size: int = field(default=8, metadata=option("Images per forward pass."))
    seed: int = field(default=0, metadata=option("Noise and augmentation seed."))
    ensemble: int = field(default=1, metadata=option("Noise draws averaged per image (DIFT-style)."))
    recipe: str = field(default=DEFAULT_RECIPE, metadata=option(
        "paper: the original Revelio code's preprocessing (fp32, bilinear Resize + CenterCrop "
        "as torchvision rounds them); default: ours (bicubic). --dtype overrides the precision "
        "(default: %(default)s).", choices=RECIPE_NAMES))
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = field(default=None, metadata=option(
        "Compute precision (features are stored in fp32/fp16 regardless; default: the recipe's, float32)."))
    cpu: bool = field(default=False, metadata=option(
        "Force the CPU (also chosen automatically for multi-process runs without CUDA)."))
    channels_last: bool = field(default=False, metadata=option("NHWC convolutions (faster on GPUs)."))
    max_images: Optional[int] = field(default=None, metadata=option(
        "Only the first N images (quick trials; default: all)."))
    shard_size: Optional[int] = field(default=None, metadata=option(
        "Images per shard file (default: 512 pooled, 64 with --spatial). Work since the last "
        "complete shard is redone after a kill."))
    num_workers: int = field(default=4, metadata=option("Image-decoding threads."))
    out: str = field(metadata=option("Output directory of the feature store."))
    overwrite: bool = field(default=False, metadata=option("Delete an existing store at --out and start over."))
    no_progress: bool = field(default=False, metadata=option("Hide the progress bar."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Extract diffusion features (pooled vectors and optionally spatial maps) of an image "
        "dataset split into a resumable feature store (safetensors shards + summary.json).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_options(p, ExtractionRun)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    from revelio_hub.backbones import load_backbone
    from revelio_hub.data import open_image_dataset
    from revelio_hub.features import extract_to_store
    from revelio_hub.training_recipes import get_recipe

    from revelio_hub.distributed import finish, make_accelerator

    accelerator = make_accelerator(cpu=args.cpu)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format=f"[rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("extract_features")
    try:
        label_column = "" if (args.label_column or "").lower() == "none" else args.label_column

        def open_source():
            return open_image_dataset(args.dataset, split=args.split, image_column=args.image_column,
                                      label_column=label_column)

        # The main process builds the datasets cache first, the others then reuse it. The barrier
        # is passed even when opening fails, so every process reports the error instead of hanging.
        if accelerator.is_main_process:
            try:
                source = open_source()
            finally:
                accelerator.wait_for_everyone()
        else:
            accelerator.wait_for_everyone()
            source = open_source()
        extraction = get_recipe(args.recipe).extraction
        opts = {"channels_last": True} if args.channels_last else {}
        opts["resize"] = extraction.resize
        backbone = load_backbone(args.backbone, device=accelerator.device,
                                 dtype=getattr(torch, args.dtype or extraction.dtype),
                                 revision=args.revision, image_size=args.image_size, **opts)
        if accelerator.is_main_process:
            log.info("%d images in %s[%s]; backbone %s (%s, %d px) on %d process(es)", len(source), args.dataset,
                     args.split, backbone.name, backbone.family, backbone.image_size, accelerator.num_processes)
        store = extract_to_store(
            backbone, source, args.out, args.layers, args.timesteps,
            spatial=args.spatial, views=args.num_views, batch_size=args.batch_size, seed=args.seed,
            ensemble=args.ensemble, rank=accelerator.process_index, world_size=accelerator.num_processes,
            progress=accelerator.is_local_main_process and not args.no_progress, overwrite=args.overwrite,
            max_images=args.max_images, shard_size=args.shard_size, num_workers=args.num_workers,
            barrier=accelerator.wait_for_everyone if accelerator.num_processes > 1 else None,
        )
    except ValueError as err:
        log.error("%s", err)
        return 2
    if accelerator.is_main_process:
        s = store.summary
        print(f"Feature store {args.out}: {s['num_images']} images, {s['num_rows']} rows per entry, "
              f"entries {store.entries}, {s['num_skipped']} corrupt images skipped, complete={s['complete']}")
    finish(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
