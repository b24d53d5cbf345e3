"""The app's "Why this class?" view: which neurons made Diff-C predict a class.

Plain functions over an :class:`~revelio_hub.app.state.AppState`, like
:mod:`revelio_hub.app.analysis`: the UI events and the JSON endpoints call
them, and tests call them directly. The science lives in
:mod:`revelio_hub.interpret`; this module picks the release entry, reuses the
cached feature maps (no backbone pass when the image was analysed already),
and turns results into what the UI shows (a signed bar chart, tables).

* **Why this class?** — :func:`attribute_image` / :func:`attribute_analysis`:
  which neurons push the predicted (or chosen) class up or down, measured by
  removing each through the SAE and re-running Diff-C; :func:`why_chart` draws
  them as a signed bar chart whose bars can be clicked (:func:`bar_at`). Dense
  neurons (firing on most images) are hidden unless asked, as in the neuron
  table; the shown neurons that name one label value are also removed together
  (:func:`~revelio_hub.interpret.concept_effects.concept_effects`): "shape =
  star neurons: −0.41 of P(star) when removed".

Comparing two images is :mod:`revelio_hub.app.comparison_view`; the concept
map, :mod:`revelio_hub.app.concept_view`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from revelio_hub.app.analysis import (Analysis, _top_images, image_reliability, model_recipe, no_diffc_note,
                                      resolve_entry)
from revelio_hub.app.state import AppState, LoadedRelease, image_digest
from revelio_hub.app.validation import MAX_TEXT_CHARS, ImageLimits, shown
from revelio_hub.interpret.concept_effects import ConceptEffect, concept_effects

if TYPE_CHECKING:
    from PIL import Image

    from revelio_hub.interpret import Attribution

#: Neurons measured exactly for the app's "Why this class?" (each costs one batched Diff-C row).
WHY_TOP = 16
#: Bars per direction in the chart.
CHART_BARS = 6


# ------------------------------------------------------------------ attribution


@dataclass
class AttributionView:
    """One image's attribution at one (release, layer, t), with what the UI needs to show it."""

    release: str
    layer: str
    timestep: int
    attribution: "Attribution"
    digest: str
    class_names: list[str] = field(default_factory=list)
    #: measured neurons that fire on most atlas images (hidden from the chart unless ``show_dense``)
    dense: set[int] = field(default_factory=set)
    show_dense: bool = False
    #: groups of shown neurons naming one value, removed together (largest effect first)
    concepts: list[ConceptEffect] = field(default_factory=list)
    #: The reliability verdict (as ``Analysis.ood``): a flagged image keeps its numbers, marked unreliable.
    ood: Optional[dict[str, Any]] = None
    #: measured neurons that name the explained class where they fire on this image (its checked claims)
    names_class: set[int] = field(default_factory=set)
    #: how many of the layer's neurons name the class on some firing (``None``: the atlas has no such value)
    class_neurons: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        """The ``/attribute_json`` payload (``reliable``/``reasons`` as ``/analyze_json``'s)."""
        a = self.attribution
        ood = self.ood or {}
        out = {"release": self.release, "layer": self.layer, "timestep": self.timestep,
               "reliable": bool(ood.get("reliable", True)), "reasons": list(ood.get("reasons") or [])}
        out.update(a.to_dict())
        for row in out["neurons"]:
            row["dense"] = row["neuron"] in self.dense
            row["names_class"] = row["neuron"] in self.names_class
        out["class_neurons"] = self.class_neurons
        out["concepts"] = [dict(c.to_dict(), text=c.text(a.target_name)) for c in self.concepts]
        out["predicted"] = self.class_names[a.predicted] if self.class_names else a.predicted
        out["pushing_up"] = [r["neuron"] for r in a.pushing("up")]
        out["pushing_down"] = [r["neuron"] for r in a.pushing("down")]
        return out


