"""Where in the image a neuron fires: the position of its activation peak, summarised over its top images.

An image's activation of a token-level neuron is its maximum over positions,
so the summary alone loses *where* the neuron fires; the heat map shows it for
one image only. The atlas therefore records, for every top image of every
neuron, the position of that maximum (:func:`peak_positions`), and
:func:`where_label` turns the top images' peaks into a few words: a quadrant
("top-left"), the centre, a half ("top"), or "anywhere" when no region holds
``min_share`` of them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["peak_positions", "where_label", "MIN_SHARE"]

#: Share of a neuron's top images whose peak must lie in one region for the region to be named.
MIN_SHARE = 0.8


def peak_positions(sae: Any, maps: torch.Tensor) -> torch.Tensor:
    """N × n_latents: the flattened position (row · W + column) of each neuron's largest code on each map.

    ``maps`` is N×d×H×W; every position is encoded on its own (a token-level SAE's
    training distribution). Where a neuron never fires on an image the value is
    meaningless (the caller keeps only positions of firing neurons).
    """
    vals, idx = sae.encode(maps)  # N×H×W×k
    n, h, w, k = vals.shape
    dense = vals.new_zeros(n, h * w, sae.n_latents)
    dense.scatter_(-1, idx.reshape(n, h * w, k), vals.reshape(n, h * w, k))
    return dense.argmax(1)


def _region(ys: torch.Tensor, xs: torch.Tensor, min_count: float) -> Optional[str]:
    top, left = ys < 0.5, xs < 0.5
    quadrants = {"top-left": top & left, "top-right": top & ~left, "bottom-left": ~top & left,
                 "bottom-right": ~top & ~left}
    centre = {"centre": (ys - 0.5).abs().le(0.25) & (xs - 0.5).abs().le(0.25)}
    halves = {"top": top, "bottom": ~top, "left": left, "right": ~left}
    for group in (quadrants, centre, halves):
        name, mask = max(group.items(), key=lambda kv: int(kv[1].sum()))
        if int(mask.sum()) >= min_count:
            return name
    return None


def where_label(positions: Sequence[int], grid: Sequence[int], min_share: float = MIN_SHARE,
                min_images: int = 5) -> Optional[str]:
    """Where the peaks of a neuron's top images lie: ``"top-left"``, ``"centre"``, ``"top"``, … or ``"anywhere"``.

    ``positions`` are flattened peaks on an H×W ``grid`` (-1 = empty slot,
    skipped). Regions are tried from the most specific: quadrants, the centre
    (the middle half in both directions), halves. ``None`` when fewer than
    ``min_images`` positions are known.
    """
    h, w = int(grid[0]), int(grid[1])
    pos = torch.as_tensor([int(p) for p in positions if 0 <= int(p) < h * w], dtype=torch.long)
    if pos.numel() < min_images:
        return None
    ys = (torch.div(pos, w, rounding_mode="floor").double() + 0.5) / h
    xs = ((pos % w).double() + 0.5) / w
    return _region(ys, xs, min_share * pos.numel()) or "anywhere"
