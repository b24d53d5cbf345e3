"""Turning whatever the app receives into a safe RGB image, or a plain error.

Two kinds of caller reach :func:`read_image`:

* **Python callers** of the library pass a file path, raw bytes, a PIL image,
  a numpy array, a tensor or a ``FileData``-like dict. They run with the
  server's own rights, so a path is simply opened.
* **The served endpoints** receive JSON from anyone on the network. A path in
  that JSON would let a client make the server open any file on its disk, so
  the endpoints first pass the value through :func:`served_upload`, which
  accepts only a tagged ``gradio.FileData`` whose file lies (symlinks and
  ``..`` resolved) inside Gradio's upload folder (uploads, and the copies of
  the example images the page shows), and returns an :class:`Upload`. Every refusal there reads
  :data:`UPLOAD_REFUSED`, whether or not the path exists, so the answer tells
  a client nothing about the server's files. Messages about an upload name it
  by the name the user gave it, never by its server path.

All inputs end in :func:`revelio_hub.images.load_image` /
:func:`revelio_hub.images.to_rgb`, so decompression bombs, corrupt files and
odd colour modes are handled in one place, and every refusal is a
``ValueError`` whose message can be shown to a user as is.

Gradio's own image preprocessing is bypassed on purpose: it opens the file
with Pillow before our checks run, and a corrupt upload would surface as an
opaque "Error" instead of a sentence saying what is wrong.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

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


#: The one answer to every served file value that is not a real upload (same text whether or not the path exists).
UPLOAD_REFUSED = "The image upload did not arrive; upload the file again."
NO_IMAGE = "No image given: upload an image (PNG, JPEG, WebP, ...) or pick an example."
#: Longest path a served file value may name (Linux's PATH_MAX); longer ones are refused before any file lookup.
MAX_PATH_CHARS = 4096
#: The tag Gradio puts on file payloads (``gradio_client.handle_file``, the browser's uploads).
FILEDATA_TAG = "gradio.FileData"
_MAX_SHOWN = 60


@dataclass(frozen=True)
class Upload:
    """A file that came in through Gradio's upload: where it is, and what the user called it.

    ``path`` stays on the server; messages use ``name``.
    """

    path: str
    name: str


def shown(value: Any, limit: int = _MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: Free-text inputs (a searched label value, a class to explain) longer than this are refused before any
#: lookup: messages quote them, and a 100 KB "class name" must not come back whole.
MAX_TEXT_CHARS = 200

_WHOLE = re.compile(r"\s*[+-]?\d{1,12}\s*")
#: Larger numbers are refused before any lookup (no timestep, neuron id or count is near this).
_MAX_WHOLE = 10**12


def whole_number(value: Any, what: str) -> int:
    """The one rule for numeric inputs of every endpoint: an int, a whole float, or a string of digits.

    ``25``, ``25.0`` and ``"25"`` are 25; ``3.5``, ``"abc"``, ``True``, NaN and
    numbers of more than 12 digits raise a one-line ``ValueError`` that echoes
    at most a few characters of the input.
    """
    number: Optional[int] = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value == value and abs(value) < _MAX_WHOLE and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and len(value) < 40 and _WHOLE.fullmatch(value):
        number = int(value)
    if number is None or abs(number) >= _MAX_WHOLE:
        raise ValueError(f"{what} must be a whole number, got {shown(value, 24)}.")
    return number


def unusable_path(path: str) -> bool:
    """A path no upload has: a URL (Gradio would fetch it), a NUL byte, or more than :data:`MAX_PATH_CHARS`."""
    return "://" in path or "\x00" in path or len(path) > MAX_PATH_CHARS


def upload_roots() -> list[str]:
    """Folders a served upload may live in: Gradio's upload cache (``$GRADIO_TEMP_DIR`` or ``<tmp>/gradio``)."""
    from gradio.utils import get_upload_folder

    return [get_upload_folder()]


