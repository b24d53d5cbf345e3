"""Canonical layer names and the shapes of their outputs.

Users name layers the way the paper does (``bottleneck``, ``up_ft1``,
``block3``); this module maps those names to the denoiser's submodules and
computes their output shapes from the config. Reading the outputs out of a pass
(every requested layer in one pass, stopping after the deepest) is
:mod:`.capture`'s job.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn


def unet_layer_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Canonical names of a diffusers ``UNet2DConditionModel``'s blocks, in execution order."""
    modules: dict[str, nn.Module] = {}
    for i, block in enumerate(unet.down_blocks):
        modules[f"down_ft{i}"] = block
    modules["bottleneck"] = unet.mid_block
    for i, block in enumerate(unet.up_blocks):
        modules[f"up_ft{i}"] = block
    return modules


def unet_feature_shapes(config: Mapping[str, Any], latent_size: int) -> dict[str, tuple[int, int, int]]:
    """C×H×W of every canonical UNet layer, from the config alone (no forward pass).

    Every down block but the last halves the resolution, every up block but the
    last doubles it; up block ``i`` outputs ``reversed(block_out_channels)[i]``.
    """
    channels = list(config["block_out_channels"])
    n = len(channels)
    shapes: dict[str, tuple[int, int, int]] = {}
    size = latent_size
    for i, c in enumerate(channels):
        if i < n - 1:
            size = math.ceil(size / 2)
        shapes[f"down_ft{i}"] = (c, size, size)
    shapes["bottleneck"] = (channels[-1], size, size)
    for i, c in enumerate(reversed(channels)):
        if i < n - 1:
            size = size * 2
        shapes[f"up_ft{i}"] = (c, size, size)
    return shapes


def transformer_layer_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """``block{i}`` -> ``transformer_blocks[i]`` of a DiT/PixArt transformer, in execution order."""
    return {f"block{i}": block for i, block in enumerate(transformer.transformer_blocks)}


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B×(h·w)×C patch tokens (row-major, as DiT's patch embedding makes them) -> B×C×h×w."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"Cannot reshape {n} tokens into a {height}×{width} map.")
    return tokens.transpose(1, 2).reshape(b, c, height, width)
