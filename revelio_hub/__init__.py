"""Revelio Hub: interpret and leverage the semantic content of diffusion models.

The public API is imported lazily so that ``import revelio_hub`` stays fast
(the app's cold start and the CLIs' ``--help`` should not pay for diffusers).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureRecipe": "revelio_hub.recipe",
    "load_backbone": "revelio_hub.backbones",
    "Backbone": "revelio_hub.backbones",
    "FeatureStore": "revelio_hub.features",
    "KSparseAutoencoder": "revelio_hub.sae.model",
    "DiffC": "revelio_hub.diffc.model",
    "NeuronAtlas": "revelio_hub.interpret.atlas_model",
    "Release": "revelio_hub.release",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'revelio_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
