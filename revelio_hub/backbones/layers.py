"""Canonical layer names, capturing block outputs, and stopping the pass early.

Users name layers the way the paper does (``bottleneck``, ``up_ft1``,
``block3``); this module maps those names to the denoiser's submodules and
captures their outputs with forward hooks. Every requested layer is captured in
one forward pass, and the hook of the deepest requested block raises a private
exception that the caller catches, so the rest of the network never runs (for
``bottleneck`` that skips more than half of an SD UNet's work).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn


class _EarlyExit(Exception):
    """Raised from the hook of the deepest requested block to abandon the rest of the pass."""


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


def _first_output(output: Any) -> torch.Tensor:
    """A block's hidden state: down blocks return ``(hidden, residuals)``, others a tensor."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


@contextmanager
def capture(
    modules: Mapping[str, nn.Module], requested: Sequence[str], early_exit: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Hook ``modules[name]`` for each requested name; yield the dict the outputs land in.

    ``modules`` must be in execution order. With ``early_exit`` the deepest
    requested block raises :class:`_EarlyExit` once its output is stored; run
    the model through :func:`run_until_captured` to swallow it.
    """
    order = list(modules)
    deepest = max(requested, key=order.index)
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[name] = _first_output(output)
            if early_exit and name == deepest:
                raise _EarlyExit

        return hook

    try:
        for name in dict.fromkeys(requested):
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(fn: Callable[[], Any]) -> None:
    """Call ``fn`` and swallow the early-exit signal raised by a :func:`capture` hook."""
    try:
        fn()
    except _EarlyExit:
        pass
