"""The attribution faithfulness benchmark runs in its CI size and reports what docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from app_inputs import app_release_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_benchmark_reports_aopc_spearman_flips_and_timing():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attribution.py"), "--small", "--json",
         "--release", app_release_path()],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )
    result = json.loads(out.stdout)
    assert result["entries"] and result["images"] == 6
    for row in result["entries"]:
        aopc = row["aopc"]
        assert set(aopc) == {"exact", "grad_x_act", "activation", "random"}
        assert all(math.isfinite(aopc[o][k]) for o in aopc for k in ("8", "16"))
        # removing the neurons exact attribution ranks first hurts the prediction more than removing random ones
        assert aopc["exact"]["8"] > aopc["random"]["8"]
        assert row["goal_met_k8"] == (aopc["exact"]["8"] >= 2 * aopc["random"]["8"]
                                      and aopc["exact"]["8"] > aopc["activation"]["8"])
        assert -1 <= row["spearman_all_active_mean"] <= 1
        flip = row["flips"]["exact"]
        assert flip["median"] is None or flip["median"] >= 1
        assert 0 <= flip["flipped_fraction"] <= 1
        timing = row["time_ms_per_image"]
        assert timing["top16_batched"] > 0 and timing["naive_loop"] > 0
    assert result["all_goals_met_k8"] == all(r["goal_met_k8"] for r in result["entries"])


def test_help_explains():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attribution.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "AOPC" in out.stdout and "--small" in out.stdout
