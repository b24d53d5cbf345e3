"""Model cards and the summary figure of a release.

The card is the release's front page on the Hub: YAML metadata the Hub indexes
(``library_name``, ``tags``, ``base_model``, ``datasets``, ``license`` and a
``model-index`` with the measured FVU, L0, dead fraction, sigma_label and Diff-C
accuracy of every entry), then a body with a loading snippet, the metrics
table, the figure and the recipe. Everything is rendered from ``release.json``
so the card cannot disagree with the files next to it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["render_card", "render_figure", "card_metrics"]

#: The paper this project re-implements (Kim, Thomas and Ghadiyaram, ICCV 2025) and its arXiv page;
#: the app's About tab and generated Spaces link it.
PAPER_TITLE = "Revelio: Interpreting and leveraging semantic information in diffusion models"
PAPER_URL = "https://arxiv.org/abs/2411.16725"
_PAPER = PAPER_TITLE

# (metrics section, key, model-index metric type, display name, task type)
_INDEXED = [
    ("sae", "fvu", "fvu", "k-SAE FVU", "feature-extraction"),
    ("sae", "l0", "l0", "k-SAE L0", "feature-extraction"),
    ("sae", "dead_fraction", "dead_fraction", "k-SAE dead fraction", "feature-extraction"),
    ("sae", "cosine", "cosine_similarity", "k-SAE reconstruction cosine", "feature-extraction"),
    ("atlas", "sigma_label", "sigma_label",
     "sigma_label (paper: sample std of top-10 class ids, 1,000 neurons with the highest mean activation)",
     "feature-extraction"),
    ("diffc", "top1", "accuracy", "Diff-C top-1 accuracy", "image-classification"),
    ("diffc", "top5", "top_5_accuracy", "Diff-C top-5 accuracy", "image-classification"),
]


def _num(x: Any) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _is_local(name: Any) -> bool:
    """A name that is (or looks like) a path on the machine that built the release, not a Hub id."""
    if not name:
        return False
    text = str(name)
    return text.startswith(("/", ".", "~", "\\")) or ":\\" in text or Path(text).expanduser().exists()


def hub_metadata(config: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(base_model, dataset) for the card's YAML: Hub ids only, never a local path.

    ``release.json`` records them under ``base_model`` and ``dataset.hub_id``
    (set by ``assemble_release`` from ``--base-model``/``--dataset-id`` or from
    names that are Hub ids); older files fall back to the backbone and dataset
    ids when those are not local paths.
    """
    data = config.get("dataset") or {}
    if "base_model" in config:
        base = config.get("base_model")
    else:
        backbone = config.get("backbone")
        base = backbone if backbone and not config.get("embedded_backbone") and not _is_local(backbone) else None
    dataset = data.get("hub_id") if "hub_id" in data else (None if _is_local(data.get("id")) else data.get("id"))
    return base, dataset


def _display_name(name: Any) -> str:
    """How a backbone or dataset is named in the card's text: a Hub id as is, a local folder by its name only."""
    if not name:
        return "a custom dataset"
    return f"{Path(str(name)).name} (a local folder)" if _is_local(name) else str(name)


def card_metrics(config: dict[str, Any]) -> list[EvalResult]:
    """One :class:`EvalResult` per measured metric of every entry (what ``model-index`` lists)."""
    _, hub_dataset = hub_metadata(config)
    dataset = hub_dataset or "custom"
    split = (config.get("dataset") or {}).get("split")
    results = []
    for item in config.get("entries", []):
        where = f"{item['layer']}, t={item['timestep']}"
        metrics = item.get("metrics") or {}
        for section, key, metric_type, label, task in _INDEXED:
            value = _num((metrics.get(section) or {}).get(key))
            if value is None:
                continue
            results.append(EvalResult(
                task_type=task, dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                metric_type=metric_type, metric_value=round(value, 6),
                metric_name=f"{label.format(n=(metrics.get(section) or {}).get('summary_neurons') or 1000)} ({where})",
            ))
    return results


