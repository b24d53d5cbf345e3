"""Concept map: where in the network (layer × timestep) does one neuron best detect a concept?

A concept is one value of one of the atlas' label columns ("stripes" in
``background``, "magenta" in ``color``, a breed). Each release entry's atlas
keeps, per label value, every neuron's AUROC at telling images with that value
from the rest (``NeuronAtlas.value_auroc``) and ranks its live neurons by it
(``NeuronAtlas.search``). The map holds, for each (layer, timestep), the best
neuron's AUROC and its id: a researcher sees at a
glance which block and noise level carry the concept, and opens that neuron.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

__all__ = ["ConceptMap", "concept_map", "label_values"]

EntryKey = tuple[str, int]


def label_values(atlases: Mapping[EntryKey, Any]) -> dict[str, list[str]]:
    """Every label column of the atlases and its values (union over entries, first-seen order)."""
    out: dict[str, list[str]] = {}
    for atlas in atlases.values():
        if atlas is None:
            continue
        for column, values in dict(atlas.label_columns).items():
            seen = out.setdefault(str(column), [])
            seen.extend(str(v) for v in values if str(v) not in seen)
    return out


@dataclass
class ConceptMap:
    """Best single-neuron AUROC for one label value at every (layer, timestep).

    Attributes:
        value, column: the concept.
        layers, timesteps: the grid's rows and columns (release order; timesteps ascending).
        auroc: ``len(layers) × len(timesteps)``; ``nan`` where the release has no
            entry, no atlas, or the atlas lacks the column.
        neurons: the best neuron of each cell (``-1`` where ``auroc`` is ``nan``).
    """

    value: str
    column: str
    layers: list[str]
    timesteps: list[int]
    auroc: torch.Tensor
    neurons: torch.Tensor

    def cell(self, layer: str, timestep: int) -> tuple[int, float]:
        """(best neuron, its AUROC) at one entry; ``ValueError`` for a cell outside the grid."""
        if layer not in self.layers or int(timestep) not in self.timesteps:
            raise ValueError(f"({layer}, {timestep}) is not on this map; layers {self.layers}, timesteps {self.timesteps}.")
        i, j = self.layers.index(layer), self.timesteps.index(int(timestep))
        return int(self.neurons[i, j]), float(self.auroc[i, j])

    def best(self) -> Optional[tuple[str, int, int, float]]:
        """(layer, timestep, neuron, AUROC) of the best cell, or ``None`` if the map is empty."""
        if torch.isnan(self.auroc).all():
            return None
        flat = int(torch.nan_to_num(self.auroc, nan=-1.0).argmax())
        i, j = divmod(flat, len(self.timesteps))
        return self.layers[i], self.timesteps[j], int(self.neurons[i, j]), float(self.auroc[i, j])

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "column": self.column,
            "layers": list(self.layers),
            "timesteps": list(self.timesteps),
            "auroc": [[None if math.isnan(v) else round(v, 6) for v in row] for row in self.auroc.tolist()],
            "neurons": self.neurons.tolist(),
        }


def _resolve_column(columns: dict[str, list[str]], value: str, column: Optional[str]) -> str:
    if not columns:
        raise ValueError("This release's atlases record no label columns; there is nothing to map.")
    if column:
        if column not in columns:
            raise ValueError(f"Unknown label column {column!r}; the atlases have: {', '.join(columns)}.")
        if value not in columns[column]:
            raise ValueError(f"{value!r} is not a value of {column!r}; its values are: {', '.join(columns[column])}.")
        return column
    hits = [c for c, values in columns.items() if value in values]
    if not hits:
        known = "; ".join(f"{c}: {', '.join(v[:12])}{' …' if len(v) > 12 else ''}" for c, v in columns.items())
        raise ValueError(f"No label column has the value {value!r}. Known values — {known}.")
    if len(hits) > 1:
        raise ValueError(f"{value!r} is a value of several columns ({', '.join(hits)}); pick one.")
    return hits[0]


def concept_map(atlases: Mapping[EntryKey, Any], value: str, column: Optional[str] = None) -> ConceptMap:
    """The concept map of ``value`` over a release's entries.

    Args:
        atlases: ``{(layer, timestep): NeuronAtlas or None}`` for the release's
            entries, in release order (``None`` for entries without an atlas).
        value: the label value, e.g. ``"stripes"``.
        column: its label column; found automatically when only one column has the value.
    """
    value = str(value)
    column = _resolve_column(label_values(atlases), value, column)
    layers: list[str] = []
    for layer, _ in atlases:
        if layer not in layers:
            layers.append(layer)
    timesteps = sorted({int(t) for _, t in atlases})
    auroc = torch.full((len(layers), len(timesteps)), float("nan"))
    neurons = torch.full((len(layers), len(timesteps)), -1, dtype=torch.long)
    for (layer, t), atlas in atlases.items():
        if atlas is None:
            continue
        values = [str(v) for v in dict(atlas.label_columns).get(column, [])]
        if value not in values:
            continue
        hits = atlas.search(value, column=column, limit=1)  # best live neuron by AUROC (dead and undefined left out)
        if not hits:
            continue
        best = int(hits[0]["neuron"])
        score = float(torch.as_tensor(atlas.value_auroc(column))[best, values.index(value)])  # unrounded
        i, j = layers.index(layer), timesteps.index(int(t))
        auroc[i, j], neurons[i, j] = score, best
    return ConceptMap(value, column, layers, timesteps, auroc, neurons)
