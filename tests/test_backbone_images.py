"""revelio_hub.images: every image a user can hand us becomes the same model input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from revelio_hub.images import center_crop_resize, load_image, to_model_tensor, to_rgb


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16"])
def test_every_opaque_mode_becomes_rgb(mode):
    img = Image.new("RGB", (12, 9), (200, 200, 200)).convert("L").convert(mode) if mode not in ("I;16",) else Image.new(mode, (12, 9))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (12, 9)


def test_alpha_is_composited_on_white():
    for mode in ("RGBA", "LA", "PA"):
        img = Image.new("RGBA", (10, 10), (255, 0, 0, 0)).convert(mode)
        assert to_rgb(img).getpixel((5, 5)) == (255, 255, 255), mode
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert("P")
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_high_bit_depth_scaled_not_clipped():
    ramp16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0..65535
    img16 = Image.fromarray(ramp16.astype(np.uint16))
    assert img16.mode.startswith("I;16")
    out = np.asarray(to_rgb(img16))[..., 0]
    assert out.min() == 0 and out.max() == 255 and 0 < out[2, 0] < 255
    img_i = Image.fromarray(ramp16.astype(np.int32), mode="I")  # how Pillow opens 16-bit PNGs
    np.testing.assert_array_equal(np.asarray(to_rgb(img_i))[..., 0], out)
    img_f = Image.fromarray(np.full((3, 3), 0.5, np.float32), mode="F")
    assert to_rgb(img_f).getpixel((0, 0)) == (128, 128, 128)
    png16 = load_image(_png_bytes(Image.fromarray(np.kron(ramp16, np.ones((4, 4), np.uint16)))))
    assert np.asarray(png16).max() == 255


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.size == (10, 20)
    r, g, b = out.getpixel((5, 2))  # after rotation the red half is on top
    assert r > 200 and g < 60


def test_animated_image_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_arrays_and_tensors():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 1] = 255
    assert to_rgb(rgb).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(rgb[..., 1]).getpixel((0, 0)) == (255, 255, 255)  # HW grey
    assert to_rgb(np.full((4, 4), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(np.full((4, 4, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    chw = torch.zeros(3, 6, 8, dtype=torch.uint8)
    chw[1] = 255
    assert to_rgb(chw).size == (8, 6) and to_rgb(chw).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(chw.permute(1, 2, 0)).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(chw.float() / 255).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="H×W"):
        to_rgb(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(ValueError, match="PIL image"):
        to_rgb("cat.png")


def test_load_image_rejects_bad_files(tmp_path):
    good = _png_bytes(Image.new("RGB", (64, 48), (1, 2, 3)))
    assert load_image(good).size == (64, 48)
    path = tmp_path / "x.png"
    path.write_bytes(good)
    assert load_image(path).size == (64, 48) and load_image(str(path)).mode == "RGB"
    with pytest.raises(ValueError, match="truncated"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not an image"):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(b"")
    with pytest.raises(ValueError, match="at least 8"):
        load_image(_png_bytes(Image.new("RGB", (4, 40))))
    with pytest.raises(ValueError, match="more than the allowed"):
        load_image(good, max_pixels=1000)
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    # A decompression bomb: tiny file, huge header size; refused before decoding.
    bomb = _png_bytes(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000
    with pytest.raises(ValueError, match="pixels"):
        load_image(bomb)


def test_center_crop_resize_and_model_tensor():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white centre square
    out = center_crop_resize(img, 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[:, 1:-1].min() > 240  # the centre crop is the white square (edges blend)
    batch = to_model_tensor([img, np.zeros((10, 30, 3), np.uint8)], 32)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert batch[0].min() > 0.85 and batch[1].max() == -1.0 and batch.min() >= -1.0
    assert to_model_tensor(img, 16).shape == (1, 3, 16, 16)
    # Antialiased: a 1-px checkerboard shrinks to mid grey, not aliasing to black/white.
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    small = np.asarray(center_crop_resize(checker, 32)).astype(float)
    assert abs(small.mean() - 127.5) < 10 and small.std() < 20


def _photo(path, size=(2400, 1600), orientation=None):
    """A JPEG whose left third is red (so orientation and content can be checked after a reduced decode)."""
    w, h = size
    img = Image.new("RGB", size, (235, 235, 225))
    img.paste((200, 30, 30), (0, 0, w // 3, h))
    kwargs = {"quality": 92}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    img.save(path, **kwargs)
    return path


@pytest.fixture()
def decoded_sizes(monkeypatch):
    """Sizes of JPEG images when their pixels are loaded (the buffer Pillow allocates; load() may repeat)."""
    from PIL import JpegImagePlugin

    sizes = []
    original = JpegImagePlugin.JpegImageFile.load

    def load(self):
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return sizes


def test_large_jpeg_is_decoded_reduced_not_at_full_size(tmp_path, decoded_sizes):
    path = _photo(tmp_path / "photo.jpg")
    img = load_image(path, max_side=256)
    # 2400×1600 decoded at 1/4 per side (the largest DCT scale keeping both sides ≥ 256): 16× less memory.
    assert set(decoded_sizes) == {(600, 400)}
    assert img.size == (256, 171) and img.mode == "RGB"
    full = load_image(path)
    full.thumbnail((256, 256))
    assert (2400, 1600) in decoded_sizes
    diff = np.abs(np.asarray(img, dtype=np.float32) - np.asarray(full, dtype=np.float32))
    assert diff.mean() < 3  # same picture as the full decode, up to resampling


def test_reduced_decode_keeps_exif_orientation_and_limits(tmp_path, decoded_sizes):
    path = _photo(tmp_path / "rotated.jpg", orientation=6)  # viewers rotate 90° clockwise: 1600 wide, 2400 high
    img = load_image(path, max_side=256)
    assert set(decoded_sizes) == {(600, 400)}
    assert img.size == (171, 256)
    arr = np.asarray(img)
    assert (arr[:20, 85, 0] > 150).all() and (arr[:20, 85, 1] < 100).all()  # the red third is now at the top
    assert (arr[-20:, 85, 1] > 150).all()
    # The pixel budget and minimum side apply to the size in the file, not the reduced one.
    with pytest.raises(ValueError, match="more than the allowed"):
        load_image(path, max_pixels=2400 * 1600 - 1, max_side=256)
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=0)


def test_app_reads_large_jpegs_through_the_reduced_decode(tmp_path, decoded_sizes):
    from revelio_hub.app.validation import ImageLimits, read_image

    img = read_image(str(_photo(tmp_path / "upload.jpg")), ImageLimits(max_side=256))
    assert set(decoded_sizes) == {(600, 400)} and max(img.size) == 256


def test_bilinear_resize_follows_torchvision_resize_and_center_crop():
    """The paper recipe's preprocessing: torchvision's Resize(64) + CenterCrop(64) on a PIL image, as the original
    Revelio code runs it: bilinear, long side int(64 · 203 / 100) = 129 (truncated, ours rounds to 130), crop
    offset int(round(65 / 2)) = 32 (ours floors (130 − 64) / 2 = 33)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 203, 3), dtype=np.uint8))
    expected = img.resize((129, 64), Image.Resampling.BILINEAR).crop((32, 0, 96, 64))
    got = center_crop_resize(img, 64, resize="bilinear")
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    ours = center_crop_resize(img, 64)
    assert not np.array_equal(np.asarray(ours), np.asarray(got))
    tall_img = img.transpose(Image.Transpose.TRANSPOSE)  # 100 wide, 203 high
    tall = center_crop_resize(tall_img, 64, resize="bilinear")
    tall_expected = tall_img.resize((64, 129), Image.Resampling.BILINEAR).crop((0, 32, 64, 96))
    assert np.array_equal(np.asarray(tall), np.asarray(tall_expected))
    assert to_model_tensor([img], 64, resize="bilinear").shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="resize must be one of"):
        center_crop_resize(img, 64, resize="nearest")
