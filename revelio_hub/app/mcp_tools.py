"""The app as Model Context Protocol tools, for LLM agents.

Gradio serves every public endpoint of an app as an MCP tool when launched
with ``mcp_server=True`` (the tool's description and argument descriptions come
from the function's docstring, its schema from the type hints). The tools are
the JSON API itself, so an agent gets exactly what ``gradio_client`` and raw
HTTP get, and its calls go through the same gate: Gradio's MCP server calls the
app over HTTP through ``gradio_client``, so an image reaches an endpoint only as
an upload: a ``data:`` URI the agent sends is uploaded first, the URL of a file
the agent uploaded (what Gradio's ``upload_file_to_gradio`` tool returns) is read
as that upload (:func:`file_route_urls_as_paths`), and any other URL is refused
before anything is fetched (:class:`~revelio_hub.app.ui.ServedBlocks`).

The tools: ``analyze_json`` (an image's neurons with summaries and how reliable
they are), ``attribute_json`` (why Diff-C predicted a class), ``compare_json``,
``search_neurons`` (neurons detecting a label value), ``describe_neuron``
(defined here) and ``list_releases`` (here). The two UI endpoints ``/analyze``
and ``/neuron`` return Gradio component values and are marked
:func:`ui_only`, so agents do not see them.

An agent reads a tool's docstring: its first paragraph, each argument's line,
and the ``Returns:`` lines, which Gradio joins with ", " (so in these
docstrings a ``Returns:`` line ends where a comma belongs, without one).

``mcp`` is an optional dependency (``pip install "revelio-hub[mcp]"``): the app
starts without it and says how to enable MCP when it is asked for.
"""

import base64
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import unquote

from huggingface_hub.utils import HFValidationError, validate_repo_id

from revelio_hub.app import analysis
from revelio_hub.app.api_surface import json_endpoint
from revelio_hub.app.state import AppState
from revelio_hub.app.validation import whole_number
from revelio_hub.interpret.atlas_config import THUMBNAIL_DIR

#: Environment variable that turns the MCP server on where there is no command line (a Space's variables).
MCP_ENV = "REVELIO_MCP"
MCP_INSTALL = 'pip install "revelio-hub[mcp]"  (or: pip install "gradio[mcp]")'
#: Top images :func:`describe_neuron` returns at most (each a WebP thumbnail as the atlas stores it).
MAX_TOP_IMAGES = 20


