"""The served app as a hostile client sees it: raw HTTP, no gradio_client.

A Space is public, so anyone can post JSON to its endpoints. These tests send
requests by hand (httpx) to the app served in this process, through Gradio's
``POST /gradio_api/call/<api_name>`` + ``GET`` event stream, and check that:

* no endpoint opens a file the client names (a plain path string, an untagged
  dict, a ``file://`` url, a tagged ``FileData`` outside Gradio's upload
  folder, a symlink or ``..`` out of it): each is refused with one and the
  same sentence, whether or not the file exists, and nothing comes back;
* a real upload (``POST /gradio_api/upload``) works (the positive control);
* no response carries the release folder's path or the client's own path;
* a file name in a message is HTML-escaped, and web users are not told to
  "raise max_pixels".
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from app_fixtures import app  # noqa: E402,F401 (fixture: the app served in this process)
from app_inputs import app_release_path, call, huge_png, not_an_image, queue_event, shape_image, upload  # noqa: E402

import httpx
import gradio as gr

from revelio_hub.app.validation import UPLOAD_REFUSED  # noqa: E402

TAG = {"_type": "gradio.FileData"}
#: Every endpoint with a file input, and the rest of its arguments (defaults).
FILE_ENDPOINTS = {
    "analyze": [None, None, ""],
    "analyze_json": ["", -1, ""],
    "attribute_json": ["", -1, "", ""],
    "compare_json": [None, "", -1, ""],  # the second image is covered in test_app_interpret.py
    "compare": [None, None, None, ""],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real PNG outside the upload folder (what an attacker would like read), and a path that does not exist."""
    folder = tmp_path_factory.mktemp("server_files")
    return {"secret": shape_image(folder / "secret.png", color=(10, 200, 10)), "missing": folder / "missing.png"}


def attack_cases(files: dict[str, Path]) -> dict[str, Any]:
    from gradio.utils import get_upload_folder

    secret, missing = files["secret"], files["missing"]
    cache = Path(get_upload_folder())
    link_dir = cache / f"revelio-test-{uuid.uuid4().hex}"
    link_dir.mkdir(parents=True)
    link = link_dir / "inside.png"
    link.symlink_to(secret)  # inside the upload folder by name, outside it in fact
    return {
        "untagged dict, file exists": {"path": str(secret)},
        "untagged dict, file missing": {"path": str(missing)},
        "string path, file exists": str(secret),
        "string path, file missing": str(missing),
        "file:// url, tagged": {"path": f"file://{secret}", "meta": TAG},
        "file:// url string": f"file://{secret}",
        "tagged, outside the upload folder, exists": {"path": str(secret), "meta": TAG},
        "tagged, outside the upload folder, missing": {"path": str(missing), "meta": TAG},
        "tagged, relative path": {"path": os.path.relpath(secret), "meta": TAG},
        "tagged, ../ out of the upload folder": {"path": f"{cache}/../..{secret}", "meta": TAG},
        "tagged, symlink in the upload folder": {"path": str(link), "meta": TAG},
        "tagged, missing inside the upload folder": {"path": str(link_dir / "nothing.png"), "meta": TAG},
        "tagged, http url": {"path": "http://127.0.0.1:1/x.png", "meta": TAG},
    }




def file_events(app) -> dict[str, int]:
    """api_name -> fn_index of every event (public or not) with a file input."""
    return {
        fn.api_name: i for i, fn in app.demo.fns.items()
        if any('"path"' in json.dumps(c.api_info()) for c in fn.inputs if hasattr(c, "api_info"))
    }


#: Private events with a file input: re-analysis after a layer/timestep change (the browser calls them by index).
PRIVATE_FILE_EVENTS = {"refresh", "refresh_1"}
#: Private events of shareable links with a file input (deep_links): a linked example's analysis, "copy link".
LINK_FILE_EVENTS = {"analyze_1", "analysis_link"}


def test_every_file_endpoint_is_covered(app):
    """The cases below cover every event with a file input (a new endpoint cannot slip past them)."""
    assert set(file_events(app)) == set(FILE_ENDPOINTS) | PRIVATE_FILE_EVENTS | LINK_FILE_EVENTS


