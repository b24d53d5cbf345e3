"""Turning whatever the app receives into a safe RGB image, or a plain error.

Uploads reach the app in three shapes: a gradio ``FileData`` dict (the UI
event runs with ``preprocess=False`` and ``/analyze_json`` receives the dict a
``gradio_client.handle_file`` upload produces), a file path (tests, Python
callers), or an in-memory image (PIL / numpy / tensor). All of them end in
:func:`revelio_hub.images.load_image` / :func:`revelio_hub.images.to_rgb`, so
decompression bombs, corrupt files and odd colour modes are handled in one
place, and every refusal is a ``ValueError`` whose message can be shown to a
user as is.

Gradio's own image preprocessing is bypassed on purpose: it opens the file
with Pillow before our checks run, and a corrupt upload would surface as an
opaque "Error" instead of a sentence saying what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from revelio_hub.images import DEFAULT_MAX_PIXELS, MIN_SIDE, load_image, to_rgb


@dataclass(frozen=True)
class ImageLimits:
    """What the app accepts.

    Attributes:
        max_pixels: refuse images with more pixels than this (checked from the
            header, before decoding: bounded memory whatever the file claims).
        min_side: refuse images whose shorter side is smaller (a 3-pixel image
            says nothing about a neuron; upsampling it would only invent pixels).
        max_side: after loading, downscale so the longer side is at most this;
            the backbone centre-crops to a few hundred pixels anyway, and the
            heat-map overlay does not need more.
    """

    max_pixels: int = min(DEFAULT_MAX_PIXELS, 40_000_000)
    min_side: int = max(MIN_SIDE, 16)
    max_side: int = 1024


def _path_from_payload(value: Mapping[str, Any]) -> tuple[str, str]:
    path = value.get("path")
    if not path:
        # gradio_client sends {"path": ..., "meta": {"_type": "gradio.FileData"}}; a data URL
        # or a remote url without a local path means the upload did not happen.
        raise ValueError("The image upload did not arrive; upload the file again.")
    name = value.get("orig_name") or os.path.basename(str(path))
    return str(path), str(name)


def read_image(value: Any, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Return ``value`` as an 8-bit RGB PIL image no larger than ``limits.max_side``.

    ``value`` may be a gradio ``FileData`` dict, a path, raw bytes, a PIL image,
    a numpy array or a tensor. ``None`` (nothing uploaded) and every unusable
    input raise ``ValueError`` with a message meant for the user.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("No image given: upload an image (PNG, JPEG, WebP, ...) or pick an example.")
    shown_name = None
    if isinstance(value, Mapping):
        value, shown_name = _path_from_payload(value)
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        try:
            img = load_image(value, max_pixels=limits.max_pixels, min_side=limits.min_side)
        except ValueError as exc:
            if shown_name is None:
                raise
            # Name the file as the user knows it, not by the server's upload path.
            raise ValueError(str(exc).replace(repr(os.fspath(value)), f"The file {shown_name!r}")) from None
    else:
        if isinstance(value, Image.Image):
            w, h = value.size
            if w * h > limits.max_pixels:
                raise ValueError(
                    f"The image is {w}×{h} pixels, more than the allowed {limits.max_pixels:,}; downscale it first."
                )
        img = to_rgb(value)
        w, h = img.size
        if w * h > limits.max_pixels:
            raise ValueError(
                f"The image is {w}×{h} pixels, more than the allowed {limits.max_pixels:,}; downscale it first."
            )
        if min(w, h) < limits.min_side:
            raise ValueError(
                f"The image is only {w}×{h} pixels; images need at least {limits.min_side} px per side."
            )
    if min(img.size) < limits.min_side:
        raise ValueError(
            f"The image is only {img.size[0]}×{img.size[1]} pixels; images need at least "
            f"{limits.min_side} px per side."
        )
    if max(img.size) > limits.max_side:
        img = img.copy()
        img.thumbnail((limits.max_side, limits.max_side), Image.Resampling.BICUBIC)
    return img


__all__ = ["ImageLimits", "read_image"]
