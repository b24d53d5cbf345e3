"""The analyses behind every button of the app, as plain functions.

The UI (:mod:`revelio_hub.app.ui`) and the JSON API call these, and tests call
them directly: each takes an :class:`~revelio_hub.app.state.AppState` and plain
values, and returns plain data (dataclasses, dicts, PIL images). Bad input is a
``ValueError`` whose message is written for the person who made the request;
the UI turns it into ``gr.Error``.

The costly step, the backbone pass, happens only in :func:`analyze` (and only
on a feature-cache miss). Picking another neuron (:func:`neuron_view`) reuses
the cached maps: it runs the SAE on one small map and reads the atlas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from revelio_hub.app.state import OOD_EXTRA_SAE_MAX_PARAMS, AppState, LoadedRelease, image_digest
from revelio_hub.app.errors import NO_DIFFC
from revelio_hub.app.shown_files import shown_copy
from revelio_hub.app.validation import MAX_TEXT_CHARS, ImageLimits, shown, whole_number
from revelio_hub.interpret.heatmap import overlay_heatmap, with_colour_scale
from revelio_hub.interpret.ood import assess, ordinal, sae_error
from revelio_hub.interpret.reliability import UNRELIABLE_MESSAGE, VIEWS
from revelio_hub.layer_names import canonical_layer

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: Side of the image shown under the heat map (the backbone's centre crop, upsampled for display).
DISPLAY_SIZE = 384
#: Ways the neuron browser can sort neurons: most frequent, best label detector (AUROC, highest first),
#: most class-specific top images (entropy, lowest first), strongest when firing.
SORT_KEYS = ("frequency", "auroc", "entropy", "mean_activation")
#: How an image's neurons are ranked. ``relevance`` (default): activation / the neuron's mean activation
#: when it fires, i.e. how unusual this activation is for this neuron; chosen over a z-score and raw
#: activation with benchmarks/bench_explain.py (docs/benchmarks.md). ``top``: activation / the neuron's
#: weakest top image (≥ 1: this image would be one of its top images). ``zscore``: (activation − mean over
#: all atlas images) / std. ``activation``: raw activation (lists always-on neurons first).
RANKINGS = ("relevance", "top", "zscore", "activation")
DEFAULT_RANKING = "relevance"

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class NeuronHit:
    """One of an image's most relevant neurons.

    ``relevance`` is how unusual the activation is for this neuron (see
    :data:`RANKINGS`); ``frequency`` the share of atlas images it fires on;
    ``dense`` marks neurons firing on more than the atlas' dense threshold,
    which say little about any one image (the app hides them by default).
    """

    id: int
    activation: float
    summary: str
    relevance: float = float("nan")
    frequency: float = float("nan")
    dense: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "activation": self.activation, "relevance": self.relevance,
                "frequency": self.frequency, "summary": self.summary, "dense": self.dense}


@dataclass
class Analysis:
    """The result of analysing one image at one (release, layer, t).

    ``digest`` keys the cached feature maps, so follow-up calls (another neuron,
    the heat map) find them without running the backbone again. ``release`` is
    the release's *name* (what users see; its id may be a server path).
    ``predictions`` is ``None`` when the entry has no Diff-C head, and ``note``
    then says so and names the entries that have one.
    """

    release: str
    layer: str
    timestep: int
    predictions: Optional[dict[str, float]]
    neurons: list[NeuronHit]
    digest: str
    image: "Image.Image" = field(repr=False)
    note: Optional[str] = None
    ood: Optional[dict[str, Any]] = None
    ranking: str = DEFAULT_RANKING

    def to_json(self) -> dict[str, Any]:
        """The ``/analyze_json`` payload: neurons sorted by relevance (most unusual for the neuron first),
        dense ones included and flagged; ``ood`` holds the out-of-distribution numbers and verdict."""
        return {
            "release": self.release,
            "layer": self.layer,
            "timestep": self.timestep,
            "predictions": dict(self.predictions) if self.predictions is not None else None,
            "note": self.note,
            "neurons": [n.to_dict() for n in self.neurons],
            "ranking": self.ranking,
            "reliable": self.reliable,
            "reasons": list((self.ood or {}).get("reasons") or []),
            "ood": dict(self.ood) if self.ood is not None else None,
        }

    @property
    def reliable(self) -> bool:
        """False when the reliability check flagged the image: predictions and neuron names are then unreliable."""
        return bool((self.ood or {}).get("reliable", True))

    def visible_neurons(self, show_dense: bool = False) -> list[NeuronHit]:
        """The neurons the app lists: dense ones only when asked."""
        return [n for n in self.neurons if show_dense or not n.dense]


@dataclass
class NeuronDetails:
    """What the neuron browser shows about one neuron."""

    id: int
    summary: str
    frequency: float
    mean_activation: float
    purity: float  # per-neuron class-id spread (kept for old callers; the UI shows AUROC and entropy)
    histogram: dict[str, float]
    top_images: list[tuple[Any, str]]
    best_auroc: float = float("nan")
    entropy: float = float("nan")
    dense: bool = False
    label_values: list[dict[str, Any]] = field(default_factory=list)
    histogram_column: Optional[str] = None
    #: the entry's σ_label beside its chance level (:func:`sigma_label_note`); "" when the atlas lacks it
    layer_note: str = ""


# --------------------------------------------------------------------- helpers


def resolve_entry(
    state: AppState, release: Optional[str], layer: Optional[str], timestep: Any
) -> tuple[LoadedRelease, str, int]:
    """Validate the (release, layer, t) choice; missing layer/t fall back to the release's first entry.

    The timestep follows :func:`~revelio_hub.app.validation.whole_number` (an
    int or a numeric string); ``None``, ``""`` and ``-1`` (the API's documented
    "default") pick the release's default for the layer, any other value must
    be one the layer offers.
    """
    rel = state.get_release(release)
    default_layer, default_t = rel.default_entry()
    if layer in (None, ""):
        layer = default_layer
    if not isinstance(layer, str):
        raise ValueError(f"Layer must be a layer name, got {shown(layer, 24)}.")
    layer = canonical_layer(layer)  # mid_block -> bottleneck: the answer names the canonical layer
    t = None if timestep is None or (isinstance(timestep, str) and not timestep.strip()) else whole_number(timestep, "Timestep")
    if t is None or t == -1:
        ts = rel.timesteps(layer)
        t = default_t if default_t in ts or not ts else ts[0]
    layer, t = rel.check_entry(layer, t)
    return rel, layer, t


def diffc_entries(rel: LoadedRelease) -> list[tuple[str, int]]:
    """The ``(layer, t)`` entries of ``rel`` that ship a Diff-C head (from ``release.json``, nothing loaded)."""
    items = (getattr(rel.release, "config", None) or {}).get("entries") or []
    return [(str(i["layer"]), int(i["timestep"])) for i in items if isinstance(i, dict) and i.get("diffc")]


def no_diffc_note(rel: LoadedRelease, layer: str, t: int) -> str:
    """What to tell a user whose entry has no classifier (:data:`~revelio_hub.app.errors.NO_DIFFC`)."""
    entries = getattr(rel.release, "diffc_entries", None) or []
    where = ", ".join(f"{l} t={tt}" for l, tt in entries) or "none in this release"
    return NO_DIFFC.format(layer=layer, t=t, where=where)


def model_recipe(model: Any) -> dict[str, Any]:
    """The feature recipe a k-SAE or Diff-C was trained on, as a dict (empty if unknown)."""
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        return {}
    return dict(recipe) if isinstance(recipe, dict) else recipe.to_dict()


def _check_neuron(entry: Any, neuron: Any) -> int:
    n_latents = int(entry.sae.n_latents)
    try:
        value = whole_number(neuron, "Neuron id")
    except ValueError:
        value = None
    if value is None or not 0 <= value < n_latents:
        raise ValueError(f"Neuron id must be a whole number from 0 to {n_latents - 1}, got {shown(neuron, 24)}.")
    return value


def _atlas_summary(atlas: Any, i: int, activation: Optional[float] = None) -> str:
    """The neuron's line; with an image's ``activation``, as it applies to that image (names withheld where the
    neuron fires too weakly there for its claims, see :meth:`NeuronAtlas.summary_on_image`)."""
    if atlas is None:
        return ""
    return str(atlas.summary(i) if activation is None else atlas.summary_on_image(i, activation))


def _atlas(entry: Any, rel: LoadedRelease, layer: str, t: int) -> Any:
    if entry.atlas is None:
        raise ValueError(f"Release {rel.name!r} has no neuron atlas for {layer} t={t}; pick another entry.")
    return entry.atlas


def display_image(image: "Image.Image", size: int = DISPLAY_SIZE) -> "Image.Image":
    """The backbone's view of ``image`` (same resize + centre crop), at display resolution."""
    from revelio_hub.images import center_crop_resize

    return center_crop_resize(image, size)


