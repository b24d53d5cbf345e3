"""Gradio pieces of the interpretation views: "Why this class?", Compare, Concept map, and their endpoints.

Kept apart from :mod:`revelio_hub.app.ui` so that file stays about layout of
the core app; :func:`revelio_hub.app.ui.build_ui` calls the builders here
inside its Blocks and hands over the components they connect to. Event
functions are methods of :class:`InterpretEvents` (tests call them directly),
thin shells over :mod:`revelio_hub.app.attribution_view`,
:mod:`revelio_hub.app.comparison_view` and :mod:`revelio_hub.app.concept_view` that turn
``ValueError`` into ``gr.Error`` via :func:`~revelio_hub.app.errors.user_errors`.

API (public, same input rules as ``/analyze_json``: uploads only):

* ``/attribute_json`` - (image, layer, timestep, release, target) -> which
  neurons push the class up / down, with exact removal effects.
* ``/compare_json`` - (image, other, layer, timestep, release) -> neurons more
  active in each image.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import gradio as gr
from gradio import FileData

from revelio_hub.app import analysis
from revelio_hub.app import attribution_view
from revelio_hub.app import comparison_view
from revelio_hub.app import concept_view
from revelio_hub.app.api_surface import PRIVATE, json_endpoint
from revelio_hub.app.errors import user_errors
from revelio_hub.app.page import CompareComponents, ConceptComponents, Page, WhyComponents
from revelio_hub.app.state import AppState


__all__ = ["InterpretEvents", "why_section", "compare_section", "concept_tab", "wire"]


class InterpretEvents:
    """Event functions of the interpretation views, bound to one state and the core :class:`Events`."""

    def __init__(self, state: AppState, events: Any) -> None:
        self.state = state
        self.events = events

    def _served(self, image: Any) -> Any:
        """Every file input passes the same gate as ``/analyze_json``: files in Gradio's upload folder only."""
        return self.events.served_image(image)

    # ------------------------------------------------------------ Why this class?

    def _why(self, result: Any, target: Any, show_dense: Any = False):
        view = attribution_view.attribute_analysis(self.state, result, target, show_dense=bool(show_dense))
        chart, bars = attribution_view.why_chart(view)
        thumbs = attribution_view.why_thumbnails(self.state, view)
        rows = attribution_view._chart_rows(view, attribution_view.CHART_BARS)
        layout = {"bars": bars, "thumbs": [r["neuron"] for r in rows][: len(thumbs)]}
        return attribution_view.why_note(view), chart, thumbs, layout, view

    def after_analyze(self, result: Any, show_dense: Any = False):
        """Explain the top class of a freshly analysed image; offer the entry's classes as targets."""
        empty = ("", None, [], None, gr.update(choices=[], value=None))
        if result is None:
            return empty
        with user_errors("explaining the prediction"):
            rel, layer, t = analysis.resolve_entry(self.state, result.release, result.layer, result.timestep)
            entry = rel.entry(layer, t)
            if entry.diffc is None:
                return (f"_{analysis.no_diffc_note(rel, layer, t)}_", None, [], None, gr.update(choices=[], value=None))
            note, chart, thumbs, layout, view = self._why(result, None, show_dense)
            classes = list(entry.diffc.class_names)
            return note, chart, thumbs, layout, gr.update(choices=classes, value=view.attribution.target_name)

    def why(self, result: Any, target: Any, show_dense: Any = False):
        """Explain another class of the analysed image (dense neurons shown when the Analyze tab's box is ticked)."""
        with user_errors("explaining the prediction"):
            if result is None:
                raise ValueError("Analyze an image first.")
            note, chart, thumbs, layout, _ = self._why(result, target, show_dense)
            return note, chart, thumbs, layout

    def toggle_dense(self, result: Any, target: Any, show_dense: Any):
        """The "show dense neurons" box changed: redraw the explanation (nothing to redraw before an analysis)."""
        if result is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        return self.why(result, target, show_dense)

    def _show(self, result: Any, neuron: Optional[int]):
        if neuron is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        caption, gallery, heatmap = self.events.select_neuron(result, neuron)
        return gr.update(value=neuron), caption, gallery, heatmap

    def click_bar(self, result: Any, layout: Any, evt: gr.SelectData):
        """A click on a bar of the chart shows that neuron's heat map and top images, as the neuron table does."""
        with user_errors("showing the neuron"):
            if result is None or not layout:
                raise ValueError("Analyze an image first.")
            index = evt.index if isinstance(evt.index, (list, tuple)) else None
            neuron = attribution_view.bar_at(layout["bars"], float(index[1])) if index and len(index) == 2 else None
            return self._show(result, neuron)

    def click_thumb(self, result: Any, layout: Any, evt: gr.SelectData):
        """A click on a thumbnail under the chart does the same for its neuron."""
        with user_errors("showing the neuron"):
            if result is None or not layout:
                raise ValueError("Analyze an image first.")
            i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            thumbs = layout["thumbs"]
            neuron = thumbs[i] if isinstance(i, int) and 0 <= i < len(thumbs) else None
            return self._show(result, neuron)

    # ------------------------------------------------------------------ Compare

    def compare(self, image, other, layer, timestep, release):
        """Compare the analysed image's upload with a second one: neurons more active in each."""
        with user_errors("comparing the images"):
            view = comparison_view.compare_images(self.state, self._served(image), self._served_other(other), layer,
                                                  timestep, release)
            first, second = view.tables()
            c = view.comparison
            note = (f"{len(c.first)} neurons are more active in this image, {len(c.second)} in the other; "
                    f"{c.shared} fire in both. Click a row to see where it fires on this image.")
            return first, second, note

    @staticmethod
    def clear_compare():
        """Empty comparison tables: the image, layer, timestep, release or second image they described changed."""
        return None, None, ""

    def _served_other(self, other: Any) -> Any:
        if other is None:
            raise ValueError("Upload a second image to compare with.")
        return self._served(other)

    # --------------------------------------------------------------- Concept map

    def concept_choices(self, release):
        with user_errors("listing label values"):
            choices = concept_view.concept_choices(self.state, release)
            note = ("" if choices else
                    "_This release's atlases keep no per-label statistics; rebuild its atlases to get a concept map._")
            return gr.update(choices=choices, value=None), note, None, None

    def concept(self, release, choice):
        with user_errors("building the concept map"):
            if not choice:
                return None, "", None
            cmap = concept_view.concept_map(self.state, release, choice)
            table, _ = concept_view.concept_table(cmap)
            best = cmap.best()
            note = (f"Best single neuron for **{cmap.value}** ({cmap.column}): #{best[2]} at {best[0]} t={best[1]}, "
                    f"AUROC {best[3]:.3f}. Click a cell to open its neuron in the Neuron browser."
                    if best else f"No entry's atlas has statistics for {cmap.value!r}.")
            return table, note, cmap

    def concept_click(self, release, cmap, evt: gr.SelectData):
        """Open the clicked cell's neuron in the Neuron browser tab."""
        with user_errors("opening the neuron"):
            index = evt.index if isinstance(evt.index, (list, tuple)) else None
            cell = concept_view.concept_cell(cmap, int(index[0]), int(index[1])) if cmap is not None and index else None
            if cell is None:
                return (gr.update(),) * 7
            layer, t, neuron = cell
            rel = self.state.get_release(release)
            stats, hist, gallery = self.events.neuron_details(release, layer, t, neuron)
            return (gr.Tabs(selected="browser"), gr.update(value=layer),
                    gr.update(choices=rel.timesteps(layer), value=t), neuron, stats, hist, gallery)

    # ---------------------------------------------------------------------- API

    def attribute_json(self, image: FileData, layer: str = "", timestep: int = -1, release: str = "",
                       target: str = "") -> dict:
        """Explain a prediction: which neurons made Diff-C predict a class, measured by removing each one through
        the sparse autoencoder and re-running Diff-C on the same features.

        Args:
            image: the image, uploaded (gradio_client's handle_file, or an MCP data: URI); never a server path.
            layer: the backbone layer ("" = the release's default entry; it must have a Diff-C head).
            timestep: the diffusion timestep t (-1 = the default for the layer).
            release: the release name ("" = the app's default release).
            target: the class to explain ("" = the predicted class).
        Returns:
            {"release", "layer", "timestep", "reliable" (false: unlike the release's data, the answer is
            unreliable), "reasons", "target", "prob", "logit", "predicted"
            "neurons": [{"neuron", "activation", "effect_prob", "effect_logit", "estimate_prob", "estimate_logit"
            "summary"}], "pushing_up", "pushing_down", "spearman", ...}; effect = P(class) with nothing removed
            minus P(class) with the neuron removed (positive: the neuron pushes the class up).
        """
        with user_errors("explaining the prediction"):
            return attribution_view.attribute_image(self.state, self._served(image), layer or None, timestep, release,
                                     target).to_json()

    def compare_json(self, image: FileData, other: FileData, layer: str = "", timestep: int = -1,
                     release: str = "") -> dict:
        """Compare two images: the neurons whose activations differ most between them, largest difference first.

        Args:
            image: the first image, uploaded; never a server path.
            other: the second image, uploaded; never a server path.
            layer: the backbone layer ("" = the release's default entry).
            timestep: the diffusion timestep t (-1 = the default for the layer).
            release: the release name ("" = the app's default release).
        Returns:
            {"release", "layer", "timestep", "more_in_first": [{"neuron", "first", "second", "difference"
            "summary"}], "more_in_second": [...], "shared_active_neurons"}
        """
        with user_errors("comparing the images"):
            return comparison_view.compare_images(self.state, self._served(image), self._served_other(other),
                                                  layer or None, timestep, release).to_json()


