"""The atlas's images: square WebP thumbnails of top images and heat-map overlays of where a neuron fires.

The builder calls these after the statistics are final (only images in some
neuron's top list are drawn); the read model
(:class:`~revelio_hub.interpret.atlas_model.NeuronAtlas`) stores and serves them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from revelio_hub.interpret.atlas_config import AtlasConfig
from revelio_hub.interpret.atlas_model import NeuronAtlas

__all__ = ["make_thumbnail", "heat_overlay", "add_thumbnails", "add_heatmaps"]


def make_thumbnail(image: Any, size: int):
    """A ``size``-pixel square RGB thumbnail of a PIL image (centre crop, bicubic)."""
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        raise ValueError(f"thumbnails(image_id) must return a PIL image or None, got {type(image).__name__}")
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def heat_overlay(thumb: Any, heat: torch.Tensor, vmax: float):
    """Blend a red-yellow heat map (H×W, scaled by ``vmax``) over a thumbnail."""
    from PIL import Image

    h = (heat.float().clamp_min(0) / max(vmax, 1e-12)).clamp(0, 1)
    size = thumb.size
    h = torch.nn.functional.interpolate(h[None, None], size=(size[1], size[0]), mode="bilinear",
                                        align_corners=False)[0, 0].clamp(0, 1)
    rgb = torch.stack([torch.ones_like(h), h, torch.zeros_like(h)], -1)  # red -> yellow
    colour = Image.fromarray((rgb * 255).byte().numpy(), "RGB")
    alpha = Image.fromarray((h * 0.6 * 255).byte().numpy(), "L")
    out = thumb.copy()
    out.paste(colour, (0, 0), alpha)
    return out


def add_thumbnails(atlas: NeuronAtlas, thumbnails: Callable[[int], Any], config: AtlasConfig,
                   progress: bool = False) -> None:
    """Store a thumbnail of every image in some neuron's top list; record which ones the source lacked."""
    ids = torch.unique(atlas.stats["top_image_ids"])
    ids = ids[ids >= 0].tolist()
    missing = []
    iterator: Iterable[int] = ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ids, desc="thumbnails", unit="img")
    for image_id in iterator:
        image = thumbnails(int(image_id))
        if image is None:
            missing.append(int(image_id))
            continue
        atlas._thumbnails[int(image_id)] = make_thumbnail(image, config.thumbnail_size)
    atlas.meta["thumbnails"] = len(atlas._thumbnails)
    atlas.meta["missing_thumbnails"] = missing


def add_heatmaps(atlas: NeuronAtlas, sae: Any, maps: Callable[[Sequence[int]], torch.Tensor],
                  neurons: Optional[Sequence[int]], config: AtlasConfig) -> None:
    """Store heat-map overlays of selected neurons on their top images (one feature-map read per image)."""
    neurons = list(neurons) if neurons is not None else atlas.sorted_neurons("frequency", limit=64)
    wanted: dict[int, list[int]] = {}
    for i in neurons:
        i = atlas._check(i)
        for image_id in atlas.stats["top_image_ids"][i, : config.purity_top].tolist():
            if image_id >= 0 and image_id in atlas._thumbnails:
                wanted.setdefault(image_id, []).append(i)
    device = next(sae.parameters()).device
    ids = sorted(wanted)
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            x = maps(chunk)
            if x.dim() != 4 or x.shape[0] != len(chunk):
                raise ValueError(f"heatmap_maps must return {len(chunk)}×d×H×W maps, got {tuple(x.shape)}")
            for row, image_id in enumerate(chunk):
                ns = wanted[image_id]
                heat = sae.activation_map(x[row : row + 1].to(device=device, dtype=torch.float32), ns)[0].cpu()
                for j, i in enumerate(ns):
                    vmax = float(heat[j].max())
                    if vmax > 0:
                        atlas._heatmaps[(i, image_id)] = heat_overlay(atlas._thumbnails[image_id], heat[j], vmax)
    atlas.meta["heatmap_neurons"] = sorted({i for (i, _) in atlas._heatmaps})
