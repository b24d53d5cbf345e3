#!/usr/bin/env python
"""Build the neuron atlas of a k-SAE over a feature store (top images, label AUROCs, summaries, thumbnails).

Thin command-line wrapper over :func:`revelio_hub.interpret.atlas_builder.build_atlas`. Under
``accelerate launch`` the images are split over processes; each keeps a
streaming per-neuron top-N and the states are gathered and merged on the main
process, which then writes the atlas.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from revelio_hub.cli import HelpFormatter, add_options, from_args, option
from revelio_hub.interpret.atlas_config import AtlasConfig
from revelio_hub.layer_names import canonical_layer

EPILOG = """\
examples:
  # atlas of the up_ft1/t25 SAE over the Pets train store, thumbnails from the dataset
  python training/build_atlas.py --store stores/sd15-pets-train --layer up_ft1 --timestep 25 \\
      --sae runs/sae/up_ft1_t25 --dataset timm/oxford-iiit-pet --split train --out runs/atlas/up_ft1_t25

  # on 2 GPUs, with heat-map overlays of the 64 most frequent neurons (needs a --spatial store)
  accelerate launch --num_processes 2 training/build_atlas.py --store ... --sae ... --out ... --heatmaps 64

Without --dataset the dataset recorded in the feature store is opened for thumbnails and
labels; --no-thumbnails skips thumbnails (the app then shows grey placeholders). Every label
column of the dataset (ClassLabel, integer or string columns other than the image and row ids)
is kept by default, read from the dataset by image id; --label-columns chooses them.
"""


@dataclass(kw_only=True)
class AtlasRun:
    """What the atlas describes and where it goes; how it is built is :class:`AtlasConfig` (its options follow)."""

    store: str = field(metadata=option("Feature store folder (training/extract_features.py)."))
    layer: str = field(metadata=option("Layer of the store entry, e.g. up_ft1.", parse=canonical_layer))
    timestep: int = field(metadata=option("Timestep of the store entry, e.g. 25."))
    sae: str = field(metadata=option("k-SAE folder or Hub repo id (training/train_ksae.py output)."))
    sae_subfolder: Optional[str] = field(default=None, metadata=option(
        "Subfolder of --sae (e.g. up_ft1/t25/sae of a release; default: none)."))
    dataset: Optional[str] = field(default=None, metadata=option(
        "Dataset for thumbnails (default: the one recorded in the store)."))
    split: Optional[str] = field(default=None, metadata=option("Dataset split (default: the store's)."))
    out: str = field(metadata=option("Atlas folder to write."))
    no_thumbnails: bool = field(default=False, metadata=option("Do not store thumbnails."))
    label_columns: Optional[str] = field(default=None, metadata=option(
        "Dataset label columns to keep, comma-separated (default: all; the class column comes first). "
        "Pass an empty string to keep only the store's class labels.", metavar="A,B,..."))
    heatmaps: int = field(default=0, metadata=option(
        "Store heat-map overlays for the N most frequent neurons (needs spatial maps; default: 0, none).",
        metavar="N"))
    batch_size: int = field(default=256, metadata=option("Images per batch."))
    cpu: bool = field(default=False, metadata=option("Run on the CPU even if a GPU is available."))


#: The AtlasConfig settings offered on the command line (the summary thresholds stay editable in atlas.json).
ATLAS_OPTIONS = ("top_n", "purity_top", "summary_neurons", "thumbnail_size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build a neuron atlas (stats.safetensors, atlas.json, thumbnails/) for a k-SAE from a "
        "feature store: per-neuron top-N images, firing frequency, mean activation, per label value AUROC, "
        "sigma_label and entropy, one honest summary line per neuron, and the reconstruction-error distribution.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_options(p, AtlasRun)
    add_options(p.add_argument_group("how the atlas is built"), AtlasConfig, only=ATLAS_OPTIONS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    from revelio_hub.interpret.atlas_builder import atlas_inputs, finalize_atlas, store_batches
    from revelio_hub.interpret.atlas_statistics import TopKAccumulator, pre_topk_accumulator
    from revelio_hub.interpret.neuron_labels import ActivationLog
    from revelio_hub.interpret.ood import image_reconstruction_error
    from revelio_hub.interpret.where import peak_positions
    from revelio_hub.features import FeatureStore
    from revelio_hub.sae.model import KSparseAutoencoder

    from revelio_hub.distributed import finish, make_accelerator

    accelerator = make_accelerator(cpu=args.cpu)
    try:
        config = from_args(AtlasConfig, args)
        store = FeatureStore(args.store)
        sae = KSparseAutoencoder.from_pretrained(args.sae, subfolder=args.sae_subfolder).to(accelerator.device).eval()
        kind = atlas_inputs(store, args.layer, args.timestep, sae)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")

    all_ids = store.load(args.layer, args.timestep, "pooled", views=0).image_ids.tolist()
    mine = all_ids[accelerator.process_index :: accelerator.num_processes]
    dataset_info = store.summary.get("dataset") or {}
    dataset = args.dataset or dataset_info.get("id")
    split = args.split or dataset_info.get("split") or "train"
    source = None
    if dataset is not None and not (args.no_thumbnails and args.label_columns == ""):
        from revelio_hub.data import open_image_dataset

        try:
            source = open_image_dataset(dataset, split=split, image_column=dataset_info.get("image_column"),
                                        label_column=dataset_info.get("label_column") or "")
        except ValueError as error:
            if not args.no_thumbnails or args.label_columns:
                raise SystemExit(f"error: {error}")
    columns, tables = _label_tables(store, source, args.label_columns)

    acc = TopKAccumulator(sae.n_latents, config.top_n, config.threshold, device=accelerator.device)
    pre_topk = pre_topk_accumulator(sae.n_latents, config, accelerator.device)  # the paper's sigma_label
    log = ActivationLog(sae.n_latents, list(columns), config.threshold)
    from tqdm.auto import tqdm

    n_batches = (len(mine) + args.batch_size - 1) // args.batch_size
    peak_grid = None  # token SAEs: where each neuron peaks on its top images ("where: top-left")
    with torch.no_grad():
        for x, labels, ids in tqdm(store_batches(store, args.layer, args.timestep, kind, args.batch_size, mine),
                                   total=n_batches, desc=f"atlas {args.layer} t={args.timestep}",
                                   disable=not accelerator.is_main_process):
            x = x.to(accelerator.device)
            acts, dense = sae.image_codes(x)
            by_column = {c: table[ids.long()] for c, table in tables.items()}
            first = next(iter(columns), None)
            acc.update(acts, by_column[first] if first else labels, ids)
            pre_topk.update(dense, by_column[first] if first else labels, ids)
            peaks = None
            if kind == "spatial" and sae.granularity != "pooled":
                peaks, peak_grid = peak_positions(sae, x), tuple(x.shape[2:])
            log.update(acts, ids, by_column, image_reconstruction_error(sae, x), peaks)

    if accelerator.num_processes > 1:  # merge the per-process states: concatenated top-N rows are candidates
        from accelerate.utils import gather_object

        acc, pre_topk = _gathered(accelerator, acc), _gathered(accelerator, pre_topk)
        logs = gather_object([log])
        log = logs[0]
        for other in logs[1:]:
            log.merge(other)
    if not accelerator.is_main_process:
        finish(accelerator)
        return 0

    thumbnails = heatmap_maps = None
    if not args.no_thumbnails:
        if source is None:
            raise SystemExit("error: the store records no dataset; pass --dataset or --no-thumbnails")
        thumbnails = source.load_image
        if args.heatmaps > 0:
            if not store.has_spatial:
                raise SystemExit(f"error: --heatmaps needs spatial maps, but {store.path} holds pooled features only")
            heatmap_maps = lambda ids: store.load(args.layer, args.timestep, "spatial", views=0,  # noqa: E731
                                                  image_ids=list(ids)).features.float()
    atlas = finalize_atlas(
        acc, list(next(iter(columns.values()), [])), config=config, sae=sae, thumbnails=thumbnails,
        heatmap_maps=heatmap_maps, log=log, label_columns=columns, pre_topk=pre_topk, peak_grid=peak_grid,
        heatmap_neurons=_most_frequent(acc, args.heatmaps) if args.heatmaps > 0 else None,
        out=args.out, progress=True,
        extra_meta={"dataset": dataset, "split": split, "layer": args.layer, "timestep": args.timestep,
                    "store": str(args.store), "sae": str(args.sae)},
    )
    s = atlas.summary_stats
    sigma = s.get("sigma_label")
    print(f"wrote {args.out}: {atlas.num_neurons:,} neurons over {atlas.num_images:,} images, "
          f"{s['dead_count']:,} dead ({100 * s['dead_fraction']:.1f}%), label columns {list(columns)}, sigma_label "
          f"{'n/a' if sigma is None else f'{sigma:.3f}'} over {s.get('sigma_label_neurons')} neurons "
          f"(shuffled labels: {s.get('sigma_label_shuffled')})")
    finish(accelerator)
    return 0


def _gathered(accelerator, acc):
    """One accumulator over every process's images: the concatenated per-process top-N rows are the candidates."""
    from revelio_hub.interpret.atlas_statistics import TopKAccumulator

    state = {k: accelerator.gather(v.contiguous()) for k, v in acc.state().items()}
    merged = TopKAccumulator(acc.n_latents, acc.top_n, acc.threshold, device=accelerator.device)
    merged._merge(state["values"], state["image_ids"], state["labels"])
    merged.fire_count = state["fire_count"].view(-1, acc.n_latents).sum(0)
    merged.fire_sum = state["fire_sum"].view(-1, acc.n_latents).sum(0)
    merged.fire_sq = state["fire_sq"].view(-1, acc.n_latents).sum(0)
    merged.num_images = int(state["num_images"].sum())
    return merged