# ----------------------------------------------------------------------- layout


def why_section() -> WhyComponents:
    """The "Why this class?" block (inside the Analyze tab)."""
    with gr.Accordion("Why this class?", open=True, elem_id="why"):
        with gr.Row(equal_height=True):
            target = gr.Dropdown([], label="Class to explain", scale=3, elem_id="why-target")
            button = gr.Button("Explain", scale=1, elem_id="why-btn")
        note = gr.Markdown("", elem_classes=["revelio-caption"])
        chart = gr.Image(label="Neurons pushing the class up (green) and down (red)", show_label=False,
                         interactive=False, format="png", elem_id="why-chart", buttons=[])
        thumbs = gr.Gallery(label="Their strongest dataset images (click one)", columns=6, height="auto",
                            allow_preview=False, object_fit="contain", elem_id="why-thumbs", buttons=[])
    return WhyComponents(target, button, note, chart, thumbs, gr.State(None))


def compare_section() -> CompareComponents:
    """The "Compare with another image" block (inside the Analyze tab)."""
    with gr.Accordion("Compare with another image", open=False, elem_id="compare"):
        with gr.Row():
            other = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Second image",
                             height=200, elem_id="compare-image")
            with gr.Column():
                button = gr.Button("Compare", variant="secondary", elem_id="compare-btn")
                note = gr.Markdown("")
        first = gr.Dataframe(headers=comparison_view.COMPARE_HEADERS, interactive=False, max_height=260,
                             label="More active in this image (click a row)", elem_id="compare-first")
        second = gr.Dataframe(headers=comparison_view.COMPARE_HEADERS, interactive=False, max_height=260,
                              label="More active in the other image (click a row)", elem_id="compare-second")
    return CompareComponents(other, button, note, first, second)


