"""Backbone passes in worker processes (issue 10 §2: the throughput of a CPU server under load).

What a user relies on: the answers are the ones the server process would have
computed (bit for bit), errors keep their words, a dead worker costs one
request and never the server, workers never outlive the server, and the
backbone is loaded in the workers only (memory does not double).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from app_inputs import app_release_path  # noqa: E402

import torch

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402
from revelio_hub.app.workers import WORKER_DIED, WorkerDied, default_workers  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def images():
    from revelio_hub.toy.shapes import image_spec, render

    return [render(image_spec(i, seed=77), image_size=64) for i in range(6)]


@pytest.fixture(scope="module")
def states():
    """(in-process state, state with one worker) on the same release."""
    local = AppState.from_config(AppConfig(releases=[app_release_path()]))
    pooled = AppState.from_config(AppConfig(releases=[app_release_path()], workers=1))
    try:
        yield local, pooled
    finally:
        pooled.close()


def test_worker_maps_and_answers_equal_in_process_ones(states, images):
    local, pooled = states
    rel_local, rel_pooled = local.get_release(), pooled.get_release()
    for image in images:
        for t in rel_local.timesteps():
            want = local.feature_maps(image, rel_local, t)
            got = pooled.feature_maps(image, rel_pooled, t)
            assert set(got) == set(want)
            for layer in want:
                assert got[layer].dtype == torch.float32 and torch.equal(got[layer], want[layer]), (layer, t)
    for image in images[:2]:
        for layer, t in rel_local.entries:
            assert A.analyze(pooled, image, layer, t).to_json() == A.analyze(local, image, layer, t).to_json()
    # The backbone lives in the worker: the server process never loaded it.
    assert pooled.backbones.loads == 0 and local.backbones.loads >= 1
    assert pooled.backbone_calls == local.backbone_calls
    # The worker ran the small SAEs of the OOD check on each pass: the errors this process would compute.
    from revelio_hub.interpret.ood import image_reconstruction_error

    keys = list(pooled.features._data)
    assert keys and not any(maps.errors for maps in local.features._data.values())
    for key in keys:
        maps, t = pooled.features.get(key), key[2]
        errors = maps.errors
        assert set(errors) == set(rel_pooled.small_sae_layers(t)) and errors
        for layer, err in errors.items():
            with torch.inference_mode():
                assert err == float(image_reconstruction_error(rel_pooled.entry(layer, t).sae, maps[layer])[0])


def test_worker_errors_keep_their_message(states, images):
    _, pooled = states
    rel = pooled.get_release()
    with pytest.raises(ValueError, match="not_a_layer"):
        pooled.workers.backbone_pass(rel.id, images[0], ["not_a_layer"], rel.timesteps()[0], None, 0, 1)
    # The pool survives a user error.
    assert pooled.workers.restarts == 0
    pooled.workers.backbone_pass(rel.id, images[0], [rel.layers[0]], rel.timesteps()[0], None, 0, 1)


def test_a_killed_worker_costs_one_request_then_a_new_one_answers(images):
    state = AppState.from_config(AppConfig(releases=[app_release_path()], workers=1))
    try:
        rel = state.get_release()
        layer, t = rel.default_entry()
        (pid,) = state.workers.load(rel.id, rel.image_size)
        want = A.analyze(state, images[0], layer, t).to_json()
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(WorkerDied, match="worker process stopped"):
            state.feature_maps(images[1], rel, t)
        assert state.workers.restarts == 1
        state.features = type(state.features)(8)  # forget cached maps: the answer must come from a new worker
        assert A.analyze(state, images[0], layer, t).to_json() == want
        assert state.workers.load(rel.id) != [pid]
    finally:
        state.close()


def test_web_users_are_told_to_retry_when_a_worker_died():
    import gradio as gr
    from revelio_hub.app.errors import user_errors

    with pytest.raises(gr.Error, match="worker process stopped during this request.*try again"):
        with user_errors("analysing the image"):
            raise WorkerDied(WORKER_DIED)


def test_workers_exit_when_the_server_process_is_killed(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from revelio_hub.app.state import AppConfig, AppState
        if __name__ == "__main__":
            state = AppState.from_config(AppConfig(releases=[{app_release_path()!r}], workers=1))
            rel = state.get_release()
            print(*state.workers.load(rel.id), flush=True)
            time.sleep(300)
    """))
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(server.stdout.readline())
        assert _alive(pid)
        server.send_signal(signal.SIGKILL)  # no clean-up runs in the server
        server.wait(timeout=10)
        deadline = time.time() + 15
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the worker outlived the server process"
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": -1}, "whole number"),
    ({"workers": True}, "whole number"),
    ({"workers": 1.5}, "whole number"),
    ({"workers": 1, "device": "cuda"}, "CPU only"),
    ({"workers": 1, "device": "auto"}, "CPU only"),
])
def test_bad_worker_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AppConfig(releases=["x"], **kwargs)


def test_app_py_picks_one_worker_on_a_multicore_cpu_only():
    assert default_workers("cpu", 2) == 1 and default_workers("cpu", 16) == 1
    assert default_workers("cpu", 1) == 0
    assert default_workers("cuda", 8) == 0 and default_workers("auto", 8) == 0


def test_app_py_refuses_workers_on_a_gpu_device_with_a_usage_error():
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "app.py"), "--device", "cuda",
                           "--workers", "1", "--no-warmup"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "app.py: error: Backbone worker processes run on the CPU only" in proc.stderr
    assert "Traceback" not in proc.stderr
