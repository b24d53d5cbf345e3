"""The shapes generator: deterministic, and its labels are what the pixels show."""

import colorsys

import numpy as np
import pytest

from revelio_hub.toy.shapes import COLORS, FACTORS, image_spec, make_shapes_dataset, object_mask, render

HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLORS.items()}


@pytest.fixture(scope="module")
def ds():
    return make_shapes_dataset(120, seed=7, image_size=64)


def _saturated_mask(arr: np.ndarray) -> np.ndarray:
    """Backgrounds are grey, objects saturated: saturation alone finds the object."""
    a = arr.astype(np.float32) / 255
    mx, mn = a.max(-1), a.min(-1)
    return (mx - mn) / np.maximum(mx, 1e-6) > 0.5


def test_same_seed_same_images_and_labels(ds):
    again = make_shapes_dataset(20, seed=7, image_size=64)
    for i in range(20):
        assert np.array_equal(np.asarray(ds[i]["image"]), np.asarray(again[i]["image"]))
        assert all(ds[i][f] == again[i][f] for f in FACTORS)
    other = make_shapes_dataset(20, seed=8, image_size=64)
    assert any(not np.array_equal(np.asarray(ds[i]["image"]), np.asarray(other[i]["image"])) for i in range(20))


def test_image_i_does_not_depend_on_n_or_start():
    tail = make_shapes_dataset(3, seed=7, image_size=32, start_index=5)
    full = make_shapes_dataset(8, seed=7, image_size=32)
    for j in range(3):
        assert np.array_equal(np.asarray(tail[j]["image"]), np.asarray(full[5 + j]["image"]))
        assert tail[j]["image_id"] == 5 + j


def test_class_names_and_schema(ds):
    assert len(FACTORS["shape"]) >= 5 and len(FACTORS["color"]) >= 6
    assert len(FACTORS["size"]) >= 2 and len(FACTORS["position"]) >= 4 and len(FACTORS["background"]) >= 3
    for name, values in FACTORS.items():
        assert ds.features[name].names == list(values)
    assert "circle" in FACTORS["shape"] and "red" in FACTORS["color"]
    img = ds[0]["image"]
    assert img.mode == "RGB" and img.size == (64, 64)


def test_any_size():
    spec = image_spec(0, seed=1)
    assert render(spec, 17).size == (17, 17)
    assert render(spec, 96).size == (96, 96)
    with pytest.raises(ValueError, match="image_size"):
        render(spec, 2)


def test_colour_label_matches_pixel_majority(ds):
    for row in ds:
        arr = np.asarray(row["image"])
        mask = _saturated_mask(arr)
        ys, xs = np.nonzero(mask)
        box = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        hues = [colorsys.rgb_to_hsv(*(p / 255))[0] for p in box[_saturated_mask(box)]]

        def nearest(h):
            return min(HUES, key=lambda n: min(abs(h - HUES[n]), 1 - abs(h - HUES[n])))

        names = [nearest(h) for h in hues]
        majority = max(set(names), key=names.count)
        assert majority == FACTORS["color"][row["color"]]


def test_position_from_centroid_and_size_from_area(ds):
    areas = {"small": [], "large": []}
    for row in ds:
        mask = _saturated_mask(np.asarray(row["image"]))
        ys, xs = np.nonzero(mask)
        vertical = "top" if ys.mean() < 32 else "bottom"
        horizontal = "left" if xs.mean() < 32 else "right"
        assert f"{vertical}_{horizontal}" == FACTORS["position"][row["position"]]
        areas[FACTORS["size"][row["size"]]].append((FACTORS["shape"][row["shape"]], mask.sum()))
    # Per shape, every large object covers more pixels than any small one.
    for shape in FACTORS["shape"]:
        small = [a for s, a in areas["small"] if s == shape]
        large = [a for s, a in areas["large"] if s == shape]
        if small and large:
            assert min(large) > max(small), shape


def test_shape_from_fill_ratio_and_mask_agrees_with_pixels(ds):
    # Fill ratio of the bounding box separates the convex shapes cleanly.
    expected = {"square": (0.85, 1.01), "circle": (0.68, 0.86), "triangle": (0.35, 0.62), "star": (0.2, 0.5)}
    for i, row in enumerate(ds):
        spec = image_spec(i, seed=7)
        mask = object_mask(spec, 64)
        pix = _saturated_mask(np.asarray(row["image"]))
        assert (mask & pix).sum() / max(mask.sum(), 1) > 0.8  # edges blend with the background
        shape = FACTORS["shape"][row["shape"]]
        if shape in expected and spec.size == "large":
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            lo, hi = expected[shape]
            assert lo <= fill <= hi, (shape, fill)


def test_factors_are_balanced_and_independent():
    ds = make_shapes_dataset(600, seed=3, image_size=16, supersample=1)
    shape = np.array(ds["shape"])
    color = np.array(ds["color"])
    counts = np.bincount(shape, minlength=5)
    assert counts.min() > 600 / 5 * 0.6
    # Independence: the colour distribution barely changes with the shape.
    table = np.array([[np.sum((shape == s) & (color == c)) for c in range(6)] for s in range(5)], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 20 degrees of freedom: p < 0.001 at 45


def test_distractor_option_adds_a_second_object():
    plain = make_shapes_dataset(10, seed=2, image_size=64)
    busy = make_shapes_dataset(10, seed=2, image_size=64, distractor=True)
    more = [
        _saturated_mask(np.asarray(b["image"])).sum() > _saturated_mask(np.asarray(p["image"])).sum()
        for p, b in zip(plain, busy)
    ]
    assert sum(more) >= 8


def test_bad_inputs_name_valid_values():
    with pytest.raises(ValueError, match="positive"):
        make_shapes_dataset(0)
    spec = image_spec(0, seed=0)
    bad = type(spec)(**{**spec.to_dict(), "shape": "hexagon", "distractor": None})
    with pytest.raises(ValueError, match="circle"):
        render(bad)
