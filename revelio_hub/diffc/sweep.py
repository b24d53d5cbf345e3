"""The layer × timestep linear-probe sweep: the paper's Figure-4 analysis for any model and dataset.

Which block and which noise level carry the most class information differs
between backbones and datasets (fine-grained data prefers small t, coarse
categories larger t). Training the full Diff-C head for every (layer, t) would
cost hours; a linear probe on the cached *pooled* features costs seconds per
entry and ranks the entries the same way often enough to choose where to train
Diff-C. Selection uses a validation split carved from the training images by
image id; the test store is only used to report.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from revelio_hub.diffc.model import DiffC
from revelio_hub.diffc.training import LabeledFeatures, classification_report, predict_logits, split_by_image
from revelio_hub.recipe import FeatureRecipe


@dataclass
class SweepConfig:
    """Linear-probe settings for :func:`sweep` (cheap: pooled features, large batches).

    Attributes:
        steps: optimiser steps per (layer, t).
        batch_size: rows per step (the whole training set when smaller).
        lr: AdamW learning rate of the probe.
        weight_decay: AdamW weight decay.
        eval_every: validate every this many steps and keep the best probe.
        val_fraction: fraction of training images held out (by image id) for selection.
        seed: seeds split, sampling and init.
    """

    steps: int = 300
    batch_size: int = 4096
    lr: float = 1e-2
    weight_decay: float = 1e-2
    eval_every: int = 25
    val_fraction: float = 0.1
    seed: int = 0


def train_linear_probe(train: LabeledFeatures, val: Optional[LabeledFeatures], class_names: Sequence[str],
                       config: SweepConfig, recipe: Optional[dict] = None) -> tuple[DiffC, dict[str, Any]]:
    """Fit a ``head="linear"`` Diff-C on pooled features; returns the best-on-validation probe."""
    feats = train.features.float()
    if feats.ndim == 4:
        feats = feats.mean(dim=(2, 3))
    torch.manual_seed(config.seed)
    probe = DiffC(feats.shape[1], list(class_names), head="linear", recipe=recipe)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    best: tuple[tuple[float, float], dict[str, torch.Tensor], dict[str, Any]] | None = None
    n = feats.shape[0]
    for step in range(1, config.steps + 1):
        probe.train()
        idx = torch.randperm(n, generator=gen)[: config.batch_size] if n > config.batch_size else slice(None)
        loss = F.cross_entropy(probe(feats[idx]), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is not None and len(val) and (step % config.eval_every == 0 or step == config.steps):
            rep = classification_report(predict_logits(probe, val.features), val.labels, class_names)
            key = (rep["top1"], -rep["loss"])
            if best is None or key > best[0]:
                best = (key, {k: v.clone() for k, v in probe.state_dict().items()},
                        {"val_top1": rep["top1"], "val_top5": rep["top5"], "best_step": step})
    if best is None:
        return probe.eval(), {"best_step": config.steps}
    probe.load_state_dict(best[1])
    return probe.eval(), best[2]


def sweep(
    store: Any,
    output_dir: Union[str, Path],
    layers: Optional[Sequence[str]] = None,
    timesteps: Optional[Sequence[int]] = None,
    *,
    test_store: Any = None,
    config: Optional[SweepConfig] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Linear probes for every cached (layer, t): the paper's Figure-4 analysis for any model and dataset.

    ``store``/``test_store`` are feature stores (paths or objects with
    ``entries``, ``class_names``, ``load``, ``recipe``). Writes ``sweep.json``,
    ``sweep.csv`` and ``sweep.png`` (heat map of test top-1, or validation
    top-1 without a test store, by layer × timestep) to ``output_dir``.
    """
    from tqdm.auto import tqdm

    config = config or SweepConfig()
    if not hasattr(store, "load"):
        from revelio_hub.features import FeatureStore

        store = FeatureStore(store)
    if test_store is not None and not hasattr(test_store, "load"):
        from revelio_hub.features import FeatureStore

        test_store = FeatureStore(test_store)
    entries = [(str(l), int(t)) for l, t in store.entries]
    available_layers = sorted({l for l, _ in entries})
    available_t = sorted({t for _, t in entries})
    for name, wanted, have in (("layers", layers, available_layers), ("timesteps", timesteps, available_t)):
        unknown = sorted(set(wanted or []) - set(have))
        if unknown:
            raise ValueError(f"Unknown {name} {unknown}: the store has {have}.")
    chosen = [(l, t) for l, t in entries if (layers is None or l in layers) and (timesteps is None or t in timesteps)]
    if not chosen:
        raise ValueError("No (layer, timestep) entries selected; the store has " + str(entries))
    class_names = list(store.class_names)
    rows: list[dict[str, Any]] = []
    for layer, t in tqdm(chosen, desc="sweep", disable=not progress):
        data = LabeledFeatures.of(store.load(layer, t, kind="pooled"))
        train_part, val_part = split_by_image(data, config.val_fraction, config.seed)
        recipe = store.recipe(layer, t, "pooled")
        recipe = recipe.to_dict() if isinstance(recipe, FeatureRecipe) else recipe
        probe, info = train_linear_probe(train_part, val_part.plain_view() if len(val_part) else None,
                                         class_names, config, recipe)
        row: dict[str, Any] = {"layer": layer, "timestep": t, "d_in": int(data.features.shape[1]),
                               "num_train_rows": len(train_part), **info}
        if test_store is not None:
            test = LabeledFeatures.of(test_store.load(layer, t, kind="pooled")).plain_view()
            rep = classification_report(predict_logits(probe, test.features), test.labels, class_names)
            row.update(test_top1=rep["top1"], test_top5=rep["top5"], num_test=rep["num_samples"])
        rows.append(row)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = "test_top1" if test_store is not None else "val_top1"
    (out / "sweep.json").write_text(json.dumps({"metric": metric, "class_names": class_names, "rows": rows}, indent=2))
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("layer", "timestep"), k))
    with (out / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    save_sweep_heatmap(rows, metric, out / "sweep.png")
    return rows


def _layer_order(name: str) -> tuple[int, int, str]:
    """down blocks, bottleneck, then up blocks / transformer blocks, in network order."""
    m = re.match(r"(down_ft|up_ft|block)(\d+)$", name)
    if name == "bottleneck":
        return (1, 0, name)
    if m:
        return ({"down_ft": 0, "up_ft": 2, "block": 3}[m.group(1)], int(m.group(2)), name)
    return (4, 0, name)


def save_sweep_heatmap(rows: Sequence[dict[str, Any]], metric: str, path: Union[str, Path]) -> None:
    """Heat map of ``metric`` (rows: layers in network order, columns: timesteps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows}, key=_layer_order)
    steps = sorted({int(r["timestep"]) for r in rows})
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), steps.index(int(r["timestep"]))] = r.get(metric, np.nan)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 1.1 * len(steps)), 1.6 + 0.6 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(steps)), labels=[str(s) for s in steps])
    ax.set_yticks(range(len(layers)), labels=layers)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(steps)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1%}", ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, label=metric.replace("_", " "))
    ax.set_title(f"Linear-probe {metric.replace('_', ' ')}\nby layer × timestep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["SweepConfig", "train_linear_probe", "sweep", "save_sweep_heatmap"]
