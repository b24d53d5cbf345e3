"""Backbone passes in worker processes, so one CPU app can use more than one core.

The app answers requests from threads of one Python process. On a CPU-only
machine the threads take turns on one interpreter lock (the GIL) for
everything written in Python: Gradio's request handling (three HTTP requests
per API call), and the diffusion backbone's forward pass, which for a small
model is mostly Python-level module calls between short kernels. Measured
with ``benchmarks/bench_app.py --clients 8`` on 2 cores (``docs/benchmarks.md``,
issue 10): 8 clients got about the throughput of one client (1.03×), the
server process never going past about 1.2 cores.

A worker process has an interpreter of its own. :class:`BackboneWorkers` runs
the backbone pass (:meth:`~revelio_hub.app.state.AppState._backbone_pass`,
pure by design: image in, feature maps out) in ``n`` such processes, so the
server process handles other requests while a pass runs. The feature cache,
the SAEs, Diff-C and the atlas stay in the server process; the backbone, the
largest model, is loaded in the workers only, so memory does not double.

Used for ``device="cpu"`` only: on a GPU the kernels release the GIL and the
model should not be copied, and on ZeroGPU ``spaces.GPU`` already runs the
same pass in its own worker (:mod:`revelio_hub.app.gpu`).

Answers are the same as in-process ones, bit for bit: the worker runs the
same code with the same torch thread count, and returns the maps as float32
arrays (``tests/test_app_workers.py``). A worker that dies (killed, out of
memory) fails the calls it was running with a clear error, and the next call
starts a fresh pool; workers exit when the server process dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import torch

from revelio_hub.interpret.ood import sae_error

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

#: What a caller sees when a worker process died during its pass.
WORKER_DIED = "The backbone worker process stopped during this request (out of memory?); please try again."
#: Added when no worker ever answered: the usual cause is a script without a main guard (``spawn``
#: re-imports the script in each worker).
NEVER_STARTED = (" No worker has answered since start-up: a script that starts workers must do so under "
                 "`if __name__ == \"__main__\":`.")


def default_workers(device: str, cpu_count: Optional[int] = None) -> int:
    """Backbone worker processes for ``app.py``: one on a CPU machine with at least 2 cores, else none.

    One worker and the server process share two cores; more workers would
    compete with the server process for the same cores (more than one is
    unmeasured; pass ``--workers`` to try).
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 1 if device == "cpu" and cores >= 2 else 0


class WorkerDied(RuntimeError):
    """A backbone worker process stopped during the call (its message is meant for the user)."""


class PassRunner(Protocol):
    """What a worker process needs of the app state it builds: the backbone pass and the releases.

    :class:`~revelio_hub.app.state.AppState` is one. Named here, below the
    state, so this module needs nothing from it: the state hands the pool a
    picklable function that builds its worker-side copy (``build_state``).
    """

    def _backbone_pass(self, release_id: str, image: "Image.Image", layers: list[str], t: int,
                       size: Optional[int], seed: int, ensemble: int) -> dict[str, torch.Tensor]: ...

    def get_release(self, release_id: Optional[str] = None) -> Any: ...

    def backbone(self, rel: Any, image_size: Optional[int] = None) -> Any: ...


# ------------------------------------------------------------ worker side

#: The worker process's own app state (releases, backbone cache), built once by :func:`_start_worker`.
_WORKER_STATE: Optional[PassRunner] = None


