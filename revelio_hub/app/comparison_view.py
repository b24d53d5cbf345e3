"""The app's image comparison: the neurons whose activations differ most between two images.

Plain functions over an :class:`~revelio_hub.app.state.AppState`, like
:mod:`revelio_hub.app.attribution_view`: the Compare panel, ``/compare_json``
and tests call :func:`compare_images`. Both images go through the same
decoding and feature cache as an analysis (no second backbone pass for an image
already analysed); the science is :func:`revelio_hub.interpret.compare`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from revelio_hub.app.analysis import model_recipe, resolve_entry
from revelio_hub.app.state import AppState
from revelio_hub.app.validation import ImageLimits

if TYPE_CHECKING:
    from revelio_hub.interpret import Comparison

#: Columns of the two tables of the Compare panel (:meth:`ComparisonView.tables`).
COMPARE_HEADERS = ["neuron", "this image", "other image", "difference", "summary"]


@dataclass
class ComparisonView:
    """Two images compared at one (release, layer, t)."""

    release: str
    layer: str
    timestep: int
    comparison: "Comparison"

    def to_json(self) -> dict[str, Any]:
        """The ``/compare_json`` payload."""
        out = {"release": self.release, "layer": self.layer, "timestep": self.timestep}
        out.update(self.comparison.to_dict())
        return out

    def tables(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Rows for the two tables (columns :data:`COMPARE_HEADERS`)."""

        def rows(items):
            return [[d.neuron, round(d.first, 4), round(d.second, 4), round(d.difference, 4), d.summary] for d in items]

        return rows(self.comparison.first), rows(self.comparison.second)


def compare_images(
    state: AppState,
    image: Any,
    other: Any,
    layer: Optional[str] = None,
    timestep: Any = None,
    release: Optional[str] = "",
    *,
    top: int = 10,
    limits: ImageLimits = ImageLimits(),
) -> ComparisonView:
    """The neurons whose activations differ most between ``image`` and ``other`` (both directions)."""
    from revelio_hub.interpret import compare

    rel, layer, t = resolve_entry(state, release, layer, timestep)
    entry = rel.entry(layer, t)
    recipe = model_recipe(entry.sae)
    maps = []
    for what, value in (("first", image), ("second", other)):
        try:
            img = state.decoded.read(value, limits)
        except ValueError as exc:
            raise ValueError(f"The {what} image: {exc}" if what == "second" else str(exc)) from None
        maps.append(state.feature_maps(img, rel, t, recipe)[layer])
    result = compare(entry.sae, maps[0], maps[1], top=top, atlas=entry.atlas, layer=layer, timestep=t)
    return ComparisonView(rel.name, layer, t, result)


__all__ = ["COMPARE_HEADERS", "ComparisonView", "compare_images"]
