"""Procedural shape images with known generative factors.

The toy release is trained and evaluated on these images. Because every image is
drawn from independently sampled factors (shape, colour, size, position,
background), we know the ground truth behind every pixel, which turns "are these
neurons monosemantic?" into a measurable question (AUROC of one neuron at
detecting one factor value).

Design choices, and why:

* Objects are saturated colours on **neutral** (grey-scale) backgrounds, so an
  object's pixels are recoverable from saturation alone (tests rely on this to
  check labels from pixels, and it keeps colour and background from being
  confounded).
* Every image is drawn from its own random stream, seeded from ``(seed, index)``,
  so image ``i`` is identical whatever ``n`` or batch it was generated in.
* Drawing happens at ``supersample`` × resolution and is downsampled with a box
  filter, which antialiases edges without any extra dependency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Six hues 60 degrees apart, fully saturated: well separated for any observer.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 200, 40),
    "cyan": (20, 210, 220),
    "blue": (35, 60, 235),
    "magenta": (220, 35, 210),
}
SIZES: dict[str, float] = {"small": 0.16, "large": 0.27}  # object radius as a fraction of the side
POSITIONS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
BACKGROUNDS: tuple[str, ...] = ("dark", "light", "stripes")

#: The label columns of :func:`make_shapes_dataset`, in order, with their class names.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": BACKGROUNDS,
}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image (besides its size).

    ``cx``/``cy`` are the object centre and ``radius`` its circumradius, all as
    fractions of the image side, so one spec renders at any resolution.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str
    cx: float
    cy: float
    radius: float
    background_seed: int = 0
    distractor: Optional["ShapeSpec"] = None

    def labels(self) -> dict[str, int]:
        """Class ids of the five factors (the dataset's label columns)."""
        return {name: FACTORS[name].index(getattr(self, name)) for name in FACTORS}

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: str) -> None:
    if value not in FACTORS[name]:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {list(FACTORS[name])}")


def _region_center(position: str, rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A random centre inside the quadrant, keeping the object inside the image.

    The jitter range keeps the centre strictly inside its quadrant, so the
    position label is always recoverable from the object's centroid.
    """
    left = position.endswith("left")
    top = position.startswith("top")
    margin = radius + 0.02
    lo, hi = margin, 0.5 - 0.04  # distance from the image border to the centre
    if hi < lo:
        lo = hi = 0.25
    x = rng.uniform(lo, hi)
    y = rng.uniform(lo, hi)
    return (x if left else 1.0 - x, y if top else 1.0 - y)


def sample_spec(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] = tuple(COLORS),
    sizes: Sequence[str] = tuple(SIZES),
    positions: Sequence[str] = POSITIONS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    distractor: bool = False,
) -> ShapeSpec:
    """Draw every factor uniformly and independently (so no two are confounded)."""
    shape = str(rng.choice(list(shapes)))
    color = str(rng.choice(list(colors)))
    size = str(rng.choice(list(sizes)))
    position = str(rng.choice(list(positions)))
    background = str(rng.choice(list(backgrounds)))
    radius = SIZES[size] * rng.uniform(0.92, 1.08)
    cx, cy = _region_center(position, rng, radius)
    bg_seed = int(rng.integers(0, 2**31 - 1))
    second = None
    if distractor:
        # A small object of another colour in another quadrant: it makes the
        # "which object is the label about" question non-trivial.
        other_pos = str(rng.choice([p for p in POSITIONS if p != position]))
        other_color = str(rng.choice([c for c in COLORS if c != color]))
        r2 = SIZES["small"] * 0.8
        ox, oy = _region_center(other_pos, rng, r2)
        second = ShapeSpec(str(rng.choice(list(SHAPES))), other_color, "small", other_pos, background, ox, oy, r2)
    return ShapeSpec(shape, color, size, position, background, cx, cy, radius, bg_seed, second)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius ``r`` around (cx, cy)."""
    if shape == "square":
        h = r / math.sqrt(2.0)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Pointing up; an equilateral triangle's centroid is its circumcentre.
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        h = r * 0.95
        return [
            (cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w),
            (cx + h, cy + w), (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h),
            (cx - w, cy + w), (cx - h, cy + w), (cx - h, cy - w), (cx - w, cy - w),
        ]
    raise ValueError(f"Unknown shape {shape!r}; valid values are {list(SHAPES)}")


def _draw_object(draw: ImageDraw.ImageDraw, spec: ShapeSpec, side: int, fill) -> None:
    cx, cy, r = spec.cx * side, spec.cy * side, spec.radius * side
    if spec.shape == "circle":
        rc = r * 0.9  # same visual size as the polygons, whose area is smaller than the circumcircle
        draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], fill=fill)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r), fill=fill)


