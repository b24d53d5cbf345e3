"""training/calibrate_release.py: calibrates a release folder in place, refuses what it cannot use, pushes the result."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from app_inputs import app_release_path  # noqa: E402

from revelio_hub.release import Release  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = runpy.run_path(str(REPO / "training" / "calibrate_release.py"))


def test_a_release_without_a_hub_dataset_needs_dataset(tmp_path, capsys):
    assert SCRIPT["main"](["--release", app_release_path(), "--cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset" in err[0]


def test_calibrates_in_place_and_pushes_the_calibrated_folder(hub, tmp_path):
    from revelio_hub.toy.shapes import make_shapes_dataset

    release = tmp_path / "release"
    shutil.copytree(app_release_path(), release)
    size = int(Release.from_pretrained(str(release)).config.get("image_size") or 32)
    make_shapes_dataset(24, seed=1, image_size=size).save_to_disk(str(tmp_path / "held_out"))
    code = SCRIPT["main"](["--release", str(release), "--dataset", str(tmp_path / "held_out"), "--label-column",
                           "shape", "--max-images", "24", "--shifts", "rotate", "mosaic", "--views",
                           "--timesteps", "25", "--push", "someone/toy-calibrated", "--cpu"])
    assert code == 0
    local = Release.from_pretrained(str(release))
    layer = next(l for l, t in local.diffc_entries if t == 25)
    model = local.load(layer, 25).reliability
    assert model is not None and model.views == [] and model.metrics["calibration"]["images"] == 24 * 3
    source = Release.from_pretrained(app_release_path())  # --timesteps 25 leaves the other entries as they were
    for l, t in (e for e in local.diffc_entries if e[1] != 25):
        mine, theirs = local.load(l, t).reliability, source.load(l, t).reliability
        assert (mine is None and theirs is None) or mine.to_dict() == theirs.to_dict()
    remote = Release.from_pretrained("someone/toy-calibrated")
    assert remote.load(layer, 25).reliability.to_dict() == model.to_dict()
