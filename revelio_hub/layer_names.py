"""One spelling per layer: the paper's names, with diffusers' module names accepted as aliases.

Releases, feature stores and model configs record layers by their canonical
names (``bottleneck``, ``up_ft1``, ``down_ft0``, DiT ``block3``), which is what
the paper writes. People who read diffusers code know the same blocks as
``mid_block``, ``up_blocks[1]`` or ``up_blocks.1``, ``transformer_blocks.3``;
the README presents them as the same layers, so every place that parses a
layer name maps those spellings to the canonical one first (and says the
canonical name back in what it prints). Pure string work: no torch import, so
the lightest modules (command-line parsing, the app's argument checks) can use it.
"""

from __future__ import annotations

import re

__all__ = ["canonical_layer", "LAYER_ALIASES_HELP"]

#: ``up_blocks.1``, ``up_blocks[1]``, ``down_blocks.0``, ``transformer_blocks[3]`` (diffusers attribute paths).
_INDEXED = re.compile(r"^(up_blocks|down_blocks|transformer_blocks)(?:\.(\d+)|\[(\d+)\])$")
_CANONICAL_PREFIX = {"up_blocks": "up_ft", "down_blocks": "down_ft", "transformer_blocks": "block"}

#: For ``--help`` texts: how the aliases read.
LAYER_ALIASES_HELP = "diffusers names work too: mid_block = bottleneck, up_blocks.1 = up_ft1, transformer_blocks.3 = block3"


def canonical_layer(name: str) -> str:
    """The canonical name of layer ``name``; names that are not diffusers aliases come back unchanged.

    >>> canonical_layer("mid_block"), canonical_layer("up_blocks[1]"), canonical_layer("up_ft1")
    ('bottleneck', 'up_ft1', 'up_ft1')
    """
    if not isinstance(name, str):
        return name
    text = name.strip()
    if text == "mid_block":
        return "bottleneck"
    match = _INDEXED.match(text)
    if match:
        kind, dotted, bracketed = match.groups()
        return f"{_CANONICAL_PREFIX[kind]}{int(dotted if dotted is not None else bracketed)}"
    return name