def _fmt(x: Any, kind: str = "float") -> str:
    v = _num(x)
    if v is None:
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def _table(config: dict[str, Any]) -> str:
    rows = [
        "| layer | t | latents (k) | FVU | L0 | dead | σ_label ↓ | σ_label, shuffled labels | entropy ↓ (bits) "
        "| named ↑ | Diff-C top-1 | top-5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in config.get("entries", []):
        m = item.get("metrics") or {}
        sae, atlas, diffc = m.get("sae") or {}, m.get("atlas") or {}, m.get("diffc") or {}
        latents = f"{_fmt(sae.get('n_latents'), 'int')} ({sae.get('k', '–')})" if sae else "–"
        rows.append(
            f"| `{item['layer']}` | {item['timestep']} | {latents} | {_fmt(sae.get('fvu'))} | {_fmt(sae.get('l0'))} "
            f"| {_fmt(sae.get('dead_fraction'), 'pct')} | {_fmt(atlas.get('sigma_label', atlas.get('mean_purity')))} "
            f"| {_fmt(atlas.get('sigma_label_shuffled'))} "
            f"| {_fmt(atlas.get('mean_entropy'))} | {_fmt(atlas.get('named_fraction'), 'pct')} "
            f"| {_fmt(diffc.get('top1'), 'pct')} | {_fmt(diffc.get('top5'), 'pct')} |"
        )
    return "\n".join(rows)


def _examples(item: dict[str, Any]) -> str:
    """The summaries of a few neurons of the default entry, exactly as the app shows them."""
    examples = ((item.get("metrics") or {}).get("atlas") or {}).get("examples") or []
    if not examples:
        return ""
    rows = [f"Neurons of `{item['layer']}` t={item['timestep']} that best detect a label value, as the app summarises them:",
            "", "| neuron | summary |", "|---|---|"]
    rows += [f"| {int(e['neuron'])} | {str(e['summary']).replace('|', '/')} |" for e in examples]
    return "\n".join(rows) + "\n"


def _default_entry(config: dict[str, Any]) -> dict[str, Any]:
    entries = config.get("entries", [])
    for item in entries:  # the paper's best setting, when present
        if item["layer"] == "up_ft1" and int(item["timestep"]) == 25:
            return item
    return entries[0]


def _snippet(config: dict[str, Any], repo_id: str) -> str:
    item = _default_entry(config)
    layer, t = item["layer"], int(item["timestep"])
    seed, ensemble = int(config.get("noise_seed") or 0), int(config.get("ensemble") or 1)
    images = ("[Image.open(path) for path, _ in release.examples[:2]]  # or your own images"
              if config.get("examples") else '[Image.open("your_image.jpg")]')
    lines = [
        "```python",
        "from PIL import Image",
        "from revelio_hub import Release",
        "",
        f'release = Release.from_pretrained("{repo_id}")  # reads release.json and this card only',
        f'entry = release.load("{layer}", {t})  # downloads only {layer}/t{t}/',
        "backbone = release.load_backbone()  # add device=\"cuda\", dtype=torch.float16 on a GPU",
        f"images = {images}",
        f'maps = backbone.extract(images, ["{layer}"], [{t}], seed={seed}, ensemble={ensemble})[("{layer}", {t})]',
        "acts = entry.sae.image_activations(maps)  # images × latents",
        "for i in acts[0].topk(5).indices.tolist():",
        "    print(i, entry.atlas.summary(i))  # e.g. 'magenta (color) · AUROC 0.99 · 10/10 top images · fires on 4.1% "
        "of images', or 'mixed ...'",
    ]
    if item.get("diffc"):
        lines.append("if entry.diffc is not None:")
        lines.append("    print(entry.diffc.predict(maps, top_k=3))")
    lines.append("```")
    return "\n".join(lines)


def _purity_neurons(config: dict[str, Any]) -> str:
    counts = sorted({int(n) for e in config.get("entries", [])
                     if (n := ((e.get("metrics") or {}).get("atlas") or {}).get("summary_neurons")) is not None})
    if not counts:
        return "1,000"
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,} (per entry)"