# -------------------------------------------------------------------- analyses


def analyze(
    state: AppState,
    image: Any,
    layer: Optional[str] = None,
    timestep: Any = None,
    release: Optional[str] = "",
    *,
    progress: Optional[ProgressFn] = None,
    limits: ImageLimits = ImageLimits(),
    ranking: str = DEFAULT_RANKING,
) -> Analysis:
    """Predict classes and list the most relevant neurons of ``image`` at ``(release, layer, t)``.

    ``image`` is anything :func:`~revelio_hub.app.validation.read_image`
    accepts. Predictions are the entry's Diff-C top-k probabilities (so they sum
    to at most 1); neurons are ranked by ``ranking`` (see :data:`RANKINGS`):
    the ``top_neurons`` best non-dense ones plus, flagged, the best dense ones,
    each with the atlas' one-line summary. ``ood`` compares the SAE's
    reconstruction error on the image with its error on the atlas images.
    """
    import torch

    if ranking not in RANKINGS:
        raise ValueError(f"Unknown ranking {shown(ranking)}; choose one of: {', '.join(RANKINGS)}.")

    rel, layer, t = resolve_entry(state, release, layer, timestep)
    if progress:
        progress(0.0, "Reading the image…")
    img = state.decoded.read(image, limits)
    digest = image_digest(img)
    entry = rel.entry(layer, t)
    sae_recipe = model_recipe(entry.sae)
    maps = state.feature_maps(img, rel, t, sae_recipe, digest=digest, progress=progress)
    predictions: Optional[dict[str, float]] = None
    if entry.diffc is not None:
        diffc_recipe = model_recipe(entry.diffc)
        same = all(diffc_recipe.get(k) == sae_recipe.get(k) for k in ("image_size", "noise_seed", "ensemble"))
        # A Diff-C trained at another image size (the paper: 512 px vs 256 px) needs its own pass.
        diffc_maps = maps if same else state.feature_maps(img, rel, t, diffc_recipe, digest=digest, progress=progress)
    if progress:
        progress(0.8, "Decoding neurons and classes…")
    fmap = maps[layer]
    logits = views = None
    with torch.inference_mode():
        acts = entry.sae.image_activations(fmap)[0].float()
        if entry.diffc is not None:
            predictions = entry.diffc.predict(diffc_maps[layer], top_k=state.config.top_classes)[0]
            logits = entry.diffc(diffc_maps[layer]).float().cpu()
    if entry.diffc is not None:
        views = view_logits_of(state, rel, entry, layer, t, img)
    neurons = rank_neurons(entry.atlas, acts, state.config.top_neurons, ranking)
    note = None
    if predictions is not None:
        predictions = {str(name): round(float(p), 6) for name, p in predictions.items()}
    else:
        note = no_diffc_note(rel, layer, t)
    ood = out_of_distribution(rel, layer, t, maps, predictions or {}, maps.errors, logits, views)
    return Analysis(rel.name, layer, t, predictions, neurons, digest, display_image(img), note=note, ood=ood,
                    ranking=ranking)


