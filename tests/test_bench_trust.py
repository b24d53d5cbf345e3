"""benchmarks/bench_trust.py in a small form on a calibrated copy of the bundled release: the measurement must be sound."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_inputs import calibrated_release  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = runpy.run_path(str(REPO / "benchmarks" / "bench_trust.py"))


def test_photographs_come_from_installed_packages():
    files = BENCH["photo_files"]()
    assert files and all(f.is_file() for f in files)  # matplotlib's sample photo at least
    shots = BENCH["photos"](2, seed=0)
    assert len(shots) == 3 * len(files) and all(s.mode == "RGB" for s in shots)


def test_toy_check_shapes_keep_their_labels():
    from revelio_hub.toy.shapes import SHAPES

    kinds = BENCH["toy_shifted"](4, seed=11, start=0, size=32)
    assert set(kinds) == {"rotated_45", "larger_1.5x", "jpeg_20", "two_objects"}
    for images, labels in kinds.values():
        assert len(images) == len(labels) == 4 and all(0 <= l < len(SHAPES) for l in labels)
        assert all(img.size == (32, 32) for img in images)


def test_small_run_reports_every_figure_on_new_images():
    release = calibrated_release()
    report = BENCH["main"](["--release", release, "--images", "12", "--crops", "0", "--skip", "300"])
    assert report["shift_seed"] != report["calibration_seed"] and report["photo_images"] >= 1
    assert report["entries"]
    for res in report["entries"].values():
        assert res["per_shift"]["held_out"]["images"] == 12
        for key, (op, goal) in BENCH["GOALS"].items():
            value = res[key]
            assert 0 <= value <= 1 and res["goals_met"][key] == (value <= goal if op == "≤" else value >= goal)
        assert set(res["toy_check"]) == {"rotated_45", "larger_1.5x", "jpeg_20", "two_objects"}
    with pytest.raises(SystemExit):  # the calibration's own shift seed would measure it on its training suite
        BENCH["main"](["--release", release, "--seed", str(report["calibration_seed"])])
