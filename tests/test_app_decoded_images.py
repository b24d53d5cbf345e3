"""Uploads decoded once (revelio_hub.app.decoded_images): naming an upload again costs a hash, not a decode."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from app_inputs import not_an_image, shape_image  # noqa: E402

from revelio_hub.app.decoded_images import DecodedImages  # noqa: E402
from revelio_hub.app.validation import ImageLimits, Upload, read_image  # noqa: E402


def test_the_same_bytes_are_decoded_once_whatever_the_name(tmp_path):
    first = shape_image(tmp_path / "a.png", size=200)
    copy = tmp_path / "renamed.png"
    shutil.copy(first, copy)
    cache = DecodedImages()
    image = cache.read(Upload(str(first), "a.png"))
    assert np.array_equal(np.asarray(image), np.asarray(read_image(str(first))))
    assert cache.read(Upload(str(copy), "b.png")) is image and (cache.hits, cache.misses) == (1, 1)
    small = cache.read(Upload(str(first), "a.png"), ImageLimits(max_side=64))  # other limits: another entry
    assert small.size == (64, 64) and cache.misses == 2


def test_refusals_are_not_kept_and_other_values_pass_through(tmp_path):
    cache = DecodedImages()
    bad = not_an_image(tmp_path)
    for _ in range(2):
        with pytest.raises(ValueError, match="not an image") as info:
            cache.read(Upload(str(bad), "mine.png"))
        assert "mine.png" in str(info.value) and str(tmp_path) not in str(info.value)
    assert len(cache) == 0
    path = shape_image(tmp_path / "p.png")
    cache.read(str(path))  # a Python caller's path: read as before, nothing kept
    assert len(cache) == 0 and cache.misses == 2  # the two refusals only


def test_entries_are_bounded_by_count_and_bytes(tmp_path):
    uploads = [Upload(str(shape_image(tmp_path / f"{i}.png", color=(i * 40, 0, 0), size=100)), f"{i}.png")
               for i in range(5)]
    by_count = DecodedImages(max_images=2)
    by_bytes = DecodedImages(max_bytes=2 * 100 * 100 * 3)
    for cache in (by_count, by_bytes):
        for upload in uploads:
            cache.read(upload)
        assert len(cache) == 2
        cache.read(uploads[-1])
        assert cache.hits == 1  # the newest stayed