def neuron_scores(atlas: Any, acts: "torch.Tensor", ranking: str = DEFAULT_RANKING) -> "torch.Tensor":
    """The ranking score of every neuron for one image's activations (see :data:`RANKINGS`)."""
    if atlas is None or ranking == "activation":
        return acts.float()
    if ranking == "top":
        return atlas.top_relative(acts)
    return atlas.zscore(acts) if ranking == "zscore" else atlas.relevance(acts)


def rank_neurons(atlas: Any, acts: "torch.Tensor", n: int, ranking: str = DEFAULT_RANKING) -> list[NeuronHit]:
    """The ``n`` highest-scoring firing neurons that are not dense, then up to ``n`` dense ones, best first."""
    import torch

    scores = neuron_scores(atlas, acts, ranking)
    firing = acts > 0
    dense = atlas.dense_mask.to(acts.device) if atlas is not None else torch.zeros_like(firing)
    hits: list[NeuronHit] = []
    for group in (firing & ~dense, firing & dense):
        ids = torch.nonzero(group).flatten()
        if ids.numel() == 0:
            continue
        order = ids[torch.argsort(scores[ids], descending=True, stable=True)][:n]
        for i in order.tolist():
            freq = float(atlas.stats["frequency"][i]) if atlas is not None else float("nan")
            hits.append(NeuronHit(int(i), round(float(acts[i]), 6), _atlas_summary(atlas, int(i), float(acts[i])),
                                  relevance=round(float(scores[i]), 4), frequency=round(freq, 4),
                                  dense=bool(dense[i])))
    hits.sort(key=lambda h: h.relevance if h.relevance == h.relevance else h.activation, reverse=True)
    return hits


