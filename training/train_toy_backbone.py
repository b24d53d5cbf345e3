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
from dataclasses import dataclass, field
from typing import Optional

import torch

from revelio_hub.cli import HelpFormatter, add_options, from_args, option
from revelio_hub.toy.backbone_training import ToyBackboneConfig, train_toy_backbone


@dataclass(kw_only=True)
class ToyBackboneRun:
    """Where the backbone goes and how this process runs; the model and schedule are ToyBackboneConfig's."""

    out: str = field(metadata=option("output folder (pixel-backbone layout, checkpoints inside)"))
    threads: Optional[int] = field(default=None, metadata=option("torch CPU threads (default: torch's choice)"))
    no_resume: bool = field(default=False, metadata=option("ignore existing checkpoints"))
    no_progress: bool = field(default=False, metadata=option("hide the progress bar"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_options(p, ToyBackboneRun)
    add_options(p.add_argument_group("the model and its training (ToyBackboneConfig)"), ToyBackboneConfig)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = from_args(ToyBackboneConfig, a)
    out = train_toy_backbone(cfg, a.out, resume=not a.no_resume, progress=not a.no_progress)
    print(f"saved toy backbone to {out} (sample grid: {out / 'sample_grid.png'})")


if __name__ == "__main__":
    main()
