"""Interpretation metrics: label purity (σ_label), label entropy, AUROC, rank agreement.

Each metric is defined once, here, so that a number written in a model card and
the one shown in the app mean the same thing. The training metrics live next to
training: reconstruction and dead latents in :mod:`revelio_hub.sae.metrics`,
classification accuracy in :mod:`revelio_hub.diffc.metrics`.
All functions take torch tensors (any device) and return python floats or
CPU/device tensors as documented; none of them mutate inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from revelio_hub.sae.metrics import as_2d

__all__ = [
    "label_purity",
    "mean_label_purity",
    "sigma_label",
    "shuffled_sigma_label",
    "label_entropy",
    "auroc",
    "spearman",
]


# ---------------------------------------------------------------- interpretability


def label_purity(top_labels: torch.Tensor, top: int = 10) -> torch.Tensor:
    """Per-neuron spread of the class ids of its ``top`` images: population std (``ddof=0``).

    ``top_labels`` is n_neurons×K, the class ids of each neuron's top images
    sorted by activation; 0 means all share one class, larger is more mixed.
    This is the atlas' per-neuron "purity" column, kept for old atlases. It is
    **not** the paper's number: :func:`sigma_label` is (sample std, neuron
    selection as the original Revelio code). Class ids are arbitrary integers, so prefer
    :func:`label_entropy` or a value's AUROC to judge one neuron.
    """
    top_labels = as_2d(top_labels, "top_labels")
    if top < 1:
        raise ValueError(f"top must be ≥ 1, got {top}")
    labels = top_labels[:, :top].double()
    return labels.std(dim=1, unbiased=False)


def mean_label_purity(
    top_labels: torch.Tensor, activity: Optional[torch.Tensor] = None, n_neurons: int = 1000, top: int = 10
) -> float:
    """:func:`label_purity` averaged over the ``n_neurons`` neurons ranked first by ``activity``.

    ``activity`` is any per-neuron ranking score (higher first); without it all
    neurons are averaged. For the paper's number use :func:`sigma_label`, which
    ranks by mean activation over the images where a neuron fires and skips
    neurons firing on 10 images or fewer.
    """
    purity = label_purity(top_labels, top)
    if activity is not None:
        if activity.shape[0] != purity.shape[0]:
            raise ValueError(f"activity has {activity.shape[0]} neurons, top_labels has {purity.shape[0]}")
        order = torch.argsort(activity.to(purity.device), descending=True)[:n_neurons]
        purity = purity[order]
    return float(purity.mean())


def sigma_label(top_labels: torch.Tensor, fire_count: torch.Tensor, mean_activation: torch.Tensor,
                n_neurons: int = 1000, top: int = 10, min_images: int = 10) -> tuple[Optional[float], int]:
    """The paper's label-purity formula (σ_label), as the original Revelio code's ``save_feature.py`` computes it.

    Among neurons that fire on more than ``min_images`` images, ranked by their
    mean activation over the images where they fire (highest first), the first
    ``n_neurons``: the mean over them of the **sample** standard deviation
    (``torch.std``, n − 1) of the class ids of their top ``top`` images. Lower
    means more class-specific; the value depends on how classes are numbered,
    so compare it only within one dataset, and next to its value for shuffled
    labels (:func:`shuffled_sigma_label`). Returns ``(sigma_label, neurons used)``,
    ``(None, 0)`` when no neuron qualifies.

    The paper's number needs the paper's activations: ReLU of the SAE's dense
    pre-TopK activations (``KSparseAutoencoder.image_codes``); the atlas feeds
    those. On TopK codes far fewer neurons qualify and the value is not the paper's.

    One deliberate difference: the original multiplies the mean activation of
    ineligible neurons by 0, which only sorts them last; they enter its average
    only when fewer than ``n_neurons`` neurons qualify (their top slots then
    hold zero-activation images). Here they never count.
    """
    eligible = torch.nonzero(fire_count > min_images).flatten()
    if eligible.numel() == 0:
        return None, 0
    order = eligible[torch.argsort(mean_activation[eligible].double(), descending=True, stable=True)][:n_neurons]
    labels = top_labels[order, :top]
    if top < 2 or (labels < 0).any():
        return None, 0  # the original's top-10 are all real, labelled firings
    return float(labels.double().std(dim=1, unbiased=True).mean()), int(order.numel())


def shuffled_sigma_label(top_image_ids: torch.Tensor, labels_by_id: torch.Tensor, fire_count: torch.Tensor,
                         mean_activation: torch.Tensor, n_neurons: int = 1000, top: int = 10,
                         min_images: int = 10, permutations: int = 10, seed: int = 0) -> Optional[float]:
    """:func:`sigma_label` with the class ids permuted across images: the value of "no class structure".

    σ_label alone cannot be read (its scale depends on the number of classes and
    their numbering); beside this baseline it can. ``labels_by_id`` maps image id
    → class id (−1 = unknown, ids that no top list uses); the labels of the
    labelled ids are permuted ``permutations`` times with a seeded generator and
    the mean is returned (``None`` when no neuron qualifies).
    """
    known = torch.nonzero(labels_by_id >= 0).flatten()
    if known.numel() == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(permutations):
        table = labels_by_id.clone()
        table[known] = labels_by_id[known[torch.randperm(known.numel(), generator=g)]]
        ids = top_image_ids[:, :top]
        top_labels = torch.where(ids >= 0, table[ids.clamp_min(0)], torch.full_like(ids, -1))
        value, _ = sigma_label(top_labels, fire_count, mean_activation, n_neurons, top, min_images)
        if value is None:
            return None
        values.append(value)
    return float(sum(values) / len(values))


def label_entropy(top_labels: torch.Tensor, num_classes: Optional[int] = None, top: int = 10) -> torch.Tensor:
    """Per-neuron entropy (bits) of the class distribution of its ``top`` images.

    0 means all top images share one class; log2(min(top, num_classes)) is the
    maximum. Unlike the std purity it does not depend on how classes are numbered.
    """
    top_labels = as_2d(top_labels, "top_labels")[:, :top].long()
    if num_classes is None:
        num_classes = int(top_labels.max()) + 1 if top_labels.numel() else 1
    if top_labels.numel() and (top_labels.min() < 0 or top_labels.max() >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes}), got [{int(top_labels.min())}, {int(top_labels.max())}]")
    counts = torch.zeros(top_labels.shape[0], num_classes, dtype=torch.float64, device=top_labels.device)
    counts.scatter_add_(1, top_labels, torch.ones_like(top_labels, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | float:
    """Area under the ROC curve from ranks (Mann–Whitney U), ties counted as ½.

    ``scores``: N (one scorer) or N×M (M scorers, e.g. every neuron at once);
    ``labels``: N booleans/0-1. Returns a float for 1-D scores, else an M tensor.
    Rank-based, so it is exact (no thresholds) and handles the many exact zeros
    of sparse activations correctly.
    """
    labels = labels.reshape(-1).bool()
    one_d = scores.dim() == 1
    s = as_2d(scores, "scores")
    if s.shape[0] != labels.shape[0]:
        raise ValueError(f"scores have {s.shape[0]} samples, labels have {labels.shape[0]}")
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative label")
    cols = s.t().contiguous().double()  # M×N
    sorted_cols = cols.sort(dim=1).values
    left = torch.searchsorted(sorted_cols, cols, right=False)
    right = torch.searchsorted(sorted_cols, cols, right=True)
    ranks = (left + right + 1).double() / 2  # 1-based average rank
    rank_sum = ranks[:, labels.to(ranks.device)].sum(1)
    result = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(result[0]) if one_d else result


# ---------------------------------------------------------------- rank agreement


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (float64)."""
    x = x.double()
    sorted_x = x.sort().values
    left = torch.searchsorted(sorted_x, x, right=False)
    right = torch.searchsorted(sorted_x, x, right=True)
    return (left + right + 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson correlation of average ranks).

    Used to say how well a cheap score (e.g. a gradient × activation estimate)
    orders items like an expensive one (the exact effect). Returns ``nan`` when
    it is undefined: fewer than two pairs, or one side constant (no ordering to
    agree with).
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs two tensors of equal length, got {a.numel()} and {b.numel()}")
    if a.numel() < 2:
        return float("nan")
    ra, rb = _average_ranks(a.cpu()), _average_ranks(b.cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    if denom == 0:
        return float("nan")
    return float((ra * rb).sum()) / denom
