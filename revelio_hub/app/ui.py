"""The Gradio Blocks: layout, events and the API endpoints (`/analyze_json`, `/attribute_json`, `/compare_json`, `/search_neurons`, …; README lists them all).

Every event function here is a thin shell: it unpacks component values, calls
:mod:`revelio_hub.app.analysis`, and turns a ``ValueError`` into ``gr.Error``
(a plain message in the UI and for ``gradio_client``; never a stack trace).
Unexpected exceptions are logged as one line on the server (the traceback
at DEBUG level: it may quote what a client sent) and reported to the user as
one sentence.

API (for ``gradio_client``):

* ``/analyze`` - the Analyze button: (image, layer, timestep, release) ->
  predictions, neuron table, selected neuron, caption, gallery, heat map.
* ``/analyze_json`` - (image file, layer, timestep, release name or "") -> a
  JSON dict ``{"release", "layer", "timestep", "predictions", "note", "neurons", "ranking", "reliable",
  "reasons", "ood"}``.
* ``/search_neurons`` - (label value, layer, timestep, release name or "") -> a
  JSON list of neurons detecting that value, best AUROC first.
* ``/neuron`` - (release, layer, timestep, neuron id) -> stats, label
  histogram, top-activating images.
* ``/attribute_json``, ``/compare_json`` - see :mod:`revelio_hub.app.interpret_ui`.
* ``/describe_neuron``, ``/list_releases`` - see :mod:`revelio_hub.app.mcp_tools`; the JSON
  endpoints are also the app's MCP tools (``python app.py --mcp``).

Page links (``?release=&layer=&t=&neuron=`` or ``&example=``) open a neuron or an
analysed example: :mod:`revelio_hub.app.deep_links`.

The endpoints are public: anyone can post to them. So every file input goes
through :func:`~revelio_hub.app.validation.served_upload` (only files in
Gradio's upload folder: uploads, and the copies of the examples the page
shows), release folders are never served (:mod:`revelio_hub.app.shown_files`), Gradio's own
refusals of file payloads are answered with the same sentence
(:class:`ServedBlocks`), messages are HTML-escaped (Gradio renders them as
HTML), and users see release *names*, never server paths.
"""

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import gradio as gr
from gradio import FileData
from starlette.middleware import Middleware

from revelio_hub.app import analysis
from revelio_hub.app import deep_links
from revelio_hub.app import interpret_ui
from revelio_hub.app.errors import user_errors
from revelio_hub.app.api_surface import PRIVATE, IntDropdown, json_endpoint
from revelio_hub.app.mcp_tools import file_route_urls_as_paths, ui_only, wire_tools
from revelio_hub.app.page import AnalyzeTab, BrowserTab, Page
from revelio_hub.app.phone import PHONE_HEAD, scroll_to_results
from revelio_hub.app.state import AppState, LoadedRelease
from revelio_hub.app.sessions import HeartbeatMarker, lean_sessions_supported, use_lean_sessions
from revelio_hub.app.shown_files import blocked_release_dirs, shown_copy, shown_examples
from revelio_hub.app.temp_files import cleanup_lifespan
from revelio_hub.app.validation import (
    UPLOAD_REFUSED,
    Upload,
    served_upload,
    unusable_path,
    upload_roots,
    whole_number,
)
from revelio_hub.cards import PAPER_TITLE, PAPER_URL

logger = logging.getLogger(__name__)

NEURON_HEADERS = ["neuron", "activation", "× usual", "summary"]

