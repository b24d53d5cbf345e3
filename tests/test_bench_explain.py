"""benchmarks/bench_explain.py in a small form on the bundled release: the measurement itself must be sound."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from app_inputs import app_release_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = runpy.run_path(str(REPO / "benchmarks" / "bench_explain.py"))


def test_summary_parser_reads_what_users_read():
    named = BENCH["named_values"]
    assert named("magenta (color) · AUROC 0.99 · 10/10 top images · fires on 4.1% of images") == ["magenta"]
    assert named("stripes (background) · AUROC 1.00 · 10/10 top images; large (size) · AUROC 0.93 · 9/10 top images"
                 " · fires on 30% of images") == ["stripes", "large"]
    assert named("top_left (position) · AUROC 0.97 · 8/10 top images · fires on 12% of images") == ["top_left"]
    assert named("circle · AUROC 0.95 · 9/10 top images · fires on 3.0% of images") == ["circle"]  # one column
    assert named("circle 5/10 · purity 1.20 · fires on 40.0% of images") == ["circle"]  # the first format
    assert named("mixed (no single label value explains its top images) · fires on 3% of images") == []
    assert named("dead neuron (never fired on 300 images)") == []
    # calibrated summaries (issue 19): one or two values, the held-out share, "where"; "unsure" names nothing
    assert named("cyan (color) · true on 94% of held-out images it fires strongly on · fires on 4% of images") == ["cyan"]
    assert named("small (size) · cross (shape) · true on 93% and 95% of held-out images it fires strongly on · "
                 "where: top-left · fires on 4.0% of images") == ["small", "cross"]
    assert named("star · true on 91% of held-out images it fires strongly on · fires on 3% of images") == ["star"]
    assert named("unsure: cyan (color)? claims like it held on 71% of held-out images it fires strongly on · "
                 "where: anywhere · fires on 4.0% of images") == []


@pytest.mark.skipif(not (Path(app_release_path()) / "release.json").is_file(), reason="no bundled release")
def test_unnamed_lines_are_sorted_by_the_reason_they_give():
    reason = BENCH["unnamed_reason"]
    assert reason("not named here: fires weakly (0.5× its usual); where it fires ≥ 1.5×: red") == "fires_weakly"
    assert reason("not named here: fires 1.2× its usual, where its names held too rarely") == "not_held_in_its_regime"
    assert reason("unsure: red (colour)? claims like it held on 80% ...") == "unsure"
    assert reason("mixed (no single label value explains its top images)") == "mixed"
    assert reason("red (colour) · true on 95% ...") == "other"


def test_small_run_scores_summaries_against_the_generator_labels():
    from revelio_hub.toy.shapes import FACTORS

    report = BENCH["main"](["--release", app_release_path(), "--images", "6", "--ood-images", "3",
                            "--layers", "bottleneck", "--timesteps", "25"])
    (key, res), = report["entries"].items()
    assert key == "bottleneck/t25"
    r = res["default"]
    assert r["listed"] == 6 * 5  # five listed neurons per image
    assert 0 <= r["correct"] <= r["named"] <= r["listed"]
    # every listing that names nothing is counted once, under a reason its line gives
    assert sum(r["unnamed"].values()) == r["listed"] - r["named"] and "other" not in r["unnamed"]
    if r["named"]:
        assert r["precision"] == pytest.approx(r["correct"] / r["named"], abs=1e-4)
    # every parsed value is a real label value of the generator
    values = {v for vals in FACTORS.values() for v in vals}
    held = BENCH["held_out"](2, 7, 32)
    assert all(truth <= values and len(truth) == len(FACTORS) for _, truth in held)
    # the OOD check separates noise from held-out shapes (when the release records error quantiles)
    if res["ood_flagged"].get("noise") is not None:
        assert res["ood_flagged"]["noise"] > r["held_out_flagged"]
    with pytest.raises(SystemExit):
        BENCH["main"](["--release", app_release_path(), "--seed", "1"])  # the release's own test images
