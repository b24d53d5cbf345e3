"""The app page's components, grouped by tab and panel.

Each layout builder (:mod:`revelio_hub.app.ui`, :mod:`revelio_hub.app.interpret_ui`)
returns one of these groups, and the event wiring takes the groups instead of
a long list of single components. They live here, below both modules, so the
core UI and the interpretation views can share them without importing each
other. Fields are Gradio components (typed ``Any``: this module builds
nothing, it only names what was built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AnalyzeTab", "BrowserTab", "CompareComponents", "ConceptComponents", "Page", "WhyComponents"]


@dataclass
class WhyComponents:
    """The "Why this class?" panel of the Analyze tab; ``layout`` keeps where the chart's bars and thumbnails are."""

    target: Any
    button: Any
    note: Any
    chart: Any
    thumbs: Any
    layout: Any


@dataclass
class CompareComponents:
    """The "Compare with another image" panel of the Analyze tab."""

    other: Any
    button: Any
    note: Any
    first: Any
    second: Any


@dataclass
class ConceptComponents:
    """The "Concept map" tab; ``cmap`` holds the map on screen (a ``gr.State``)."""

    value: Any
    note: Any
    table: Any
    cmap: Any


@dataclass
class AnalyzeTab:
    """The Analyze tab: the image and its entry, the results of one analysis, and the panels below them."""

    image: Any
    layer: Any
    timestep: Any
    button: Any
    show_dense: Any
    #: the "copy link to this analysis" controls (button, link box)
    link_copy: tuple[Any, Any]
    examples: Any
    ood: Any
    predictions: Any
    predictions_note: Any
    heatmap: Any
    neurons: Any
    neuron: Any
    caption: Any
    gallery: Any
    #: the analysis on screen (a ``gr.State``)
    analysis: Any
    why: WhyComponents
    compare: CompareComponents

    @property
    def results(self) -> list[Any]:
        """What an analysis fills and a cleared screen empties (``Events.analyze``'s order)."""
        return [self.predictions, self.predictions_note, self.neurons, self.neuron, self.caption, self.gallery,
                self.heatmap, self.analysis, self.ood]

    @property
    def neuron_outputs(self) -> list[Any]:
        """What redrawing the neuron list changes (``Events.apply_dense_choice``' order)."""
        return [self.predictions, self.neurons, self.neuron, self.caption, self.gallery, self.heatmap,
                self.analysis]

    @property
    def shown_neuron(self) -> list[Any]:
        """What selecting a neuron changes: the selection, its caption, its images, its heat map."""
        return [self.neuron, self.caption, self.gallery, self.heatmap]


@dataclass
class BrowserTab:
    """The Neuron browser tab."""

    layer: Any
    timestep: Any
    neuron: Any
    button: Any
    #: the "copy link to this neuron" controls (button, link box)
    link_copy: tuple[Any, Any]
    stats: Any
    histogram: Any
    gallery: Any
    sort: Any
    sorted: Any
    search: Any
    search_table: Any

    @property
    def outputs(self) -> list[Any]:
        """What ``Events.browser_entry`` fills: sorted list, search value, search table, stats, histogram, gallery."""
        return [self.sorted, self.search, self.search_table, self.stats, self.histogram, self.gallery]

    @property
    def details(self) -> list[Any]:
        """One neuron's view: stats, histogram, gallery."""
        return [self.stats, self.histogram, self.gallery]


@dataclass
class Page:
    """The whole page: header, tabs, and the link note shown above them."""

    release: Any
    link_note: Any
    tabs: Any
    analyze: AnalyzeTab
    browser: BrowserTab
    concept: ConceptComponents
    card: Any
