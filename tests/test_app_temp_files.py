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


# ------------------------------------------------------------------ a run's own folder, SIGTERM, restart


def test_stale_run_folders_are_removed_and_live_or_foreign_ones_kept(tmp_path):
    from revelio_hub.app.run_folder import APP_TEMP_NAME, LOCK_NAME, claim_run_folder, remove_stale_runs

    live = claim_run_folder(tmp_path, set_env=False)  # a live run: its lock is held
    root = tmp_path / APP_TEMP_NAME
    ended = root / "run-1-dead"
    (ended / "abc").mkdir(parents=True)
    (ended / LOCK_NAME).touch()
    (ended / "abc" / "upload.png").write_bytes(b"x")
    foreign = [root / "run-2-nolock", root / "mine", tmp_path / "run-3-outside"]
    for folder in foreign:
        folder.mkdir()
        (folder / "keep.txt").write_text("not the app's")
    (foreign[1] / LOCK_NAME).touch()  # a lock file outside a run-* folder marks nothing
    assert remove_stale_runs(root) == 1
    assert not ended.exists() and live.path.is_dir() and all((f / "keep.txt").is_file() for f in foreign)
    live.remove()
    assert not live.path.exists()


def _start_app(port: int, temp: Path) -> "subprocess.Popen":
    import subprocess

    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "app.py"), "--release", app_release_path(),
           "--port", str(port), "--no-warmup"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_up(url: str, proc, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the app did not answer")


@pytest.mark.slow  # three starts of app.py: about 40 s on an idle 2-core machine, 2 min on a busy one
def test_sigterm_deletes_the_runs_files_and_a_restart_serves_no_old_upload(tmp_path):
    """SIGTERM (how Spaces and Docker stop a container), with a browser tab open: the app exits within seconds
    and its uploads and heat maps are gone; a run killed without cleanup is cleaned by the next start;
    an earlier upload's URL is not served after a restart; nothing else in the temp folder is touched."""
    import signal

    import httpx
    from app_inputs import FILEDATA_TAG, Heartbeat, free_port, shape_image

    temp = tmp_path / "gradio"
    temp.mkdir()
    (temp / "someone_else.txt").write_text("another app's file")
    image = shape_image(tmp_path / "mine.png")
    urls, procs = [], []
    try:
        for stop in (signal.SIGTERM, signal.SIGKILL):
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            proc = _start_app(port, temp)
            procs.append(proc)
            _wait_up(url, proc)
            with open(image, "rb") as fh:
                path = httpx.post(f"{url}gradio_api/upload", files={"files": ("mine.png", fh, "image/png")},
                                  timeout=60).json()[0]
            value = {"path": path, "meta": FILEDATA_TAG}
            r = httpx.post(f"{url}gradio_api/call/analyze", json={"data": [value, None, None, ""]}, timeout=60)
            with httpx.stream("GET", f"{url}gradio_api/call/analyze/{r.json()['event_id']}", timeout=120) as s:
                assert any(line.startswith("event: complete") for line in s.iter_lines())
            assert Path(path).is_file() and httpx.get(f"{url}gradio_api/file={path}", timeout=30).status_code == 200
            urls.append(f"gradio_api/file={path}")
            tab = Heartbeat(url, "open-tab") if stop == signal.SIGTERM else None  # a browser tab stays open
            start = time.monotonic()
            proc.send_signal(stop)
            proc.wait(timeout=30)
            if stop == signal.SIGTERM:
                assert time.monotonic() - start < 10 and proc.returncode == 0, proc.stderr.read()[-2000:]
                assert not Path(path).exists() and not Path(path).parents[1].exists()  # the run's folder is gone
                tab.close()
            else:
                assert Path(path).is_file()  # a killed run cleans nothing: the next start does
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        proc = _start_app(port, temp)
        procs.append(proc)
        _wait_up(url, proc)
        assert not Path(path).exists()
        for old in urls:
            assert httpx.get(url + old, timeout=30).status_code in (403, 404)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        leftovers = [p for p in temp.rglob("*") if p.is_file() and "revelio-hub" in p.parts]
        assert leftovers == [] and (temp / "someone_else.txt").read_text() == "another app's file"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
