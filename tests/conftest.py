"""Shared test settings: offline, CPU, few threads (the CI machine has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Torch on one thread for this test: for tiny models on a shared 2-core machine, thread hand-offs cost more
    than the maths (files whose models are all tiny use it for every test: ``pytestmark``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub (``tests/hub_server.py``) with the real ``huggingface_hub`` client pointed at it.

    The client reads ``HF_ENDPOINT`` and friends into ``huggingface_hub.constants``
    at import time, so besides the environment (for subprocesses) the constants
    are patched for this process; ``monkeypatch`` restores both afterwards.
    """
    from huggingface_hub import constants

    from hub_server import HubServer

    with HubServer(token="hf_test_token") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        yield server
