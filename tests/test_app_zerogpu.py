"""ZeroGPU support of the app: the ``spaces.GPU``-decorated path answers exactly like the plain one.

``spaces`` is faked here: its ``GPU`` decorator records each call and, like a
ZeroGPU worker, pickles the arguments in and the result out (the real worker
runs in a forked process, so anything that does not pickle, or that the call
caches in memory, would be lost there).
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest
from app_inputs import app_release_path, shape_image  # noqa: E402
import torch

from revelio_hub.app import analysis as A  # noqa: E402
from revelio_hub.app.gpu import GPU_DURATION_S, call_device, gpu_task, load_device  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402


def fake_spaces() -> tuple[types.ModuleType, list[dict]]:
    """A stand-in for ``spaces``; ``module.observe()`` (set by the test) is sampled around each call."""
    calls: list[dict] = []
    module = types.ModuleType("spaces")
    module.observe = lambda: None

    def GPU(task=None, *, duration=None, size=None):  # noqa: N802 (mirrors spaces.GPU)
        def decorate(fn):
            def worker_call(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # into the worker
                before = module.observe()
                result = fn(*args, **kwargs)
                calls.append({"fn": getattr(fn, "__name__", ""), "duration": duration,
                              "observed": (before, module.observe())})
                return pickle.loads(pickle.dumps(result))  # and back
            return worker_call

        return decorate(task) if callable(task) else decorate

    module.GPU = GPU
    return module, calls


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return shape_image(tmp_path_factory.mktemp("zerogpu") / "red.png", color=(220, 40, 40))


@pytest.fixture(scope="module")
def plain(image) -> tuple[list[tuple[str, int]], list[dict]]:
    """Today's path (no ``spaces``): the entries analysed and their ``/analyze_json`` payloads."""
    saved = sys.modules.pop("spaces", None)
    try:
        state = _state()
    finally:
        if saved is not None:
            sys.modules["spaces"] = saved
    entries = state.get_release().entries[:2]
    return entries, [A.analyze(state, str(image), layer, t).to_json() for layer, t in entries]


def _state(device: str = "cpu") -> AppState:
    return AppState.from_config(AppConfig(releases=[app_release_path()], device=device, feature_cache_size=8))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_gpu_decorated_analysis_equals_the_plain_one(monkeypatch, image, plain, device):
    entries, plain = plain
    module, calls = fake_spaces()
    monkeypatch.setitem(sys.modules, "spaces", module)
    gpu_state = _state(device)  # rebuilt: the decorator is chosen when the state is built
    rel = gpu_state.get_release()
    module.observe = lambda: len(gpu_state.features)
    decorated = [A.analyze(gpu_state, str(image), layer, t).to_json() for layer, t in entries]

    # The backbone pass went through spaces.GPU, once per distinct timestep and view of the reliability check
    # (the image, and its mirrored copy where the entry is calibrated with one), cached afterwards.
    passes = {t: 1 + len(getattr(rel.entry(layer, t).reliability, "views", [])) for layer, t in entries}
    assert [c["fn"] for c in calls] == ["_backbone_pass"] * sum(passes.values())
    assert all(c["duration"] == GPU_DURATION_S for c in calls)
    # The GPU call caches nothing itself (on ZeroGPU that would stay in the worker process).
    assert all(before == after for before, after in (c["observed"] for c in calls))
    for got, want in zip(decorated, plain):
        assert got.keys() == want.keys()
        assert (got["release"], got["layer"], got["timestep"]) == (want["release"], want["layer"], want["timestep"])
        assert got["predictions"] == want["predictions"]
        assert got["neurons"] == want["neurons"]
    # The features the worker computed were cached in *this* process: the heat map needs no new pass.
    analysis = A.analyze(gpu_state, str(image), *entries[0])
    n_calls = len(calls)
    _, overlay, _ = A.neuron_view(gpu_state, analysis, analysis.neurons[0].id)
    # The overlay covers the analysed crop (a colour scale is drawn under it).
    assert overlay.size[0] == analysis.image.size[0] and overlay.size[1] > analysis.image.size[1]
    assert len(calls) == n_calls
    # On a CPU-only machine `auto` leaves the backbone on the CPU.
    if not torch.cuda.is_available():
        assert gpu_state.backbone(rel).device == torch.device("cpu")


def test_without_spaces_the_decorator_is_the_identity(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError

    def fn(x):
        return x + 1

    assert gpu_task()(fn) is fn
    assert load_device("auto") == "cpu" and load_device("cuda:1") == "cuda:1"
    assert call_device("cpu") == "cpu" and call_device("mps") == "mps"
    assert call_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_app_builds_when_spaces_is_not_installed(monkeypatch):
    import gradio as gr

    from revelio_hub.app.ui import build_ui

    monkeypatch.setitem(sys.modules, "spaces", None)
    state = _state("auto")
    assert isinstance(build_ui(state), gr.Blocks)
    assert state._backbone_pass == state._gpu_backbone_pass  # the plain method, undecorated


def test_backbone_moves_in_place_and_keeps_its_answer(image):
    """``Backbone.to`` (what the GPU call uses) moves networks and conditioning, not the results."""
    state = _state()
    rel = state.get_release()
    layer, t = rel.default_entry()
    backbone = state.backbone(rel)
    from PIL import Image

    pil = Image.open(image).convert("RGB")
    before = backbone.extract([pil], [layer], [t])[(layer, t)]
    assert backbone.to("cpu") is backbone  # same device: nothing to do
    target = "cuda" if torch.cuda.is_available() else "meta"
    moved = state.backbone(rel).to(target)
    try:
        assert moved.device == torch.device(target)
        assert next(moved.denoiser.parameters()).device.type == torch.device(target).type
        tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
        assert all(v.device.type == torch.device(target).type for v in tensors)
    finally:
        moved.to("cpu") if target == "cuda" else None
    if target == "cuda":
        after = moved.extract([pil], [layer], [t])[(layer, t)]
        torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)
