"""Shareable links: one URL per neuron and per analysed example.

``?release=toy-shapes&layer=down_ft1&t=25&neuron=217`` opens the Neuron browser
on neuron 217 of that entry; ``?release=toy-shapes&layer=down_ft1&t=25&example=2``
opens the Analyze tab with the release's example 2 analysed at that entry (and
``&neuron=`` selects one of its neurons).
An uploaded image cannot be linked (it stays on the server only for a while,
and its path must not leave it), so a link to such an analysis keeps the
release, entry and tab, and says to share the image alongside.

Query parameters are typed by anyone, so they are input like any other: each
is checked (release by name, layer and timestep against the release's entries,
neuron against the SAE's width, example against the release's list), and a
bad one leaves the page as it would be without the link, with one sentence
saying what was wrong. Nothing in a link is a path.
"""

import hashlib
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

import gradio as gr

from revelio_hub.app import analysis
from revelio_hub.app.api_surface import PRIVATE
from revelio_hub.app.page import Page
from revelio_hub.app.state import AppState, LoadedRelease
from revelio_hub.app.shown_files import shown_copy
from revelio_hub.app.validation import whole_number

#: The query keys a link may carry, in the order links are written.
QUERY_KEYS = ("release", "layer", "t", "neuron", "example")
#: Longest value accepted for any query key (a release name, a layer name, a number).
MAX_VALUE = 120
UPLOAD_NOT_LINKED = ("The link opens this release, entry and tab; your uploaded image is not in it "
                     "(uploads are not kept), so send the image along with it.")
#: Values ``Events.browser_entry`` returns (sorted list, search value, search table, stats, histogram, gallery).
BROWSER_OUTPUTS = 6
#: Runs in the browser after the link's query is computed: the page's own address + the query, copied.
COPY_JS = """(query) => {
  if (!query || !query.startsWith("?")) return query;
  const url = window.location.origin + window.location.pathname + query;
  try { navigator.clipboard.writeText(url); } catch (e) {}
  return url;
}"""


@dataclass(frozen=True)
class Link:
    """A checked link: release *name*, entry, and a neuron or an example index."""

    release: str
    layer: str
    timestep: int
    neuron: Optional[int] = None
    example: Optional[int] = None

    def query(self) -> str:
        """``?release=...&layer=...&t=...[&neuron=...|&example=...]``."""
        items = [("release", self.release), ("layer", self.layer), ("t", self.timestep),
                 ("neuron", self.neuron), ("example", self.example)]
        return "?" + urlencode([(k, v) for k, v in items if v is not None])


def parse_link(state: AppState, params: Mapping[str, str]) -> Optional[Link]:
    """The link in a page's query parameters, or ``None`` when it has none; ``ValueError`` when it is bad.

    Unknown keys are ignored (other tools add their own); a missing release,
    layer or timestep means the default, as in the API.
    """
    given = {key: str(params[key]) for key in QUERY_KEYS if key in params}
    if not given:
        return None
    for key, value in given.items():
        if len(value) > MAX_VALUE:
            raise ValueError(f"The link's {key} is too long ({MAX_VALUE} characters at most).")
    rel, layer, t = analysis.resolve_entry(state, given.get("release", ""), given.get("layer") or None, given.get("t"))
    neuron = example = None
    if given.get("neuron"):
        n_latents = int(rel.entry(layer, t).sae.n_latents)
        neuron = whole_number(given["neuron"], "The link's neuron")
        if not 0 <= neuron < n_latents:
            raise ValueError(f"The link's neuron must be from 0 to {n_latents - 1} for {layer} t={t}.")
    if given.get("example"):
        example = whole_number(given["example"], "The link's example")
        if not 0 <= example < len(rel.examples):
            raise ValueError(f"The link's example must be from 0 to {len(rel.examples) - 1}: release "
                             f"{rel.name!r} has {len(rel.examples)} examples.")
    return Link(rel.name, layer, t, neuron, example)


def _digest(path: str) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def example_index(rel: LoadedRelease, image_path: Optional[str]) -> Optional[int]:
    """Which of ``rel``'s examples the image on screen is (by content: Gradio shows a copy), or ``None``."""
    if not image_path:
        return None
    digest = _digest(image_path)
    for i, (path, _) in enumerate(rel.examples):
        if digest is not None and _digest(path) == digest:
            return i
    return None


