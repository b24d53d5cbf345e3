"""Removing SAE neurons from diffusion features while keeping everything else.

The k-SAE writes a feature vector as ``x = x̂(z) + e``: the reconstruction
``x̂(z) = (Σ_j z_j d_j + b_pre) / s`` (``d_j`` decoder rows, ``s`` the input
scale) plus an error term ``e = x − x̂(z)``. Removing neuron ``j`` means
zeroing ``z_j`` and *keeping* ``e``::

    x' = x̂(z without j) + e = x − z_j · d_j / s

so with nothing removed a downstream model sees ``x`` itself, bit for bit, and
the SAE's reconstruction error never passes for a neuron's effect.

How ``z_j`` covers a feature map depends on what the SAE was trained on:

* **token** SAEs encode every spatial position; ``z_j`` is a map and the
  neuron is removed at every position where it fires.
* **pooled** SAEs encode the spatial mean ``m`` of the map; ``z_j`` is one
  number ``a_j`` and its contribution ``a_j · d_j / s`` is subtracted from
  every position. The mean of the result is ``m − a_j d_j / s``: the neuron is
  removed exactly from what the SAE sees, and the spatial pattern of the rest
  of the map is left as it was.

:class:`NeuronCodes` holds one image's active neurons in this form;
:func:`remove_neurons` builds ablated maps from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["NeuronCodes", "encode_codes", "as_maps", "remove_neurons"]


@dataclass
class NeuronCodes:
    """The active neurons of one image and where they fire.

    Attributes:
        neurons: ids of the neurons active anywhere in the image (ascending).
        amap: ``Q × len(neurons)`` activations: ``Q = H·W`` positions for a
            token SAE (row ``h·W + w``), ``Q = 1`` (the spatial mean) for a pooled SAE.
        directions: ``len(neurons) × C`` decoder rows divided by the input scale:
            removing neuron ``neurons[i]`` subtracts ``amap[:, i] ⊗ directions[i]``.
        activations: image-level activation of each neuron, as
            ``KSparseAutoencoder.image_activations`` defines it (max over
            positions for a token SAE, the code of the mean for a pooled one).
        height, width: the feature map's spatial size.
    """

    neurons: torch.Tensor
    amap: torch.Tensor
    directions: torch.Tensor
    activations: torch.Tensor
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.neurons.numel())

    def columns(self, neuron_ids: Sequence[int]) -> torch.Tensor:
        """Column index in :attr:`amap` of each neuron id (``-1`` for neurons that are not active)."""
        ids = torch.as_tensor(list(neuron_ids), dtype=torch.long).reshape(-1)
        if not len(self) or not ids.numel():
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self.neurons, ids).clamp_max(len(self) - 1)
        return torch.where(self.neurons[pos] == ids, pos, torch.full_like(pos, -1))

    def deltas(self, columns: torch.Tensor) -> torch.Tensor:
        """What removing each neuron (by column) subtracts from the map: ``len(columns) × C × H' × W'``.

        ``H' × W'`` is ``H × W`` for a token SAE and ``1 × 1`` (broadcast over
        the map) for a pooled SAE.
        """
        columns = columns.reshape(-1)
        amap = self.amap[:, columns]  # Q×S
        delta = amap.t()[:, :, None] * self.directions[columns][:, None, :]  # S×Q×C
        q = self.amap.shape[0]
        h, w = (self.height, self.width) if q > 1 else (1, 1)
        return delta.reshape(columns.numel(), h, w, -1).permute(0, 3, 1, 2)


def as_maps(features: torch.Tensor) -> torch.Tensor:
    """Features as float ``N×C×H×W`` maps (``C×H×W`` gets a batch axis, ``N×C`` vectors become 1×1 maps)."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"Features must be a torch.Tensor, got {type(features).__name__}.")
    if features.dim() == 3:
        features = features.unsqueeze(0)
    elif features.dim() == 2:
        features = features[:, :, None, None]
    if features.dim() != 4:
        raise ValueError(f"Features must be N×C×H×W maps (or one C×H×W map), got shape {tuple(features.shape)}.")
    if not features.is_floating_point():
        raise ValueError(f"Features must be floating point, got dtype {features.dtype}.")
    return features


@torch.no_grad()
def encode_codes(sae: Any, maps: torch.Tensor) -> list[NeuronCodes]:
    """Encode ``N×C×H×W`` maps with ``sae`` (respecting its granularity): one :class:`NeuronCodes` per image."""
    maps = as_maps(maps)
    n, _, h, w = maps.shape
    param = sae.W_dec
    if sae.granularity == "token":
        vals, idx = sae.encode(maps)  # N×H×W×k
        vals, idx = vals.reshape(n, h * w, -1), idx.reshape(n, h * w, -1)
    else:
        vals, idx = sae.encode(maps.to(param.dtype).mean(dim=(2, 3)))  # N×k: the mean is what it was trained on
        vals, idx = vals[:, None], idx[:, None]
    out = []
    for i in range(n):
        v, j = vals[i].float(), idx[i]
        active = v != 0  # with ReLU, TopK may keep zeros: those neurons are not active
        neurons, inverse = torch.unique(j[active], return_inverse=True)
        amap = v.new_zeros(v.shape[0], neurons.numel())
        rows = torch.nonzero(active)[:, 0]
        amap[rows, inverse] = v[active]  # TopK indices are distinct per position: no collisions
        directions = (param[neurons].float() / float(sae.scale)).to(maps.device)
        activations = amap.amax(0).clamp_min(0) if amap.shape[0] > 1 else amap[0]
        out.append(NeuronCodes(neurons.cpu(), amap, directions, activations, h, w))
    return out


def remove_neurons(codes: NeuronCodes, feature_map: torch.Tensor, neuron_sets: Sequence[Sequence[int]]) -> torch.Tensor:
    """One ablated copy of ``feature_map`` (``C×H×W``) per set of neuron ids: ``len(neuron_sets)×C×H×W``.

    ``codes`` must come from :func:`encode_codes` on the same map. Neurons that
    are not active in the image are already absent: removing them changes nothing.
    """
    feature_map = as_maps(feature_map)[0]
    out = feature_map.new_empty(len(neuron_sets), *feature_map.shape)
    for i, ids in enumerate(neuron_sets):
        cols = codes.columns(ids)
        cols = cols[cols >= 0]
        out[i] = feature_map
        if cols.numel():
            out[i] -= codes.deltas(cols).sum(0).to(feature_map.dtype)
    return out
