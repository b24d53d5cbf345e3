"""Optional ZeroGPU support: ``spaces.GPU`` when the ``spaces`` package is installed, a no-op otherwise.

ZeroGPU (the free shared GPU of Hugging Face Spaces) lends a GPU only while a
function decorated with ``spaces.GPU`` runs. On such a Space the call runs in
a *forked worker process*: its arguments and its return value are pickled, and
whatever it caches in memory stays in the worker. So the decorated function in
this app is the pure backbone pass (image in, CPU feature maps out, see
:meth:`revelio_hub.app.state.AppState.feature_maps`); the feature cache is
filled by the caller, in the main process.

Models follow the ZeroGPU pattern when the app's device is ``auto``: they load
on the CPU at start-up, and the decorated call moves the backbone to CUDA when
CUDA is there (inside the worker on ZeroGPU; once, in place, on an ordinary
GPU machine). Everywhere else (``spaces`` missing, or installed but not on
ZeroGPU, where ``spaces.GPU`` returns the function unchanged) nothing changes.

Install it with ``pip install spaces``; the generated Space for ``zero-a10g``
hardware lists it in its requirements (:mod:`revelio_hub.space`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds of GPU one analysis may hold. ZeroGPU counts the time actually used against the
#: visitor's quota and uses this as the upper bound when scheduling (shorter bounds are
#: scheduled sooner). One call is one image's backbone pass, plus, in a fresh worker, the copy
#: of the backbone to the GPU (SD 1.5's UNet alone: 860M parameters, 3.4 GB in float32). Unmeasured on
#: ZeroGPU: 30 s is an estimate with a wide margin for both, and for ``ensemble`` > 1.
GPU_DURATION_S = 30

#: ``AppConfig.device`` values that mean "use CUDA when the decorated call finds it".
AUTO_DEVICE = "auto"


def _identity(fn: F) -> F:
    return fn


def gpu_task(duration: int = GPU_DURATION_S) -> Callable[[F], F]:
    """A decorator that holds a ZeroGPU GPU for the call, or does nothing without ``spaces``.

    ``spaces`` is looked up at decoration time (not at import), so a process
    that installs or fakes it before building the app state gets it.
    """
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return _identity
    return spaces.GPU(duration=duration)


def load_device(device: str) -> str:
    """Where models load at start-up: the CPU for ``auto`` (ZeroGPU moves them later), else ``device``."""
    return "cpu" if device == AUTO_DEVICE else device


def call_device(device: str) -> str:
    """Where the decorated call runs the backbone: CUDA for ``auto`` when there is one, else ``device``."""
    if device != AUTO_DEVICE:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["GPU_DURATION_S", "AUTO_DEVICE", "gpu_task", "load_device", "call_device"]
