"""Turning whatever a user hands us into the tensor a diffusion model expects.

Images reach Revelio Hub from dataset rows, uploaded files, numpy arrays and
tensors, in every colour mode Pillow knows. Feature extraction must see the
same pixels no matter how an image arrived, so everything goes through
:func:`to_rgb` (a canonical 8-bit RGB PIL image) and then the paper's
preprocessing: resize the shorter side, centre-crop, scale to ``[-1, 1]``
(:func:`center_crop_resize`, :func:`to_model_tensor`).

Uploaded files are untrusted: :func:`load_image` guards against decompression
bombs, truncated or corrupt files and absurd sizes, and always answers with a
``ValueError`` that says what was wrong.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

#: Images smaller than this (shorter side, in pixels) are rejected by :func:`load_image`.
MIN_SIDE = 8
#: Default pixel budget of :func:`load_image` (about 50 megapixels, e.g. 7000×7000).
DEFAULT_MAX_PIXELS = 50_000_000

_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- PIL


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten an image with alpha onto white (transparent areas become white, as a viewer shows them)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grey images to 8 bits.

    ``I;16*`` is always 0..65535. Mode ``I`` is what Pillow gives for 16-bit
    PNGs, so values up to 65535 are scaled by the 16-bit range (and values up
    to 255 by the 8-bit range). ``F`` images are taken as [0, 1] when they fit,
    otherwise min-max normalised; there is no universal convention for them.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 65535.0
    elif img.mode == "I":
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if lo >= 0 and hi <= 255:
            arr = arr / 255.0
        elif lo >= 0 and hi <= 65535:
            arr = arr / 65535.0
        else:
            arr = (arr - lo) / max(hi - lo, 1e-12)
    else:  # "F"
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if not (lo >= 0 and hi <= 1):
            arr = (arr - lo) / max(hi - lo, 1e-12)
    grey = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: use the first frame
    img = ImageOps.exif_transpose(img)  # returns a copy, frame 0 only
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if mode == "CMYK":
        return img.convert("RGB")
    # "1", "L", "YCbCr", "LAB", "HSV", ...: Pillow's own conversion is right.
    return img.convert("RGB")


# ------------------------------------------------------------------ arrays/tensors


def _array_to_rgb(arr: np.ndarray, *, source: str) -> Image.Image:
    """HW or HWC (C in 1, 3, 4) array of uint8, uint16, bool or float in [0, 1] -> RGB."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW given where HWC is expected
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{source} of shape {tuple(arr.shape)} is not an image: expected H×W (grey), "
            "H×W×C or C×H×W with C in 1 (grey), 3 (RGB) or 4 (RGBA)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{source} of shape {tuple(arr.shape)} is empty.")
    if arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:
        u8 = np.round(arr.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        u8 = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{source} contains NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{source} is floating point with values in [{lo:.3g}, {hi:.3g}]; "
                "float images must lie in [0, 1] (use uint8 for 0..255)."
            )
        u8 = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(
            f"{source} has dtype {arr.dtype}; supported: uint8, uint16, bool, or float in [0, 1]."
        )
    u8 = np.ascontiguousarray(u8)
    if u8.ndim == 2:
        return Image.fromarray(u8, mode="L").convert("RGB")
    if u8.shape[-1] == 4:
        return _composite_on_white(Image.fromarray(u8, mode="RGBA"))
    return Image.fromarray(u8, mode="RGB")


def _tensor_to_rgb(t: torch.Tensor) -> Image.Image:
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # CHW -> HWC
    elif t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(1, 2, 0)  # ambiguous tiny image: torch convention is CHW
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    if t.dtype not in (torch.uint8, torch.bool) and not t.is_floating_point():
        raise ValueError(f"Tensor image has dtype {t.dtype}; supported: uint8, or float in [0, 1].")
    return _array_to_rgb(t.numpy(), source="Tensor image")


def to_rgb(image: Any) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image, whatever it was.

    Accepts PIL images of any mode (alpha composited on white, ``P`` palettes,
    ``CMYK``, 16/32-bit and float grey scaled to 8 bits, ``1``), applies the
    EXIF orientation and takes the first frame of animations; numpy arrays
    (H×W or H×W×C; uint8, uint16, bool or float in [0, 1]); torch tensors (C×H×W
    or H×W×C; uint8 or float in [0, 1]). Anything else is a ``ValueError``.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, source="Array image")
    raise ValueError(
        f"Cannot use an object of type {type(image).__name__} as an image: pass a PIL image, "
        "a numpy array (H×W or H×W×C) or a torch tensor (C×H×W or H×W×C)."
    )


# ------------------------------------------------------------------------ files


