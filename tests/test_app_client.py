"""The launched app driven through ``gradio_client``, as API users drive it.

The server runs in this process (``Blocks.launch(prevent_thread_lock=True)``)
on a free loopback port, with the same queue settings as ``python app.py``.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_inputs import BAD_INPUTS, LaunchedApp, LibraryReference, shape_image, app_release_path  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from revelio_hub.app.state import AppConfig, AppState  # noqa: E402


def release_path() -> str:
    return app_release_path()


@pytest.fixture(scope="module")
def app():
    state = AppState.from_config(AppConfig(releases=[release_path()], queue_size=64))
    with LaunchedApp(state) as launched:
        yield launched


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("client_images")
    colors = [(220, 40, 40), (40, 180, 40), (40, 40, 220), (220, 200, 40)]
    return [shape_image(folder / f"img{i}.png", color=c, size=64 + 16 * i) for i, c in enumerate(colors)]


def test_endpoints_are_exposed(app, client):
    deps = {fn.api_name: fn for fn in app.demo.fns.values() if fn.api_name}
    # One concurrency group for both analysis endpoints, sized for the backbone; a bounded queue.
    assert deps["analyze"].concurrency_id == deps["analyze_json"].concurrency_id
    assert deps["analyze"].concurrency_limit == deps["analyze_json"].concurrency_limit == app.state.config.concurrency
    assert app.demo._queue.max_size == app.state.config.queue_size
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/analyze" in api and "/analyze_json" in api
    params = [p["parameter_name"] for p in api["/analyze_json"]["parameters"]]
    assert params == ["image", "layer", "timestep", "release"]
    assert [p["parameter_name"] for p in api["/search_neurons"]["parameters"]] == ["value", "layer", "timestep",
                                                                                  "release"]


def test_analyze_json_matches_the_library(app, client, images):
    import torch

    rel = app.state.get_release()
    library = LibraryReference(release_path())  # the library called directly, without the app
    for layer, t in rel.entries[:2]:
        got = client.predict(handle_file(str(images[0])), layer, t, "", api_name="/analyze_json")
        acts, preds = library.run(images[0], layer, t)
        assert got["release"] == rel.name and got["layer"] == layer and got["timestep"] == t
        atlas = library.entry(layer, t).atlas
        visible = [n["id"] for n in got["neurons"] if not n["dense"]]
        firing = torch.nonzero((acts > 0) & ~atlas.dense_mask).flatten()
        relevance = atlas.relevance(acts)
        assert visible == firing[torch.argsort(relevance[firing], descending=True, stable=True)][: len(visible)].tolist()
        for n in got["neurons"]:
            assert n["activation"] == pytest.approx(float(acts[n["id"]]), rel=1e-4, abs=1e-5)
            assert n["summary"] == atlas.summary_on_image(n["id"], float(acts[n["id"]]))
        assert [n["relevance"] for n in got["neurons"]] == sorted((n["relevance"] for n in got["neurons"]), reverse=True)
        assert isinstance(got["ood"]["out_of_distribution"], bool)
        assert got["predictions"] == pytest.approx(preds, abs=1e-5)
        assert sum(got["predictions"].values()) <= 1 + 1e-5


def test_analyze_json_defaults_and_release_by_name(app, client, images):
    rel = app.state.get_release()
    default = client.predict(handle_file(str(images[1])), "", -1, "", api_name="/analyze_json")
    by_name = client.predict(handle_file(str(images[1])), "", -1, rel.name, api_name="/analyze_json")
    assert (default["layer"], default["timestep"]) == rel.default_entry()
    assert by_name == default


def test_ui_analyze_endpoint(client, images):
    preds, note, table, neuron, caption, gallery, heatmap, ood = client.predict(
        handle_file(str(images[2])), None, None, None, api_name="/analyze"
    )
    assert not note  # the default entry has a Diff-C head
    assert preds["confidences"] and table["data"]
    assert ood  # the out-of-distribution line (or warning) is always filled in
    assert neuron["value"] == table["data"][0][0]
    assert gallery and Path(heatmap).is_file()


def test_sixteen_concurrent_calls_all_succeed(app, client, images):
    jobs = [
        client.submit(handle_file(str(images[i % len(images)])), "", -1, "", api_name="/analyze_json")
        for i in range(16)
    ]
    results = [job.result(timeout=300) for job in jobs]
    assert len(results) == 16
    by_image: dict[int, list] = {}
    for i, r in enumerate(results):
        assert r["neurons"] and r["predictions"]
        by_image.setdefault(i % len(images), []).append([n["id"] for n in r["neurons"]])
    for runs in by_image.values():  # concurrency does not mix up results
        assert all(run == runs[0] for run in runs)

    # Independent clients at once too (each its own session and upload).
    def one(i: int):
        c = Client(app.url, verbose=False)
        return c.predict(handle_file(str(images[i % len(images)])), "", -1, "", api_name="/analyze_json")

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(r["neurons"] for r in pool.map(one, range(8)))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_give_their_plain_message(client, tmp_path, case):
    make, pattern = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(path)), "", -1, "", api_name="/analyze_json")
    message = str(info.value)
    assert re.search(pattern, message), message
    assert path.name in message and "Traceback" not in message and "/tmp/gradio" not in message


def test_bad_choices_give_plain_messages(client, images):
    with pytest.raises(AppError, match="Layer 'nope' is not in release"):
        client.predict(handle_file(str(images[0])), "nope", -1, "", api_name="/analyze_json")
    with pytest.raises(AppError, match="Unknown release 'elsewhere'"):
        client.predict(handle_file(str(images[0])), "", -1, "elsewhere", api_name="/analyze_json")
