"""The Gradio Blocks: layout, events and the two API endpoints.

Every event function here is a thin shell: it unpacks component values, calls
:mod:`revelio_hub.app.analysis`, and turns a ``ValueError`` into ``gr.Error``
(a plain message in the UI and for ``gradio_client``; never a stack trace).
Unexpected exceptions are logged with their traceback on the server and
reported to the user as one sentence.

API (for ``gradio_client``):

* ``/analyze`` - the Analyze button: (image, layer, timestep, release) ->
  predictions, neuron table, selected neuron, caption, gallery, heat map.
* ``/analyze_json`` - (image file, layer, timestep, release id or "") -> a
  JSON dict ``{"release", "layer", "timestep", "predictions", "neurons"}``.
"""

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

import gradio as gr
from gradio import FileData

from revelio_hub.app import analysis as A
from revelio_hub.app.state import AppState, LoadedRelease

logger = logging.getLogger(__name__)

NEURON_HEADERS = ["neuron", "activation", "summary"]

CSS = """
#revelio-title h1 {margin-bottom: 0}
#revelio-title p {margin-top: 4px; opacity: .8}
#analyze-btn {min-height: 48px; font-size: 1.05em}
.revelio-caption {min-height: 2.2em}
"""


@contextlib.contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Show ``ValueError``s as they are and anything else as one plain sentence."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:  # the log keeps the traceback; the user gets a sentence
        logger.exception("Unexpected error while %s", action)
        raise gr.Error(
            f"Something went wrong while {action} ({type(exc).__name__}). "
            "Try another image or setting; the server log has the details.",
            print_exception=False,
        ) from None


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="amber", neutral_hue="slate")


def launch_kwargs(state: AppState) -> dict[str, Any]:
    """Arguments of ``Blocks.launch`` that the app needs wherever it is launched (app.py, tests)."""
    return {
        "theme": theme(),
        "css": CSS,
        "allowed_paths": state.allowed_paths(),
        "max_file_size": "25mb",
        "show_error": True,
    }


def _entry_updates(rel: LoadedRelease, layer: Optional[str] = None) -> tuple[dict, dict]:
    layers = rel.layers
    d_layer, d_t = rel.default_entry()
    layer = layer if layer in layers else d_layer
    ts = rel.timesteps(layer)
    t = d_t if d_t in ts else ts[0]
    return gr.update(choices=layers, value=layer), gr.update(choices=ts, value=t)


