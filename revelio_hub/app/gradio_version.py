"""The Gradio version the app's workarounds were tested on, and a start-up warning when another is installed.

Three parts of the app lean on Gradio internals that no public API covers:
:mod:`revelio_hub.app.sessions` (swaps the class of Gradio's ``StateHolder``,
builds ``SessionState`` without its rendering loop, calls
``config_for_block``), :class:`revelio_hub.app.ui.ServedBlocks` (overrides
``Blocks.preprocess_data``) and :mod:`revelio_hub.app.temp_files` (calls
``route_utils.delete_files_created_by_app``). ``pyproject.toml`` pins Gradio
to the minor version they were tested on; an install that bypasses the pin
(a Space's ``sdk_version``, ``pip install --no-deps``) gets one warning line at
start-up naming both versions, so a changed behaviour has a visible suspect.
Gradio's patch releases do not change these internals' shape, so only the
minor version is compared.

**Why the workarounds stay** (reviewed against Gradio 6.31's documented
resource-clean-up mechanisms):

* ``launch(state_session_capacity=N)`` bounds how many sessions are kept, but
  counts a browser tab like a script's call: a cap low enough to bound scripted
  traffic (the app keeps 32 script sessions) would drop the state of the 33rd
  open tab. ``gr.State(time_to_live=...)``, ``delete_callback`` and
  ``Blocks.unload`` expire or clean *state values* (and ``unload`` fires only
  for browser tabs), not the ``SessionState`` itself, and none of them avoids
  rendering every component's configuration for each new session.
  ``delete_cache`` concerns files, not sessions. Measured cost of that
  rendering, which only :mod:`revelio_hub.app.sessions` avoids:
  ``python benchmarks/bench_sessions.py`` on cpu2, 2 cores, load ≈ 1.8,
  2026-12-03, Gradio 6.31.0, 120 components: a new session 6.578 ms with
  Gradio's own ``SessionState`` against 0.072 ms lean after an
  ``/analyze_json`` call's reads, 173.2 KB kept against 17.9 KB
  (``docs/benchmarks.md``, "Gradio pin and the workarounds it protects").
* ``ServedBlocks.preprocess_data``: Gradio vets a ``FileData`` payload before
  any event function or ``gr.Request`` hook runs, and reports a refusal with
  the absolute server path inside the event's stream (a later request than
  the one carrying the payload). ASGI middleware would have to rewrite that
  event stream; no public hook runs between receiving the payload and vetting
  it, so the override stays (``tests/test_app_security.py``).
"""

from __future__ import annotations

import logging
from typing import Optional

import gradio

logger = logging.getLogger(__name__)

#: ``major.minor`` of the Gradio the internals above were tested on; ``pyproject.toml`` pins the same.
TESTED_GRADIO = "6.31"


def minor_version(version: str) -> str:
    """``"6.31.0"`` → ``"6.31"``; pre-release and local tags after the minor number are ignored."""
    parts = version.split(".")
    return ".".join(parts[:2])


def untested_gradio_message(installed: str, expected: str = TESTED_GRADIO) -> Optional[str]:
    """The warning for ``installed`` Gradio, or None when its minor version is ``expected``."""
    if minor_version(installed) == expected:
        return None
    return (
        f"Gradio {installed} is installed; this app was tested on Gradio {expected}.x "
        f"(pip install \"gradio[mcp]~={expected}.0\"). Its session store, upload checks and temp-file "
        "clean-up use Gradio internals that may behave differently on this version."
    )


def warn_if_untested_gradio(installed: Optional[str] = None) -> Optional[str]:
    """Log :func:`untested_gradio_message` for the installed Gradio (or ``installed``) as a warning; returns it."""
    message = untested_gradio_message(installed or gradio.__version__)
    if message:
        logger.warning(message)
    return message


__all__ = ["TESTED_GRADIO", "minor_version", "untested_gradio_message", "warn_if_untested_gradio"]
