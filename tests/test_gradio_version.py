"""Gradio pinned to the version the app's workarounds were tested on, and a warning naming both versions otherwise.

The session store, upload checks and temp-file clean-up use Gradio internals
(revelio_hub/app/gradio_version.py lists them): a user who runs the app on
another Gradio must be told at start-up, and every place that names the
version (pyproject's pin, the Space's sdk_version, requirements.txt) must agree.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import gradio
from packaging.requirements import Requirement

from revelio_hub.app.gradio_version import TESTED_GRADIO, untested_gradio_message, warn_if_untested_gradio

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_gradio_is_the_tested_one():
    assert untested_gradio_message(gradio.__version__) is None, gradio.__version__


def test_a_patch_release_is_the_same_minor_version():
    assert untested_gradio_message(f"{TESTED_GRADIO}.7") is None


def test_another_version_gets_a_warning_naming_both(caplog):
    with caplog.at_level(logging.WARNING, logger="revelio_hub.app.gradio_version"):
        message = warn_if_untested_gradio("6.40.1")
    assert message is not None
    assert "6.40.1" in message and f"{TESTED_GRADIO}.x" in message
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]


def test_pyproject_pins_gradio_and_its_mcp_extra_to_the_tested_minor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    gradios = [r for r in requirements if r.name == "gradio"]
    assert len(gradios) >= 3  # the dependency, the mcp extra, the test extra
    for requirement in gradios:
        assert requirement.specifier.contains(f"{TESTED_GRADIO}.0"), requirement
        assert not requirement.specifier.contains(_next_minor()), requirement


def test_the_space_and_requirements_name_the_tested_minor():
    sdk = re.search(r"^sdk_version: (\S+)$", (ROOT / "README.md").read_text(), re.M).group(1)
    assert untested_gradio_message(sdk) is None, sdk
    pinned = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.startswith("gradio[")]
    assert pinned and all(r.specifier.contains(sdk) for r in pinned)


def test_app_start_warns_before_anything_else_on_another_gradio():
    """``python app.py`` on another Gradio prints the warning line, then goes on (here: to a bad --release)."""
    script = (
        "import gradio, runpy, sys; gradio.__version__ = '7.0.0'; "
        "sys.argv = ['app.py', '--release', 'no-such-release-folder/x', '--no-warmup']; "
        "runpy.run_path('app.py', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # the bad release, not the version, stops it
    warning = [line for line in done.stderr.splitlines() if "Gradio 7.0.0 is installed" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and f"{TESTED_GRADIO}.x" in warning[0], done.stderr
    assert "app.py: error:" in done.stderr


def _next_minor() -> str:
    major, minor = TESTED_GRADIO.split(".")
    return f"{major}.{int(minor) + 1}.0"
