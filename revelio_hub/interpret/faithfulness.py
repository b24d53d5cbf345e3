"""Is an ordering of neurons faithful? Deletion curves and AOPC.

Remove an image's neurons one after another in a given order (through the SAE,
keeping its reconstruction error: :mod:`revelio_hub.interpret.ablation`) and
follow the probability Diff-C gives the originally predicted class. An
ordering that puts the neurons the prediction really rests on first makes the
curve fall fast. The area over the perturbation curve,

    AOPC_K = 1/(K+1) · Σ_{k=0..K} (p_0 − p_k)

(Samek et al., 2017), summarises the first K removals; compare it with random
orderings of the same active neurons. ``benchmarks/bench_attribution.py``
reports it for exact attribution, gradient × activation, activation alone and
random orderings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from revelio_hub.interpret.ablation import NeuronCodes, as_maps

__all__ = ["DeletionCurve", "deletion_curve", "aopc"]


@dataclass
class DeletionCurve:
    """Diff-C's output as neurons are removed cumulatively: entry ``k`` has the first ``k`` removed.

    Attributes:
        target: the class followed (the prediction on the original features unless given).
        probs: ``K+1`` probabilities of ``target`` (``probs[0]``: nothing removed).
        predictions: ``K+1`` top classes.
        order: the neuron ids, in removal order (only those active in the image).
    """

    target: int
    probs: torch.Tensor
    predictions: torch.Tensor
    order: list[int]

    def aopc(self, k: int) -> float:
        """Area over the curve for the first ``k`` removals (fewer if fewer neurons are active)."""
        return aopc(self.probs, k)

    def flip(self) -> Optional[int]:
        """How many removals it takes to change the top class (``None``: it never changes)."""
        changed = torch.nonzero(self.predictions != self.predictions[0]).flatten()
        return int(changed[0]) if changed.numel() else None


def aopc(probs: torch.Tensor, k: int) -> float:
    """``1/(k+1) · Σ_{i=0..k} (p_0 − p_i)``; a curve shorter than ``k+1`` is held at its last value."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    probs = probs.reshape(-1).double()
    if probs.numel() < k + 1:
        probs = torch.cat([probs, probs[-1:].expand(k + 1 - probs.numel())])
    return float((probs[0] - probs[: k + 1]).mean())


@torch.no_grad()
def deletion_curve(
    diffc: Any,
    codes: NeuronCodes,
    feature_map: torch.Tensor,
    order: Sequence[int],
    *,
    target: Optional[int] = None,
    max_k: Optional[int] = None,
    batch_size: int = 256,
) -> DeletionCurve:
    """Remove ``order``'s neurons cumulatively from one ``C×H×W`` map and run Diff-C on every step in one batch.

    ``codes`` come from :func:`~revelio_hub.interpret.ablation.encode_codes` on the
    same map; neurons of ``order`` that are not active are skipped. ``max_k``
    caps the number of removals.
    """
    x = as_maps(feature_map)[0].to(diffc.fc.weight)
    cols = codes.columns(order)
    keep = cols >= 0
    cols = cols[keep]
    ids = torch.as_tensor(list(order), dtype=torch.long).reshape(-1)[keep].tolist()
    if max_k is not None:
        cols, ids = cols[:max_k], ids[:max_k]
    steps = x[None].expand(cols.numel() + 1, *x.shape).clone()
    if cols.numel():
        steps[1:] -= codes.deltas(cols.to(codes.amap.device)).to(x).cumsum(0)
    was = diffc.training
    if was:
        diffc.eval()
    try:
        logits = torch.cat([diffc(steps[i : i + batch_size]).float() for i in range(0, steps.shape[0], batch_size)])
    finally:
        if was:
            diffc.train()
    t = int(logits[0].argmax()) if target is None else int(target)
    return DeletionCurve(t, torch.softmax(logits, 1)[:, t].cpu(), logits.argmax(1).cpu(), ids)
