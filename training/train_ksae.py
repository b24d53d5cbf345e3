#!/usr/bin/env python
"""Train a k-sparse autoencoder on stored diffusion features, or every (layer, t) SAE straight from a backbone.

Thin command-line wrapper over :func:`revelio_hub.sae.training.train_sae` and
:func:`revelio_hub.sae.streaming.train_sae_stream`; ``accelerate launch`` /
``torchrun`` runs it data-parallel (same global batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from revelio_hub.cli import HelpFormatter, add_options, error_line, from_args
from revelio_hub.layer_names import canonical_layer

EPILOG = """\
examples:
  # our recipe on pooled SD1.5 up_ft1 features at t=25 (the paper's k 32, 64x expansion, 83.9M samples)
  python training/train_ksae.py --store stores/sd15-pets-train --layer up_ft1 --timestep 25 \\
      --out runs/sae-up_ft1-t25

  # the paper's recipe exactly, trained on every sample and evaluated on the test split's features
  python training/train_ksae.py --recipe paper --store stores/sd15-pets-train --layer up_ft1 --timestep 25 \\
      --eval-store stores/sd15-pets-test --out runs/sae-paper-up_ft1-t25

  # a token-level SAE on 64 sampled positions per map (store extracted with --spatial), 4 GPUs
  accelerate launch --num_processes 4 training/train_ksae.py --store stores/sd15-pets-train \\
      --layer up_ft1 --timestep 25 --granularity token --tokens-per-image 64 --out runs/sae-tok

  # no feature store: one SAE per (layer, t), all fed by one backbone pass per batch, into runs/grid/<layer>/t<t>
  python training/train_ksae.py --backbone releases/toy-shapes/backbone --dataset data/toy-train \
      --layers bottleneck up_ft1 --timesteps 25 100 --batch-size 64 --steps 2000 --out runs/grid

  # plain tensors, two CPU processes (torchrun: `accelerate launch --cpu` starts one process without MPI)
  torchrun --nproc_per_node 2 training/train_ksae.py --features feats.safetensors \\
      --k 8 --expansion 8 --batch-size 512 --steps 2000 --out runs/small