def _top_images_line(config: dict[str, Any]) -> str:
    """Which activations rank the top images the atlas keeps and the app shows (they differ from σ_label's)."""
    kinds = {((e.get("metrics") or {}).get("atlas") or {}).get("top_images_activations")
             for e in config.get("entries", [])} - {None}
    if kinds == {"topk_code"}:
        return ("The top images the atlas keeps and the app shows are ranked by the SAE's TopK code, the "
                "activation the app reports for an image (chosen by measurement: docs/benchmarks.md, "
                "\"σ_label and top images\"); the atlas also holds σ_label on the TopK code (`topk_sigma_label`).")
    return ""


def _recipes_line(config: dict[str, Any], part: str) -> str:
    """The training recipes (``paper``/``default``) that built the entries' models of one kind."""
    names = sorted({r for e in config.get("entries", [])
                    if (r := ((e.get("metrics") or {}).get(part) or {}).get("training_recipe"))})
    if not names:
        return "not recorded"
    return ", ".join(f"`{n}`" for n in names) + " (see `revelio_hub.training_recipes`; `paper` = the original Revelio code's)"


def render_card(config: dict[str, Any], repo_id: Optional[str] = None) -> ModelCard:
    """The model card of a release described by ``config`` (the content of ``release.json``)."""
    repo_id = repo_id or config.get("repo_id") or f"<user>/{config.get('name') or 'revelio-release'}"
    dataset = _display_name((config.get("dataset") or {}).get("id"))
    backbone = _display_name(config.get("backbone"))
    has_diffc = any(item.get("diffc") for item in config.get("entries", []))
    name = config.get("name") or "revelio-release"
    item = _default_entry(config)
    entries = ", ".join(f"`{e['layer']}` t={e['timestep']}" for e in config.get("entries", []))
    figure = f"![sigma_label and Diff-C accuracy by layer and timestep]({config['figure']})\n" if config.get("figure") else ""
    description = config.get("description") or (
        f"k-sparse autoencoders (k-SAEs){', Diff-C classifiers' if has_diffc else ''} and neuron atlases "
        f"trained on diffusion features of `{dataset}` from `{backbone}`"
        + (" (embedded in this repo)." if config.get("embedded_backbone") else ".")
    )
    body = f"""
# {name}

{description}

Made with [Revelio Hub](https://github.com/revelio-hub/revelio-hub), a re-implementation of *{_PAPER}*.
Each entry is one block of the diffusion model read at one timestep: {entries}.

## Use it

Install [Revelio Hub](https://github.com/revelio-hub/revelio-hub) (`pip install -e .` in a checkout), then:

{_snippet(config, repo_id)}

Each `sae/` and `diffc/` folder is a standalone `PyTorchModelHubMixin` model, so one SAE needs nothing else:

```python
from revelio_hub import KSparseAutoencoder
sae = KSparseAutoencoder.from_pretrained("{repo_id}", subfolder="{item['layer']}/t{item['timestep']}/sae")
```

To browse the neurons interactively: `python app.py --release {repo_id}`.

## Entries and metrics

{_table(config)}

{_metrics_explained(config)}

{_examples(item)}
{figure}
## Recipe

{_recipe(config, item, backbone)}

Files: `release.json` (machine-readable summary of all of the above), `<layer>/t<t>/{{sae,diffc,atlas}}/`.
"""
    return ModelCard(f"---\n{_card_data(config, name, has_diffc).to_yaml()}\n---\n{body}")


def _card_data(config: dict[str, Any], name: str, has_diffc: bool) -> ModelCardData:
    """The card's YAML header: what the Hub indexes (tags, base model, dataset, license, metrics)."""
    base_model, hub_dataset = hub_metadata(config)
    tags = ["revelio-hub", "sparse-autoencoder", "k-sparse-autoencoder", "interpretability", "diffusion-features"]
    if has_diffc:
        tags.append("image-classification")
    if config.get("embedded_backbone"):
        tags.append("toy-model")
    return ModelCardData(
        library_name="revelio-hub",
        tags=tags,
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        license=config.get("license") or "apache-2.0",
        model_name=name,
        eval_results=card_metrics(config) or None,
    )