def served_upload(
    value: Any,
    allowed_roots: Sequence[Union[str, os.PathLike]],
    allowed_files: Iterable[Union[str, os.PathLike]] = (),
) -> Upload:
    """Check that a value a served endpoint received is a real upload; return it as an :class:`Upload`.

    Accepted: a ``gradio.FileData`` (the model, or its dict with
    ``meta._type == "gradio.FileData"``) whose ``path``, with symlinks and
    ``..`` resolved, is an existing file inside one of ``allowed_roots``
    (Gradio's upload folder: :func:`upload_roots`) or is one of
    ``allowed_files`` (the app passes none: its example images are served from
    copies in the upload folder). Everything else (a plain
    path string, an untagged dict, a URL, a file elsewhere, a missing file)
    raises ``ValueError(UPLOAD_REFUSED)``: one text, so the answer does not
    reveal which server paths exist. ``None`` raises the "no image" message.
    """
    from gradio.utils import is_in_or_equal

    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(NO_IMAGE)
    if hasattr(value, "model_dump") and not isinstance(value, Mapping):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise ValueError(UPLOAD_REFUSED)
    meta = value.get("meta")
    path = value.get("path")
    if (
        not isinstance(meta, Mapping)
        or meta.get("_type") != FILEDATA_TAG
        or not isinstance(path, str)
        or not path
        or unusable_path(path)
    ):
        raise ValueError(UPLOAD_REFUSED)
    real = os.path.realpath(path)
    inside = any(is_in_or_equal(real, os.path.realpath(root)) for root in allowed_roots)
    if not inside:
        inside = real in {os.path.realpath(f) for f in allowed_files}
    if not inside or not os.path.isfile(real):
        raise ValueError(UPLOAD_REFUSED)
    name = value.get("orig_name")
    name = name if isinstance(name, str) and name.strip() else os.path.basename(real)
    return Upload(real, name)


def _path_from_payload(value: Mapping[str, Any]) -> tuple[str, str]:
    path = value.get("path")
    if not path:
        # gradio_client sends {"path": ..., "meta": {"_type": "gradio.FileData"}}; a data URL
        # or a remote url without a local path means the upload did not happen.
        raise ValueError(UPLOAD_REFUSED)
    name = value.get("orig_name") or os.path.basename(str(path))
    return str(path), str(name)


#: The hint for Python callers that a web user cannot act on (they do not set max_pixels).
_MAX_PIXELS_HINT = re.compile(r"\s*\(or raise max_pixels[^)]*\)")


def _upload_message(message: str, path: str, name: str) -> str:
    """A ``load_image`` message about ``path`` rewritten for the person who uploaded ``name``."""
    message = message.replace(f"Image file {path!r}", f"The file {shown(name)}")
    message = message.replace(repr(path), f"The file {shown(name)}")
    return _MAX_PIXELS_HINT.sub("", message)


def read_image(value: Any, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Return ``value`` as an 8-bit RGB PIL image no larger than ``limits.max_side``.

    ``value`` may be an :class:`Upload` (what :func:`served_upload` returns), a
    gradio ``FileData`` dict, a path, raw bytes, a PIL image, a numpy array or
    a tensor. Paths are opened as given: served endpoints must call
    :func:`served_upload` first. ``None`` (nothing uploaded) and every unusable
    input raise ``ValueError`` with a message meant for the user.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(NO_IMAGE)
    shown_name: Optional[str] = None
    if isinstance(value, Upload):
        value, shown_name = value.path, value.name
    elif isinstance(value, Mapping):
        value, shown_name = _path_from_payload(value)
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        try:
            img = load_image(value, max_pixels=limits.max_pixels, min_side=limits.min_side, max_side=limits.max_side)
        except ValueError as exc:
            if shown_name is None:
                raise
            # Name the file as the user knows it, not by the server's upload path.
            raise ValueError(_upload_message(str(exc), os.fspath(value), shown_name)) from None
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


__all__ = [
    "ImageLimits",
    "MAX_PATH_CHARS",
    "MAX_TEXT_CHARS",
    "NO_IMAGE",
    "UPLOAD_REFUSED",
    "Upload",
    "read_image",
    "served_upload",
    "shown",
    "unusable_path",
    "upload_roots",
    "whole_number",
]
