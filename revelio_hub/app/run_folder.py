"""The app's own temp folder, and a clean stop: nothing a run wrote outlives it.

Gradio writes every upload and every generated image under its temp folder
(``$GRADIO_TEMP_DIR`` or ``<tmp>/gradio``), shared with any other Gradio app on
the machine. Spaces and Docker stop a container with SIGTERM, which by default
ends Python without running any cleanup: every upload and heat map of the
run stayed on disk, and an earlier user's upload URL still answered after a
restart (issue 22).

So each run of ``app.py`` works in a folder of its own,
``<Gradio temp folder>/revelio-hub/run-<pid>-<random>`` (:func:`claim_run_folder`
points ``$GRADIO_TEMP_DIR`` at it). The run holds an exclusive ``flock`` on a
lock file inside it for as long as it lives; the kernel drops the lock when the
process ends, however it ends. At start-up every ``run-*`` folder under
``revelio-hub`` whose lock can be taken belongs to a run that is gone, and is
deleted (:func:`remove_stale_runs`); a folder whose lock is held belongs to a
live app and is left alone, and nothing outside ``revelio-hub/run-*`` folders
holding a lock file is ever touched. :class:`GracefulStop` turns SIGTERM into
an orderly stop (Gradio's own ``Blocks.close()``), after which
:meth:`RunFolder.remove` deletes the run's folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Union

logger = logging.getLogger(__name__)

#: The app's folder inside Gradio's temp folder; runs are ``run-*`` folders in it.
APP_TEMP_NAME = "revelio-hub"
#: The lock file that marks a run folder as the app's, held by the live run.
LOCK_NAME = ".run.lock"
_ENV = "GRADIO_TEMP_DIR"


def gradio_temp_parent() -> Path:
    """Gradio's temp folder as Gradio finds it: ``$GRADIO_TEMP_DIR`` or ``<tmp>/gradio``."""
    return Path(os.environ.get(_ENV) or Path(tempfile.gettempdir()) / "gradio")


@dataclass
class RunFolder:
    """This run's temp folder and the open, locked lock file that marks it as alive."""

    path: Path
    _lock: Optional[IO[bytes]] = None

    def remove(self) -> None:
        """Delete the folder and everything in it (uploads, heat maps); then let the lock go."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _try_lock(path: Path) -> Optional[IO[bytes]]:
    """``path`` opened with an exclusive, non-blocking ``flock``; ``None`` if another process holds it."""
    handle = open(path, "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def remove_stale_runs(root: Union[str, os.PathLike]) -> int:
    """Delete the ``run-*`` folders under ``root`` whose run has ended (lock file present and free); count them."""
    root = Path(root)
    removed = 0
    if not root.is_dir():
        return 0
    for folder in sorted(root.iterdir()):
        lock_file = folder / LOCK_NAME
        if not folder.name.startswith("run-") or folder.is_symlink() or not folder.is_dir():
            continue
        if lock_file.is_symlink() or not lock_file.is_file():
            continue
        handle = _try_lock(lock_file)
        if handle is None:  # a live app's folder
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        finally:
            handle.close()
    if removed:
        logger.info("Deleted the temp files of %d earlier run(s) of the app", removed)
    return removed


def claim_run_folder(parent: Optional[Union[str, os.PathLike]] = None, *, set_env: bool = True) -> RunFolder:
    """Make this run's temp folder (after deleting those of ended runs) and, by default, point Gradio at it.

    ``parent`` defaults to :func:`gradio_temp_parent`. With ``set_env`` the
    folder becomes ``$GRADIO_TEMP_DIR``: call this before the Blocks is built.
    """
    root = Path(parent or gradio_temp_parent()) / APP_TEMP_NAME
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_runs(root)
    path = root / f"run-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    lock = _try_lock(path / LOCK_NAME)
    if lock is None:  # nobody else can know this fresh name
        raise RuntimeError(f"Could not lock the app's new temp folder {path}.")
    if set_env:
        os.environ[_ENV] = str(path)
    return RunFolder(path, lock)


class GracefulStop:
    """While inside, SIGTERM stops the app as Gradio's own ``Blocks.close()`` does, or as Ctrl-C before there is one.

    Set :attr:`blocks` once the app is built: SIGTERM then closes it (its
    queue, the browser tabs' heartbeat streams, its server), ``launch``
    returns and the caller's ``finally`` runs. Without it (still starting),
    SIGTERM raises ``KeyboardInterrupt``. Ctrl-C's path closes only the
    server, which then waits for open tabs' heartbeats; closing the Blocks
    ends them first. Only the main thread may install a handler; elsewhere
    this does nothing.
    """

    def __init__(self) -> None:
        self.blocks: Optional[Any] = None
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.blocks is None:
            raise KeyboardInterrupt(f"signal {signum}")
        logger.info("SIGTERM: closing the app")
        self.blocks.close()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


__all__ = ["APP_TEMP_NAME", "LOCK_NAME", "RunFolder", "claim_run_folder", "gradio_temp_parent",
           "remove_stale_runs", "GracefulStop"]
