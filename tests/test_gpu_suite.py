"""The GPU suite (benchmarks/gpu_suite.py) must work the day someone gets a GPU.

GPU time comes rarely, so the suite runs here as a CPU dry run (``--small
--device cpu``, tiny models, same code paths): every step has to finish and
report numbers, and its guard has to keep one broken step from hiding the others.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from suite_runner import FAILED, OK, SKIPPED, TIMED_OUT, Step, render_table, run_steps  # noqa: E402

STEPS = ["models", "extract", "ksae", "diffc", "atlas", "app", "multigpu"]


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    import torch
    out = tmp_path / "suite.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--small", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        if name == "multigpu":  # no GPU here: skipped, and the report says why
            assert step["status"] == SKIPPED and "2 CUDA GPUs" in step["reason"]
            continue
        assert step["status"] == OK, (name, step["error"], step["notes"])
        assert step["figures"], name
        for key, fig in step["figures"].items():
            if fig["value"] is None:  # e.g. peak accelerator memory on a CPU: says why
                assert fig["note"], (name, key)
            else:
                assert math.isfinite(fig["value"]) and fig["value"] > 0, (name, key, fig)

    extract = steps["extract"]["figures"]
    for layer, px in (("bottleneck", 128), ("up_ft1", 128), ("bottleneck", 64)):
        key = f"{layer}@{px}px"
        assert extract[f"{key} original-style fp32"]["unit"] == "img/s"
        assert extract[f"{key} ours fp32 eager"]["unit"] == "img/s"
        assert extract[f"{key} ours eager"]["unit"] == "GFLOP/s"
    assert extract["bottleneck@128px compile cold"]["unit"] == "s"
    assert any(k.startswith("DiT block") for k in extract)
    for key in ("original-style fp32 dense", "ours (train_sae)", "ours held-out FVU", "original-style held-out FVU"):
        assert key in steps["ksae"]["figures"]
    assert {"/analyze_json new image p50", "/analyze_json new image p95"} <= set(steps["app"]["figures"])

    machine = report["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["device"] == "cpu" and machine["cpu_count"] >= 1 and machine["python"]
    assert set(machine["packages"]) >= {"diffusers", "transformers", "gradio", "gradio_client", "accelerate"}
    assert report["config"]["small"] is True and report["date"]

    for name in STEPS:  # one table with a row per step
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), proc.stdout


def test_a_failing_step_is_reported_with_its_traceback_and_the_others_still_run():
    def fine(rec):
        rec.add("answer", 42.0, "units")

    def broken_helper():
        raise RuntimeError("kernel launch failed")

    def broken(rec):
        rec.add("measured before the failure", 7.0, "img/s")
        broken_helper()

    records = run_steps([Step("a", "first", fine), Step("b", "breaks", broken), Step("c", "after", fine)],
                        budget_s=60, log=lambda line: None)
    assert [r.status for r in records] == [OK, FAILED, OK]
    failed = records[1]
    assert failed.error["type"] == "RuntimeError" and failed.error["message"] == "kernel launch failed"
    assert "broken_helper" in failed.error["traceback_tail"]  # the tail points at where it broke
    assert failed.figures["measured before the failure"].value == 7.0  # partial figures are kept
    assert records[2].figures["answer"].value == 42.0
    table = render_table(records)
    assert "kernel launch failed" in table and "failed" in table
    assert json.dumps([r.to_json() for r in records])  # the JSON report can hold every record


def test_a_step_past_its_cap_is_cut_and_the_next_still_runs():
    def hangs(rec):
        rec.add("before", 1.0, "s")
        time.sleep(30)

    def fine(rec):
        rec.add("ran", 1.0, "s")

    def trims(rec):
        if rec.fits(1e6, "the slow part"):
            raise AssertionError("cannot fit")

    records = run_steps([Step("slow", "hangs", hangs, share=1.0), Step("trim", "trims", trims, share=1.0),
                         Step("next", "after", fine, share=100.0)], budget_s=3, log=lambda line: None)
    assert [r.status for r in records] == [TIMED_OUT, TIMED_OUT, OK]
    assert records[0].figures["before"].value == 1.0
    assert records[0].seconds < 25  # cut at its cap, not after the sleep
    assert records[1].notes == ["left out (time cap): the slow part"]


def test_steps_whose_packages_are_missing_are_skipped_with_the_install_command(monkeypatch, tmp_path):
    import gpu_suite

    monkeypatch.setitem(gpu_suite.STEP_PACKAGES, "extract", ("a_package_that_is_not_installed",))
    ctx = gpu_suite.Context("cpu", small=True, work=tmp_path, compile_backend="eager")
    steps = {s.name: s for s in gpu_suite.build_steps(ctx)}
    reason = steps["extract"].skip()
    assert "a_package_that_is_not_installed" in reason
    assert "benchmarks/gpu_suite.sh" in reason and "pip download" in reason and "--no-index" in reason
    assert steps["ksae"].skip() is None  # torch-only steps still run
    records = run_steps([steps["extract"]], budget_s=10, log=lambda line: None)
    assert records[0].status == SKIPPED and records[0].reason == reason
    for name, version in gpu_suite.DEVICE_WHEELS.items():  # the download command pins every carried wheel
        assert f"{name}=={version}" in gpu_suite.wheel_download_command()
