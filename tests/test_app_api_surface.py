"""The app's "Use via API" surface as API users read it, and the README's API examples run against it.

``view_api()`` is what a user reads to write a call: every endpoint listed must be one the README
documents, every input and output must carry a name (not ``value_22`` or an ordinal) and its real type
(timesteps and neuron ids are ints), and the UI's private events must not be listed. The README's
``gradio_client`` and ``curl`` blocks are taken from README.md as written and run against the served app.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from app_inputs import LaunchedApp, app_release_path, shape_image  # noqa: E402
from gradio_client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use it from programs: API, MCP tools, links"
README_URL = "http://127.0.0.1:7860"
ENDPOINTS = {"/analyze", "/neuron", "/analyze_json", "/attribute_json", "/compare_json", "/search_neurons",
             "/describe_neuron", "/list_releases"}
UNNAMED = re.compile(r"^(value_\d+|parameter_\d+|\d+(st|nd|rd|th))$")


@pytest.fixture(scope="module")
def app():
    from revelio_hub.app.state import AppConfig, AppState

    with LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()], workers=0))) as launched:
        yield launched


@pytest.fixture(scope="module")
def api(app) -> dict:
    return Client(app.url, verbose=False).view_api(print_info=False, return_format="dict")


def section_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.M | re.S)


def test_only_documented_endpoints_are_listed(api):
    assert set(api["named_endpoints"]) == ENDPOINTS
    assert not api["unnamed_endpoints"]  # the UI's private events stay off the page
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ENDPOINTS:
        assert f"`{name}`" in readme, name


def test_every_input_and_output_is_named_and_typed(api):
    for name, endpoint in api["named_endpoints"].items():
        for item in endpoint["parameters"] + endpoint["returns"]:
            assert item["label"] and not UNNAMED.match(item["label"]), (name, item)
            assert "Literal[]" not in item["python_type"]["type"], (name, item)
        for item in endpoint["parameters"]:
            if item.get("parameter_name") in ("timestep", "neuron", "top_images"):
                assert item["python_type"]["type"] == "int", (name, item)
    returns = {name: [r["python_type"]["type"] for r in e["returns"]] for name, e in api["named_endpoints"].items()}
    for name in ("/analyze_json", "/attribute_json", "/compare_json", "/describe_neuron"):
        assert returns[name] == ["dict(str, Any)"], name
    assert returns["/search_neurons"] == returns["/list_releases"] == ["list[Any]"]
    analyze_outputs = [r["label"] for r in api["named_endpoints"]["/analyze"]["returns"]]
    assert "Selected neuron" in analyze_outputs
    selected = api["named_endpoints"]["/analyze"]["returns"][analyze_outputs.index("Selected neuron")]
    assert selected["python_type"]["type"] == "int"


def test_readme_lists_every_analyze_json_key(app, tmp_path):
    from gradio_client import handle_file

    image = shape_image(tmp_path / "red.png")
    result = Client(app.url, verbose=False).predict(handle_file(str(image)), "", -1, "", api_name="/analyze_json")
    table = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `/analyze_json`"))
    for key in result:
        assert f'"{key}"' in table, key
    assert {"ranking", "ood"} <= set(result)


def test_readme_python_example_runs(app, tmp_path):
    (block,) = [b for b in section_blocks("python") if "gradio_client" in b]
    shape_image(tmp_path / "my_image.png")
    code = block.replace(README_URL, app.url.rstrip("/"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.strip().splitlines() if not line.startswith("Loaded as API")]
    assert "'layer': 'down_ft1', 'timestep': 25" in lines[0]
    assert len(lines) == 2 + 5 and all(re.match(r"^\d+ [\d.]+ \S", line) for line in lines[2:]), lines


def test_readme_curl_example_runs(app, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (block,) = section_blocks("bash")
    shape_image(tmp_path / "my_image.png")
    script = block.replace(f"URL={README_URL}", f"URL={app.url.rstrip('/')}")
    bin_dir = tmp_path / "bin"  # the README says `python`: make it this interpreter
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event: complete" in proc.stdout, proc.stdout[-2000:]
    data = next(line for line in proc.stdout.splitlines() if line.startswith("data:"))
    (result,) = json.loads(data[len("data:"):])
    assert result["release"] == "toy-shapes" and result["neurons"] and "ood" in result


def test_agent_endpoints_name_no_server_path(app):
    """``/list_releases`` and ``/describe_neuron`` name releases and Hub ids, never a folder on the server."""
    client = Client(app.url, verbose=False)
    answers = json.dumps([client.predict(api_name="/list_releases"),
                          client.predict(1, "", -1, "", 20, api_name="/describe_neuron")])
    for folder in (str(Path(app_release_path()).resolve()), str(ROOT), os.getcwd()):
        assert folder not in answers
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="top_images must be from 0 to 20"):
        client.predict(1, "", -1, "", 21, api_name="/describe_neuron")
    with pytest.raises(AppError, match="Neuron id must be a whole number"):
        client.predict(10**9, "", -1, "", 1, api_name="/describe_neuron")
