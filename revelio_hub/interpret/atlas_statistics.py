"""The streaming statistics an atlas is built from: per-neuron top-N, firing rates, purity, σ_label.

Building streams over image batches: a running per-neuron top-N is merged with
each batch's top-N, so memory is O(n_latents × (N + batch)) and never
O(n_images × n_latents) — 100k images × 80k latents would be 32 GB dense.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from revelio_hub.interpret import metrics
from revelio_hub.interpret.atlas_config import AtlasConfig
from revelio_hub.interpret.neuron_labels import ActivationLog

__all__ = ["TopKAccumulator", "pre_topk_accumulator", "purity_and_entropy", "sigma_labels"]


class TopKAccumulator:
    """Streaming per-neuron statistics over image batches.

    Keeps, for every neuron, the ``top_n`` largest activations seen so far with
    their image ids and labels, the number of images on which it fired and the
    sum (and sum of squares) of its activations when firing. State is stored neuron-minor
    (``top_n × n``) so a batch's ``topk`` over dim 0 merges without transposes.
    Two accumulators (e.g. from two processes) combine with :meth:`merge`.
    """

    def __init__(self, n_latents: int, top_n: int = 20, threshold: float = 0.0, device: Union[str, torch.device] = "cpu"):
        if n_latents < 1:
            raise ValueError(f"n_latents must be ≥ 1, got {n_latents}")
        if top_n < 1:
            raise ValueError(f"top_n must be ≥ 1, got {top_n}")
        self.n_latents = int(n_latents)
        self.top_n = int(top_n)
        self.threshold = float(threshold)
        self.values = torch.full((top_n, n_latents), -math.inf, device=device)
        self.image_ids = torch.full((top_n, n_latents), -1, dtype=torch.long, device=device)
        self.labels = torch.full((top_n, n_latents), -1, dtype=torch.long, device=device)
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.fire_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.fire_sq = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.num_images = 0

    def update(self, acts: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Fold in one batch: ``acts`` B×n image-level activations, ``labels``/``image_ids`` B."""
        if acts.dim() != 2 or acts.shape[1] != self.n_latents:
            raise ValueError(f"activations must be B×{self.n_latents}, got shape {tuple(acts.shape)}")
        b = acts.shape[0]
        if labels.shape != (b,) or image_ids.shape != (b,):
            raise ValueError(
                f"labels and image_ids must have shape ({b},), got {tuple(labels.shape)} and {tuple(image_ids.shape)}"
            )
        if b == 0:
            return
        device = self.values.device
        acts = acts.to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.long)
        image_ids = image_ids.to(device=device, dtype=torch.long)

        fired = acts > self.threshold
        self.fire_count += fired.sum(0)
        firing = torch.where(fired, acts, torch.zeros((), device=device)).double()
        self.fire_sum += firing.sum(0)
        self.fire_sq += firing.pow(2).sum(0)
        self.num_images += b

        k = min(self.top_n, b)
        batch_vals, rows = torch.topk(acts, k, dim=0)  # k×n
        self._merge(batch_vals, image_ids[rows], labels[rows])

    def _merge(self, values: torch.Tensor, image_ids: torch.Tensor, labels: torch.Tensor) -> None:
        all_vals = torch.cat([self.values, values], 0)
        keep_vals, pos = torch.topk(all_vals, self.top_n, dim=0)
        self.values = keep_vals
        self.image_ids = torch.cat([self.image_ids, image_ids], 0).gather(0, pos)
        self.labels = torch.cat([self.labels, labels], 0).gather(0, pos)

    def merge(self, other: "TopKAccumulator") -> None:
        """Combine with an accumulator that saw a disjoint set of images."""
        if (other.n_latents, other.top_n) != (self.n_latents, self.top_n):
            raise ValueError("can only merge accumulators with the same n_latents and top_n")
        self._merge(other.values.to(self.values.device), other.image_ids.to(self.values.device),
                    other.labels.to(self.values.device))
        self.fire_count += other.fire_count.to(self.fire_count.device)
        self.fire_sum += other.fire_sum.to(self.fire_sum.device)
        self.fire_sq += other.fire_sq.to(self.fire_sq.device)
        self.num_images += other.num_images

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the state (for gathering across processes)."""
        return {"values": self.values, "image_ids": self.image_ids, "labels": self.labels,
                "fire_count": self.fire_count, "fire_sum": self.fire_sum, "fire_sq": self.fire_sq,
                "num_images": torch.tensor([self.num_images], device=self.values.device)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], threshold: float = 0.0) -> "TopKAccumulator":
        top_n, n = state["values"].shape
        acc = cls(n, top_n, threshold, device=state["values"].device)
        acc.values, acc.image_ids, acc.labels = state["values"], state["image_ids"], state["labels"]
        acc.fire_count, acc.fire_sum = state["fire_count"], state["fire_sum"]
        if "fire_sq" in state:
            acc.fire_sq = state["fire_sq"]
        acc.num_images = int(state["num_images"].sum())
        return acc

    def result(self) -> dict[str, torch.Tensor]:
        """Per-neuron tensors in atlas layout (n×K), empty slots as id -1 / activation 0.

        A slot is empty when the image in it did not fire (activation ≤
        threshold): a neuron that fired on 3 images lists exactly 3.
        """
        empty = ~(self.values > self.threshold)
        ids = self.image_ids.masked_fill(empty, -1).T.contiguous().cpu()
        vals = self.values.masked_fill(empty, 0.0).T.contiguous().cpu()
        labels = self.labels.masked_fill(empty, -1).T.contiguous().cpu()
        count = self.fire_count.cpu()
        frequency = (count.double() / max(self.num_images, 1)).float()
        mean_act = (self.fire_sum.cpu() / count.clamp_min(1).double()).float()
        # std over *all* images (silent ones count as 0): the scale of a z-score of one image's activation
        n_img = max(self.num_images, 1)
        mean_all = self.fire_sum.cpu() / n_img
        std_all = (self.fire_sq.cpu() / n_img - mean_all.pow(2)).clamp_min(0).sqrt().float()
        return {"top_image_ids": ids, "top_activations": vals.float(), "top_labels": labels,
                "frequency": frequency, "mean_activation": mean_act, "activation_std": std_all, "fire_count": count}

def pre_topk_accumulator(n_latents: int, config: AtlasConfig, device: Union[str, torch.device]) -> TopKAccumulator:
    """The accumulator of the paper's σ_label: ReLU(pre-TopK) activations, top ``purity_top`` images per neuron."""
    return TopKAccumulator(n_latents, config.purity_top, 0.0, device=device)