def _small_sae_layers(rel: LoadedRelease, layer: str, t: int) -> list[str]:
    """Other layers at ``t`` whose SAE joins the out-of-distribution check (see :data:`OOD_EXTRA_SAE_MAX_PARAMS`)."""
    return [name for name in rel.small_sae_layers(t) if name != layer]


def out_of_distribution(rel: LoadedRelease, layer: str, t: int, maps: dict[str, "torch.Tensor"],
                        predictions: dict[str, float],
                        errors: Optional[dict[str, float]] = None,
                        logits: Optional["torch.Tensor"] = None,
                        view_logits: Optional[dict[str, "torch.Tensor"]] = None) -> Optional[dict[str, Any]]:
    """The reliability verdict on an image: ``reliable``, ``reasons``, and the numbers behind them.

    With a calibrated reliability score (``entry.reliability``, see
    :mod:`revelio_hub.interpret.reliability`) the score decides: ``logits`` are
    Diff-C's on the image, ``view_logits`` on its views (:func:`view_logits_of`).
    Without one (an entry without Diff-C, an older release) the SAE
    reconstruction-error percentiles decide, the worst layer first
    (:func:`revelio_hub.interpret.ood.assess`). Either way the
    reconstruction errors of the analysed layer and the small SAEs of the
    other layers at ``t`` are reported (``errors``: those a backbone worker
    already computed on these ``maps``).
    """
    entry = rel.entry(layer, t)
    model = entry.reliability
    names = [layer, *_small_sae_layers(rel, layer, t)]
    if model is not None:
        names += [name for name in model.layers if name not in names]
    measured = {name: (float(errors[name]) if errors is not None and name in errors
                       else sae_error(rel.entry(name, t).sae, maps[name])) for name in names if name in maps}

    def percentile(name: str) -> Optional[float]:
        atlas = rel.entry(name, t).atlas
        return atlas.error_percentile(measured[name]) if atlas is not None else None

    others = {name: (measured[name], percentile(name)) for name in names[1:] if name in measured}
    confidence = max(predictions.values()) if predictions else None
    report = assess(measured[layer], percentile(layer), confidence, layer=layer, others=others).to_dict()
    if model is None or logits is None:
        report["reliable"] = not report["out_of_distribution"]
        report["reasons"] = [report["message"]] if report["out_of_distribution"] else []
        return report
    values = model.image_values(measured, logits, view_logits, maps[layer].mean(dim=(2, 3)),
                                {name: maps[name].amax(dim=(2, 3)) for name in model.trust_layers if name in maps})
    return {**report, **reliability_report(model, values)}


