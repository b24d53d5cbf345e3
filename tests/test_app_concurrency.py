"""Answers do not depend on what else the app is doing (issue 10 §2).

The app serves several requests at once on one shared backbone (or, as
``app.py`` runs it on a multi-core CPU, on one backbone in a worker process
that takes passes from all requests). Each test runs
many distinct images over several layers and timesteps of the release, from 8
threads at once, and compares every field with answers computed one at a time
by a separate app state (so nothing is served from a shared cache): 0 errors,
0 differences. The feature cache is then checked entry by entry, because a
wrong feature map stored under an image's hash would poison every later answer
for that image.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_inputs import LaunchedApp, app_release_path  # noqa: E402

import torch

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState, default_threads  # noqa: E402

N_IMAGES = 48
THREADS = 8


def _state(concurrency: int = 2, workers: int = 0) -> AppState:
    # Cache large enough for every (image, t) of the run: nothing is evicted, so it can be compared.
    return AppState.from_config(AppConfig(releases=[app_release_path()], feature_cache_size=4 * N_IMAGES,
                                          concurrency=concurrency, workers=workers))


@pytest.fixture(scope="module", autouse=True)
def app_threads():
    """torch threads as ``app.py`` sets them (more threads than cores per request only spin on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(default_threads(2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Distinct toy-shape images (different shapes, colours, sizes, positions, backgrounds)."""
    from revelio_hub.toy.shapes import image_spec, render

    folder = tmp_path_factory.mktemp("concurrency_images")
    paths = []
    for i in range(N_IMAGES):
        path = folder / f"shape_{i}.png"
        render(image_spec(i, seed=2610), image_size=64).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def jobs(images) -> list[tuple[Path, str, int]]:
    """Each image at two entries (two layers; often two timesteps), shuffled so neighbours differ."""
    entries = _state().get_release().entries
    assert len({layer for layer, _ in entries}) > 1 and len({t for _, t in entries}) > 1
    out = []
    for i, path in enumerate(images):
        for entry in (entries[i % len(entries)], entries[(i + 5) % len(entries)]):
            out.append((path, *entry))
    random.Random(0).shuffle(out)
    return out


@pytest.fixture(scope="module")
def one_at_a_time(jobs):
    """(state, answers) of a fresh app state that analyses the jobs sequentially."""
    state = _state()
    return state, [A.analyze(state, str(path), layer, t).to_json() for path, layer, t in jobs]


def _differences(got: list, want: list, jobs) -> list[str]:
    return [f"{job[0].name} {job[1]} t={job[2]}: {g} != {w}" for job, g, w in zip(jobs, got, want) if g != w]


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "worker-process"])
def test_analyze_from_eight_threads_equals_one_at_a_time(jobs, one_at_a_time, workers):
    ref_state, want = one_at_a_time
    state = _state(workers=workers)

    def run(job):
        path, layer, t = job
        return A.analyze(state, str(path), layer, t).to_json()  # what /analyze_json returns

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            got = list(pool.map(run, jobs))  # an exception here is an error: the test fails on it
    finally:
        state.close()
    assert _differences(got, want, jobs) == []

    # Every cached feature map is the one computed for its own image and timestep.
    keys = list(state.features._data)
    assert keys and set(keys) == set(ref_state.features._data)
    for key in keys:
        mine, ref = state.features.get(key), ref_state.features.get(key)
        assert set(mine) == set(ref)
        for layer in ref:
            assert torch.equal(mine[layer], ref[layer]), (key, layer)


def test_served_app_with_concurrency_answers_as_one_at_a_time(jobs, one_at_a_time):
    """As app.py serves it here: concurrent events, backbone passes in a worker process."""
    from gradio_client import Client, handle_file

    _, want = one_at_a_time
    subset = jobs[:N_IMAGES]
    app = LaunchedApp(_state(concurrency=4, workers=1))
    try:
        clients = [Client(app.url, verbose=False) for _ in range(THREADS)]

        def client_run(k: int) -> dict:
            # Client k sends jobs k, k + 8, ... one after another (a Client is not shared between threads).
            return {i: clients[k].predict(handle_file(str(subset[i][0])), subset[i][1], subset[i][2], "",
                                          api_name="/analyze_json")
                    for i in range(k, len(subset), THREADS)}

        with ThreadPoolExecutor(THREADS) as pool:
            answers = {i: a for part in pool.map(client_run, range(THREADS)) for i, a in part.items()}
        got = [answers[i] for i in range(len(subset))]
    finally:
        app.close()
    assert _differences(got, want[:N_IMAGES], subset) == []
