"""Gradio's temp folder stays bounded however many requests the app serves (issue 10 §4).

Uploads and generated heat maps land in Gradio's cache folder. The app deletes
them once older than ``AppConfig.delete_cache``'s age, with the empty hash
folders they leave, so the folder returns to its size at start once requests
stop. Four clients at once: Gradio's own ``delete_cache`` task dies under
concurrent requests (see ``revelio_hub.app.temp_files``), and this test
catches that.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_inputs import LaunchedApp, app_release_path  # noqa: E402

from revelio_hub.app.state import DEFAULT_DELETE_CACHE, AppConfig, AppState  # noqa: E402
from revelio_hub.app.temp_files import prune_empty_dirs  # noqa: E402

CALLS = 200


def _census(root: Path) -> tuple[int, int, int]:
    """(files, folders, bytes of files) under ``root``."""
    files = folders = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        folders += len(dirnames)
        for name in filenames:
            files += 1
            try:
                size += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return files, folders, size


def test_prune_removes_only_old_empty_folders(tmp_path):
    old = time.time() - 100
    for name in ("old_empty", "old_full", "new_empty", "old_parent/old_child"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "old_full" / "heatmap.png").write_bytes(b"x")
    for name in ("old_empty", "old_full", "old_parent/old_child", "old_parent"):
        os.utime(tmp_path / name, (old, old))
    assert prune_empty_dirs(tmp_path, age=10) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new_empty", "old_full", "old_parent"]
    # old_parent was refreshed by its child's removal: gone on a later round, once old again.
    os.utime(tmp_path / "old_parent", (old, old))
    assert prune_empty_dirs(tmp_path, age=10) == 1 and tmp_path.is_dir()
    assert prune_empty_dirs(tmp_path / "missing", age=10) == 0


def test_cleanup_is_on_by_default_and_checked():
    assert AppConfig(releases=["x"]).delete_cache == DEFAULT_DELETE_CACHE
    assert AppConfig(releases=["x"], delete_cache=None).delete_cache is None
    for bad in [(0, 10), (10,), ("60", 60), (1.5, 2), (True, 5)]:
        with pytest.raises(ValueError, match="delete_cache"):
            AppConfig(releases=["x"], delete_cache=bad)


def _oldest_new_file_age(root: Path, known: set) -> float:
    """Age in seconds of the oldest file under ``root`` that was not in ``known`` (0 if none)."""
    now, oldest = time.time(), 0.0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path not in known:
                try:
                    oldest = max(oldest, now - path.stat().st_ctime)
                except OSError:
                    pass
    return oldest


@pytest.mark.slow  # 200 requests through the server: about 40 s on a busy 2-core machine
def test_temp_folder_stays_bounded_over_200_calls(tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    from revelio_hub.toy.shapes import image_spec, render

    # An upload must outlive its wait in the queue: keep `age` well above a request's latency.
    frequency, age = 1, 5
    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # read when the Blocks and the server are built
    images = []
    for i in range(CALLS):
        path = tmp_path / f"upload_{i}.png"
        render(image_spec(i, seed=77), image_size=48).save(path)  # distinct: a new upload and heat map each
        images.append(path)

    state = AppState.from_config(AppConfig(releases=[app_release_path()], delete_cache=(frequency, age)))
    state.warmup()  # the backbone loads before the clock starts on the first upload
    app = LaunchedApp(state)
    try:
        # download_files=False: the client does not fetch the outputs, so no fetch races the short test age.
        clients = [Client(app.url, verbose=False, download_files=False) for _ in range(4)]
        before = _census(cache)
        known = {Path(d) / n for d, _, names in os.walk(cache) for n in names}
        oldest = []

        def client_run(k: int) -> None:
            # Client k makes calls k, k + 4, ... one after another (a Client is not shared between threads).
            for i in range(k, CALLS, len(clients)):
                # The UI's Analyze endpoint: an upload in, a heat map and a gallery out.
                out = clients[k].predict(handle_file(str(images[i])), None, None, None, api_name="/analyze")
                assert out[5]  # the heat map came back
                if i % 20 == 0:
                    oldest.append(_oldest_new_file_age(cache, known))

        start = time.monotonic()
        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(client_run, range(len(clients))))
        duration = time.monotonic() - start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # files and then their folders go once older than `age`
            now = _census(cache)
            if now[0] <= before[0] + 4 and now[1] <= before[1] + 4:
                break
            time.sleep(0.5)
    finally:
        app.close()
    # While serving, no upload or heat map outlives age + one cleanup period (+ slack for a busy machine).
    assert max(oldest) <= age + frequency + 10, (oldest, duration)
    # Once requests stop, the folder is back to its size at start: nothing accumulated.
    assert now[0] <= before[0] + 4 and now[1] <= before[1] + 4, (before, now)
