"""The app's concept map: for one label value, the best single neuron's AUROC at every layer × timestep.

Plain functions over an :class:`~revelio_hub.app.state.AppState`, like
:mod:`revelio_hub.app.attribution_view`: the Concept map tab and tests call
them. :func:`concept_choices` lists the label values of a release's atlases,
:func:`concept_map` builds the map (:func:`revelio_hub.interpret.concept_map`),
:func:`concept_table` colours it for the page and :func:`concept_cell` turns a
clicked cell back into (layer, timestep, neuron).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from revelio_hub.app.state import AppState, LoadedRelease

if TYPE_CHECKING:
    from revelio_hub.interpret import ConceptMap


def _atlases(rel: LoadedRelease) -> dict[tuple[str, int], Any]:
    """Every entry's atlas, or ``None`` where it has none or it predates per-label statistics."""
    out = {}
    for layer, t in rel.entries:
        atlas = rel.entry(layer, t).atlas
        out[(layer, t)] = atlas if atlas is not None and hasattr(atlas, "label_columns") else None
    return out


def concept_choices(state: AppState, release: Optional[str] = "") -> list[tuple[str, str]]:
    """Dropdown choices ``("value · column", "column=value")`` over every label column of the release's atlases."""
    from revelio_hub.interpret import label_values

    rel = state.get_release(release)
    return [(f"{v} · {c}", f"{c}={v}") for c, values in label_values(_atlases(rel)).items() for v in values]


def concept_map(state: AppState, release: Optional[str], choice: str) -> "ConceptMap":
    """The concept map of a ``"column=value"`` choice (or a bare value, if only one column has it)."""
    from revelio_hub.interpret import concept_map as build

    if not isinstance(choice, str) or not choice.strip():
        raise ValueError("Pick a label value.")
    column, _, value = choice.partition("=") if "=" in choice else ("", "", choice)
    rel = state.get_release(release)
    return build(_atlases(rel), value.strip(), column.strip() or None)


def concept_table(cmap: "ConceptMap") -> tuple[Any, list[str]]:
    """A colour-scaled table (pandas Styler) of the map: rows = layers, columns = timesteps, cells "AUROC · #neuron"."""
    import math

    import pandas as pd
    from matplotlib import colormaps

    headers = ["layer"] + [f"t={t}" for t in cmap.timesteps]
    rows = []
    for i, layer in enumerate(cmap.layers):
        row = [layer]
        for j in range(len(cmap.timesteps)):
            score, neuron = float(cmap.auroc[i, j]), int(cmap.neurons[i, j])
            row.append("—" if math.isnan(score) else f"{score:.3f} · #{neuron}")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=headers)
    cmap_fn = colormaps["viridis"]

    def colour(col: Any) -> list[str]:
        if col.name == "layer":
            return [""] * len(col)
        j = headers.index(col.name) - 1
        styles = []
        for i in range(len(col)):
            score = float(cmap.auroc[i, j])
            if math.isnan(score):
                styles.append("")
                continue
            r, g, b, _ = cmap_fn(max(0.0, min(1.0, (score - 0.5) / 0.5)))  # 0.5 (chance) → dark, 1 → bright
            text = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            styles.append(f"background-color: rgb({int(255 * r)},{int(255 * g)},{int(255 * b)}); color: {text}")
        return styles

    return frame.style.apply(colour, axis=0), headers


def concept_cell(cmap: "ConceptMap", row: int, col: int) -> Optional[tuple[str, int, int]]:
    """(layer, timestep, neuron) of a clicked table cell; ``None`` for the layer column or an empty cell."""
    if not 0 <= row < len(cmap.layers) or not 1 <= col <= len(cmap.timesteps):
        return None
    neuron = int(cmap.neurons[row, col - 1])
    if neuron < 0:
        return None
    return cmap.layers[row], cmap.timesteps[col - 1], neuron


__all__ = ["concept_cell", "concept_choices", "concept_map", "concept_table"]