def reliability_report(model: Any, values: dict[str, float]) -> dict[str, Any]:
    """The verdict of a calibrated score as the app reports it: ``reliable``, ``reasons``, the message.

    The message of a reliable image quotes the signal (and so the layer) that
    weighed most, with its percentile among the release's held-out images.
    """
    verdict = model.verdict(values)
    decided = verdict.signals[verdict.decided_by]
    if verdict.reliable:
        where = f"{verdict.decided_by} is at the {ordinal(round(decided['percentile']))} percentile"
        message = (f"Like the release's data: reliability score {verdict.score:.2f} (flagged above "
                   f"{verdict.threshold:.2f}); the signal that weighed most, {where} of the release's held-out images.")
    else:
        message = f"{UNRELIABLE_MESSAGE} Why: {'; '.join(verdict.reasons)}."
    return {"reliable": verdict.reliable, "reasons": verdict.reasons, "out_of_distribution": not verdict.reliable,
            "message": message, "reliability": verdict.to_dict()}


def image_reliability(state: AppState, rel: LoadedRelease, entry: Any, layer: str, t: int, image: "Image.Image",
                      maps: dict[str, "torch.Tensor"]) -> Optional[dict[str, Any]]:
    """:func:`out_of_distribution` for a view that has only the image and its Diff-C maps (``/attribute_json``)."""
    import torch

    with torch.inference_mode():
        logits = entry.diffc(maps[layer]).float().cpu()
    probs = torch.softmax(logits[0], -1)
    predictions = {str(entry.diffc.class_names[int(probs.argmax())]): float(probs.max())}
    sae_maps = state.feature_maps(image, rel, t, model_recipe(entry.sae))
    return out_of_distribution(rel, layer, t, sae_maps, predictions, sae_maps.errors, logits,
                               view_logits_of(state, rel, entry, layer, t, image))


def view_logits_of(state: AppState, rel: LoadedRelease, entry: Any, layer: str, t: int,
                   image: "Image.Image") -> dict[str, "torch.Tensor"]:
    """Diff-C's logits on the views (e.g. the mirrored image) the entry's reliability score compares.

    Each view is one more backbone pass, cached like any image's (a second
    analysis of the same upload costs nothing).
    """
    import torch

    model = entry.reliability
    if model is None or entry.diffc is None:
        return {}
    out = {}
    for view in model.views:
        maps = state.feature_maps(VIEWS[view](image), rel, t, model_recipe(entry.diffc))
        with torch.inference_mode():
            out[view] = entry.diffc(maps[layer]).float().cpu()
    return out


def activation_map(state: AppState, analysis: Analysis, neuron: Any) -> "torch.Tensor":
    """Where ``neuron`` fires on the analysed image: an ``H×W`` map from the cached features.

    Raises ``ValueError`` if the features fell out of the cache (the caller
    should analyse the image again).
    """
    import torch

    rel = state.get_release(analysis.release)
    entry = rel.entry(analysis.layer, analysis.timestep)
    neuron_id = _check_neuron(entry, neuron)
    maps = state.features.get(state.feature_key(analysis.digest, rel, analysis.timestep, model_recipe(entry.sae)))
    if maps is None:
        raise ValueError("This image's features are no longer cached; click Analyze again.")
    with torch.inference_mode():
        amap = entry.sae.activation_map(maps[analysis.layer], [neuron_id])
    return amap[0, 0].float()