def _diffc_entry(rel: LoadedRelease, layer: str, t: int) -> Any:
    entry = rel.entry(layer, t)
    if entry.diffc is None or entry.sae is None:
        raise ValueError(no_diffc_note(rel, layer, t))
    return entry


def _target(value: Any) -> Optional[str]:
    """``None``/``""`` → the predicted class; anything else is a class name (checked by the library)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"The class to explain must be a class name (or empty for the top class), got {shown(value)}.")
    if len(value) > MAX_TEXT_CHARS:  # messages quote it: a 100 KB "class name" must not come back whole
        raise ValueError(f"The class to explain is too long ({MAX_TEXT_CHARS} characters at most).")
    return value.strip()


def attribute_image(
    state: AppState,
    image: Any,
    layer: Optional[str] = None,
    timestep: Any = None,
    release: Optional[str] = "",
    target: Any = None,
    *,
    top: int = WHY_TOP,
    limits: ImageLimits = ImageLimits(),
    show_dense: bool = False,
) -> AttributionView:
    """Which neurons made the entry's Diff-C predict ``target`` (default: its top class) for ``image``.

    ``image`` is anything :func:`~revelio_hub.app.validation.read_image` takes.
    Features come from the app's cache when the image was seen before.
    """
    rel, layer, t = resolve_entry(state, release, layer, timestep)
    entry = _diffc_entry(rel, layer, t)
    target = _target(target)
    img = state.decoded.read(image, limits)
    digest = image_digest(img)
    maps = state.feature_maps(img, rel, t, model_recipe(entry.diffc), digest=digest)
    view = _attribute(rel, entry, layer, t, maps[layer], digest, target, top, show_dense)
    view.ood = image_reliability(state, rel, entry, layer, t, img, maps)
    return view


def attribute_analysis(state: AppState, analysis: Analysis, target: Any = None, *, top: int = WHY_TOP,
                       show_dense: bool = False) -> AttributionView:
    """"Why this class?" for an analysed image, from its cached features (no backbone pass)."""
    rel, layer, t = resolve_entry(state, analysis.release, analysis.layer, analysis.timestep)
    entry = _diffc_entry(rel, layer, t)
    maps = state.features.get(state.feature_key(analysis.digest, rel, t, model_recipe(entry.diffc)))
    if maps is None:
        raise ValueError("This image's features are no longer cached; click Analyze again.")
    view = _attribute(rel, entry, layer, t, maps[layer], analysis.digest, _target(target), top, show_dense)
    view.ood = analysis.ood
    return view


def _attribute(rel: LoadedRelease, entry: Any, layer: str, t: int, fmap: Any, digest: str, target: Optional[str],
               top: int, show_dense: bool = False) -> AttributionView:
    result = entry.attribute(fmap, target=target, top=top)[0]
    atlas = entry.atlas
    dense = ({int(j) for j in result.neurons.tolist() if bool(atlas.dense_mask[int(j)])}
             if atlas is not None else set())
    concepts = concept_effects(entry.sae, entry.diffc, fmap, result, atlas, include_dense=bool(show_dense))
    names_class, class_neurons = _class_names(atlas, result)
    return AttributionView(rel.name, layer, t, result, digest, class_names=list(entry.diffc.class_names),
                           dense=dense, show_dense=bool(show_dense), concepts=concepts, names_class=names_class,
                           class_neurons=class_neurons)


def _class_names(atlas: Any, result: "Attribution") -> tuple[set[int], Optional[int]]:
    """(measured neurons naming the explained class on this image, the layer's neurons naming it on some firing).

    Both ``(set(), None)`` when no atlas label value is the class's name: nothing can be said either way.
    """
    name = result.target_name
    if atlas is None or not any(name in values for values in atlas.label_columns.values()):
        return set(), None
    naming = {int(j) for j, x in zip(result.neurons.tolist(), result.activations.tolist())
              if any(e.value == name for e in atlas.names_on_image(int(j), float(x)))}
    return naming, len(atlas.neurons_naming(name))


@dataclass
class ChartBar:
    """One clickable bar of :func:`why_chart`: the neuron and its vertical pixel span in the image."""

    neuron: int
    top: float
    bottom: float


def _chart_rows(view: AttributionView, n: int) -> list[dict[str, Any]]:
    """The charted neurons: up to ``n`` pushing up, then up to ``n`` pushing down; dense ones only when shown."""
    a = view.attribution

    def keep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if view.show_dense or r["neuron"] not in view.dense][:n]

    return keep(a.pushing("up")) + list(reversed(keep(a.pushing("down"))))


def why_chart(view: AttributionView, n: int = CHART_BARS) -> tuple["Image.Image", list[ChartBar]]:
    """A signed horizontal bar chart of the neurons pushing the class up (green) and down (red).

    Bar length is the exact drop in the class's probability when the neuron is
    removed. Returns the rendered image and the bars' pixel spans, so a click
    on the image can be mapped back to a neuron (:func:`bar_at`).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: figures stay local to this thread
    from PIL import Image

    a = view.attribution
    rows = _chart_rows(view, n)
    height = 1.1 + 0.42 * max(1, len(rows))
    fig = Figure(figsize=(7.2, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    name = a.target_name
    if not rows:
        ax.text(0.5, 0.5, "Removing no single neuron changes\nthe probability of this class.",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        labels, values, colors = [], [], []
        for r in rows:
            summary = " · ".join((r["summary"] or "").split(" · ")[:2])  # top label and purity: the telling part
            summary = summary if len(summary) <= 38 else summary[:37] + "…"
            labels.append(f"#{r['neuron']}  {summary}")
            values.append(100 * r["effect_prob"])
            colors.append("#2e9d5a" if r["effect_prob"] > 0 else "#d0473c")
        ys = list(range(len(rows)))[::-1]
        bars = ax.barh(ys, values, color=colors, height=0.7)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.axvline(0, color="#444", lw=0.8)
        ax.set_xlabel(f"percentage points of P({name}) lost when the neuron is removed", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    ax.set_title(f"Why {name}? P = {a.prob:.1%}; green pushes it up, red down (click a bar)", fontsize=10)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the pixels and the bars' extents below come from this one rendering
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    spans: list[ChartBar] = []
    if rows:
        fig_h = image.size[1]
        renderer = canvas.get_renderer()
        for r, bar in zip(rows, bars):
            box = bar.get_window_extent(renderer)
            # a whole row (label included) is clickable: pad the bar to the row pitch
            pad = 0.15 * box.height / 0.7
            spans.append(ChartBar(int(r["neuron"]), float(fig_h - box.y1 - pad), float(fig_h - box.y0 + pad)))
    return image, spans


def bar_at(bars: list[ChartBar], y: float) -> Optional[int]:
    """The neuron whose bar row contains pixel row ``y`` of the chart (``None`` between rows)."""
    for bar in bars:
        if bar.top <= y <= bar.bottom:
            return bar.neuron
    return None


def why_thumbnails(state: AppState, view: AttributionView, n: int = CHART_BARS) -> list[tuple[Any, str]]:
    """Each charted neuron's strongest atlas image, captioned with its signed effect (chart order)."""
    rel = state.get_release(view.release)
    atlas = rel.entry(view.layer, view.timestep).atlas
    out = []
    for r in _chart_rows(view, n):
        thumbs = _top_images(atlas, r["neuron"], 1) if atlas is not None else []
        if thumbs:
            out.append((thumbs[0][0], f"#{r['neuron']}: {100 * r['effect_prob']:+.1f} pp"))
    return out


def why_note(view: AttributionView) -> str:
    """One paragraph under the chart: what was measured and how far to trust the cheap estimate."""
    a = view.attribution
    rho = "n/a" if a.spearman != a.spearman else f"{a.spearman:.2f}"
    return (
        f"**Why {a.target_name}?** Each bar is the exact change in P({a.target_name}) = {a.prob:.1%} when one "
        f"neuron is removed through the SAE (its reconstruction error kept) and Diff-C re-run; "
        f"{len(a)} of the {len(a.all_neurons)} active neurons were measured (the {len(a)} with the largest "
        f"gradient × activation estimate; rank agreement of that estimate with the exact effects: ρ = {rho}). "
        "Click a bar or a thumbnail to see where that neuron fires."
        + _saturation_line(view) + _dense_line(view) + _class_line(view) + _concept_lines(view)
    )


#: Below this largest single-neuron change of P(class), the bars' order is mostly noise: say so.
SATURATED_EFFECT = 0.01


def _saturation_line(view: AttributionView) -> str:
    """Where no single removal moves P(class) by ``SATURATED_EFFECT``, the chart ranks tiny effects; say that.

    On the toy release's bottleneck Diff-C answers with P ≈ 1 and single removals change it by less than 0.005
    (docs/benchmarks.md, "Per-neuron claim records"), so the top bars there explain little on their own.
    """
    effects = view.attribution.effects_prob
    largest = float(effects.abs().max()) if len(effects) else 0.0
    if largest >= SATURATED_EFFECT:
        return ""
    name = view.attribution.target_name
    return (f" No single neuron's removal changes P({name}) by {SATURATED_EFFECT:.0%} or more (largest: "
            f"{largest:.2%}): Diff-C rests on many neurons at once here, so the order of these bars says little; "
            "removing groups of neurons together (by concept, where shown) measures more.")


def _class_line(view: AttributionView) -> str:
    """Say so when no charted bar pushing the class up is named for it, so "small (size)" is not read as "star".

    The bars answer "whose removal lowers P(star)?", and that can be a size or background neuron: on the toy
    release no charted bar is named for the class on 31 % of correctly classified held-out shapes at the
    bottleneck, and at down_ft1 no neuron is named for any shape (docs/benchmarks.md, "Why this class: what the
    layer's neurons allow"). Quiet when the atlas has no value of the class's name.
    """
    name = view.attribution.target_name
    if view.class_neurons is None:
        return ""
    if view.class_neurons == 0:
        return (f" No neuron of this layer is named {name} on held-out images, so no bar here can be: Diff-C's "
                f"{name} rests on neurons named for other things, or on several together.")
    up = [r for r in _chart_rows(view, CHART_BARS) if r["effect_prob"] > 0]
    if not up or any(r["neuron"] in view.names_class for r in up):
        return ""
    many = view.class_neurons
    return (f" None of the charted neurons pushing {name} up is named {name} where it fires here "
            f"({many} of this layer's neuron{'s are' if many != 1 else ' is'} named {name} on some firings): the bars "
            f"show what P({name}) rests on at this layer, not {name} detectors.")


def _dense_line(view: AttributionView) -> str:
    hidden = 0 if view.show_dense else len(view.dense)
    return (f" {hidden} dense neuron{'s' if hidden != 1 else ''} (firing on most images) hidden; tick "
            "\"Show dense neurons\" to include them." if hidden else "")


def _concept_lines(view: AttributionView) -> str:
    """The by-concept view: each named value's shown neurons removed together (exact), largest change first."""
    if not view.concepts:
        return ""
    name = view.attribution.target_name
    lines = "\n".join(f"- {c.text(name)} (sum of their single effects: {-c.summed_prob:+.2f})"
                      for c in view.concepts[:6])
    return ("\n\n**By concept** — the shown neurons whose summaries name one value, removed together:\n" + lines)


__all__ = [
    "AttributionView",
    "ChartBar",
    "ConceptEffect",
    "WHY_TOP",
    "attribute_analysis",
    "attribute_image",
    "bar_at",
    "why_chart",
    "why_note",
    "why_thumbnails",
]