class LinkEvents:
    """Open the link a page was loaded with; write links for what is on screen."""

    def __init__(self, state: AppState, events: Any) -> None:
        self.state = state
        self.events = events

    def open(self, by: str, request: gr.Request) -> tuple:
        """On page load: apply the link, if any (tab, release, entry, neuron or example), and say if it was bad."""
        n_out = 9 + BROWSER_OUTPUTS + 3  # see wire(): the entry's controls, the browser, image, link, note
        try:
            link = parse_link(self.state, dict(request.query_params) if request is not None else {})
        except ValueError as exc:
            note = f"**This link could not be opened:** {html.escape(str(exc), quote=False)}"
            return (*(gr.update(),) * (n_out - 2), None, gr.update(value=note, visible=True))
        if link is None:
            return (*(gr.update(),) * (n_out - 2), None, gr.update())
        rel = self.state.get_release(link.release)
        _, _, examples, card, *_ = self.events.change_release(rel.name)
        # one update per component: Gradio consumes an update dict as it applies it
        timesteps = [gr.update(choices=rel.timesteps(link.layer), value=link.timestep) for _ in range(2)]
        layers = [gr.update(choices=rel.layers, value=link.layer) for _ in range(2)]
        neuron = link.neuron if link.neuron is not None else 0
        browser = self.events.browser_entry(rel.name, link.layer, link.timestep, by, None, neuron)
        image = shown_copy(rel.examples[link.example][0]) if link.example is not None else gr.update()
        tab = gr.Tabs(selected="analyze" if link.example is not None or link.neuron is None else "browser")
        return (tab, gr.update(value=rel.name), layers[0], timesteps[0], examples, card, layers[1], timesteps[1], neuron,
                *browser, image, link, gr.update(value="", visible=False))

    def analyze(self, link: Optional[Link], image, layer, timestep, release, progress=gr.Progress()):
        """After a link to an example: analyse it, and select the link's neuron when the image's table lists it
        (nothing to do for other links)."""
        if link is None or link.example is None:
            return (gr.update(),) * 9
        out = self.events.analyze(image, layer, timestep, release, progress=progress)
        preds, note, rows, choices, caption, gallery, heatmap, result, ood = out
        if link.neuron is None or result is None or link.neuron not in {n.id for n in result.visible_neurons()}:
            return out
        caption, gallery, heatmap = self.events.select_neuron(result, link.neuron)
        return (preds, note, rows, {**choices, "value": link.neuron}, caption, gallery, heatmap, result, ood)

    def neuron_link(self, release: str, layer: str, timestep: Any, neuron: Any) -> str:
        """The query of a link to the neuron shown in the browser (the page adds its address)."""
        try:
            return parse_link(self.state, {"release": release, "layer": layer, "t": str(timestep),
                                           "neuron": str(neuron)}).query()
        except ValueError as exc:
            return f"No link: {exc}"

    def analysis_link(self, release: str, layer: str, timestep: Any, image: Any, neuron: Any = None) -> str:
        """The query of a link to this analysis: the example it shows and the selected neuron, or only the
        entry for an upload."""
        entry = {"release": release, "layer": layer, "t": str(timestep)}
        try:
            link = parse_link(self.state, {**entry, **({"neuron": str(neuron)} if neuron is not None else {})})
        except ValueError as exc:
            return f"No link: {exc}"
        try:  # only a real upload or example is read (the value came from the browser)
            path = self.events.served_image(image).path
        except ValueError:  # no image, or not an upload: a link to the entry
            path = None
        index = example_index(self.state.get_release(link.release), path)
        if index is None:
            return Link(link.release, link.layer, link.timestep).query()
        return Link(link.release, link.layer, link.timestep, neuron=link.neuron, example=index).query()


def copy_link_row(label: str, elem_id: str) -> tuple[Any, Any]:
    """A "copy link" button and the box that shows the link it copied."""
    with gr.Row(equal_height=True):
        button = gr.Button(label, size="sm", scale=0, min_width=160, elem_id=f"{elem_id}-button")
        box = gr.Textbox(label="Link (copied)", interactive=False, scale=3,
                         placeholder="Click to get a link to what is shown", elem_id=elem_id)
    return button, box


def wire(ev: LinkEvents, loaded: Any, page: Page, *, backbone: Mapping[str, Any]) -> Any:
    """Events: ``loaded`` (the page-load event) applies the link; the copy buttons write links.

    Returns the dependency that analyses a linked example, for the events that
    follow every analysis.
    """
    a, b = page.analyze, page.browser
    link_state = gr.State(None)
    opened = loaded.then(
        ev.open, b.sort,
        [page.tabs, page.release, a.layer, a.timestep, a.examples, page.card, b.layer, b.timestep,
         b.neuron, *b.outputs, a.image, link_state, page.link_note], **PRIVATE)
    analyzed = opened.then(ev.analyze, [link_state, a.image, a.layer, a.timestep, page.release], a.results,
                           preprocess=False, **backbone, **PRIVATE)
    button, box = b.link_copy
    button.click(ev.neuron_link, [page.release, b.layer, b.timestep, b.neuron], box,
                 preprocess=False, **PRIVATE).then(None, box, box, js=COPY_JS, **PRIVATE)
    button, box = a.link_copy
    button.click(ev.analysis_link, [page.release, a.layer, a.timestep, a.image, a.neuron], box,
                 preprocess=False, **PRIVATE).then(None, box, box, js=COPY_JS, **PRIVATE)
    return analyzed


__all__ = ["COPY_JS", "Link", "LinkEvents", "copy_link_row", "example_index", "parse_link", "wire"]