def neuron_gallery(state: AppState, release: Optional[str], layer: str, timestep: Any, neuron: Any, n: Optional[int] = None) -> list[tuple[Any, str]]:
    """The atlas' top-activating dataset images of ``neuron`` as (image, caption) pairs."""
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    entry = rel.entry(layer, t)
    neuron_id = _check_neuron(entry, neuron)
    return _top_images(entry.atlas, neuron_id, n or state.config.top_images)


def _top_images(atlas: Any, neuron_id: int, n: int) -> list[tuple[Any, str]]:
    """(thumbnail, "label · activation") of a neuron's top dataset images.

    Thumbnails are returned as file paths when the atlas folder has them, so
    Gradio serves the stored WebP files instead of re-encoding images: copies
    in Gradio's upload folder, never the release folder itself (:mod:`revelio_hub.app.shown_files`).
    """
    if atlas is None:
        return []
    from revelio_hub.interpret.atlas_config import THUMBNAIL_DIR

    info = atlas.neuron(neuron_id)
    items: list[tuple[Any, str]] = []
    for image_id, act, label in list(zip(info.top_image_ids, info.top_activations, info.top_labels))[:n]:
        file = Path(atlas.path) / THUMBNAIL_DIR / f"{int(image_id)}.webp" if atlas.path is not None else None
        image = shown_copy(file) if file is not None and file.is_file() else atlas.thumbnail(int(image_id))
        caption = f"{label} · {float(act):.2f}" if label else f"#{int(image_id)} · {float(act):.2f}"
        items.append((image, caption))
    return items


def neuron_view(state: AppState, analysis: Analysis, neuron: Any) -> tuple[list[tuple[Any, str]], "Image.Image", str]:
    """Gallery, heat-map overlay and a one-line caption for ``neuron`` on an analysed image.

    Uses only cached features: no backbone pass.
    """
    rel = state.get_release(analysis.release)
    entry = rel.entry(analysis.layer, analysis.timestep)
    neuron_id = _check_neuron(entry, neuron)
    amap = activation_map(state, analysis, neuron_id)
    peak = float(amap.max())
    overlay = with_colour_scale(overlay_heatmap(analysis.image, amap), max(peak, 0.0))
    gallery = _top_images(entry.atlas, neuron_id, state.config.top_images)
    listed = next((h.activation for h in analysis.neurons if h.id == neuron_id), None)
    summary = _atlas_summary(entry.atlas, neuron_id, peak if listed is None else listed)
    caption = (f"Neuron {neuron_id}" + (f" — {summary}" if summary else "") + f" ({_map_peak(entry.sae, peak)}). "
               "The heat map covers the square centre crop the backbone sees." + _map_caveat(entry.sae))
    return gallery, overlay, caption


def _map_peak(sae: Any, peak: float) -> str:
    """The heat map's peak in words. A pooled SAE's neuron can fire on the image's mean vector while no single
    position fires it alone, so "does not fire anywhere" would be false there."""
    pooled = getattr(sae, "granularity", "token") == "pooled"
    if peak > 0:
        return f"{'per-position ' if pooled else ''}peak activation {peak:.3g}"
    return "no single position fires it on its own" if pooled else "does not fire anywhere on this image"


def _map_caveat(sae: Any) -> str:
    """What a pooled SAE's heat map is (its neurons read the mean over positions, the map encodes each alone)."""
    if getattr(sae, "granularity", "token") != "pooled":
        return ""
    return (" This layer's SAE reads the image's mean feature vector; the map encodes each position on its own, so "
            "it shows roughly where, not how much.")


# -------------------------------------------------------------- neuron browser


def _stat(atlas: Any, record: Any, name: str) -> float:
    if isinstance(record, dict) and name in record:
        value = record[name]
    else:
        value = getattr(record, name, None)
    if value is None:
        return float("nan")
    return float(value)


