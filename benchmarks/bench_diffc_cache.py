#!/usr/bin/env python
"""Diff-C training from cached features vs ``--online`` (the original Revelio code's way), same data, one run.

Both modes train the same head on the same images with the same backbone: a
randomly initialised toy pixel-space UNet (``revelio_hub.toy``; the SD
architecture cannot be fetched here) on procedural shapes, class = shape.

* cached: extract V views per training image once (view 0 plain, views ≥ 1
  RandomResizedCrop 0.8–1.0 + flip via ``features.augment_view``), then every
  epoch samples one cached view per image (``train_diffc``);
* online: every epoch augments each image afresh and runs the backbone on it
  (``train_diffc_online``).

Prints seconds per epoch of both (the training loop, backbone included for
online), their ratio, the backbone seconds and image-forwards a ``--run-epochs``
(default 30) run would spend in each mode, and both test accuracies
(``--json`` for one machine-readable line). The issue's target: ≥ 10× less
backbone compute for a 30-epoch run (30 / V forwards per image with V ≤ 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="training images (default: %(default)s)")
    p.add_argument("--test-images", type=int, default=48, help="test images (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64],
                   help="toy UNet block widths (default: %(default)s)")
    p.add_argument("--layer", default="up_ft0", help="layer to classify from (default: %(default)s)")
    p.add_argument("--timestep", type=int, default=25, help="timestep (default: %(default)s)")
    p.add_argument("--t", dest="timestep", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--num-views", type=int, default=3, help="cached views per training image (default: %(default)s)")
    p.add_argument("--views", dest="num_views", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help="epochs actually timed per mode (default: %(default)s)")
    p.add_argument("--run-epochs", type=int, default=30, help="length of the run to project to (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="Diff-C width (default: %(default)s; paper 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s (paper)")
    p.add_argument("--lr", type=float, default=1e-3, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p.parse_args(argv)


class TimedBackbone:
    """Wraps ``backbone.extract`` to count image forwards and seconds spent in the backbone."""

    def __init__(self, backbone):
        self.backbone, self.seconds, self.images = backbone, 0.0, 0
        self._extract = backbone.extract
        backbone.extract = self.extract

    def extract(self, images, *args, **kwargs):
        start = time.perf_counter()
        out = self._extract(images, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return out

    def reset(self):
        self.seconds, self.images = 0.0, 0


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from revelio_hub.backbones import load_backbone
    from revelio_hub.diffc.training import DiffCTrainConfig, LabeledFeatures, train_diffc, train_diffc_online
    from revelio_hub.data import open_image_dataset
    from revelio_hub.features import augment_view
    from revelio_hub.toy.backbone_training import ToyBackboneConfig, random_backbone
    from revelio_hub.toy.shapes import make_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_diffc_"))
    folder = random_backbone(ToyBackboneConfig(image_size=a.image_size, block_out_channels=tuple(a.widths)), work / "bb")
    backbone = load_backbone(folder)
    timer = TimedBackbone(backbone)
    train = open_image_dataset(make_shapes_dataset(a.images, seed=a.seed, image_size=a.image_size), label_column="shape")
    test = open_image_dataset(make_shapes_dataset(a.test_images, seed=a.seed + 1, image_size=a.image_size),
                              label_column="shape")
    ids, images, _ = train.load_images(range(len(train)))
    test_ids, test_images, _ = test.load_images(range(len(test)))
    cfg = DiffCTrainConfig(head="conv", hidden=a.hidden, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                           seed=a.seed)
    S, layer, t = backbone.image_size, a.layer, a.timestep

    # ---- cached: one extraction of V views, then epochs over the cache
    timer.reset()
    rows, labels, row_ids, views = [], [], [], []
    for v in range(a.num_views):
        batch = [augment_view(img, i, v, S, seed=a.seed) for i, img in zip(ids, images)]
        rows.append(backbone.extract(batch, [layer], [t], image_ids=ids, batch_size=32)[(layer, t)].half())
        labels += train.labels[ids].tolist()
        row_ids += ids
        views += [v] * len(ids)
    extract_seconds, extract_images = timer.seconds, timer.images
    cache = LabeledFeatures(torch.cat(rows), torch.tensor(labels), torch.tensor(row_ids), torch.tensor(views))
    test_maps = backbone.extract(test_images, [layer], [t], image_ids=test_ids, batch_size=32)[(layer, t)]
    test_set = LabeledFeatures(test_maps, torch.as_tensor(test.labels[test_ids]), torch.tensor(test_ids), None)
    cached = train_diffc(cache, train.class_names, work / "cached", cfg, test=test_set, progress=False)
    cached_epoch = statistics.median(r["train_seconds"] for r in cached.fit.history)

    # ---- online: augment + extract every epoch
    timer.reset()
    online = train_diffc_online(backbone, train, train.labels, train.class_names, layer, t, work / "online", cfg,
                                image_ids=range(len(train)), test_images=test_images,
                                test_labels=test.labels[test_ids], progress=False)
    online_epoch = statistics.median(r["train_seconds"] for r in online.fit.history)
    n_train = online.eval["num_train_images"]
    # Backbone cost of one online epoch, measured: everything the timer saw minus the plain val/test passes.
    per_image = timer.seconds / max(timer.images, 1)

    R = a.run_epochs
    n_val, n_test = online.eval["num_val_images"], len(test_ids)
    # Image forwards of a whole R-epoch run, test pass included in both modes:
    # cached = V views of every training-split image (the store does not know the
    # validation split) + test; online = R augmented passes over the training
    # images + one plain pass over the validation images + test.
    forwards_cached = extract_images + n_test
    forwards_online = R * n_train + n_val + n_test
    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "images": a.images, "image_size": S, "layer": layer, "t": t, "views": a.num_views,
        "feature_shape": list(cache.features.shape[1:]), "hidden": a.hidden,
        "cached_epoch_s": round(cached_epoch, 4),
        "online_epoch_s": round(online_epoch, 4),
        "epoch_speedup": round(online_epoch / cached_epoch, 2),
        "cached_extract_once_s": round(extract_seconds, 3),
        "backbone_s_per_image": round(per_image, 5),
        f"backbone_forwards_{R}ep_cached": forwards_cached,
        f"backbone_forwards_{R}ep_online": forwards_online,
        "backbone_compute_ratio": round(forwards_online / forwards_cached, 2),
        f"projected_{R}ep_total_s_cached": round(extract_seconds + n_test * per_image + R * cached_epoch, 2),
        f"projected_{R}ep_total_s_online": round((n_val + n_test) * per_image + R * online_epoch, 2),
        "test_top1_cached": round(cached.eval["top1"], 4),
        "test_top1_online": round(online.eval["top1"], 4),
        "timed_epochs": a.epochs,
    }
    result["total_speedup"] = round(result[f"projected_{R}ep_total_s_online"] / result[f"projected_{R}ep_total_s_cached"], 2)
    if a.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{width}}  {v}")
    return result


if __name__ == "__main__":
    main()