def _metrics_explained(config: dict[str, Any]) -> str:
    """What each column of the metrics table means, and how the summaries' claims are calibrated."""
    return f"""FVU is the fraction of variance unexplained on held-out features (lower is better), L0 the mean number of active
latents, *dead* the share of latents that never fired. σ_label is the paper's metric, computed as the original Revelio
code does: on ReLU of the SAE's dense pre-TopK activations, the sample standard deviation of the class ids of a
neuron's top-10 images, averaged over the (up to) 1,000 neurons with the highest mean activation among those firing on
more than 10 images (lower means more class-specific); beside it the same number with the labels shuffled across
images, its value without any class structure. {_top_images_line(config)} Entropy is
the label entropy of the top images of the (up to) 1,000 most frequent neurons. *Named* is the share of live neurons
whose summary names a label value (the rest say `unsure` or `mixed`). {_claims_explained(config)} Token-level
entries add where the neuron peaks on its top images ("where: top-left", or "anywhere"). Atlases built before the
calibration name a value when most top images carry it and its AUROC (shown: 0.5 = chance, 1 = perfect) is at least
0.55. Diff-C accuracy is measured on the test split."""


def _claims_explained(config: dict[str, Any]) -> str:
    """How the summaries' claims were checked, in the figures of the stored claim tables (``release.json``)."""
    tables = [c for e in config.get("entries", []) if (c := ((e.get("metrics") or {}).get("atlas") or {})
                                                        .get("claim_calibration"))]
    if not tables:
        return "The summaries' claims were not checked on held-out images (an atlas built before claim calibration)."
    c = tables[0]
    folds, floor, prior = int(c.get("folds", 5)), 100 * float(c.get("min_precision", 0.9)), c.get("prior_pairs")
    regimes = [float(r) for r in c.get("regimes") or [c.get("strong", 1.5)]]
    text = (f"Claims are calibrated when the atlas is built: the atlas images are cut into {folds} parts; claims "
            f"made from {folds - 1} parts (per label column the value with the best AUROC, with the share of the top "
            "images carrying it) are checked on the remaining one, on the images the neuron fires strongly on "
            f"(activation at least {regimes[0]:g} × its mean when firing). Each claim's figure is the neuron's own "
            "record on those held-out images")
    if prior is not None:
        text += (f", shrunk towards the record of all claims like it (same AUROC band, top-image share and density) "
                 f"by {float(prior):g} pseudo-images, so a neuron seldom seen keeps its band's figure and one often "
                 "seen earns its own")
    text += (f". A summary names a value only where that figure is at least {floor:.0f}%, and quotes it (\"true on "
             "94% of held-out images it fires strongly on\"); otherwise it says `unsure` and the figure measured.")
    if len(regimes) > 1:
        spans = ", ".join(f"{lo:g}–{hi:g}×" for lo, hi in zip(regimes[1:], regimes))
        text += (f" Weaker firings ({spans} its mean) are checked the same way on their own: on an image where the "
                 f"neuron fires that way the app names a value only where that check reached {floor:.0f}% too, and "
                 f"quotes that figure; below {regimes[-1]:g}× it names nothing for the image. A neuron that "
                 "seldom fires strongly (too few such held-out images to measure any of its claims) is summarised "
                 "from the strongest of these checks that was measured, and says which (\"true on 97% of held-out "
                 f"images it fires {regimes[1]:g}–{regimes[0]:g}× its usual on\").")
    else:
        text += " On an image where the neuron fires more weakly, the app names nothing for it."
    if len({_settings_key(t) for t in tables}) > 1:
        text += " (The entries' atlases were calibrated with different settings; these are the first entry's.)"
    return text


def _settings_key(table: dict[str, Any]) -> str:
    """A comparable text form of a claim table's settings."""
    return repr(sorted((k, repr(v)) for k, v in table.items()))


