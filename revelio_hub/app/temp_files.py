"""Keeping Gradio's temp folder bounded on a server that runs for weeks.

Every upload and every generated image (the heat map, gallery copies) is
written to Gradio's cache folder, in a directory named after the file's hash,
and by default never deleted: issue 10 measured the folder growing from 6.9 to
15.2 MB over about 1,300 calls (quoted in ``docs/benchmarks.md``).

Gradio has the cleanup, ``gr.Blocks(delete_cache=(frequency, age))``, but in
the installed version (6.31) its scheduled task iterates the live sets of
created files while request threads add to them; under concurrent traffic it
dies on the first "Set changed size during iteration" and never runs again
(reproduced with 4 clients; ``tests/test_app_temp_files.py`` fails with it).
So the app runs Gradio's own deletion function (:func:`delete_old_files`) on
its own schedule, over snapshots of those sets, from a server lifespan
(:func:`cleanup_lifespan`, configured by
:attr:`revelio_hub.app.state.AppConfig.delete_cache`); one failed round is
logged and the next one runs. Gradio deletes files only, leaving one empty
hash folder per file (4 KiB and an inode each); :func:`prune_empty_dirs`
removes those on the same schedule. As with Gradio's option, the files the app
created are all deleted when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Optional, Union

logger = logging.getLogger(__name__)


def delete_old_files(blocks: Any, age: Optional[float]) -> None:
    """Delete the files ``blocks`` created (uploads, outputs) older than ``age`` seconds (``None``: all).

    Gradio's own ``delete_files_created_by_app`` (which spares files a
    component must keep, such as example images), run on copies of the live
    sets so concurrent requests cannot break it; what it deleted is then taken
    out of the live sets. Copying and subtracting a set are single operations
    under the GIL.
    """
    from gradio.route_utils import delete_files_created_by_app

    live = list(blocks.temp_file_sets)
    snapshot = [set(files) for files in live]
    view = SimpleNamespace(blocks=dict(blocks.blocks), temp_file_sets=[set(files) for files in snapshot])
    delete_files_created_by_app(view, age)
    for files, before, after in zip(live, snapshot, view.temp_file_sets):
        files -= before - after


def prune_empty_dirs(root: Union[str, os.PathLike], age: float) -> int:
    """Remove empty directories under ``root`` untouched for more than ``age`` seconds; returns how many.

    ``root`` itself is kept. The age test protects a directory that Gradio has
    just created and is about to write its file into (creating or removing a
    file refreshes the directory's mtime).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    cutoff = time.time() - age
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        path = Path(dirpath)
        if path == root or filenames:
            continue
        try:
            if path.stat().st_mtime < cutoff and not any(path.iterdir()):
                path.rmdir()
                removed += 1
        except OSError:  # filled or removed meanwhile: leave it
            continue
    return removed


def cleanup_lifespan(delete_cache: Optional[tuple[int, int]]) -> Optional[Callable[[Any], Any]]:
    """A FastAPI lifespan for ``Blocks.launch(app_kwargs={"lifespan": ...})`` that keeps the cache bounded.

    Every ``frequency`` seconds: :func:`delete_old_files` then
    :func:`prune_empty_dirs` for files and folders older than ``age``; at
    shutdown, every file the app created. ``None`` (no cleanup configured)
    gives ``None``.
    """
    if not delete_cache:
        return None
    frequency, age = delete_cache

    def clean(blocks: Any, max_age: Optional[float]) -> None:
        try:
            delete_old_files(blocks, max_age)
            prune_empty_dirs(blocks.GRADIO_CACHE, age if max_age is not None else 0)
        except Exception:  # one bad round must not end the cleanup for the life of the server
            logger.exception("Cleaning Gradio's temp folder failed; retrying in %s s", frequency)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(frequency)
                await asyncio.to_thread(clean, app.get_blocks(), age)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            clean(app.get_blocks(), None)

    return lifespan


__all__ = ["delete_old_files", "prune_empty_dirs", "cleanup_lifespan"]
