"""Uploads decoded once: a repeated reference to one upload costs a hash, not a decode.

A PNG compresses a flat 40-megapixel image (the app's pixel limit) into about
0.1 MB, and decoding it costs most of a second of server CPU. An API client can
upload such a file once and then name it again in 200-byte requests, each one
decoded anew: 799 ms of server CPU per repeated call before this cache, 26 ms
with it (``bench_app.py --soak``, ``docs/benchmarks.md``, issue 22). The
feature cache did not help: its key is a hash of the *decoded* pixels.

:class:`DecodedImages` keeps the last few uploads as the app uses them
(decoded, RGB, downscaled to ``ImageLimits.max_side``), keyed by a hash of the
file's bytes and the limits, so the same upload, whatever its path or name,
is decoded once. Entries are bounded by count and by decoded bytes. Only
successful decodes are kept: a refused file is refused again from its header,
which costs nothing for the too-large case. Images handed out are shared
between requests and must not be modified in place (the app never does; it
draws overlays on copies).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Hashable

from PIL import Image

from revelio_hub.app.validation import ImageLimits, Upload, read_image

#: Decoded uploads kept (each at most max_side² × 3 bytes: 3 MB at the default 1024 px).
DEFAULT_MAX_IMAGES = 16
#: ... and at most this many decoded bytes in all.
DEFAULT_MAX_BYTES = 48 * 2**20


def file_digest(path: str) -> str:
    """A hash of the file's bytes (uploads are at most 25 MB: about 30 ms for the largest, 0.2 ms for 0.1 MB)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DecodedImages:
    """A thread-safe LRU of decoded uploads: :meth:`read` is :func:`read_image` with repeats served from memory."""

    def __init__(self, max_images: int = DEFAULT_MAX_IMAGES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_images = int(max_images)
        self.max_bytes = int(max_bytes)
        self._images: "OrderedDict[Hashable, Image.Image]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def read(self, value: Any, limits: ImageLimits = ImageLimits()) -> Image.Image:
        """``read_image(value, limits)``; an :class:`Upload` seen before (same bytes, same limits) is not decoded again."""
        if not isinstance(value, Upload):
            return read_image(value, limits)
        try:
            key = (file_digest(value.path), limits)
        except OSError:  # gone meanwhile: read_image says so in the user's words
            return read_image(value, limits)
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
                self.hits += 1
                return image
            self.misses += 1
        image = read_image(value, limits)
        self._put(key, image)
        return image

    def _put(self, key: Hashable, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._images:
                return
            self._images[key] = image
            self._bytes += size
            while len(self._images) > self.max_images or self._bytes > self.max_bytes:
                _, old = self._images.popitem(last=False)
                self._bytes -= old.width * old.height * len(old.getbands())

    def __len__(self) -> int:
        return len(self._images)


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_IMAGES", "DecodedImages", "file_digest"]