def concept_tab(state: AppState) -> ConceptComponents:
    """The "Concept map" tab."""
    with gr.Tab("Concept map", id="concepts"):
        gr.Markdown("Pick a label value of the release's atlases: each cell is the best single neuron's AUROC at "
                    "detecting it, at one layer and timestep (0.5 = chance).")
        try:
            choices = concept_view.concept_choices(state)
        except Exception:  # the tab's own event reports problems; the app must still start
            choices = []
        value = gr.Dropdown(choices, value=None, label="Label value", elem_id="concept-value")
        note = gr.Markdown("" if choices else "_This release's atlases keep no per-label statistics yet._")
        table = gr.Dataframe(interactive=False, label="Best neuron AUROC · neuron id (click a cell to open it)",
                             elem_id="concept-map")
        # Inside the tab: a component between two tabs shifts the next tab's index in Gradio's tab bar,
        # which then lists that tab ("About") twice once it is opened.
        cmap = gr.State(None)
    return ConceptComponents(value, note, table, cmap)


def wire(ev: InterpretEvents, page: Page, *, analyzed: Sequence[Any], concurrency: Optional[int]) -> None:
    """Connect the views' events (inside the Blocks' context) and register the JSON endpoints.

    ``analyzed``: every event that sets or clears the analysis (Analyze, a layer/timestep re-analysis, a new
    image or release); each refreshes the explanation and clears the comparison, so neither describes
    another entry's result.
    """
    tab, why, compare, concept = page.analyze, page.analyze.why, page.analyze.compare, page.concept
    shown = tab.shown_neuron
    # The "show dense neurons" box of the neuron table applies to the explanation too.
    why_out = [why.note, why.chart, why.thumbs, why.layout]
    for dep in analyzed:
        dep.then(ev.after_analyze, [tab.analysis, tab.show_dense], [*why_out, why.target], **PRIVATE)
    why.button.click(ev.why, [tab.analysis, why.target, tab.show_dense], why_out, **PRIVATE)
    why.target.input(ev.why, [tab.analysis, why.target, tab.show_dense], why_out, **PRIVATE)
    tab.show_dense.input(ev.toggle_dense, [tab.analysis, why.target, tab.show_dense], why_out, **PRIVATE)
    why.chart.select(ev.click_bar, [tab.analysis, why.layout], shown, **PRIVATE)
    why.thumbs.select(ev.click_thumb, [tab.analysis, why.layout], shown, **PRIVATE)

    compare.button.click(ev.compare, [tab.image, compare.other, tab.layer, tab.timestep, page.release],
                         [compare.first, compare.second, compare.note], preprocess=False,
                         concurrency_id="backbone", concurrency_limit=concurrency, **PRIVATE)
    for table in (compare.first, compare.second):
        table.select(ev.events.select_row, [tab.analysis], shown, **PRIVATE)
    # A comparison describes one (image, other image, entry): any change to them clears it, never leaves it stale.
    compare_out = [compare.first, compare.second, compare.note]
    for dep in analyzed:
        dep.then(ev.clear_compare, None, compare_out, **PRIVATE)
    compare.other.change(ev.clear_compare, None, compare_out, **PRIVATE)

    browser = [page.browser.layer, page.browser.timestep, page.browser.neuron, *page.browser.details]
    concept.value.input(ev.concept, [page.release, concept.value], [concept.table, concept.note, concept.cmap],
                        **PRIVATE)
    concept.table.select(ev.concept_click, [page.release, concept.cmap], [page.tabs, *browser], **PRIVATE)
    page.release.input(ev.concept_choices, page.release, [concept.value, concept.note, concept.table, concept.cmap],
                       **PRIVATE)

    json_endpoint(ev.attribute_json, api_name="attribute_json", output="attribution", concurrency_id="backbone",
                  concurrency_limit=concurrency)
    json_endpoint(ev.compare_json, api_name="compare_json", output="comparison", concurrency_id="backbone",
                  concurrency_limit=concurrency)
