"""Heat maps of where a neuron fires, drawn over an image: the one renderer of the project.

The app draws them for an uploaded image (:func:`revelio_hub.app.analysis.neuron_view`);
the same colours, upsampling and opacity should be used wherever a neuron's
map is shown, so a reader learns one colour scale. The map is upsampled
bicubically (a 4×4 map reads as a smooth field, not 16 blocks) and its
opacity follows activation (where the neuron is silent, the image shows
through); :func:`with_colour_scale` draws the legend into the picture.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont


def overlay_heatmap(
    image: Image.Image, amap: torch.Tensor, *, scale: Optional[float] = None, alpha: float = 0.65, cmap: str = "inferno"
) -> Image.Image:
    """Colour-map ``amap`` (H×W, upsampled to the image) and alpha-blend it over ``image``.

    The map is upsampled bicubically (clamped at 0: activations are
    non-negative), so a 4×4 map reads as a smooth field rather than 16 blocks.
    Opacity follows activation, so where the neuron is silent the image shows
    through. ``scale`` is the activation drawn at full colour (default: the
    map's maximum); a neuron that never fires leaves the image untouched.
    """
    w, h = image.size
    up = F.interpolate(amap[None, None].float(), size=(h, w), mode="bicubic", align_corners=False)[0, 0].clamp(min=0)
    peak = float(scale) if scale else float(up.max())
    if peak <= 0:
        return image.copy()
    norm = (up / peak).clamp(0, 1).numpy()
    rgba = colormaps[cmap](norm)  # H×W×4 floats in [0, 1]
    heat = (rgba[..., :3] * 255).astype(np.float32)
    weight = (alpha * np.sqrt(norm))[..., None]  # sqrt: weak but real activation stays visible
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * (1 - weight) + heat * weight
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def with_colour_scale(
    overlay: Image.Image, peak: float, *, alpha: float = 0.65, cmap: str = "inferno", height: int = 44
) -> Image.Image:
    """``overlay`` with a colour scale under it: the colours of :func:`overlay_heatmap` from 0 to ``peak``.

    Drawn into the image (not as page furniture), so API users and saved
    copies keep the legend. The bar shows each colour as blended at full
    strength over mid-grey, labelled with the activation it stands for.
    """
    w, h = overlay.size
    out = Image.new("RGB", (w, h + height), (255, 255, 255))
    out.paste(overlay.convert("RGB"), (0, 0))
    pad, bar_h = 8, 12
    ramp = np.linspace(0, 1, max(1, w - 2 * pad))
    colours = colormaps[cmap](ramp)[:, :3] * 255
    weight = (alpha * np.sqrt(ramp))[:, None]
    bar = (128 * (1 - weight) + colours * weight).astype(np.uint8)
    out.paste(Image.fromarray(np.repeat(bar[None], bar_h, axis=0), mode="RGB"), (pad, h + 4))
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    y = h + 4 + bar_h + 2
    draw.text((pad, y), "0", fill=(40, 40, 40), font=font)
    middle = "activation of the neuron"
    draw.text(((w - draw.textlength(middle, font=font)) / 2, y), middle, fill=(40, 40, 40), font=font)
    top = f"{peak:.3g}"
    draw.text((w - pad - draw.textlength(top, font=font), y), top, fill=(40, 40, 40), font=font)
    return out


__all__ = ["overlay_heatmap", "with_colour_scale"]
