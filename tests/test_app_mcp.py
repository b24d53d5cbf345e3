"""The app as an MCP server, driven by the official ``mcp`` Python client, and its answers checked against the
JSON API's (``gradio_client`` on the same served app).

Also: without the optional ``mcp`` package the app still builds, and ``app.py --mcp`` says how to enable it.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from app_inputs import LaunchedApp, app_release_path, red_and_blue  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"analyze_json", "attribute_json", "compare_json", "search_neurons", "describe_neuron", "list_releases"}


@pytest.fixture(scope="module")
def app():
    from revelio_hub.app.state import AppConfig, AppState

    with LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()], workers=0)),
                     mcp_server=True) as launched:
        yield launched


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return red_and_blue(tmp_path_factory.mktemp("mcp-images"))


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def mcp_session(app, calls):
    """Open one MCP session on the served app and run ``calls(session)`` (a coroutine function) in it."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with streamable_http_client(app.url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await calls(session)

    return asyncio.run(run())


def answer(result):
    """A successful tool result's value (Gradio's MCP server writes a JSON value as its Python literal)."""
    assert not result.isError, result.content[0].text
    return ast.literal_eval(result.content[0].text)


def test_tools_are_the_json_api_with_descriptions(app):
    tools = mcp_session(app, lambda s: s.list_tools()).tools
    by_name = {t.name: t for t in tools}
    assert set(by_name) == TOOLS  # the UI endpoints /analyze and /neuron are not offered to agents
    for tool in tools:
        assert len(tool.description) > 60 and "Returns: " in tool.description, tool.name
        assert not re.search(r",\s*,", tool.description), tool.description  # Returns lines joined cleanly
        for name, prop in tool.inputSchema["properties"].items():
            assert prop.get("description"), (tool.name, name)
    schema = by_name["describe_neuron"].inputSchema
    assert schema["properties"]["neuron"]["type"] == "integer" and schema["required"] == ["neuron"]


def test_each_tool_answers_as_the_json_api(app, images):
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False)
    red, blue = images["red"], images["blue"]

    async def calls(session):
        return [answer(await session.call_tool(name, args)) for name, args in [
            ("list_releases", {}),
            ("analyze_json", {"image": data_uri(red), "layer": "", "timestep": -1, "release": ""}),
            ("attribute_json", {"image": data_uri(red), "target": ""}),
            ("compare_json", {"image": data_uri(red), "other": data_uri(blue)}),
            ("search_neurons", {"value": "red"}),
            ("describe_neuron", {"neuron": 0, "top_images": 3}),
        ]]

    releases, analysis, why, comparison, found, neuron = mcp_session(app, calls)
    assert releases == client.predict(api_name="/list_releases")
    assert releases[0]["release"] == "toy-shapes" and releases[0]["entries"]
    assert analysis == client.predict(handle_file(str(red)), "", -1, "", api_name="/analyze_json")
    assert analysis["neurons"] and set(analysis["ood"]) >= {"out_of_distribution", "message"}
    assert why == client.predict(handle_file(str(red)), "", -1, "", "", api_name="/attribute_json")
    assert comparison == client.predict(handle_file(str(red)), handle_file(str(blue)), "", -1, "",
                                        api_name="/compare_json")
    assert found == client.predict("red", "", -1, "", api_name="/search_neurons")
    assert found and all(row["value"] == "red" for row in found)
    assert neuron == client.predict(0, "", -1, "", 3, api_name="/describe_neuron")
    assert len(neuron["top_images"]) <= 3


def test_describe_neuron_matches_the_atlas(app):
    from gradio_client import Client

    from revelio_hub.release import Release

    top = Release.from_pretrained(app_release_path()).load("down_ft1", 25).atlas
    hit = top.search("red")[0]["neuron"]
    got = Client(app.url, verbose=False).predict(hit, "down_ft1", 25, "", 4, api_name="/describe_neuron")
    info = top.neuron(hit)
    assert got["summary"] == top.summary(hit) and got["neuron"] == hit
    assert [t["image_id"] for t in got["top_images"]] == info.top_image_ids[:4]
    red = top.label_columns["color"].index("red")
    assert got["auroc"]["color"]["red"] == pytest.approx(float(top.value_auroc("color")[hit, red]), abs=1e-4)
    assert all(t["thumbnail"].startswith("data:image/webp;base64,") for t in got["top_images"])


def test_tool_images_pass_the_upload_gate(app, images, tmp_path):
    """An upload's file-route URL (Gradio's upload_file_to_gradio flow) is that upload; other URLs are refused
    before anything is fetched, and a server path is not read, however it is spelled."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import encode_file_path

    from app_inputs import upload
    from revelio_hub.app.validation import UPLOAD_REFUSED

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for agents")
    uploaded = f"{app.url}gradio_api/file={encode_file_path(upload(app, images['red']))}"

    async def calls(session):
        return [await session.call_tool("analyze_json", {"image": image}) for image in
                (uploaded, "http://127.0.0.1:9/x.png", f"{app.url}gradio_api/file={secret}",
                 f"http://elsewhere.example/gradio_api/file={secret}", str(secret), "file://" + str(secret))]

    ok, url, *paths = mcp_session(app, calls)
    assert answer(ok) == Client(app.url, verbose=False).predict(handle_file(str(images["red"])),
                                                                api_name="/analyze_json")
    assert url.isError and UPLOAD_REFUSED in url.content[0].text
    for result in paths:
        assert result.isError and "not for agents" not in result.content[0].text
    assert all(UPLOAD_REFUSED in result.content[0].text for result in paths[:2])


def test_app_builds_without_mcp_and_says_how_to_enable_it():
    """``mcp`` blocked from import: the UI builds; ``app.py --mcp`` exits with the install command."""
    code = (
        "import sys, runpy; sys.modules['mcp'] = None\n"
        "from revelio_hub.app.state import AppConfig, AppState\n"
        "from revelio_hub.app.ui import build_ui\n"
        f"build_ui(AppState.from_config(AppConfig(releases=[{app_release_path()!r}], workers=0)))\n"
        "print('built')\n"
        "sys.argv = ['app.py', '--mcp', '--no-warmup']\n"
        "runpy.run_path('app.py', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "built" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 1
    assert 'pip install "revelio-hub[mcp]"' in proc.stderr and "Traceback" not in proc.stderr
