#!/usr/bin/env python
"""Build the neuron atlas of a k-SAE over a feature store (top images, frequency, purity, thumbnails).

Thin command-line wrapper over :func:`revelio_hub.atlas.build_atlas`. Under
``accelerate launch`` the images are split over processes; each keeps a
streaming per-neuron top-N and the states are gathered and merged on the main
process, which then writes the atlas.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  # atlas of the up_ft1/t25 SAE over the Pets train store, thumbnails from the dataset
  python training/build_atlas.py --store stores/sd15-pets-train --layer up_ft1 --timestep 25 \\
      --sae runs/sae/up_ft1_t25 --dataset timm/oxford-iiit-pet --split train --out runs/atlas/up_ft1_t25

  # on 2 GPUs, with heat-map overlays of the 64 most frequent neurons (needs a --spatial store)
  accelerate launch --num_processes 2 training/build_atlas.py --store ... --sae ... --out ... --heatmaps 64

Without --dataset the dataset recorded in the feature store is opened for thumbnails;
--no-thumbnails skips them (the app then shows grey placeholders).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revelio_hub.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Build a neuron atlas (stats.safetensors, atlas.json, thumbnails/) for a k-SAE from a "
        "feature store: per-neuron top-N images, firing frequency, mean activation, label purity and entropy.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--store", required=True, help="Feature store folder (training/extract_features.py).")
    p.add_argument("--layer", required=True, help="Layer of the store entry, e.g. up_ft1.")
    p.add_argument("--timestep", type=int, required=True, help="Timestep of the store entry, e.g. 25.")
    p.add_argument("--sae", required=True, help="k-SAE folder or Hub repo id (training/train_ksae.py output).")
    p.add_argument("--sae-subfolder", default=None, help="Subfolder of --sae (e.g. up_ft1/t25/sae of a release; default: none).")
    p.add_argument("--dataset", default=None,
                   help="Dataset for thumbnails (default: the one recorded in the store).")
    p.add_argument("--split", default=None, help="Dataset split (default: the store's).")
    p.add_argument("--out", required=True, help="Atlas folder to write.")
    p.add_argument("--top-n", type=int, default=20, help="Top images kept per neuron (default: %(default)s).")
    p.add_argument("--purity-top", type=int, default=10,
                   help="Top images used for purity/entropy (default: %(default)s, as the paper).")
    p.add_argument("--summary-neurons", type=int, default=1000,
                   help="Mean purity over this many most frequent neurons, or all live ones when fewer "
                        "(default: %(default)s, as the paper).")
    p.add_argument("--thumbnail-size", type=int, default=128, help="Thumbnail side in pixels (default: %(default)s).")
    p.add_argument("--no-thumbnails", action="store_true", help="Do not store thumbnails.")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="Store heat-map overlays for the N most frequent neurons (needs spatial maps; default: 0, none).")
    p.add_argument("--batch-size", type=int, default=256, help="Images per batch (default: %(default)s).")
    p.add_argument("--cpu", action="store_true", help="Run on the CPU even if a GPU is available.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    from revelio_hub.atlas import AtlasConfig, TopKAccumulator, atlas_inputs, finalize_atlas, store_batches
    from revelio_hub.features import FeatureStore
    from revelio_hub.sae import KSparseAutoencoder

    from revelio_hub.distributed import finish, make_accelerator

    accelerator = make_accelerator(cpu=args.cpu)
    try:
        config = AtlasConfig(top_n=args.top_n, purity_top=args.purity_top, summary_neurons=args.summary_neurons,
                             thumbnail_size=args.thumbnail_size)
        store = FeatureStore(args.store)
        sae = KSparseAutoencoder.from_pretrained(args.sae, subfolder=args.sae_subfolder).to(accelerator.device).eval()
        kind = atlas_inputs(store, args.layer, args.timestep, sae)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")

    all_ids = store.load(args.layer, args.timestep, "pooled", views=0).image_ids.tolist()
    mine = all_ids[accelerator.process_index :: accelerator.num_processes]
    acc = TopKAccumulator(sae.n_latents, config.top_n, config.threshold, device=accelerator.device)
    from tqdm.auto import tqdm

    n_batches = (len(mine) + args.batch_size - 1) // args.batch_size
    with torch.no_grad():
        for x, labels, ids in tqdm(store_batches(store, args.layer, args.timestep, kind, args.batch_size, mine),
                                   total=n_batches, desc=f"atlas {args.layer} t={args.timestep}",
                                   disable=not accelerator.is_main_process):
            acc.update(sae.image_activations(x.to(accelerator.device)), labels, ids)

    if accelerator.num_processes > 1:  # merge the per-process states: concatenated top-N rows are candidates
        state = {k: accelerator.gather(v.contiguous()) for k, v in acc.state().items()}
        merged = TopKAccumulator(sae.n_latents, config.top_n, config.threshold, device=accelerator.device)
        merged._merge(state["values"], state["image_ids"], state["labels"])
        merged.fire_count = state["fire_count"].view(-1, sae.n_latents).sum(0)
        merged.fire_sum = state["fire_sum"].view(-1, sae.n_latents).sum(0)
        merged.num_images = int(state["num_images"].sum())
        acc = merged
    if not accelerator.is_main_process:
        finish(accelerator)
        return 0

    thumbnails = heatmap_maps = None
    dataset_info = store.summary.get("dataset") or {}
    dataset = args.dataset or dataset_info.get("id")
    split = args.split or dataset_info.get("split") or "train"
    if not args.no_thumbnails:
        if dataset is None:
            raise SystemExit("error: the store records no dataset; pass --dataset or --no-thumbnails")
        from revelio_hub.data import open_image_dataset

        source = open_image_dataset(dataset, split=split, image_column=dataset_info.get("image_column"),
                                    label_column=dataset_info.get("label_column") or "")
        thumbnails = source.load_image
        if args.heatmaps > 0:
            if not store.has_spatial:
                raise SystemExit(f"error: --heatmaps needs spatial maps, but {store.path} holds pooled features only")
            heatmap_maps = lambda ids: store.load(args.layer, args.timestep, "spatial", views=0,  # noqa: E731
                                                  image_ids=list(ids)).features.float()
    atlas = finalize_atlas(
        acc, store.class_names, config=config, sae=sae, thumbnails=thumbnails, heatmap_maps=heatmap_maps,
        heatmap_neurons=_most_frequent(acc, args.heatmaps) if args.heatmaps > 0 else None,
        out=args.out, progress=True,
        extra_meta={"dataset": dataset, "split": split, "layer": args.layer, "timestep": args.timestep,
                    "store": str(args.store), "sae": str(args.sae)},
    )
    s = atlas.summary_stats
    averaged = min(int(s["summary_neurons"]), atlas.num_neurons - int(s["dead_count"]))
    purity = "n/a" if s.get("mean_purity") is None else f"{s['mean_purity']:.2f}"
    print(f"wrote {args.out}: {atlas.num_neurons:,} neurons over {atlas.num_images:,} images, "
          f"{s['dead_count']:,} dead ({100 * s['dead_fraction']:.1f}%), mean purity {purity} "
          f"over the top {averaged:,} neurons (most frequently firing)")
    finish(accelerator)
    return 0


def _most_frequent(acc, n: int) -> list[int]:
    import torch

    count = acc.fire_count.cpu()
    order = torch.argsort(count, descending=True, stable=True)
    return [int(i) for i in order[:n] if count[i] > 0]


if __name__ == "__main__":
    sys.exit(main())