def _label_tables(store, source, wanted: str | None):
    """Label columns (name → value names) and lookup tables image id → label, read from the dataset.

    Feature stores keep the class label only; the other columns come from the
    dataset rows the image ids index. Without a dataset: the store's class labels.
    """
    import torch

    if source is None or wanted == "":
        names = list(store.class_names)
        if not names:
            return {}, {}
        data = store_class_table(store)
        return {"label": names}, {"label": data}
    from revelio_hub.data import label_columns

    chosen = None if wanted is None else [c.strip() for c in wanted.split(",") if c.strip()]
    try:
        cols = label_columns(source, chosen)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    return ({c: names for c, (names, _) in cols.items()},
            {c: torch.as_tensor(labels, dtype=torch.long) for c, (_, labels) in cols.items()})


def store_class_table(store):
    """image id → class label of the store (the store's own labels, un-augmented views)."""
    import torch

    first = store.entries[0]
    data = store.load(first[0], first[1], "pooled", views=0)
    table = torch.full((int(data.image_ids.max()) + 1 if len(data) else 0,), -1, dtype=torch.long)
    table[data.image_ids.long()] = data.labels.long()
    return table


def _most_frequent(acc, n: int) -> list[int]:
    import torch

    count = acc.fire_count.cpu()
    order = torch.argsort(count, descending=True, stable=True)
    return [int(i) for i in order[:n] if count[i] > 0]


if __name__ == "__main__":
    sys.exit(main())