def neuron_details(state: AppState, release: Optional[str], layer: str, timestep: Any, neuron: Any) -> NeuronDetails:
    """Everything the neuron browser shows about one neuron."""
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    entry = rel.entry(layer, t)
    neuron_id = _check_neuron(entry, neuron)
    atlas = _atlas(entry, rel, layer, t)
    record = atlas.neuron(neuron_id)
    # the histogram of the column that explains the neuron best (the class column for old atlases)
    evidence = list(getattr(record, "label_values", []) or [])
    column = evidence[0]["column"] if evidence else None
    raw = atlas.label_histogram(neuron_id, column=column) if column is not None else atlas.label_histogram(neuron_id)
    histogram = {str(k): float(v) for k, v in dict(raw).items()}
    total = sum(histogram.values())
    if total > 0:
        histogram = {k: v / total for k, v in histogram.items()}
    return NeuronDetails(
        id=neuron_id,
        summary=_atlas_summary(atlas, neuron_id),
        frequency=_stat(atlas, record, "frequency"),
        mean_activation=_stat(atlas, record, "mean_activation"),
        purity=_stat(atlas, record, "purity"),
        histogram=histogram,
        top_images=_top_images(atlas, neuron_id, state.config.top_images),
        best_auroc=_stat(atlas, record, "best_auroc"),
        entropy=_stat(atlas, record, "entropy"),
        dense=bool(getattr(record, "dense", False)),
        label_values=evidence,
        histogram_column=column,
        layer_note=sigma_label_note(atlas),
    )


def sigma_label_note(atlas: Any) -> str:
    """The entry's σ_label with the value shuffled labels give on the same neurons, so a reader sees chance.

    A σ_label near its shuffled value means the layer's top images are no more
    class-pure than random images.
    """
    stats = atlas.summary_stats if atlas is not None else {}
    sigma, chance = stats.get("sigma_label"), stats.get("sigma_label_shuffled")
    if sigma is None:
        return ""
    text = f"σ_label of this layer: {sigma:.2f} over {stats.get('sigma_label_neurons')} neurons (lower = more class-specific)"
    if chance is None:
        return text + "; no value for shuffled labels recorded."
    verdict = "not below chance" if sigma >= chance else f"{100 * (1 - sigma / chance):.0f}% below chance"
    return text + f"; shuffled labels on the same neurons: {chance:.2f} ({verdict})."


def _rounded(x: float, digits: int) -> Optional[float]:
    return None if x != x else round(x, digits)


def _neuron_rows(atlas: Any, ids: Sequence[int], n: int) -> list[list[Any]]:
    rows = []
    for i in list(ids)[:n]:
        record = atlas.neuron(int(i))
        rows.append(
            [
                int(i),
                round(_stat(atlas, record, "frequency"), 5),
                _rounded(_stat(atlas, record, "best_auroc"), 3),
                _rounded(_stat(atlas, record, "entropy"), 2),
                round(_stat(atlas, record, "mean_activation"), 3),
                _atlas_summary(atlas, int(i)),
            ]
        )
    return rows


#: Column names of :func:`sorted_neurons` and :func:`class_neurons` rows.
NEURON_TABLE_HEADERS = ["neuron", "fires on (share)", "best AUROC ↑", "entropy ↓ (bits)", "mean activation", "summary"]


def sorted_neurons(
    state: AppState, release: Optional[str], layer: str, timestep: Any, by: str = "frequency", n: int = 50
) -> list[list[Any]]:
    """Rows of the neuron list sorted ``by`` one of :data:`SORT_KEYS` (as the atlas defines the order)."""
    if by not in SORT_KEYS:
        raise ValueError(f"Cannot sort neurons by {shown(by)}; choose one of: {', '.join(SORT_KEYS)}.")
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    atlas = _atlas(rel.entry(layer, t), rel, layer, t)
    return _neuron_rows(atlas, atlas.sorted_neurons(by, limit=n), n)