def purity_and_entropy(top_labels: torch.Tensor, num_classes: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Purity (std of class ids) and entropy over each neuron's filled top slots (at most ``top``).

    Uses :func:`revelio_hub.interpret.metrics.label_purity` / ``label_entropy`` on groups of
    neurons with the same number of labelled top images, so a neuron that
    fired on only 4 images is judged on those 4 (NaN when it has none).
    """
    labels = top_labels[:, :top]
    n = labels.shape[0]
    purity = torch.full((n,), math.nan, dtype=torch.float32)
    entropy = torch.full((n,), math.nan, dtype=torch.float32)
    filled = labels >= 0
    # Slots fill from the front (sorted by activation), except when labels are unknown (-1) mid-list.
    counts = filled.sum(1)
    contiguous = (filled == (torch.arange(labels.shape[1]) < counts.unsqueeze(1))).all(1)
    for m in range(1, labels.shape[1] + 1):
        rows = torch.nonzero((counts == m) & contiguous).flatten()
        if rows.numel():
            sub = labels[rows, :m]
            purity[rows] = metrics.label_purity(sub, top=m).float()
            entropy[rows] = metrics.label_entropy(sub, num_classes=max(num_classes, 1), top=m).float()
    for row in torch.nonzero(~contiguous & (counts > 0)).flatten().tolist():
        sub = labels[row][filled[row]].unsqueeze(0)
        purity[row] = metrics.label_purity(sub, top=sub.shape[1]).float()
        entropy[row] = metrics.label_entropy(sub, num_classes=max(num_classes, 1), top=sub.shape[1]).float()
    return purity, entropy


def sigma_labels(res: dict[str, torch.Tensor], pre_topk: Optional[TopKAccumulator], log: Optional[ActivationLog],
                  columns: Mapping[str, Sequence[str]], config: AtlasConfig,
                  stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """σ_label (the paper's: on ``pre_topk`` when given) and its value for shuffled labels; the TopK one beside.

    Also stores the pre-TopK top image ids, frequency and mean activation in
    ``stats`` (``pre_topk_*``), so the number can be recomputed from the atlas.
    """
    if not columns:
        return {"sigma_label": None, "sigma_label_neurons": 0, "sigma_label_shuffled": None}
    first = next(iter(columns))
    kw = dict(n_neurons=config.summary_neurons, top=config.purity_top, min_images=config.sigma_min_images)

    def both(r: dict[str, torch.Tensor]) -> tuple[Optional[float], int, Optional[float]]:
        sigma, used = metrics.sigma_label(r["top_labels"], r["fire_count"], r["mean_activation"], **kw)
        shuffled = None
        if log is not None and log.num_images and sigma is not None:
            ids = r["top_image_ids"]
            size = max(int(ids.max()), int(log.all_image_ids().max())) + 1
            shuffled = metrics.shuffled_sigma_label(ids, log.labels_by_image_id(first, size), r["fire_count"],
                                              r["mean_activation"], **kw)
        return sigma, used, shuffled

    topk = both(res)
    if pre_topk is None:
        return {"sigma_label": topk[0], "sigma_label_neurons": topk[1], "sigma_label_shuffled": topk[2]}
    pre = pre_topk.result()
    stats["pre_topk_top_image_ids"] = pre["top_image_ids"]
    stats["pre_topk_frequency"] = pre["frequency"]
    stats["pre_topk_mean_activation"] = pre["mean_activation"]
    paper = both(pre)
    return {"sigma_label": paper[0], "sigma_label_neurons": paper[1], "sigma_label_shuffled": paper[2],
            "topk_sigma_label": topk[0], "topk_sigma_label_neurons": topk[1], "topk_sigma_label_shuffled": topk[2]}
