"""Classification metrics of Diff-C: top-k and per-class accuracy.

Defined once, here, next to the trainer, so that the accuracy of ``eval.json``,
the release card and the benchmarks mean the same thing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["topk_accuracy", "per_class_accuracy"]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose true label is among the ``k`` highest logits."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be N×classes, got shape {tuple(logits.shape)}")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels.reshape(-1, 1).to(top.device)).any(1).double().mean())


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Accuracy per class (float64, length ``num_classes``; NaN for classes absent from ``labels``).

    ``predictions`` are class ids (N) or logits (N×classes).
    """
    if predictions.dim() == 2:
        num_classes = num_classes or predictions.shape[1]
        predictions = predictions.argmax(1)
    labels = labels.reshape(-1).long()
    predictions = predictions.reshape(-1).long().to(labels.device)
    if num_classes is None:
        num_classes = int(max(labels.max(), predictions.max())) + 1
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    acc = correct / total
    acc[total == 0] = math.nan
    return acc