def test_private_reanalysis_events_refuse_server_paths(app, files, tmp_path):
    """A session with a real result, then the layer-change event with a server path: the same refusal."""
    events = file_events(app)
    rel = app.state.get_release()
    layer, t = rel.default_entry()
    served = upload(app, shape_image(tmp_path / "mine.png"))
    session = uuid.uuid4().hex[:10]
    first = queue_event(app, events["analyze"], [{"path": served, "meta": TAG}, layer, t, rel.name], session)
    assert first["success"], first
    for name in sorted(PRIVATE_FILE_EVENTS):
        for case, value in attack_cases(files).items():
            msg = queue_event(app, events[name], [value, layer, t, rel.name, None, False], session)
            assert not msg["success"] and msg["output"]["error"] == UPLOAD_REFUSED, (name, case, msg)


def test_link_events_refuse_server_paths(app, files):
    """A session opened on an example link (so its analysis event is armed), then that event and "copy link"
    with server paths: the analysis gives the one refusal, the link is refused or names the entry only."""
    events = file_events(app)
    opener = next(i for i, fn in app.demo.fns.items() if fn.api_name == "open")
    rel = app.state.get_release()
    layer, t = rel.default_entry()
    session = uuid.uuid4().hex[:10]
    opened = queue_event(app, opener, ["frequency"], session, params={"layer": layer, "t": t, "example": 0})
    shown = [d for d in opened["output"]["data"] if isinstance(d, dict) and str(d.get("path", "")).endswith(".png")]
    assert opened["success"] and len(shown) == 1, opened  # the link's example is shown: the event is armed
    entry_link = f"?release={rel.name}&layer={layer}&t={t}"
    for case, value in attack_cases(files).items():
        msg = queue_event(app, events["analyze_1"], [None, value, layer, t, rel.name], session)
        assert not msg["success"] and msg["output"]["error"] == UPLOAD_REFUSED, (case, msg)
        msg = queue_event(app, events["analysis_link"], [rel.name, layer, t, value, None], session)
        refused = not msg["success"] and msg["output"]["error"] == UPLOAD_REFUSED  # (Gradio's own check, first)
        assert refused or (msg["success"] and msg["output"]["data"] == [entry_link]), (case, msg["output"])


@pytest.mark.parametrize("api_name", sorted(FILE_ENDPOINTS))
def test_server_paths_are_refused_with_one_sentence(app, files, api_name):
    release_dir = str(Path(app_release_path()).resolve())
    results = {}
    for case, value in attack_cases(files).items():
        event, payload = call(app, api_name, [value, *FILE_ENDPOINTS[api_name]])
        results[case] = (event, payload)
        text = json.dumps(payload)
        assert event == "error", (case, text)
        assert payload["error"] == UPLOAD_REFUSED, (case, text)  # the same text whether or not the file exists
        assert "data" not in payload and ".png" not in text and ".webp" not in text  # no image comes back
        assert str(files["secret"].parent) not in text and release_dir not in text and os.getcwd() not in text
    assert len(results) == len(attack_cases(files))


def test_a_real_upload_works(app, files, tmp_path):
    """The positive control: the same file, uploaded through Gradio, is analysed by both endpoints."""
    image = shape_image(tmp_path / "mine.png", color=(220, 40, 40))
    served = upload(app, image)
    value = {"path": served, "orig_name": "mine.png", "meta": TAG}
    event, payload = call(app, "analyze_json", [value, "", -1, ""])
    assert event == "complete", payload
    result = payload[0]
    rel = app.state.get_release()
    assert result["release"] == rel.name and result["neurons"]
    event, payload = call(app, "analyze", [value, None, None, ""])
    assert event == "complete", payload
    heatmap = payload[6]
    assert heatmap and heatmap["url"]
    r = httpx.get(heatmap["url"], timeout=30)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_response_names_a_server_path(app, files, tmp_path):
    release_dir = str(Path(app_release_path()).resolve())
    texts = []
    for route in ("config", "gradio_api/info", "gradio_api/openapi.json", ""):
        r = httpx.get(app.url + route, timeout=60)
        assert r.status_code == 200
        texts.append(r.text)
    served = upload(app, shape_image(tmp_path / "any.png"))
    value = {"path": served, "orig_name": "any.png", "meta": TAG}
    texts.append(json.dumps(call(app, "analyze_json", [value, "", -1, ""])[1]))
    texts.append(json.dumps(call(app, "analyze", [value, None, None, ""])[1]))
    rel = app.state.get_release()
    layer, t = rel.default_entry()
    texts.append(json.dumps(call(app, "neuron", [rel.name, layer, t, 0])[1]))
    event, payload = call(app, "analyze_json", [value, "", -1, "elsewhere"])
    assert event == "error" and "Unknown release 'elsewhere'" in payload["error"] and rel.name in payload["error"]
    texts.append(json.dumps(payload))
    for text in texts:
        assert release_dir not in text and str(tmp_path) not in text and os.getcwd() not in text
    # The release is named, not located, in the JSON answer and the dropdown.
    assert json.loads(texts[4])[0]["release"] == rel.name


