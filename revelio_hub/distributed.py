"""One place for how our scripts start and end ``accelerate`` runs.

Two details every script needs and none should repeat:

* ``accelerate`` forms a CPU (gloo) process group only when told to use the CPU;
  under ``torchrun`` (or ``accelerate launch --multi_gpu``) on a machine without
  CUDA it would otherwise start N independent single-process runs.
* A rank that exits while others still hold the process group can abort in the
  C++ teardown ("terminate called without an active exception"); ending with a
  barrier and ``end_training()`` (which destroys the group) on every rank avoids it.
* ``accelerate launch --num_processes N`` (without ``--multi_gpu``) on a machine
  without CUDA silently starts *one* process (it forms CPU groups only through
  MPI). :func:`make_accelerator` notices, from the launcher's command line, and
  stops with the equivalent ``torchrun`` command instead of training N× slower
  than asked.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, Optional, Sequence


def wants_cpu(requested: bool = False) -> bool:
    """CPU when asked (flag or ``ACCELERATE_USE_CPU``), or when launched multi-process without CUDA."""
    import torch

    if requested or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.cuda.is_available()


def requested_processes(launcher_cmdline: Sequence[str]) -> int:
    """Processes asked of an ``accelerate launch`` command line (1 if it is not one or does not say)."""
    args = list(launcher_cmdline)
    if not any(os.path.basename(a).startswith("accelerate") or a.endswith("accelerate/commands/launch.py") for a in args[:3]):
        return 1
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                return 1
    return 1


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:  # not Linux, or no /proc: nothing to check
        return []


def check_launch(launcher_cmdline: Optional[Sequence[str]] = None, argv: Optional[Sequence[str]] = None) -> None:
    """Stop with the torchrun command if ``accelerate launch --num_processes N`` started one CPU process.

    Raises ``SystemExit`` (status 2) with a one-paragraph message; does nothing in
    every other case (a real process group, a GPU, a plain ``python`` run).
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or torch.cuda.is_available():
        return
    wanted = requested_processes(_parent_cmdline() if launcher_cmdline is None else launcher_cmdline)
    if wanted <= 1:
        return
    argv = list(sys.argv if argv is None else argv)
    command = shlex.join(["torchrun", "--nproc_per_node", str(wanted), *argv])
    raise SystemExit(
        f"error: `accelerate launch --num_processes {wanted}` started a single process: this machine has no CUDA "
        f"GPU and accelerate forms CPU process groups only through MPI. Run instead:\n  {command}"
    )


def make_accelerator(cpu: bool = False, **kwargs: Any):
    """An ``accelerate.Accelerator`` that forms a real process group on CPU-only machines too.

    Refuses (see :func:`check_launch`) a CPU-only ``accelerate launch --num_processes N``
    that would silently run one process.
    """
    from accelerate import Accelerator

    check_launch()
    return Accelerator(cpu=wants_cpu(cpu), **kwargs)


def finish(accelerator: Any) -> None:
    """Wait for every rank, then tear the process group down cleanly (call on all ranks)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    accelerator.end_training()
