"""The Revelio Hub Gradio app: state and caches, analysis functions, and the Blocks UI.

``app.py`` at the repository root is the entry point; this package holds the
logic so tests can call every event function directly. Submodules import
Gradio and torch lazily where they can: the app must answer within seconds.
"""

from __future__ import annotations

from revelio_hub.app.state import AppConfig, AppState

__all__ = ["AppConfig", "AppState", "create_app"]


def create_app(config: "AppConfig | None" = None):
    """Load the configured releases and build the Gradio Blocks: ``(state, demo)``."""
    from revelio_hub.app.ui import build_ui

    state = AppState.from_config(config or AppConfig())
    return state, build_ui(state)