def _exit_with_parent() -> None:
    """Stop this worker when the server process dies (even by SIGKILL, which runs no clean-up there)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="revelio-parent-watch", daemon=True).start()


def _start_worker(build_state: Callable[[], PassRunner], threads: int) -> None:
    """Pool initializer: build this process's app state with the server's ``build_state``."""
    global _WORKER_STATE
    _exit_with_parent()
    torch.set_num_threads(threads)
    _WORKER_STATE = build_state()


def _worker_pass(release_id: str, image: "Image.Image", layers: list[str], t: int, size: Optional[int],
                 seed: int, ensemble: int, error_layers: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """One backbone pass in the worker, and the reconstruction error of ``error_layers``' SAEs on its maps.

    The maps travel back as numpy arrays (cheaper to send than tensors).
    """

    assert _WORKER_STATE is not None, "worker used before its initializer ran"
    maps = _WORKER_STATE._backbone_pass(release_id, image, layers, t, size, seed, ensemble)
    rel = _WORKER_STATE.get_release(release_id)
    errors = {layer: sae_error(rel.entry(layer, t).sae, maps[layer]) for layer in error_layers if layer in maps}
    return {layer: value.numpy() for layer, value in maps.items()}, errors


def _worker_load(release_id: str, size: Optional[int]) -> int:
    """Load a release's backbone in the worker (warm-up); returns the worker's pid."""
    assert _WORKER_STATE is not None, "worker used before its initializer ran"
    _WORKER_STATE.backbone(_WORKER_STATE.get_release(release_id), size)
    return os.getpid()


# ------------------------------------------------------------ server side


class BackboneWorkers:
    """A pool of ``n`` processes that run backbone passes for one :class:`~revelio_hub.app.state.AppState`.

    Processes start on first use (``spawn``: a fresh interpreter, nothing
    inherited from the server's threads) and each loads the backbones it is
    asked for once. ``build_state`` makes a worker's own state there; it is
    sent to the worker, so it must pickle (a module-level function or
    classmethod, or a ``functools.partial`` of one).
    """

    def __init__(self, build_state: Callable[[], PassRunner], n: int, threads: Optional[int] = None) -> None:
        if n < 1:
            raise ValueError(f"BackboneWorkers needs at least 1 process, got {n}.")
        self.n = int(n)
        self.threads = int(threads or torch.get_num_threads())
        self._build_state = build_state
        self._pool: Optional[ProcessPoolExecutor] = None
        self._lock = threading.Lock()
        self.restarts = 0
        self._answered = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.n, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker, initargs=(self._build_state, self.threads),
                )
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Forget a broken pool (the next call starts a new one)."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
                self.restarts += 1
        pool.shutdown(wait=False, cancel_futures=True)

    def _broken(self, pool: ProcessPoolExecutor) -> WorkerDied:
        logger.error("A backbone worker process died; starting a new pool for the next request")
        self._discard(pool)
        return WorkerDied(WORKER_DIED + ("" if self._answered else NEVER_STARTED))

    def _call(self, fn: Any, *args: Any) -> Any:
        pool = self._executor()
        try:
            result = pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise self._broken(pool) from None
        self._answered = True
        return result

    def features(self, release_id: str, image: "Image.Image", layers: list[str], t: int, size: Optional[int],
                 seed: int, ensemble: int, error_layers: Sequence[str] = ()
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """``({layer: 1×C×H×W} float32 CPU maps, {layer: SAE reconstruction error})`` of one image.

        The maps are what :meth:`AppState._backbone_pass` returns; the errors are
        those of the SAEs of ``error_layers`` on them (the app's out-of-distribution
        check), computed in the worker so the server process has less to do.
        """
        maps, errors = self._call(_worker_pass, release_id, image, list(layers), int(t), size, int(seed),
                                  int(ensemble), list(error_layers))
        return {layer: torch.from_numpy(value) for layer, value in maps.items()}, errors

    def backbone_pass(self, release_id: str, image: "Image.Image", layers: list[str], t: int,
                      size: Optional[int], seed: int, ensemble: int) -> dict[str, torch.Tensor]:
        """``{layer: 1×C×H×W}`` float32 CPU maps, as :meth:`AppState._backbone_pass` returns them."""
        return self.features(release_id, image, layers, t, size, seed, ensemble)[0]

    def load(self, release_id: str, size: Optional[int] = None) -> list[int]:
        """Load a release's backbone in the workers now (the app's warm-up); returns the pids that did.

        One task per worker is sent; a fast worker may take two, and the
        other then loads on its first request.
        """
        pool = self._executor()
        futures = [pool.submit(_worker_load, release_id, size) for _ in range(self.n)]
        try:
            pids = sorted({f.result() for f in futures})
        except BrokenProcessPool:
            raise self._broken(pool) from None
        self._answered = True
        return pids

    def close(self) -> None:
        """Stop the workers (waits for running passes)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["BackboneWorkers", "PassRunner", "WorkerDied", "WORKER_DIED", "default_workers"]