def test_file_names_in_messages_are_escaped(app, tmp_path):
    served = upload(app, not_an_image(tmp_path))
    name = "<img src=x onerror=alert(1)>.png"
    event, payload = call(app, "analyze_json", [{"path": served, "orig_name": name, "meta": TAG}, "", -1, ""])
    assert event == "error"
    assert "<img" not in payload["error"] and "&lt;img src=x onerror=alert(1)&gt;.png" in payload["error"]
    assert "not an image" in payload["error"]


def test_web_users_are_not_told_to_raise_max_pixels(app, tmp_path):
    served = upload(app, huge_png(tmp_path))
    event, payload = call(app, "analyze_json", [{"path": served, "orig_name": "huge.png", "meta": TAG}, "", -1, ""])
    assert event == "error" and "huge.png" in payload["error"]
    assert "max_pixels" not in payload["error"] and served not in payload["error"]


def test_examples_are_picked_by_index_not_by_a_client_path(app, tmp_path):
    """The example gallery's select event loads the release's own file, whatever path the client puts in the event."""
    examples = app.state.get_release().examples
    if not examples:
        pytest.skip("the release has no examples")
    other = upload(app, shape_image(tmp_path / "other.png", color=(1, 2, 3)))  # a path Gradio itself would let through
    fn_index = next(i for i, fn in app.demo.fns.items() if getattr(fn.fn, "__name__", "") == "pick_example")

    def select(index: Any) -> dict:
        event_data = {"index": index, "value": {"image": {"path": other, "meta": TAG}, "caption": None}}
        return queue_event(app, fn_index, [app.state.get_release().name], uuid.uuid4().hex[:10], event_data)

    msg = select(0)
    assert msg["success"], msg
    out = msg["output"]["data"][0]
    assert Path(out["path"]).read_bytes() == Path(examples[0][0]).read_bytes()  # the example, not the client's file
    msg = select(len(examples) + 5)
    assert not msg["success"] and "Could not load that example" in msg["output"]["error"]


def test_served_upload_gate(tmp_path):
    """The gate itself, as Python: tagged + inside a root + existing, or the one refusal."""
    from revelio_hub.app.validation import NO_IMAGE, served_upload

    root = tmp_path / "uploads"
    root.mkdir()
    inside = shape_image(root / "ok.png")
    outside = shape_image(tmp_path / "outside.png")
    assert served_upload({"path": str(inside), "meta": TAG, "orig_name": "a.png"}, [root]).name == "a.png"
    assert served_upload({"path": str(outside), "meta": TAG}, [root], [outside]).path == str(outside.resolve())
    refused = [
        {"path": str(outside), "meta": TAG}, {"path": str(inside)}, str(inside), {"path": str(inside), "meta": {}},
        {"path": str(root / ".." / "outside.png"), "meta": TAG}, {"path": str(root / "none.png"), "meta": TAG}, 12,
    ]
    for value in refused:
        with pytest.raises(ValueError) as info:
            served_upload(value, [root])
        assert str(info.value) == UPLOAD_REFUSED
    with pytest.raises(ValueError, match=NO_IMAGE[:20]):
        served_upload(None, [root])


def _file_url(app, path: str) -> str:
    return f"{app.url}gradio_api/file={path}"


def test_release_weights_and_metadata_are_not_served(app):
    """Weights, release.json, configs and every other release file: refused by relative and by absolute path.

    A private local ``--release`` must not leak its SAE or Diff-C weights (issue 22); the page's images are
    served from copies in the upload folder instead (next test).
    """
    root = Path(app_release_path()).resolve()
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".jsonl", ".md"}]
    assert any(p.suffix == ".safetensors" for p in files) and (root / "release.json") in files
    files += [next(root.rglob("*.webp"))]  # a thumbnail too: only its copy is served
    for file in files:
        for shown_path in (str(file), os.path.relpath(file), f"{root.parent}/./{root.name}/../{root.name}/{file.relative_to(root)}"):
            r = httpx.get(_file_url(app, shown_path), timeout=30)
            assert r.status_code in (403, 404), (shown_path, r.status_code)
            assert b"safetensors" not in r.content[:64]  # (the 403 quotes the path the client sent, nothing else)


