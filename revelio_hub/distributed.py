"""One place for how our scripts start and end ``accelerate`` runs.

Two details every script needs and none should repeat:

* ``accelerate`` forms a CPU (gloo) process group only when told to use the CPU;
  under ``torchrun`` (or ``accelerate launch --multi_gpu``) on a machine without
  CUDA it would otherwise start N independent single-process runs.
* A rank that exits while others still hold the process group can abort in the
  C++ teardown ("terminate called without an active exception"); ending with a
  barrier and ``end_training()`` (which destroys the group) on every rank avoids it.
"""

from __future__ import annotations

import os
from typing import Any


def wants_cpu(requested: bool = False) -> bool:
    """CPU when asked (flag or ``ACCELERATE_USE_CPU``), or when launched multi-process without CUDA."""
    import torch

    if requested or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.cuda.is_available()


def make_accelerator(cpu: bool = False, **kwargs: Any):
    """An ``accelerate.Accelerator`` that forms a real process group on CPU-only machines too."""
    from accelerate import Accelerator

    return Accelerator(cpu=wants_cpu(cpu), **kwargs)


def finish(accelerator: Any) -> None:
    """Wait for every rank, then tear the process group down cleanly (call on all ranks)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    accelerator.end_training()
