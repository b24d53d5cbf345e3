"""What separates two images? The SAE neurons whose activations differ most between them.

Researchers put two images side by side (a cat and a dog, the same dog in two
poses) and ask which neurons tell them apart. Both images are encoded with the
same k-SAE and their image-level activations (``KSparseAutoencoder.
image_activations``: max over positions for a token SAE, the code of the mean
for a pooled one) are subtracted; the neurons with the largest differences in
each direction are reported with their atlas summaries.

Raw activation differences are used, not differences relative to a neuron's
typical activation: a neuron that is strong in one image and silent in the
other is what separates them, whatever its usual scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from revelio_hub.interpret.ablation import as_maps

__all__ = ["NeuronDifference", "Comparison", "compare"]


@dataclass(frozen=True)
class NeuronDifference:
    """One neuron's activation in the two images; ``difference = first − second``."""

    neuron: int
    first: float
    second: float
    difference: float
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "neuron": self.neuron,
            "first": round(self.first, 6),
            "second": round(self.second, 6),
            "difference": round(self.difference, 6),
            "summary": self.summary,
        }


@dataclass
class Comparison:
    """Neurons more active in the first image (``first``, difference > 0, largest first) and in the second
    (``second``, difference < 0, most negative first)."""

    first: list[NeuronDifference]
    second: list[NeuronDifference]
    shared: int
    layer: Optional[str] = None
    timestep: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "more_in_first": [d.to_dict() for d in self.first],
            "more_in_second": [d.to_dict() for d in self.second],
            "shared_active_neurons": self.shared,
        }


@torch.no_grad()
def compare(sae: Any, first: torch.Tensor, second: torch.Tensor, *, top: int = 10, atlas: Any = None,
            layer: Optional[str] = None, timestep: Optional[int] = None) -> Comparison:
    """Compare two images' features (``1×C×H×W`` or ``C×H×W`` maps, or ``C`` / ``1×C`` pooled vectors).

    Returns up to ``top`` neurons in each direction; ``shared`` counts the
    neurons active in both images.
    """
    if isinstance(top, bool) or int(top) != top or top < 1:
        raise ValueError(f"top must be a whole number ≥ 1, got {top!r}.")

    def acts(x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() in (1, 2):
            x = x.reshape(1, -1)
            if x.shape[1] != sae.d_in:
                raise ValueError(f"This SAE reads {sae.d_in}-channel features, got {x.shape[1]}.")
            return sae.image_activations(x)[0].float().cpu()
        x = as_maps(x)
        if x.shape[0] != 1:
            raise ValueError(f"compare takes one image per side, got a batch of {x.shape[0]}.")
        return sae.image_activations(x)[0].float().cpu()

    a, b = acts(first), acts(second)
    diff = a - b
    shared = int(((a > 0) & (b > 0)).sum())

    def side(sign: float) -> list[NeuronDifference]:
        scores = sign * diff
        k = min(int(top), int((scores > 0).sum()))
        ids = torch.topk(scores, k).indices.tolist() if k else []
        return [
            NeuronDifference(int(j), float(a[j]), float(b[j]), float(diff[j]),  # as on the image firing it more
                             str(atlas.summary_on_image(int(j), float(max(a[j], b[j])))) if atlas is not None else "")
            for j in ids
        ]

    return Comparison(side(1.0), side(-1.0), shared, layer, timestep)