Killing the job and rerunning the same command resumes from the last checkpoint
(--checkpoint-every) and ends with the same weights as an uninterrupted run.
Rerunning a finished run prints its saved evaluation. Different settings on an
existing output folder are refused unless --overwrite is given.
Outputs in --out: config.json + model.safetensors (load with
KSparseAutoencoder.from_pretrained), eval.json (held-out FVU, L0, dead fraction,
cosine), metrics.jsonl, train_config.json.
"""


def _data_args(p: argparse.ArgumentParser) -> None:
    from revelio_hub.sae.training import TOKEN_SAMPLINGS

    src = p.add_argument_group("data (one of --store, --features or --backbone)")
    src.add_argument("--store", help="Feature store folder written by training/extract_features.py.")
    src.add_argument("--layer", type=canonical_layer, help="Layer of the store entry, e.g. up_ft1 (required with --store).")
    src.add_argument("--timestep", type=int, help="Timestep of the store entry, e.g. 25 (required with --store).")
    src.add_argument("--granularity", choices=["pooled", "token"], default="pooled",
                     help="pooled: one mean-pooled vector per image (the paper); token: sampled positions of the "
                          "spatial maps (needs a store extracted with --spatial). Default: %(default)s.")
    src.add_argument("--tokens-per-image", type=int, default=64,
                     help="Positions sampled per map for --granularity token (default: %(default)s).")
    src.add_argument("--token-sampling", choices=list(TOKEN_SAMPLINGS), default="uniform",
                     help="How --granularity token draws positions: uniform, or deviation (in proportion to a "
                          "position's squared distance from its map's mean, so objects outweigh plain background; "
                          "held-out metrics still use uniform draws). Default: %(default)s.")
    src.add_argument("--view-ids", type=int, nargs="+", default=None,
                     help="Use only these views of the store, e.g. 0 for the un-augmented images (default: all).")
    src.add_argument("--features", help="Plain safetensors file with an N×d_in tensor (instead of --store; default: none).")
    src.add_argument("--features-key", default=None, help="Tensor name in --features (default: its only tensor).")


def _stream_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("streaming (--backbone with --dataset: no store; pooled SAEs, --out/<layer>/t<t>)")
    s.add_argument("--backbone", help="Hub id or local diffusers folder of the diffusion model to stream features from.")
    s.add_argument("--revision", default=None, help="Hub revision of the backbone (default: main).")
    s.add_argument("--dataset", help="Hub dataset id, image folder, parquet file or saved datasets folder.")
    s.add_argument("--split", default="train", help="Dataset split (default: %(default)s).")
    s.add_argument("--layers", nargs="+", type=canonical_layer, help="Layers to train an SAE on, e.g. bottleneck up_ft1.")
    s.add_argument("--timesteps", nargs="+", type=int, help="Timesteps, e.g. 25 100 (one SAE per layer and timestep).")
    s.add_argument("--image-size", type=int, default=None, help="Input resolution (default: the backbone's).")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Backbone dtype (default: the recipe's).")
    s.add_argument("--noise-seed", type=int, default=0, help="Diffusion noise seed, as a store's --seed (default: %(default)s).")
    s.add_argument("--ensemble", type=int, default=1, help="Noise draws averaged per image (default: %(default)s).")
    s.add_argument("--extract-batch-size", type=int, default=8, help="Images per backbone call (default: %(default)s).")
    s.add_argument("--num-workers", type=int, default=2, help="Image-decoding threads (default: %(default)s).")
    s.add_argument("--max-images", type=int, default=None, help="Only the first N images (default: all).")


def _model_args(p: argparse.ArgumentParser, config_cls: type) -> None:
    m = p.add_argument_group("model and optimisation (numbers: the paper's)")
    add_options(m, config_cls, only=("recipe", "k", "expansion", "n_latents", "batch_size", "variant", "lr",
                                     "warmup_steps", "lr_decay_fraction", "aux_k", "aux_coef", "dead_window",
                                     "b_pre_init", "normalize_input", "mixed_precision", "seed"))
    add_options(m.add_mutually_exclusive_group(), config_cls, only=("total_samples", "steps"))


def _run_args(p: argparse.ArgumentParser, config_cls: type) -> None:
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="Output folder (weights, eval.json, metrics.jsonl, checkpoint/).")
    add_options(r, config_cls, only=("eval_fraction", "checkpoint_every", "log_every"))
    r.add_argument("--eval-store", default=None,
                   help="Feature store of a separate split (same layer and timestep) to evaluate on instead of a "
                        "held-out share (default: none).")
    r.add_argument("--no-resume", action="store_true", help="Ignore an existing checkpoint (fails if one exists).")
    r.add_argument("--overwrite", action="store_true", help="Delete a previous run in --out first.")
    r.add_argument("--no-progress", action="store_true", help="No progress bar.")
    r.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present.")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if sum(x is not None for x in (args.store, args.features, args.backbone)) != 1:
        p.error("give exactly one of --store (with --layer and --timestep), --features or --backbone (with --dataset)")
    if args.store is not None and (args.layer is None or args.timestep is None):
        p.error("--store needs --layer and --timestep")
    if args.eval_store is not None and args.store is None:
        p.error("--eval-store needs --store (with --layer and --timestep)")
    if args.backbone is not None and not (args.dataset and args.layers and args.timesteps):
        p.error("--backbone needs --dataset, --layers and --timesteps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revelio_hub.sae.training import SAETrainConfig

    p = argparse.ArgumentParser(
        description="Train a k-sparse autoencoder (TopK or --variant, unit-norm decoder; --recipe paper: the original "
        "Revelio code's training exactly, --recipe default: the same with bf16 matmuls on CUDA and a learning rate "
        "scaled to the dictionary and the run) on pooled or token-level diffusion features, from a feature store or "
        "straight from the backbone.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    _data_args(p)
    _stream_args(p)
    _model_args(p, SAETrainConfig)
    _run_args(p, SAETrainConfig)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _config(args: argparse.Namespace) -> Any:
    from revelio_hub.sae.training import SAETrainConfig

    return from_args(SAETrainConfig, args)


def _train_stored(args: argparse.Namespace, acc: Any) -> dict:
    """--store / --features: one SAE on vectors in memory."""
    from revelio_hub.sae.training import load_store_features, load_tensor_features, train_sae

    if args.store is not None:
        feats, recipe = load_store_features(args.store, args.layer, args.timestep, args.granularity,
                                            args.tokens_per_image, args.view_ids, args.seed, args.token_sampling)
    else:
        feats, recipe = load_tensor_features(args.features, args.features_key)
    eval_feats = None
    if args.eval_store is not None:
        eval_feats, _ = load_store_features(args.eval_store, args.layer, args.timestep, args.granularity,
                                            args.tokens_per_image, [0], args.seed)
    cfg = _config(args)
    if acc.is_main_process:
        print(f"k-SAE on {tuple(feats.shape)} features ({args.granularity}), {acc.num_processes} process(es), "
              f"{cfg.total_steps} steps of {cfg.batch_size}", file=sys.stderr)
    result = train_sae(feats, cfg, out_dir=args.out, recipe=recipe, granularity=args.granularity,
                       accelerator=acc, resume=not args.no_resume, overwrite=args.overwrite,
                       progress=not args.no_progress, eval_features=eval_feats)
    return result.eval


def _open_dataset(args: argparse.Namespace, acc: Any) -> Any:
    """The main process builds the datasets cache first, the others then reuse it (the barrier is passed on errors too)."""
    from revelio_hub.data import open_image_dataset

    if acc.is_main_process:
        try:
            source = open_image_dataset(args.dataset, split=args.split)
        finally:
            acc.wait_for_everyone()
    else:
        acc.wait_for_everyone()
        source = open_image_dataset(args.dataset, split=args.split)
    return source.limit(args.max_images)


def _train_streaming(args: argparse.Namespace, acc: Any) -> dict:
    """--backbone: every (layer, t) SAE from one backbone pass per batch, no store."""
    import torch

    from revelio_hub.backbones import load_backbone
    from revelio_hub.sae.streaming import train_sae_stream
    from revelio_hub.training_recipes import get_recipe

    source = _open_dataset(args, acc)
    extraction = get_recipe(args.recipe).extraction
    backbone = load_backbone(args.backbone, device=acc.device, dtype=getattr(torch, args.dtype or extraction.dtype),
                             revision=args.revision, image_size=args.image_size, resize=extraction.resize)
    cfg = _config(args)
    if acc.is_main_process:
        print(f"k-SAEs on {len(args.layers)} layer(s) x {len(args.timesteps)} timestep(s) streamed from "
              f"{backbone.name} over {len(source)} images, {acc.num_processes} process(es), "
              f"{cfg.total_steps} steps of {cfg.batch_size}", file=sys.stderr)
    results = train_sae_stream(backbone, source, args.out, args.layers, args.timesteps, cfg, accelerator=acc,
                               noise_seed=args.noise_seed, ensemble=args.ensemble,
                               extract_batch_size=args.extract_batch_size, num_workers=args.num_workers,
                               granularity=args.granularity, tokens_per_image=args.tokens_per_image,
                               token_sampling=args.token_sampling, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress)
    return {f"{layer}/t{t}": r.eval for (layer, t), r in results.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from revelio_hub.distributed import finish, make_accelerator

    acc = make_accelerator(cpu=args.cpu)
    try:
        if args.no_resume and not args.overwrite and any(Path(args.out).glob("**/checkpoint")):
            raise ValueError(f"{args.out} has a checkpoint; drop --no-resume to continue it or add --overwrite")
        result = _train_streaming(args, acc) if args.backbone is not None else _train_stored(args, acc)
    except (ValueError, FileNotFoundError) as exc:  # the user's to fix: one line, no traceback
        return error_line("train_ksae.py", exc)
    if acc.is_main_process:
        print(json.dumps(result, indent=2))
    finish(acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