def load_image(
    source: Union[str, os.PathLike, bytes, bytearray, io.IOBase],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    max_side: Optional[int] = None,
) -> Image.Image:
    """Open an untrusted image file safely and return it as RGB.

    ``source`` is a path, raw bytes or a binary file object. The size is checked
    against ``max_pixels`` from the header, before any pixel is decoded, so a
    decompression bomb costs nothing. Not-an-image, corrupt, truncated, too
    small (shorter side < ``min_side``) or too large files raise ``ValueError``.

    With ``max_side`` the result is shrunk (bicubic, aspect kept) so that its
    longer side is at most ``max_side``. A JPEG is then decoded at a reduced
    scale in the first place (``Image.draft``: the decoder skips DCT
    coefficients, 1/2, 1/4 or 1/8 per side, never below ``max_side`` on either
    side), so a 36-megapixel photo never exists at full size in memory: its
    decoded buffer is up to 64 times smaller (``docs/benchmarks.md``, "## The
    app", for the measured peak). ``min_side`` and ``max_pixels`` always apply
    to the size in the file, and the EXIF orientation is applied after the
    reduced decode, as for a full one.
    """
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}.")
    name = "image"
    if isinstance(source, (bytes, bytearray)):
        fp: Any = io.BytesIO(bytes(source))
        name = f"image data ({len(source)} bytes)"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = repr(path)
        if not os.path.isfile(path):
            raise ValueError(f"Image file {name} does not exist.")
        fp = path
    elif hasattr(source, "read"):
        fp = source
    else:
        raise ValueError(
            f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"{name} is {width}×{height} = {width * height:,} pixels, more than the allowed "
                        f"{max_pixels:,}; downscale it first (or raise max_pixels if you trust the file)."
                    )
                if min(width, height) < min_side:
                    raise ValueError(
                        f"{name} is only {width}×{height} pixels; images need at least {min_side} px per side."
                    )
                if max_side is not None:
                    # JPEG only (other formats ignore it): decode at 1/2, 1/4 or 1/8 scale when
                    # both sides stay >= max_side, before any pixel is decoded.
                    img.draft("RGB", (int(max_side), int(max_side)))
                img.load()  # decode now so truncation/corruption surfaces here, not later
                rgb = _pil_to_rgb(img)
                rgb.load()  # a copy independent of the file, which the with-block closes
                if max_side is not None and max(rgb.size) > max_side:
                    rgb.thumbnail((int(max_side), int(max_side)), Image.Resampling.BICUBIC)  # rgb is our own copy
    except ValueError:
        raise
    except UnidentifiedImageError as exc:
        raise ValueError(
            f"{name} is not an image Pillow can read (supported: PNG, JPEG, WebP, GIF, BMP, TIFF, ...)."
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{name} looks like a decompression bomb and was refused: {exc}") from exc
    except (OSError, SyntaxError, EOFError, struct.error) as exc:
        raise ValueError(f"{name} is corrupt or truncated and cannot be decoded: {exc}") from exc
    return rgb


# ----------------------------------------------------------------- preprocessing


#: How ``Resize(size)`` scales the shorter side: ``"bicubic"`` (ours: long side rounded, crop offsets floored)
#: or ``"bilinear"`` (the original Revelio code's torchvision ``Resize`` + ``CenterCrop``: long side
#: truncated, crop offsets rounded).
RESIZES = ("bicubic", "bilinear")


def center_crop_resize(image: Any, size: int, resize: str = "bicubic") -> Image.Image:
    """Resize the shorter side to ``size`` then centre-crop to ``size``×``size`` (the paper's ``Resize + CenterCrop``).

    ``resize="bicubic"`` (default) uses Pillow's bicubic filter, which widens its
    support when shrinking, so downscaling is antialiased. ``resize="bilinear"``
    reproduces torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images,
    as the original Revelio code runs them: antialiased bilinear, the long side
    ``int(size · long / short)`` and the crop offsets ``int(round((side − size) / 2))``
    (about one pixel from ours).
    """
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}.")
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}.")
    size = int(size)
    img = to_rgb(image)
    w, h = img.size
    if resize == "bilinear":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    else:
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def _as_list(images: Any) -> list:
    if isinstance(images, (Image.Image, np.ndarray)):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, Iterable):
        return list(images)
    raise ValueError(f"Expected an image or a list of images, got {type(images).__name__}.")


def to_model_tensor(images: Union[ImageLike, Sequence[ImageLike]], size: int, resize: str = "bicubic") -> torch.Tensor:
    """Preprocess one image or a batch into a ``B×3×size×size`` float32 tensor in ``[-1, 1]``.

    A 4-D array/tensor is read as a batch (B×H×W×C or B×C×H×W); ``resize`` as in
    :func:`center_crop_resize`.
    """
    items = _as_list(images)
    if not items:
        raise ValueError("No images given.")
    batch = np.stack([np.asarray(center_crop_resize(im, size, resize)) for im in items])
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return tensor.div_(127.5).sub_(1.0).contiguous()


__all__ = ["to_rgb", "load_image", "center_crop_resize", "to_model_tensor", "MIN_SIDE", "DEFAULT_MAX_PIXELS", "RESIZES"]
