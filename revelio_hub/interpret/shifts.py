"""Generic image shifts: what a user may upload that the release never saw, made from the release's own images.

The reliability signal (:mod:`revelio_hub.interpret.reliability`) must learn
when Diff-C is wrong *without* knowing how a release's data was made (Pets has
no shape generator). So it is calibrated on the release's held-out images and
on these shifts of them, which change an image in ways that no particular
dataset defines: rotation, rescaling beyond the data's range, pastes of several
images, blur, noise, JPEG artefacts, colour changes. Each shift keeps the
image's size and mode (RGB) so the backbone sees it exactly as an upload.

A shift draws its strength from ``rng`` (a :class:`random.Random`), so a suite
is reproducible from one seed, and two seeds give two independent suites (the
calibration and the benchmark use different ones).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image, ImageFilter, ImageOps

__all__ = ["SHIFTS", "Shifted", "shift_image", "shift_suite"]


def _edge_colour(img: Image.Image) -> tuple[int, ...]:
    """The top-left pixel: what fills the corners a rotation or shrink uncovers (the background, for most data)."""
    return tuple(img.getpixel((0, 0)))


def rotate(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Rotate by 20–70° either way (beyond the few degrees of jitter photos and renderers have)."""
    angle = rng.uniform(20, 70) * rng.choice((-1, 1))
    return img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=_edge_colour(img))


def zoom_in(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Enlarge 1.5–2.5× and crop back to size at a random offset: objects larger than the data's."""
    w, h = img.size
    s = rng.uniform(1.5, 2.5)
    big = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
    x, y = rng.randint(0, big.width - w), rng.randint(0, big.height - h)
    return big.crop((x, y, x + w, y + h))


def zoom_out(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Shrink to 35–60 % and paste on the edge colour at a random place: objects smaller than the data's."""
    w, h = img.size
    s = rng.uniform(0.35, 0.6)
    small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (w, h), _edge_colour(img))
    canvas.paste(small, (rng.randint(0, w - small.width), rng.randint(0, h - small.height)))
    return canvas


def paste(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Paste a 40–60 % crop of ``others[0]`` into this one: two subjects in one frame."""
    if not others:
        return img.copy()
    other = others[0].convert("RGB").resize(img.size, Image.Resampling.BICUBIC)
    w, h = img.size
    s = rng.uniform(0.4, 0.6)
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    cx, cy = rng.randint(0, w - cw), rng.randint(0, h - ch)
    patch = other.crop((cx, cy, cx + cw, cy + ch))
    out = img.copy()
    out.paste(patch, (rng.randint(0, w - cw), rng.randint(0, h - ch)))
    return out


def mosaic(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Four images in a 2×2 grid (two side by side with one other), each shrunk into its tile: several subjects."""
    w, h = img.size
    pool = [img] + [o.convert("RGB") for o in others[:3]]
    n = 4 if len(pool) >= 4 else min(2, len(pool))
    out = Image.new("RGB", (w, h), _edge_colour(img))
    tiles = [(0, 0, w // 2, h), (w // 2, 0, w, h)] if n == 2 else \
        [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
    for tile, src in zip(tiles, pool[:n]):
        tw, th = tile[2] - tile[0], tile[3] - tile[1]
        out.paste(ImageOps.fit(src, (tw, th), Image.Resampling.BICUBIC), tile[:2])
    return out


def blur(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Gaussian blur of 3–8 % of the image side: an out-of-focus or upscaled photo."""
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.03, 0.08) * min(img.size)))


def noise(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Additive Gaussian pixel noise, σ 25–75 of 255: a dark, grainy sensor."""
    import numpy as np

    arr = np.asarray(img, dtype=np.float32)
    g = np.random.default_rng(rng.getrandbits(32))
    arr = arr + g.normal(0, rng.uniform(25, 75), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def jpeg(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """JPEG at quality 5–25: blocky, colour-bled compression."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(5, 25))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def colour(img: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """Swap the colour channels, invert, or drop to greyscale: colours the data does not have."""
    kind = rng.choice(("permute", "invert", "grey"))
    if kind == "invert":
        return ImageOps.invert(img)
    if kind == "grey":
        return ImageOps.grayscale(img).convert("RGB")
    bands = list(img.split())
    order = rng.choice([(1, 2, 0), (2, 0, 1), (2, 1, 0), (1, 0, 2), (0, 2, 1)])
    return Image.merge("RGB", [bands[i] for i in order])


#: Every shift by name. ``paste`` and ``mosaic`` combine several images: their subjects' labels all count.
SHIFTS: dict[str, Callable[[Image.Image, random.Random, Sequence[Image.Image]], Image.Image]] = {
    "rotate": rotate, "zoom_in": zoom_in, "zoom_out": zoom_out, "paste": paste, "mosaic": mosaic,
    "blur": blur, "noise": noise, "jpeg": jpeg, "colour": colour,
}
#: Shifts that put more than one source image into the result.
MULTI_IMAGE = ("paste", "mosaic")


def shift_image(name: str, img: Image.Image, rng: random.Random, others: Sequence[Image.Image] = ()) -> Image.Image:
    """Apply the shift ``name`` (one of :data:`SHIFTS`) to ``img`` (converted to RGB); ``others`` feed pastes."""
    if name not in SHIFTS:
        raise ValueError(f"Unknown shift {name!r}; choose from: {', '.join(SHIFTS)}.")
    return SHIFTS[name](img.convert("RGB"), rng, others)


@dataclass(frozen=True)
class Shifted:
    """One shifted image: the shift's name, the image, and the source rows it was made from (first = base)."""

    shift: str
    image: Image.Image
    sources: tuple[int, ...]


def shift_suite(images: Sequence[Image.Image], seed: int, per_image: int = 1,
                shifts: Sequence[str] = tuple(SHIFTS)) -> list[Shifted]:
    """``per_image`` shifted copies of every image per shift, drawn from ``seed``.

    Pastes and mosaics take their other subjects from ``images`` too, and
    record every source row, so a caller can tell which labels the result
    shows. Same ``seed``, same suite.
    """
    rng = random.Random(seed)
    out: list[Shifted] = []
    for name in shifts:
        for i, img in enumerate(images):
            for _ in range(per_image):
                if name in MULTI_IMAGE and len(images) > 1:
                    picks = rng.sample([j for j in range(len(images)) if j != i], min(3, len(images) - 1))
                    shifted = shift_image(name, img, random.Random(rng.getrandbits(32)), [images[j] for j in picks])
                    used = picks[:1] if name == "paste" or len(picks) < 3 else picks
                    out.append(Shifted(name, shifted, (i, *used)))
                else:
                    out.append(Shifted(name, shift_image(name, img, random.Random(rng.getrandbits(32))), (i,)))
    return out