def _background(kind: str, side: int, seed: int) -> Image.Image:
    """Neutral (grey-scale) backgrounds, so hue belongs to the object alone."""
    rng = np.random.default_rng(seed)
    if kind == "dark":
        level = int(rng.integers(15, 45))
        arr = np.full((side, side), level, dtype=np.float32)
    elif kind == "light":
        level = int(rng.integers(205, 240))
        arr = np.full((side, side), level, dtype=np.float32)
    elif kind == "stripes":
        # Diagonal mid-grey stripes, period 1/8 of the side, random phase.
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        period = side / 8.0
        phase = rng.uniform(0, period)
        band = ((xx + yy + phase) % period) < (period / 2)
        arr = np.where(band, 165.0, 90.0).astype(np.float32)
    else:
        raise ValueError(f"Unknown background {kind!r}; valid values are {list(BACKGROUNDS)}")
    return Image.fromarray(np.repeat(arr[..., None], 3, axis=2).clip(0, 255).astype(np.uint8))


def render(spec: ShapeSpec, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Render ``spec`` as an RGB image of side ``image_size`` (antialiased)."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    for name in FACTORS:
        _check_choice(name, getattr(spec, name))
    big = image_size * supersample
    img = _background(spec.background, big, spec.background_seed)
    draw = ImageDraw.Draw(img)
    if spec.distractor is not None:
        _draw_object(draw, spec.distractor, big, COLORS[spec.distractor.color])
    _draw_object(draw, spec, big, COLORS[spec.color])
    if supersample > 1:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return img


def object_mask(spec: ShapeSpec, image_size: int = 64) -> np.ndarray:
    """Boolean mask of the main object at ``image_size`` (pixels at least half covered)."""
    big = image_size * 4
    m = Image.new("L", (big, big), 0)
    _draw_object(ImageDraw.Draw(m), spec, big, 255)
    return np.asarray(m.resize((image_size, image_size), Image.Resampling.BOX)) >= 128


def image_spec(index: int, seed: int, **choices) -> ShapeSpec:
    """The spec of image ``index`` of the dataset with ``seed`` (independent of n)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return sample_spec(rng, **choices)


def make_shapes_dataset(
    n: int,
    seed: int = 0,
    image_size: int = 64,
    *,
    distractor: bool = False,
    supersample: int = 4,
    start_index: int = 0,
):
    """A ``datasets.Dataset`` of ``n`` shape images with one ``ClassLabel`` per factor.

    Columns: ``image`` (``datasets.Image``), ``shape``, ``color``, ``size``,
    ``position``, ``background`` (``ClassLabel``; names in :data:`FACTORS`) and
    ``image_id`` (the global index, ``start_index + i``). Same ``seed`` → identical
    images; use different seeds (or disjoint ``start_index`` ranges) for train and
    test splits.
    """
    import datasets  # deferred: importing datasets costs a second

    if n < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            **{name: datasets.ClassLabel(names=list(values)) for name, values in FACTORS.items()},
            "image_id": datasets.Value("int64"),
        }
    )
    columns: dict[str, list] = {"image": [], **{name: [] for name in FACTORS}, "image_id": []}
    for i in range(start_index, start_index + n):
        spec = image_spec(i, seed, distractor=distractor)
        columns["image"].append(render(spec, image_size, supersample))
        for name, value in spec.labels().items():
            columns[name].append(value)
        columns["image_id"].append(i)
    return datasets.Dataset.from_dict(columns, features=features)