def mcp_requested(flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """``--mcp``, or ``$REVELIO_MCP`` set to 1/true/yes/on."""
    return bool(flag) or environ.get(MCP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def mcp_unavailable() -> Optional[str]:
    """Why the MCP server cannot start here (the ``mcp`` package is missing), or ``None`` when it can."""
    try:
        import mcp  # noqa: F401  (Gradio imports it when the MCP server starts; a clear message beats its traceback)
    except ImportError:
        return f"MCP needs the optional `mcp` package, which is not installed. Enable it with: {MCP_INSTALL}"
    return None


#: A URL of a Gradio app's file route, as Gradio's ``upload_file_to_gradio`` MCP tool returns for an upload.
_FILE_ROUTE_URL = re.compile(r"^https?://[^/?#]+(?:/[^?#]*)?/gradio_api/file=(?P<path>[^?#]+)$")


def file_route_urls_as_paths(value: Any) -> Any:
    """``value`` with each tagged file whose path is a URL of the file route replaced by the path it names.

    Gradio's MCP integration tells agents to upload a file first (its
    ``upload_file_to_gradio`` tool posts it to ``/gradio_api/upload``) and then
    pass the URL it returns, ``<app>/gradio_api/file=<upload path>``; Gradio
    would download that URL on the server. Read as the path it names instead,
    it is an upload reference like the one ``gradio_client`` sends, and goes
    through the same checks (inside the upload folder, or refused). Nothing is
    fetched, whatever host the URL names; other URLs are left for the app to
    refuse.
    """
    if isinstance(value, dict):
        path = value.get("path")
        meta = value.get("meta")
        if isinstance(path, str) and isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
            match = _FILE_ROUTE_URL.match(path)
            if match:
                return {**value, "path": unquote(match.group("path")), "url": None}
        return {k: file_route_urls_as_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [file_route_urls_as_paths(v) for v in value]
    return value


def ui_only(fn: Callable) -> Callable:
    """Mark an event function as a UI endpoint: callable through the API, but not listed as an MCP tool.

    Gradio lists an endpoint as a tool unless its function's ``_mcp_type`` is
    something other than ``"tool"``; bound methods read the attribute from the
    function, so the decorator works on methods too.
    """
    fn._mcp_type = "ui"
    return fn


def _thumbnail_uri(atlas: Any, image_id: int) -> str:
    """The stored WebP thumbnail as a ``data:`` URI (encoded again only when the atlas holds it in memory)."""
    file = Path(atlas.path) / THUMBNAIL_DIR / f"{image_id}.webp" if atlas.path is not None else None
    if file is not None and file.is_file():
        data = file.read_bytes()
    else:
        buffer = io.BytesIO()
        atlas.thumbnail(image_id).save(buffer, format="WEBP", quality=85)
        data = buffer.getvalue()
    return "data:image/webp;base64," + base64.b64encode(data).decode("ascii")


def _auroc_table(atlas: Any, neuron: int) -> dict[str, dict[str, Optional[float]]]:
    """{column: {value: AUROC or None}} of one neuron (None where undefined)."""
    table = {}
    for column, values in atlas.label_columns.items():
        row = atlas.value_auroc(column)[neuron].tolist()
        table[column] = {v: (None if math.isnan(a) else round(float(a), 4)) for v, a in zip(values, row)}
    return table


def describe_neuron(state: AppState, release: Optional[str], layer: Optional[str], timestep: Any, neuron: Any,
                    top_images: Any = 5) -> dict[str, Any]:
    """The ``/describe_neuron`` payload: one neuron's summary, statistics, AUROCs and top images."""
    n_top = whole_number(top_images, "top_images")
    if not 0 <= n_top <= MAX_TOP_IMAGES:
        raise ValueError(f"top_images must be from 0 to {MAX_TOP_IMAGES}, got {n_top}.")
    rel, layer, t = analysis.resolve_entry(state, release, layer, timestep)
    details = analysis.neuron_details(state, rel.name, layer, t, neuron)
    atlas = rel.entry(layer, t).atlas
    info = atlas.neuron(details.id)
    tops = list(zip(info.top_image_ids, info.top_labels, info.top_activations))[:n_top]
    return {
        "release": rel.name, "layer": layer, "timestep": t, "neuron": details.id,
        "summary": details.summary,
        "frequency": round(details.frequency, 6),
        "mean_activation": round(details.mean_activation, 6),
        "best_auroc": None if math.isnan(details.best_auroc) else round(details.best_auroc, 4),
        "entropy": None if math.isnan(details.entropy) else round(details.entropy, 4),
        "dense": details.dense,
        "label_values": details.label_values,
        "auroc": _auroc_table(atlas, details.id),
        "top_images": [{"image_id": int(i), "label": label, "activation": round(float(a), 6),
                        "thumbnail": _thumbnail_uri(atlas, int(i))} for i, label, a in tops],
    }


def _hub_id(value: Any) -> Optional[str]:
    """``value`` when it is a Hub repo id, else ``None``: a backbone given as a local folder is a server path."""
    text = str(value or "")
    if not text or Path(text).is_absolute() or Path(text).exists() or text.startswith("."):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def list_releases(state: AppState) -> list[dict[str, Any]]:
    """The ``/list_releases`` payload: every served release by name, its entries and classes.

    The backbone is named only by its Hub id (``None`` for a local folder).
    """
    out = []
    for rel in state.releases.values():
        layer, t = rel.default_entry()
        out.append({
            "release": rel.name,
            "backbone": _hub_id(rel.release.backbone_id),
            "classes": list(rel.release.class_names or []),
            "default": {"layer": layer, "timestep": t},
            "entries": [{"layer": l, "timestep": tt, "diffc": (l, tt) in set(analysis.diffc_entries(rel))}
                        for l, tt in rel.entries],
        })
    return out


class ToolEvents:
    """The JSON endpoints that exist for programs and agents only (no UI control calls them)."""

    def __init__(self, state: AppState, user_errors: Callable[[str], Any]) -> None:
        self.state = state
        self._user_errors = user_errors

    def describe_neuron(self, neuron: int, layer: str = "", timestep: int = -1, release: str = "",
                        top_images: int = 5) -> dict:
        """Describe one neuron of a k-sparse autoencoder: what it detects, how reliably, and its top images.

        Args:
            neuron: the neuron id (0 to the SAE's number of latents - 1), e.g. from analyze_json or search_neurons.
            layer: the backbone layer of the entry ("" = the release's default entry).
            timestep: the diffusion timestep t of the entry (-1 = the default for the layer).
            release: the release name from list_releases ("" = the app's default release).
            top_images: how many top-activating dataset images to return, 0 to 20.
        Returns:
            {"release", "layer", "timestep", "neuron", "summary" (the label value it detects, or "mixed")
            "frequency" (share of dataset images it fires on), "mean_activation", "best_auroc", "entropy"
            "dense" (fires on most images: says little about one image)
            "label_values" (per label column, the best value's evidence)
            "auroc" ({column: {value: AUROC}} over all atlas images; 0.5 = chance, 1 = perfect)
            "top_images": [{"image_id", "label", "activation", "thumbnail" (a data:image/webp;base64 URI)}]}
        """
        with self._user_errors("describing the neuron"):
            return describe_neuron(self.state, release, layer or None, timestep, neuron, top_images)

    def list_releases(self) -> list:
        """List the releases this app serves and their (layer, timestep) entries; call it first to pick valid
        arguments for the other tools.

        Returns:
            [{"release" (the name other tools take), "backbone" (its Hub id), "classes" (what Diff-C predicts)
            "default": {"layer", "timestep"}
            "entries": [{"layer", "timestep", "diffc" (whether it predicts classes)}]}]
        """
        with self._user_errors("listing the releases"):
            return list_releases(self.state)


def wire_tools(state: AppState, user_errors: Callable[[str], Any]) -> ToolEvents:
    """Register ``/describe_neuron`` and ``/list_releases`` (inside the Blocks context)."""
    tools = ToolEvents(state, user_errors)
    json_endpoint(tools.describe_neuron, api_name="describe_neuron", output="neuron")
    json_endpoint(tools.list_releases, api_name="list_releases", output="releases")
    return tools


__all__ = ["MCP_ENV", "MCP_INSTALL", "ToolEvents", "describe_neuron", "file_route_urls_as_paths", "list_releases",
           "mcp_requested",
           "mcp_unavailable", "ui_only", "wire_tools"]