def build_ui(state: AppState) -> gr.Blocks:
    """The app for ``state``'s releases, with its queue configured (concurrency sized for the backbone)."""
    cfg = state.config
    rel0 = state.get_release()
    layer0, t0 = rel0.default_entry()
    release_choices = [(rel.name, rel.id) for rel in state.releases.values()]

    with gr.Blocks(title="Revelio Hub", fill_width=True) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(
                "# Revelio Hub\nSee what a diffusion model knows: which sparse-autoencoder neurons an image "
                "lights up, where they fire, what they mean, and the classes a light probe reads from the same features.",
                elem_id="revelio-title",
            )
            release_dd = gr.Dropdown(
                release_choices, value=rel0.id, label="Release", scale=0, min_width=240,
                interactive=len(release_choices) > 1,
            )
        analysis_state = gr.State(None)

        with gr.Tabs():
            # ------------------------------------------------------------ Analyze
            with gr.Tab("Analyze", id="analyze"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=300):
                        image_in = gr.Image(
                            type="filepath", image_mode=None, sources=["upload", "clipboard"],
                            label="Image", height=300, elem_id="image-in",
                        )
                        with gr.Row():
                            layer_dd = gr.Dropdown(rel0.layers, value=layer0, label="Layer", elem_id="layer")
                            t_dd = gr.Dropdown(rel0.timesteps(layer0), value=t0, label="Timestep t", elem_id="timestep")
                        analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn")
                        examples = gr.Gallery(
                            rel0.examples, label="Examples (click one to load it)", columns=5, height=170,
                            allow_preview=False, object_fit="cover", elem_id="examples",
                        )
                    with gr.Column(scale=3, min_width=380):
                        with gr.Row(equal_height=True):
                            preds = gr.Label(num_top_classes=cfg.top_classes, label="Predicted classes (Diff-C)", elem_id="predictions")
                            heatmap = gr.Image(label="Where the selected neuron fires", height=260, interactive=False, format="png", elem_id="heatmap")
                        neuron_table = gr.Dataframe(
                            headers=NEURON_HEADERS, datatype=["number", "number", "str"], label="Top neurons of this image (click a row)",
                            interactive=False, max_height=260, column_widths=["15%", "18%", "67%"], elem_id="neurons",
                        )
                        with gr.Row(equal_height=True):
                            neuron_dd = gr.Dropdown([], label="Selected neuron", scale=1, min_width=160, elem_id="neuron-select")
                            caption = gr.Markdown("", elem_classes=["revelio-caption"])
                        gallery = gr.Gallery(
                            label="Its top-activating dataset images", columns=5, height=240, object_fit="contain",
                            allow_preview=True, elem_id="neuron-gallery",
                        )

            # ---------------------------------------------------- Neuron browser
            with gr.Tab("Neuron browser", id="browser"):
                with gr.Row():
                    b_layer = gr.Dropdown(rel0.layers, value=layer0, label="Layer")
                    b_t = gr.Dropdown(rel0.timesteps(layer0), value=t0, label="Timestep t")
                    b_neuron = gr.Number(value=0, precision=0, minimum=0, label="Neuron id")
                    b_show = gr.Button("Show neuron", variant="primary")
                with gr.Row():
                    with gr.Column(scale=2):
                        b_stats = gr.Markdown("Pick a neuron id, or click a row of a list below.")
                        b_hist = gr.Label(label="Labels of its top images", num_top_classes=8)
                    with gr.Column(scale=3):
                        b_gallery = gr.Gallery(label="Top-activating images", columns=5, height=300, object_fit="contain")
                with gr.Row():
                    with gr.Column():
                        b_sort = gr.Radio(list(A.SORT_KEYS), value="frequency", label="Sort neurons by")
                        b_sorted = gr.Dataframe(headers=A.NEURON_TABLE_HEADERS, interactive=False, max_height=320, label="Neurons")
                    with gr.Column():
                        b_class = gr.Dropdown([], label="Neurons whose top images are mostly this class")
                        b_class_table = gr.Dataframe(headers=A.NEURON_TABLE_HEADERS, interactive=False, max_height=320, label="Class-specific neurons")

            # ------------------------------------------------------------- About
            with gr.Tab("About", id="about"):
                card_md = gr.Markdown(rel0.card or "_This release has no card._")

        # ================================================================ events

        def on_analyze(image, layer, timestep, release, progress=gr.Progress()):
            """Analyze an image: predicted classes, its top neurons, and the strongest neuron's images and heat map."""
            with user_errors("analysing the image"):
                result = A.analyze(
                    state, image, layer, timestep, release,
                    progress=lambda frac, desc: progress(frac, desc=desc),
                )
                rows = [[n.id, round(n.activation, 4), n.summary] for n in result.neurons]
                if not result.neurons:
                    return (result.predictions, rows, gr.update(choices=[], value=None),
                            "No neuron fires on this image.", [], result.image, result)
                top = result.neurons[0].id
                gal, overlay, text = A.neuron_view(state, result, top)
                choices = [(f"{n.id} · {n.summary}" if n.summary else str(n.id), n.id) for n in result.neurons]
                return (result.predictions, rows, gr.update(choices=choices, value=top), text, gal, overlay, result)

        analyze_outputs = [preds, neuron_table, neuron_dd, caption, gallery, heatmap, analysis_state]
        analyze_btn.click(
            on_analyze, [image_in, layer_dd, t_dd, release_dd], analyze_outputs,
            api_name="analyze", preprocess=False, show_progress="full",
        )

        def on_neuron(result, neuron):
            with user_errors("showing the neuron"):
                if result is None:
                    raise ValueError("Analyze an image first.")
                if neuron is None:
                    return "", [], result.image
                gal, overlay, text = A.neuron_view(state, result, neuron)
                return text, gal, overlay

        neuron_dd.input(on_neuron, [analysis_state, neuron_dd], [caption, gallery, heatmap], api_visibility="private")

        def on_row(result, evt: gr.SelectData):
            with user_errors("showing the neuron"):
                if result is None:
                    raise ValueError("Analyze an image first.")
                row = evt.row_value or []
                if not row:
                    raise ValueError("Click a row of the neuron table.")
                neuron = int(row[0])
                text, gal, overlay = on_neuron(result, neuron)
                return gr.update(value=neuron), text, gal, overlay

        neuron_table.select(on_row, [analysis_state], [neuron_dd, caption, gallery, heatmap], api_visibility="private")

        def on_example(evt: gr.SelectData):
            value = evt.value or {}
            image = value.get("image") if isinstance(value, dict) else None
            path = image.get("path") if isinstance(image, dict) else None
            if not path:
                raise gr.Error("Could not load that example; upload an image instead.", print_exception=False)
            return path

        examples.select(on_example, None, image_in, api_visibility="private")

        def on_layer(release, layer):
            with user_errors("changing the layer"):
                rel = state.get_release(release)
                return _entry_updates(rel, layer)[1]

        layer_dd.input(on_layer, [release_dd, layer_dd], t_dd, api_visibility="private")
        b_layer.input(on_layer, [release_dd, b_layer], b_t, api_visibility="private")

        # -- neuron browser
        def on_details(release, layer, timestep, neuron):
            with user_errors("showing the neuron"):
                d = A.neuron_details(state, release, layer, timestep, neuron)
                stats = (
                    f"### Neuron {d.id}\n{d.summary or ''}\n\n"
                    f"| frequency | mean activation | purity (std of top labels; lower = more specific) |\n|---|---|---|\n"
                    f"| {d.frequency:.4%} | {d.mean_activation:.3f} | {d.purity:.2f} |"
                )
                return stats, d.histogram, d.top_images

        b_show.click(on_details, [release_dd, b_layer, b_t, b_neuron], [b_stats, b_hist, b_gallery], api_name="neuron")
        b_neuron.submit(on_details, [release_dd, b_layer, b_t, b_neuron], [b_stats, b_hist, b_gallery], api_visibility="private")

        def on_sorted(release, layer, timestep, by):
            with user_errors("listing neurons"):
                return A.sorted_neurons(state, release, layer, timestep, by)

        def on_class(release, layer, timestep, name):
            with user_errors("finding neurons for the class"):
                if not name:
                    return []
                return A.class_neurons(state, release, layer, timestep, name)

        def on_browser_entry(release, layer, timestep, by, name):
            with user_errors("loading the release entry"):
                classes = A.class_names(state, release, layer, timestep)
                name = name if name in classes else None
                return (on_sorted(release, layer, timestep, by), gr.update(choices=classes, value=name),
                        on_class(release, layer, timestep, name))

        browser_inputs = [release_dd, b_layer, b_t, b_sort, b_class]
        browser_outputs = [b_sorted, b_class, b_class_table]
        b_t.change(on_browser_entry, browser_inputs, browser_outputs, api_visibility="private")
        b_sort.change(on_sorted, [release_dd, b_layer, b_t, b_sort], b_sorted, api_visibility="private")
        b_class.input(on_class, [release_dd, b_layer, b_t, b_class], b_class_table, api_visibility="private")

        def on_browser_row(release, layer, timestep, evt: gr.SelectData):
            row = evt.row_value or []
            if not row:
                raise gr.Error("Click a row of the list.", print_exception=False)
            neuron = int(row[0])
            return (neuron, *on_details(release, layer, timestep, neuron))

        for table in (b_sorted, b_class_table):
            table.select(on_browser_row, [release_dd, b_layer, b_t], [b_neuron, b_stats, b_hist, b_gallery], api_visibility="private")

        # -- switching release
        def on_release(release):
            with user_errors("switching release"):
                rel = state.get_release(release)
                layer_u, t_u = _entry_updates(rel)
                layer_b, t_b = _entry_updates(rel)
                return (layer_u, t_u, rel.examples, rel.card or "_This release has no card._", layer_b, t_b,
                        None, [], gr.update(choices=[], value=None), "", [], None)

        release_dd.input(
            on_release, release_dd,
            [layer_dd, t_dd, examples, card_md, b_layer, b_t, preds, neuron_table, neuron_dd, caption, gallery, heatmap],
            api_visibility="private",
        )
        demo.load(on_browser_entry, browser_inputs, browser_outputs, api_visibility="private")

        # -- JSON API for gradio_client users
        def analyze_json(image: FileData, layer: str = "", timestep: int = -1, release: str = "") -> dict:
            """Analyze an image file; returns {"release", "layer", "timestep", "predictions": {class: prob},
            "neurons": [{"id", "activation", "summary"}]} with neurons sorted by activation (strongest first).
            Leave layer "" and timestep -1 for the release's default entry, release "" for the app's default release."""
            with user_errors("analysing the image"):
                t = None if timestep is None or (isinstance(timestep, (int, float)) and timestep < 0) else timestep
                return A.analyze(state, image, layer or None, t, release).to_json()

        gr.api(analyze_json, api_name="analyze_json")

    demo.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
    return demo


__all__ = ["build_ui", "launch_kwargs", "user_errors", "theme", "CSS"]
