"""The default recipe's learning rate and warm-up, scaled to the dictionary and the run.

Why: the paper's Adam 4e-4 with 500 warm-up steps was tuned for 83.9M samples
(10,240 steps). A user who shortens the run (the README's ``--steps 2000``, or
1M samples = 122 steps of 8192) then spends most of it warming up at a rate too
small to move the atoms, and gets an underfit SAE. The rule here follows
sparsify's observation that the stable Adam rate falls with the square root of
the dictionary size, ``lr ∝ 1/√(n_latents / 2¹⁴)``, and grows it for short runs
(∝ 1/√steps, capped), with a warm-up of at most a tenth of the run. The
constants were chosen by ``benchmarks/bench_sae_defaults.py`` (synthetic atom
MCC, toy FVU and dead fraction at short and full lengths; ``docs/benchmarks.md``,
"SAE defaults"). The ``paper`` recipe fixes 4e-4 and 500 instead.
"""

from __future__ import annotations

import math

__all__ = ["auto_lr", "auto_warmup", "REFERENCE_LATENTS", "REFERENCE_STEPS", "BASE_LR", "MAX_LR_GAIN",
           "WARMUP_SHARE", "MAX_WARMUP"]

#: lr = BASE_LR at REFERENCE_LATENTS latents and ≥ REFERENCE_STEPS steps
BASE_LR = 4e-4
REFERENCE_LATENTS = 2**14
REFERENCE_STEPS = 10_000
#: short runs get at most this many times the long-run rate
MAX_LR_GAIN = 8.0
WARMUP_SHARE = 0.1
MAX_WARMUP = 500


def auto_lr(n_latents: int, total_steps: int) -> float:
    """Adam's rate for ``n_latents`` latents trained ``total_steps`` steps (see the module doc)."""
    if n_latents < 1 or total_steps < 1:
        raise ValueError(f"n_latents and total_steps must be positive, got {n_latents}, {total_steps}")
    width = math.sqrt(REFERENCE_LATENTS / n_latents)
    length = min(MAX_LR_GAIN, max(1.0, math.sqrt(REFERENCE_STEPS / total_steps)))
    return BASE_LR * width * length


def auto_warmup(total_steps: int) -> int:
    """Warm-up steps: a tenth of the run, at most the paper's 500."""
    return min(MAX_WARMUP, int(WARMUP_SHARE * total_steps))