def class_names(state: AppState, release: Optional[str], layer: str, timestep: Any) -> list[str]:
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    atlas = rel.entry(layer, t).atlas
    return [str(c) for c in atlas.class_names] if atlas is not None else []


def class_neurons(
    state: AppState, release: Optional[str], layer: str, timestep: Any, class_name: str, n: int = 50
) -> list[list[Any]]:
    """Rows of neurons whose top images are mostly ``class_name``."""
    names = class_names(state, release, layer, timestep)
    if class_name not in names:
        raise ValueError(f"Unknown class {shown(class_name)}; this release's classes are: {', '.join(names)}.")
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    atlas = _atlas(rel.entry(layer, t), rel, layer, t)
    return _neuron_rows(atlas, atlas.neurons_for_class(class_name), n)


def label_values(state: AppState, release: Optional[str], layer: str, timestep: Any) -> list[tuple[str, str]]:
    """(display ``"value (column)"``, search key ``"column=value"``) for every label value of the entry's atlas."""
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    atlas = rel.entry(layer, t).atlas
    if atlas is None:
        return []
    return [(f"{v} ({c})", f"{c}={v}") for c, values in atlas.label_columns.items() for v in values]


def search_neurons(
    state: AppState, value: str, layer: Optional[str] = None, timestep: Any = None, release: Optional[str] = "",
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Neurons that detect a label value, best AUROC first: the ``/search_neurons`` payload.

    ``value`` is a value name (``"stripes"``) or ``"column=value"`` to pick
    one column. Each row: neuron, column, value, AUROC, precision (share of
    its top images with the value), frequency, dense, summary.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Give a label value to search for, e.g. a class name or 'stripes'.")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"That label value is too long ({MAX_TEXT_CHARS} characters at most).")
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    atlas = _atlas(rel.entry(layer, t), rel, layer, t)
    column, name = (value.split("=", 1) if "=" in value else (None, value))
    column = column.strip() if column is not None else None
    if column is not None and column not in atlas.label_columns:
        raise ValueError(f"Unknown label column {shown(column)}; this entry has: {', '.join(atlas.label_columns)}.")
    rows = atlas.search(name.strip(), column=column, limit=max(1, min(int(limit), 500)))
    dense = atlas.dense_mask
    for row in rows:
        i = row["neuron"]
        row["frequency"] = round(float(atlas.stats["frequency"][i]), 4)
        row["dense"] = bool(dense[i])
        row["summary"] = _atlas_summary(atlas, i)
    return rows


#: Column names of :func:`search_rows`.
SEARCH_TABLE_HEADERS = ["neuron", "AUROC ↑", "top images with it", "fires on (share)", "summary"]


def search_rows(state: AppState, release: Optional[str], layer: str, timestep: Any, value: str,
                n: int = 50) -> list[list[Any]]:
    """Rows of the browser's search table (see :func:`search_neurons`)."""
    return [[r["neuron"], r["auroc"], r["precision"], r["frequency"], r["summary"]]
            for r in search_neurons(state, value, layer, timestep, release, limit=n)]


__all__ = [
    "Analysis",
    "rank_neurons",
    "neuron_scores",
    "out_of_distribution",
    "sae_error",
    "OOD_EXTRA_SAE_MAX_PARAMS",
    "label_values",
    "search_neurons",
    "search_rows",
    "SEARCH_TABLE_HEADERS",
    "RANKINGS",
    "DEFAULT_RANKING",
    "NeuronHit",
    "NeuronDetails",
    "analyze",
    "activation_map",
    "neuron_view",
    "neuron_gallery",
    "neuron_details",
    "sigma_label_note",
    "sorted_neurons",
    "class_neurons",
    "class_names",
    "resolve_entry",
    "diffc_entries",
    "no_diffc_note",
    "NEURON_TABLE_HEADERS",
    "SORT_KEYS",
    "DISPLAY_SIZE",
]