def _recipe(config: dict[str, Any], item: dict[str, Any], backbone: str) -> str:
    """How the features, k-SAEs, Diff-Cs and atlases of the release were made."""
    backbone_line = f"`{backbone}`" + (f" (revision `{config['backbone_revision']}`)" if config.get("backbone_revision") else "")
    if config.get("embedded_backbone"):
        backbone_line += f", embedded in this repo under `{config['embedded_backbone']}/`"
    classes = (config.get("dataset") or {}).get("class_names") or []
    return f"""- **Backbone:** {backbone_line}, family `{config.get('family')}`.
- **Features:** images resized and center-cropped to {config.get('image_size')} px, noised to timestep *t* with seeded
  per-image noise (seed {config.get('noise_seed', 0)}, ensemble of {config.get('ensemble', 1)}), one denoiser pass with
  the prompt `{config.get('prompt', '')!r}`, block output read from the listed layer.
- **k-SAE:** recipe {_recipes_line(config, 'sae')}. TopK (k in the table) on the block output (mean-pooled over
  space, or per position for token-level SAEs), 64× expansion by default, Adam 4e-4 with warm-up, decoder rows kept
  unit-norm, as the original Revelio code (`default` differs from `paper` only by bf16 matmuls on CUDA: the
  deviations it used to make were measured and dropped).
  The exact settings of each entry are in its `sae/train_config.json`.
- **Diff-C:** recipe {_recipes_line(config, 'diffc')}. BatchNorm → conv stack → global pooling → linear head on the
  unpooled feature map, AdamW 1e-4 with a cosine schedule; settings in `diffc/train_config.json`.
- **Atlas:** for each neuron its top-20 images (128-px WebP thumbnails in `atlas/thumbnails/`), firing frequency,
  mean activation when active, per label value AUROC, entropy and a one-line summary, built over {_fmt(((item.get('metrics') or {}).get('atlas') or {}).get('num_images'), 'int')} images.
- **Classes:** {len(classes)}{(': ' + ', '.join(classes[:12]) + (' …' if len(classes) > 12 else '')) if classes else ''}."""


def render_figure(config: dict[str, Any], path: Path) -> bool:
    """Heat maps of sigma_label and Diff-C top-1 over layer × timestep; returns False when nothing to plot."""
    entries = config.get("entries", [])
    layers = list(dict.fromkeys(e["layer"] for e in entries))
    timesteps = sorted({int(e["timestep"]) for e in entries})
    panels = []
    key0 = "sigma_label" if any(((e.get("metrics") or {}).get("atlas") or {}).get("sigma_label") is not None
                                for e in entries) else "mean_purity"
    for section, key, title, fmt in (("atlas", key0, "σ_label ↓ (sample std of top-10 class ids)", "{:.2f}"),
                                     ("diffc", "top1", "Diff-C top-1 accuracy ↑", "{:.0%}")):
        grid = [[None] * len(timesteps) for _ in layers]
        for e in entries:
            value = _num(((e.get("metrics") or {}).get(section) or {}).get(key))
            if value is not None:
                grid[layers.index(e["layer"])][timesteps.index(int(e["timestep"]))] = value
        if any(v is not None for row in grid for v in row):
            panels.append((title, grid, fmt, section == "atlas"))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * len(timesteps) * len(panels) + 1.2 * len(panels),
                                                      1.2 + 0.5 * len(layers)), squeeze=False)
    for ax, (title, grid, fmt, low_is_good) in zip(axes[0], panels):
        values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        ax.imshow(values, cmap="viridis_r" if low_is_good else "viridis", aspect="auto")
        ax.set_xticks(range(len(timesteps)), [f"t={t}" for t in timesteps])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_title(title, fontsize=9)
        finite = values[np.isfinite(values)]
        mid = float(np.nanmean(finite)) if finite.size else 0.0
        for r in range(len(layers)):
            for c in range(len(timesteps)):
                if np.isfinite(values[r, c]):
                    dark = (values[r, c] > mid) != low_is_good
                    ax.text(c, r, fmt.format(values[r, c]), ha="center", va="center", fontsize=8,
                            color="black" if dark else "white")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