CSS = """
#revelio-title h1 {margin-bottom: 0}
#revelio-title p {margin-top: 4px; opacity: .8}
#analyze-btn {min-height: 48px; font-size: 1.05em}
.revelio-caption {min-height: 2.2em}
#ood-warning.ood-flagged {border-left: 4px solid #d97706; padding-left: 8px}
/* A flagged image: its predictions and neuron claims stay readable but greyed, so nobody takes them at face
   value; the warning above them says why. */
#results:has(#ood-warning.ood-flagged) :is(#predictions, #neurons, #neuron-caption, #neuron-gallery, #why-chart,
  #why-thumbs) {opacity: .45; filter: grayscale(1)}
/* Wide markdown tables (the card's metrics, a neuron's stats) scroll inside their box instead of
   squeezing each cell to one character per line on a phone. */
.revelio-md table {display: block; max-width: 100%; overflow-x: auto}
.revelio-md th, .revelio-md td {white-space: nowrap}
.revelio-md img {max-width: 100%; height: auto}
/* On a phone the tab names are set tighter, so the tab bar shows them instead of folding them into "...". */
@media (max-width: 480px) {
  .tab-wrapper button {padding-left: 6px !important; padding-right: 6px !important; font-size: 13px !important}
}
/* Data tables keep their column widths and scroll sideways on narrow screens. */
.revelio-table table {min-width: max-content}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="amber", neutral_hue="slate")


#: Gradio's queue recomputes its monitoring summary (a pandas group-by over up to its last 10,000 events)
#: after every event, by default: 3.0 ms of Python per request after 200 events, 12–14 ms after 10,000,
#: measured with Gradio 6.31 by benchmarks/bench_sessions.py (docs/benchmarks.md, issue 10). The app lets it recompute every
#: ``ANALYTICS_EVERY`` events instead; only the ``/monitoring`` page reads it. An operator's own
#: ``$GRADIO_ANALYTICS_CACHE_FREQUENCY`` wins.
ANALYTICS_EVERY_ENV = "GRADIO_ANALYTICS_CACHE_FREQUENCY"
ANALYTICS_EVERY = 100


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set ``$name`` to ``value`` for the duration, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def launch_kwargs(state: AppState) -> dict[str, Any]:
    """Arguments of ``Blocks.launch`` that the app needs wherever it is launched (app.py, tests).

    ``show_error`` stays off: every message meant for users is a ``gr.Error``
    (always shown); anything else Gradio raises internally could quote server
    paths, so it is reported as a bare "Error".
    """
    return {
        "theme": theme(),
        "css": CSS,
        # Release folders are never served; the images the page shows are copied out (see shown_files).
        "blocked_paths": blocked_release_dirs(state),
        "head": PHONE_HEAD,
        "max_file_size": "25mb",
        "show_error": False,
        # Uploads and heat maps deleted once old (Gradio's delete_cache dies under concurrency: see temp_files).
        "app_kwargs": {"lifespan": cleanup_lifespan(state.config.delete_cache),
                       # Sessions of API scripts are not kept (only browser tabs hold a heartbeat): sessions.py.
                       "middleware": [Middleware(HeartbeatMarker)]},
    }


def _is_file_payload(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("path"), str) and (
        (value.get("meta") or {}).get("_type") == "gradio.FileData" if isinstance(value.get("meta"), dict) else False
    )


def _has_unusable_file(value: Any) -> bool:
    """Does any tagged file payload in ``value`` name a URL (which Gradio would fetch on the server), or a path
    with a NUL byte or longer than any real one (Gradio's own checks fail on those with a traceback)?"""
    if _is_file_payload(value):
        return unusable_path(value["path"])
    if isinstance(value, dict):
        return any(_has_unusable_file(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_unusable_file(v) for v in value)
    return False


class ServedBlocks(gr.Blocks):
    """``gr.Blocks`` whose refusals of file payloads read like the app's own.

    Gradio vets tagged ``FileData`` before an event function runs (a file
    outside its upload folder raises ``InvalidPathError``, a malformed payload
    a pydantic ``ValidationError``), and those messages quote the path after
    making it absolute, which reveals the server's working directory. This
    turns them into :data:`~revelio_hub.app.validation.UPLOAD_REFUSED`, the
    sentence :func:`~revelio_hub.app.validation.served_upload` gives for
    every other refused value, and refuses URLs (before Gradio downloads them), NUL bytes and
    over-long paths (on which Gradio's checks fail with a traceback echoing the request); a URL
    of the app's own file route is read as the upload it names
    (:func:`~revelio_hub.app.mcp_tools.file_route_urls_as_paths`).

    It also makes the app's sessions lean (:mod:`revelio_hub.app.sessions`).
    """

    @property
    def state_holder(self):  # noqa: D102
        return self.__dict__.get("_revelio_state_holder")

    @state_holder.setter
    def state_holder(self, holder) -> None:
        """Gradio hands the app's session store here at launch: make it create lean sessions.

        Every API call without a session id is a new session; see
        :mod:`revelio_hub.app.sessions` for what that costs and why lean
        sessions hold the same thing.
        """
        if lean_sessions_supported(self):
            use_lean_sessions(holder)
        else:
            logger.warning("This Gradio builds sessions differently; using its own (slower) sessions")
        self.__dict__["_revelio_state_holder"] = holder

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):  # noqa: D102
        import pydantic
        from gradio.exceptions import InvalidPathError

        inputs = file_route_urls_as_paths(inputs)  # an MCP agent's "<app>/gradio_api/file=<upload>": that upload
        if _has_unusable_file(inputs):
            raise gr.Error(UPLOAD_REFUSED, print_exception=False)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except (InvalidPathError, pydantic.ValidationError):
            raise gr.Error(UPLOAD_REFUSED, print_exception=False) from None


_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()(?!https?://|/|data:)([^)\s]+)(\))")


def release_hub_url(rel: LoadedRelease) -> Optional[str]:
    """The release's model-card page on the Hub, when it was named by a Hub id (not a local folder)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(rel.id).exists():
        return None
    try:
        validate_repo_id(rel.id)
    except HFValidationError:
        return None
    return f"{constants.ENDPOINT.rstrip('/')}/{rel.id}" if "/" in rel.id else None


def about_links(rel: LoadedRelease) -> str:
    """One line above the card: where the release lives on the Hub, and the paper."""
    links = []
    url = release_hub_url(rel)
    if url:
        links.append(f"**Model card:** [{rel.id}]({url})")
    links.append(f"**Paper:** [*{PAPER_TITLE}*]({PAPER_URL}) (Kim, Thomas and Ghadiyaram, ICCV 2025)")
    return " · ".join(links)


def card_markdown(rel: LoadedRelease) -> str:
    """The About tab: links to the release's Hub page and the paper, then the release card,
    its relative figures served from Gradio's cache.

    The figures are copied into Gradio's cache folder (content-addressed, so
    once per file) rather than served from the release folder: a
    ``/file=`` link carries the absolute path, and the release folder's path
    must not reach users.
    """
    text = about_links(rel) + "\n\n" + (rel.card or "_This release has no card._")
    root = rel.local_dir
    if root is None:
        return text

    def serve(match: "re.Match[str]") -> str:
        file = (root / match.group(2)).resolve()
        if not file.is_file() or root not in file.parents:
            return match.group(0)
        cached = shown_copy(file)
        return f"{match.group(1)}gradio_api/file={cached}{match.group(3)}"

    return _IMAGE_LINK.sub(serve, text)


HELP = """
**How to read this.** The backbone noises the image to timestep *t* and reads one layer.
A k-sparse autoencoder splits that feature into neurons; the table lists those firing most unusually
strongly *for them* ("× usual": activation over the neuron's mean when it fires). A summary names a
label value only where claims like it were checked on held-out atlas images and held (by default on at least
90% of them), and says how often ("true on 94% of held-out images it fires strongly on"); otherwise it says
*unsure* or *mixed*. The check is made separately for strong and for typical firings, so on your image a row
names a value only if the check for the way the neuron fires here held too, and quotes that check; otherwise
it says *not named here*. (A neuron that seldom fires strongly is summarised from its typical firings, and its
line says so.) (Atlases built before this check name a value when most of the neuron's top images
carry it, with its AUROC: 0.5 = chance, 1 = perfect.) Neurons firing on most images are hidden
unless you tick the box. Pick a neuron (click a row) to see the dataset images that excite it most and,
on the right, *where* it fires on your image. Small *t* keeps fine detail; larger *t* keeps coarse layout.
"""


def _entry_updates(rel: LoadedRelease, layer: Optional[str] = None) -> tuple[dict, dict]:
    layers = rel.layers
    d_layer, d_t = rel.default_entry()
    layer = layer if layer in layers else d_layer
    ts = rel.timesteps(layer)
    t = d_t if d_t in ts else ts[0]
    return gr.update(choices=layers, value=layer), gr.update(choices=ts, value=t)


def _num(x: float, fmt: str) -> str:
    return "–" if x != x else format(x, fmt)


BROWSER_PROMPT = "Pick a neuron id, or click a row of a list below."
#: Pixel widths that fit each header of the browser's tables (the summary takes the rest).
BROWSER_COLUMNS = ["88px", "180px", "140px", "180px", "164px", "auto"]
HEATMAP_LABEL = "Where the neuron fires (centre crop)"


def _neuron_stats_markdown(d: analysis.NeuronDetails) -> str:
    text = (
        f"### Neuron {d.id}{' (dense)' if d.dense else ''}\n{d.summary or ''}\n\n"
        "| fires on | mean activation | best AUROC (↑, 1 = perfect) | label entropy (↓, bits) |\n|---|---|---|---|\n"
        f"| {d.frequency:.2%} of images | {d.mean_activation:.3f} | {_num(d.best_auroc, '.2f')} "
        f"| {_num(d.entropy, '.2f')} |"
    )
    if d.label_values:
        text += "\n\n| label column | best value | AUROC ↑ | top images with it |\n|---|---|---|---|\n"
        text += "\n".join(
            f"| {v['column']} | {v['value']} | {'–' if v.get('auroc') is None else format(v['auroc'], '.2f')} "
            f"| {v.get('top_hits', 0)}/{v.get('top_images', 0)} |" for v in d.label_values)
    if d.layer_note:
        text += f"\n\n_{d.layer_note}_"
    return text


def _ood_markdown(result: analysis.Analysis) -> dict:
    """The reliability line: a flagged image's warning (its class greys the results, see :data:`CSS`), else the
    percentile line."""
    ood = result.ood or {}
    message = ood.get("message") or ""
    if not result.reliable:
        return gr.update(value=f"**Unreliable here.** {message}", elem_classes=["ood-flagged"], visible=True)
    return gr.update(value=message, elem_classes=[], visible=bool(message))


def _neuron_rows(result: analysis.Analysis, show_dense: bool) -> list[list[Any]]:
    return [[n.id, round(n.activation, 4), round(n.relevance, 2), n.summary + (" · dense" if n.dense else "")]
            for n in result.visible_neurons(bool(show_dense))]


class Events:
    """The event functions of the Blocks, bound to one :class:`AppState`.

    Kept as methods (not closures inside :func:`build_ui`) so tests call them
    directly with the values the components would send.

    ``upload_roots`` are the folders an uploaded file may be in (default:
    Gradio's upload folder, looked up at each call so ``$GRADIO_TEMP_DIR``
    set after start-up is honoured).
    """

    def __init__(self, state: AppState, upload_roots: Optional[Sequence[str]] = None) -> None:
        self.state = state
        self._upload_roots = list(upload_roots) if upload_roots is not None else None

    def served_image(self, value: Any) -> Upload:
        """The uploaded file an endpoint received, or ``ValueError`` (see :func:`served_upload`)."""
        roots = self._upload_roots if self._upload_roots is not None else upload_roots()
        return served_upload(value, roots)

    # ---------------------------------------------------------------- Analyze

    #: What :meth:`analyze` returns for "nothing analysed": every result output emptied.
    @staticmethod
    def clear_results():
        """Empty every output of the Analyze tab (the image, layer, timestep or release changed, or an error)."""
        return (None, "", [], gr.update(choices=[], value=None), "", [], None, None, gr.update(value="", visible=False))

    @ui_only
    def analyze(self, image, layer, timestep, release, show_dense=False, progress=gr.Progress()):
        """Analyze an image: predicted classes, its most relevant neurons, the first one's images and heat map,
        and whether the image is like the release's data."""
        with user_errors("analysing the image"):
            result = analysis.analyze(
                self.state, self.served_image(image), layer, timestep, release,
                progress=(lambda frac, desc: progress(frac, desc=desc)) if progress is not None else None,
            )
            preds, *shown = self._neuron_outputs(result, show_dense)
            # The note is a plain string (API users get text, not a component update); "" shows nothing.
            return (preds, result.note or "", *shown, _ood_markdown(result))

    def _neuron_outputs(self, result: analysis.Analysis, show_dense) -> tuple:
        rows = _neuron_rows(result, show_dense)
        shown = result.visible_neurons(bool(show_dense))
        if not shown:
            why = "No neuron fires on this image." if not result.neurons else \
                "Only dense neurons fire on this image; tick “Show dense neurons” to list them."
            return (result.predictions, rows, gr.update(choices=[], value=None), why, [], result.image, result)
        top = shown[0].id
        gal, overlay, text = analysis.neuron_view(self.state, result, top)
        # "217 · stripes (background)": the summary's first part fits a phone's dropdown; the caption has the rest
        choices = [(f"{n.id} · {n.summary.split(' · ')[0]}" if n.summary else str(n.id), n.id) for n in shown]
        return result.predictions, rows, gr.update(choices=choices, value=top), text, gal, overlay, result

    def apply_dense_choice(self, result, show_dense):
        """After Analyze: list the dense neurons too when the box is ticked (nothing to do otherwise)."""
        if result is None or not show_dense:
            return (gr.update(),) * 7
        return self.toggle_dense(result, show_dense)

    def toggle_dense(self, result, show_dense):
        """Show or hide dense neurons in the image's table (no backbone pass)."""
        with user_errors("listing the neurons"):
            if result is None:
                return (gr.update(),) * 7
            return self._neuron_outputs(result, show_dense)

    def refresh(self, image, layer, timestep, release, previous, show_dense=False, progress=gr.Progress()):
        """After the layer, timestep or release changed: analyse again if there was a result, else clear.

        The image's features are cached per timestep, so a new layer costs no
        backbone pass; results of the old entry never stay on screen.
        """
        if previous is None or image is None:
            return self.clear_results()
        return self.analyze(image, layer, timestep, release, show_dense, progress=progress)

    def _current(self, result, layer, timestep, release):
        """``result`` if it is for the entry now chosen, else a ``ValueError`` (never show an old layer's neuron)."""
        if result is None:
            raise ValueError("Analyze an image first.")
        if None not in (layer, timestep):
            rel, layer, t = analysis.resolve_entry(self.state, release, layer, timestep)
            if (result.release, result.layer, result.timestep) != (rel.name, layer, t):
                raise ValueError(
                    f"These results are for {result.layer} t={result.timestep}; "
                    f"click Analyze for {layer} t={t}."
                )
        return result

    def select_neuron(self, result, neuron, layer=None, timestep=None, release=None):
        """Show another neuron of the analysed image (cached features: no backbone pass)."""
        with user_errors("showing the neuron"):
            result = self._current(result, layer, timestep, release)
            if neuron is None:
                return "", [], result.image
            gal, overlay, text = analysis.neuron_view(self.state, result, neuron)
            return text, gal, overlay

    def select_row(self, result, layer=None, timestep=None, release=None, evt: gr.SelectData = None):
        """A click on a row of a neuron table selects that neuron (refused if the result is of another entry
        than the layer/timestep on screen; the Compare tables pass only the result)."""
        with user_errors("showing the neuron"):
            result = self._current(result, layer, timestep, release)
            row = (evt.row_value if evt is not None else None) or []
            if not row:
                raise ValueError("Click a row of the neuron table.")
            neuron = whole_number(row[0], "Neuron id")
            text, gal, overlay = self.select_neuron(result, neuron)
            return gr.update(value=neuron), text, gal, overlay

    def pick_example(self, release, evt: gr.SelectData):
        """Load the clicked example: looked up by its index in the release's own list, never by a path the client sent."""
        with user_errors("loading the example"):
            examples = self.state.get_release(release).examples
            index = evt.index[0] if isinstance(evt.index, (list, tuple)) and evt.index else evt.index
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(examples):
                raise ValueError("Could not load that example; upload an image instead.")
            return shown_copy(examples[index][0])

    def change_layer(self, release, layer):
        """Offer the timesteps the release has for the chosen layer."""
        with user_errors("changing the layer"):
            return _entry_updates(self.state.get_release(release), layer)[1]

    def change_release(self, release):
        """New release: its layers, timesteps, examples and card; the old release's results are cleared."""
        with user_errors("switching release"):
            rel = self.state.get_release(release)
            layer_u, t_u = _entry_updates(rel)
            layer_b, t_b = _entry_updates(rel)
            return (layer_u, t_u, shown_examples(rel.examples), card_markdown(rel), layer_b, t_b, *self.clear_results())

    # --------------------------------------------------------- Neuron browser

    @ui_only
    def neuron_details(self, release, layer, timestep, neuron):
        """The browser's view of one neuron: stats, label histogram, top images (programs: /describe_neuron)."""
        with user_errors("showing the neuron"):
            d = analysis.neuron_details(self.state, release, layer, timestep, neuron)
            return _neuron_stats_markdown(d), d.histogram, d.top_images

    def sorted_neurons(self, release, layer, timestep, by):
        with user_errors("listing neurons"):
            return analysis.sorted_neurons(self.state, release, layer, timestep, by)

    def class_neurons(self, release, layer, timestep, name):
        """Neurons detecting a label value (``column=value`` from the browser's dropdown), best AUROC first."""
        with user_errors("searching neurons for the label value"):
            if not name:
                return []
            return analysis.search_rows(self.state, release, layer, timestep, name)

    def browser_entry(self, release, layer, timestep, by, name, neuron=None):
        """Fill the whole browser for the chosen (release, layer, t): both lists, and the shown neuron's
        stats, label histogram and top images for *this* entry (cleared if the id does not exist here)."""
        with user_errors("loading the release entry"):
            values = analysis.label_values(self.state, release, layer, timestep)
            name = name if name in {key for _, key in values} else None
            lists = (analysis.sorted_neurons(self.state, release, layer, timestep, by),
                     gr.update(choices=values, value=name),
                     analysis.search_rows(self.state, release, layer, timestep, name) if name else [])
            try:
                details = analysis.neuron_details(self.state, release, layer, timestep, neuron)
            except ValueError:  # no neuron chosen, or an id this entry does not have
                return (*lists, BROWSER_PROMPT, None, [])
            return (*lists, _neuron_stats_markdown(details), details.histogram, details.top_images)

    def browser_row(self, release, layer, timestep, evt: gr.SelectData):
        row = evt.row_value or []
        if not row:
            raise gr.Error("Click a row of the list.", print_exception=False)
        neuron = row[0]
        return (neuron, *self.neuron_details(release, layer, timestep, neuron))

    # ------------------------------------------------------------------- API

    def analyze_json(self, image: FileData, layer: str = "", timestep: int = -1, release: str = "") -> dict:
        """Analyze an image with a release's k-sparse autoencoder: the neurons it lights up, what each means,
        the classes Diff-C predicts, and whether the image is like the release's data.

        Args:
            image: the image, uploaded (gradio_client's handle_file, or an MCP data: URI); never a server path.
            layer: the backbone layer ("" = the release's default entry); list_releases names them.
            timestep: the diffusion timestep t (-1 = the default for the layer; a numeric string is accepted).
            release: the release name ("" = the app's default release).
        Returns:
            {"release", "layer", "timestep", "predictions": {class: probability} or null
            "note" (why predictions are null: this entry has no Diff-C head)
            "neurons": [{"id", "activation", "relevance" (activation over the neuron's usual activation)
            "frequency", "summary", "dense"}] most relevant first, "ranking" (how neurons are ranked)
            "reliable" (false: the image is unlike the release's data, its classes and neuron names are unreliable)
            "reasons" (why, in words; empty when reliable)
            "ood": {"reconstruction_error", "error_percentile", "diffc_confidence", "out_of_distribution"
            "message", "layers", "reliable", "reasons", "reliability": {"score", "threshold", "decided_by"
            "signals"} (the calibrated score, when the release has one)}}
        """
        with user_errors("analysing the image"):
            return analysis.analyze(self.state, self.served_image(image), layer or None, timestep, release).to_json()

    def search_neurons(self, value: str, layer: str = "", timestep: int = -1, release: str = "") -> list:
        """Search the neurons that detect a label value (a class, or a value of another label column such as
        a colour or "stripes"), best AUROC first.

        Args:
            value: the label value; "column=value" picks one label column when several have that value.
            layer: the backbone layer ("" = the release's default entry).
            timestep: the diffusion timestep t (-1 = the default for the layer).
            release: the release name ("" = the app's default release).
        Returns:
            [{"neuron", "column", "value", "auroc" (0.5 = chance, 1 = perfect)
            "precision" (share of its top images with the value), "frequency", "dense", "summary"}]
        """
        with user_errors("searching neurons"):
            return analysis.search_neurons(self.state, value, layer or None, timestep, release)


def _header(state: AppState) -> Any:
    """The title row; returns the release dropdown (names only: a release id may be a server path)."""
    release_choices = state.release_names
    with gr.Row(equal_height=True, elem_id="revelio-header"):
        with gr.Column(scale=3, min_width=320):  # wider than a phone's share: the row wraps, the title stays whole
            gr.Markdown(
                "# Revelio Hub\nSee what a diffusion model knows: which sparse-autoencoder neurons an image "
                "lights up, where they fire, what they mean, and the classes a light probe reads from the same "
                "features.",
                elem_id="revelio-title",
            )
        release_dd = gr.Dropdown(
            release_choices, value=state.get_release().name, label="Release", scale=0, min_width=240,
            interactive=len(release_choices) > 1, elem_id="release",
        )
    return release_dd


def _analyze_tab(state: AppState, analysis_state: Any) -> AnalyzeTab:
    """The Analyze tab: the image and its entry on the left, the results and the interpretation panels right."""
    rel0 = state.get_release()
    layer0, t0 = rel0.default_entry()
    with gr.Tab("Analyze", id="analyze"), gr.Row():
        with gr.Column(scale=2, min_width=300):
            image_in = gr.Image(
                type="filepath", image_mode=None, sources=["upload", "clipboard"],
                label="Image", height=300, elem_id="image-in",
            )
            with gr.Row():
                layer_dd = gr.Dropdown(rel0.layers, value=layer0, label="Layer", elem_id="layer")
                t_dd = IntDropdown(rel0.timesteps(layer0), value=t0, label="Timestep t", elem_id="timestep")
            analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn")
            show_dense = gr.Checkbox(False, label="Show dense neurons (fire on most images)", elem_id="show-dense")
            analysis_copy = deep_links.copy_link_row("Copy link to this analysis", "analysis-link")
            examples = gr.Gallery(
                shown_examples(rel0.examples), label="Examples (click one to load it)", columns=5, height=150,
                allow_preview=False, object_fit="cover", elem_id="examples", buttons=[],
            )
            gr.Markdown(HELP, elem_classes=["revelio-help"])
        with gr.Column(scale=3, min_width=380, elem_id="results"):
            ood_md = gr.Markdown("", visible=False, elem_id="ood-warning", label="Is the image like the release's data?")
            with gr.Row(equal_height=True):
                with gr.Column(min_width=200):
                    preds = gr.Label(num_top_classes=state.config.top_classes, label="Predicted classes (Diff-C)",
                                     elem_id="predictions")
                    preds_note = gr.Markdown("", label="Why there are no predicted classes", elem_id="predictions-note")
                heatmap = gr.Image(label=HEATMAP_LABEL, height=300, interactive=False, format="png", elem_id="heatmap")
            neuron_table = gr.Dataframe(
                headers=NEURON_HEADERS, datatype=["number", "number", "number", "str"],
                label="Most relevant neurons of this image (click a row)", interactive=False,
                max_height=260, column_widths=["88px", "104px", "92px", "auto"], elem_id="neurons",
                elem_classes=["revelio-table"],
            )
            with gr.Row(equal_height=True, elem_id="neuron-pick"):
                neuron_dd = IntDropdown([], label="Selected neuron", scale=1, min_width=160, elem_id="neuron-select")
                caption = gr.Markdown("", label="About the selected neuron", elem_classes=["revelio-caption"],
                                      elem_id="neuron-caption")
            gallery = gr.Gallery(
                label="Its top-activating dataset images", columns=5, height="auto",
                object_fit="contain", allow_preview=True, elem_id="neuron-gallery",
            )
            why = interpret_ui.why_section()
            compare = interpret_ui.compare_section()
    return AnalyzeTab(image_in, layer_dd, t_dd, analyze_btn, show_dense, analysis_copy, examples, ood_md, preds,
                      preds_note, heatmap, neuron_table, neuron_dd, caption, gallery, analysis_state, why, compare)


def _browser_tab(rel0: LoadedRelease) -> BrowserTab:
    """The Neuron browser tab: one neuron's statistics and images, the sorted list, the label search."""
    layer0, t0 = rel0.default_entry()
    with gr.Tab("Neuron browser", id="browser"):
        with gr.Row():
            b_layer = gr.Dropdown(rel0.layers, value=layer0, label="Layer")
            b_t = IntDropdown(rel0.timesteps(layer0), value=t0, label="Timestep t")
            b_neuron = gr.Number(value=0, minimum=0, step=1, precision=0, label="Neuron id")
            b_show = gr.Button("Show neuron", variant="primary")
        neuron_copy = deep_links.copy_link_row("Copy link to this neuron", "neuron-link")
        with gr.Row():
            with gr.Column(scale=2):
                b_stats = gr.Markdown(BROWSER_PROMPT, label="Neuron statistics", elem_id="neuron-stats",
                                      elem_classes=["revelio-md"])
                b_hist = gr.Label(label="Labels of its top images (best-explaining column)", num_top_classes=8)
            with gr.Column(scale=3):
                b_gallery = gr.Gallery(label="Top-activating images", columns=5, height="auto", object_fit="contain")
        with gr.Row():
            with gr.Column():
                b_sort = gr.Radio([("how often it fires", "frequency"), ("best label AUROC", "auroc"),
                                   ("label entropy (lowest first)", "entropy"),
                                   ("mean activation", "mean_activation")],
                                  value="frequency", label="Sort neurons by")
                b_sorted = gr.Dataframe(headers=analysis.NEURON_TABLE_HEADERS, interactive=False, max_height=320,
                                        label="Neurons (click a row)", column_widths=BROWSER_COLUMNS,
                                        elem_id="browser-neurons", elem_classes=["revelio-table"])
            with gr.Column():
                b_class = gr.Dropdown([], label="Search: neurons that detect this label value",
                                      filterable=True, elem_id="search-value")
                b_class_table = gr.Dataframe(headers=analysis.SEARCH_TABLE_HEADERS, interactive=False,
                                             max_height=320, label="Best detectors, by AUROC (click a row)",
                                             elem_id="class-neurons", elem_classes=["revelio-table"])
    return BrowserTab(b_layer, b_t, b_neuron, b_show, neuron_copy, b_stats, b_hist, b_gallery, b_sort, b_sorted,
                      b_class, b_class_table)


def _layout(state: AppState) -> Page:
    """Every component of the page, in page order (the events are connected afterwards)."""
    release_dd = _header(state)
    link_note = gr.Markdown("", visible=False, elem_id="link-note")
    analysis_state = gr.State(None)
    # "wrap": every tab stays in the bar (two lines on a phone) instead of Gradio's measured "..." menu,
    # whose re-measuring once showed "About" twice.
    with gr.Tabs(overflow_behavior="wrap") as tabs:
        analyze_tab = _analyze_tab(state, analysis_state)
        browser = _browser_tab(state.get_release())
        concept = interpret_ui.concept_tab(state)
        with gr.Tab("About", id="about"):
            card_md = gr.Markdown(card_markdown(state.get_release()), elem_id="revelio-card",
                                  elem_classes=["revelio-md"])
    return Page(release_dd, link_note, tabs, analyze_tab, browser, concept, card_md)


def _wire_analyze(ev: Events, page: Page, backbone: dict[str, Any]) -> list[Any]:
    """The Analyze tab's events; returns those that set or clear the analysis (Analyze, re-analyses, new image).

    Every output is recomputed or cleared when an input it depends on changes (no stale screens):
    a new image clears the results; a new layer/timestep re-analyses (cached features: cheap) when
    there was a result; an error clears what the failed call would have replaced.
    """
    tab, results = page.analyze, page.analyze.results
    analyze_in = [tab.image, tab.layer, tab.timestep, page.release]
    # preprocess=False: the image arrives as the uploaded FileData (served_upload checks it) and the
    # dropdowns as sent, so numeric strings follow the same rule as /analyze_json.
    analyzed = tab.button.click(
        ev.analyze, analyze_in, results, api_name="analyze", preprocess=False, show_progress="full", **backbone,
    )
    analyzed.failure(ev.clear_results, None, results, **PRIVATE)
    scroll_to_results(analyzed)  # on a phone the results lie a screen below the button
    # /analyze keeps its four inputs (API callers); a ticked "show dense" box is applied right after
    analyzed.then(ev.apply_dense_choice, [tab.analysis, tab.show_dense], tab.neuron_outputs, **PRIVATE)
    tab.show_dense.input(ev.toggle_dense, [tab.analysis, tab.show_dense], tab.neuron_outputs, **PRIVATE)
    image_changed = tab.image.change(ev.clear_results, None, results, **PRIVATE)
    refresh = {"fn": ev.refresh, "inputs": [*analyze_in, tab.analysis, tab.show_dense], "outputs": results,
               "preprocess": False, **backbone, **PRIVATE}
    layer_refreshed = tab.layer.input(ev.change_layer, [page.release, tab.layer], tab.timestep, **PRIVATE
                                      ).then(**refresh)
    t_refreshed = tab.timestep.input(**refresh)
    for refreshed in (layer_refreshed, t_refreshed):
        refreshed.failure(ev.clear_results, None, results, **PRIVATE)
    selected = [tab.analysis, tab.layer, tab.timestep, page.release]
    tab.neuron.input(ev.select_neuron, [tab.analysis, tab.neuron, tab.layer, tab.timestep, page.release],
                     [tab.caption, tab.gallery, tab.heatmap], **PRIVATE)
    tab.neurons.select(ev.select_row, selected, tab.shown_neuron, **PRIVATE)
    tab.examples.select(ev.pick_example, page.release, tab.image, **PRIVATE)
    return [analyzed, layer_refreshed, t_refreshed, image_changed]


def _wire_browser(ev: Events, page: Page) -> None:
    """The Neuron browser's events."""
    b, release_dd = page.browser, page.release
    browser_inputs = [release_dd, b.layer, b.timestep, b.sort, b.search, b.neuron]
    details_io = ([release_dd, b.layer, b.timestep, b.neuron], b.details)
    # preprocess=False: "/neuron" takes the timestep and neuron id as sent (ints or numeric strings), so
    # a timestep "25" is accepted and a neuron id 3.5 refused instead of rounded.
    b.button.click(ev.neuron_details, *details_io, api_name="neuron", preprocess=False)
    b.neuron.submit(ev.neuron_details, *details_io, preprocess=False, **PRIVATE)
    b.layer.input(ev.change_layer, [release_dd, b.layer], b.timestep, **PRIVATE).then(
        ev.browser_entry, browser_inputs, b.outputs, preprocess=False, **PRIVATE)
    b.timestep.input(ev.browser_entry, browser_inputs, b.outputs, preprocess=False, **PRIVATE)
    b.sort.change(ev.sorted_neurons, [release_dd, b.layer, b.timestep, b.sort], b.sorted, **PRIVATE)
    b.search.input(ev.class_neurons, [release_dd, b.layer, b.timestep, b.search], b.search_table, **PRIVATE)
    for table in (b.sorted, b.search_table):
        table.select(ev.browser_row, [release_dd, b.layer, b.timestep], [b.neuron, *b.details], **PRIVATE)


def _wire_release_and_links(state: AppState, ev: Events, demo: gr.Blocks, page: Page,
                            backbone: dict[str, Any]) -> list[Any]:
    """A new release clears the Analyze tab and refills the browser; the page load opens its link.

    Returns the events that set or clear the analysis here (release change, a linked example).
    """
    a, b = page.analyze, page.browser
    browser_inputs = [page.release, b.layer, b.timestep, b.sort, b.search, b.neuron]
    release_changed = page.release.input(
        ev.change_release, page.release, [a.layer, a.timestep, a.examples, page.card, b.layer, b.timestep, *a.results],
        **PRIVATE,
    )
    release_changed.then(ev.browser_entry, browser_inputs, b.outputs, preprocess=False, **PRIVATE)
    loaded = demo.load(ev.browser_entry, browser_inputs, b.outputs, preprocess=False, **PRIVATE)
    link_analyzed = deep_links.wire(deep_links.LinkEvents(state, ev), loaded, page, backbone=backbone)
    return [release_changed, link_analyzed]


def build_ui(state: AppState) -> gr.Blocks:
    """The app for ``state``'s releases, with its queue configured (concurrency sized for the backbone)."""
    cfg = state.config
    ev = Events(state)
    backbone = {"concurrency_id": "backbone", "concurrency_limit": cfg.concurrency}
    with ServedBlocks(title="Revelio Hub", fill_width=True) as demo:
        page = _layout(state)
        analysis_events = _wire_analyze(ev, page, backbone)
        _wire_browser(ev, page)
        analysis_events += _wire_release_and_links(state, ev, demo, page, backbone)
        # Both analysis endpoints share one concurrency group: the limit is on backbone passes, not per endpoint.
        json_endpoint(ev.analyze_json, api_name="analyze_json", output="analysis", concurrency_id="backbone",
                      concurrency_limit=cfg.concurrency)
        interpret_ui.wire(interpret_ui.InterpretEvents(state, ev), page, analyzed=analysis_events,
                          concurrency=cfg.concurrency)
        json_endpoint(ev.search_neurons, api_name="search_neurons", output="neurons")
        wire_tools(state, user_errors)  # /describe_neuron, /list_releases (the MCP tools' other half)

    with _env_default(ANALYTICS_EVERY_ENV, str(ANALYTICS_EVERY)):  # read once, when the queue is made
        demo.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
    return demo


__all__ = ["Events", "ServedBlocks", "build_ui", "launch_kwargs", "theme", "CSS"]
