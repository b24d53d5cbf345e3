#!/usr/bin/env python
"""Train the toy pixel-space DDPM on procedural shapes (the embedded default backbone).

Thin CLI over :func:`revelio_hub.toy.backbone_training.train_toy_backbone`; run it
with ``accelerate launch`` or plain ``python``. The output folder opens with
``revelio_hub.load_backbone(folder)``. Interrupted runs resume from the latest
checkpoint in ``<out>/checkpoints``.

Example:
    python training/train_toy_backbone.py --out runs/toy-backbone --steps 2000
"""

from __future__ import annotations

import argparse

from revelio_hub.toy.backbone_training import ToyBackboneConfig, train_toy_backbone


def main(argv=None) -> None:
    d = ToyBackboneConfig()
    from revelio_hub.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (pixel-backbone layout, checkpoints inside)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="training resolution in pixels")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.block_out_channels),
                   help="UNet block widths; attention only in the last (lowest-resolution) block")
    p.add_argument("--layers-per-block", type=int, default=d.layers_per_block, help="resnet layers per UNet block")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables EMA weights")
    p.add_argument("--seed", type=int, default=d.seed, help="model init and noise seed")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the endless stream of training shapes")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints (0: none)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="ancestral DDPM sampling steps for the sample grid")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    cfg = ToyBackboneConfig(
        image_size=a.image_size, block_out_channels=tuple(a.widths), layers_per_block=a.layers_per_block,
        steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, ema_decay=a.ema_decay, seed=a.seed,
        data_seed=a.data_seed, checkpoint_every=a.checkpoint_every, sample_steps=a.sample_steps,
    )
    out = train_toy_backbone(cfg, a.out, resume=not a.no_resume, progress=not a.no_progress)
    print(f"saved toy backbone to {out} (sample grid: {out / 'sample_grid.png'})")


if __name__ == "__main__":
    main()