def test_shown_images_come_from_copies_that_endpoints_accept(app, tmp_path):
    """The example gallery and a neuron's top images are served (as copies); an API call with the example the
    page shows works, while the example's path in the release folder is refused like any server path."""
    root = str(Path(app_release_path()).resolve())
    rel = app.state.get_release()
    if not rel.examples:
        pytest.skip("the release has no examples")
    config = httpx.get(f"{app.url}config", timeout=60).json()
    gallery = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "examples")
    shown = gallery["props"]["value"][0]["image"]
    assert root not in shown["path"] and httpx.get(shown["url"], timeout=30).status_code == 200
    layer, t = rel.default_entry()
    atlas = rel.entry(layer, t).atlas
    neuron = next(i for i in range(atlas.num_neurons) if atlas.top_images(i, 1))  # one with top images
    event, payload = call(app, "neuron", [rel.name, layer, t, neuron])
    assert event == "complete", payload
    top = payload[2][0]["image"]
    assert root not in top["path"] and httpx.get(top["url"], timeout=30).content[:4] == b"RIFF"
    for api_name in ("analyze_json", "attribute_json"):
        event, payload = call(app, api_name, [{"path": shown["path"], "meta": TAG}, *FILE_ENDPOINTS[api_name]])
        assert event == "complete", (api_name, payload)
        original = {"path": rel.examples[0][0], "meta": TAG}
        event, payload = call(app, api_name, [original, *FILE_ENDPOINTS[api_name]])
        assert event == "error" and payload["error"] == UPLOAD_REFUSED, (api_name, payload)


@pytest.mark.parametrize("api_name", sorted(FILE_ENDPOINTS))
def test_malformed_file_values_get_one_sentence_and_no_traceback(app, api_name, capfd):
    """Paths of 5,000+ characters or with a NUL byte: the one refusal, not ``{"error": null}``, and no traceback
    (nor the path) in the server's output."""
    from gradio.utils import get_upload_folder

    cases = [{"path": "/x" * 3000, "meta": TAG}, {"path": f"{get_upload_folder()}/{'a' * 6000}.png", "meta": TAG},
             {"path": "/etc/passwd\x00.png", "meta": TAG}, {"path": f"{get_upload_folder()}/a\x00b.png", "meta": TAG}]
    capfd.readouterr()
    for value in cases:
        event, payload = call(app, api_name, [value, *FILE_ENDPOINTS[api_name]])
        assert event == "error" and payload["error"] == UPLOAD_REFUSED, (value["path"][:40], payload)
    out = capfd.readouterr()
    assert "Traceback" not in out.err + out.out and "a" * 200 not in out.err + out.out


def test_long_text_inputs_are_not_echoed_whole(app, tmp_path):
    """A 100 KB class to explain, label value, layer or release: a short error, without the input."""
    served = {"path": upload(app, shape_image(tmp_path / "mine.png")), "meta": TAG}
    huge = "stripes" * 15_000
    cases = {
        "attribute_json": [served, "", -1, "", huge],
        "search_neurons": [huge, "", -1, ""],
        "analyze_json": [served, huge, -1, ""],
        "neuron": [huge, "", -1, 0],
    }
    for api_name, data in cases.items():
        event, payload = call(app, api_name, data)
        assert event == "error" and payload["error"] and len(payload["error"]) < 400, (api_name, payload)
        assert "stripes" * 20 not in payload["error"]


def test_unexpected_errors_log_one_line_without_the_request_at_default_level(caplog):
    """An unexpected exception (its message may quote a client's input) logs its kind, not its message or
    traceback, unless the operator turns on DEBUG."""
    import logging

    from revelio_hub.app.errors import user_errors

    secret = "/home/client/" + "x" * 5000
    for level, traceback_logged in ((logging.INFO, False), (logging.DEBUG, True)):
        caplog.clear()
        with caplog.at_level(level, logger="revelio_hub.app.errors"):
            with pytest.raises(gr.Error) as info:
                with user_errors("analysing the image"):
                    raise KeyError(secret)
        assert "KeyError" in info.value.message and secret not in info.value.message
        errors = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(errors) == 1 and "KeyError" in errors[0].getMessage() and not errors[0].exc_info
        assert secret not in caplog.text or traceback_logged
        assert any(r.exc_info for r in caplog.records) == traceback_logged
