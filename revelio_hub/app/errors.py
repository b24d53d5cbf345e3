"""What a user sees when an event fails: their own mistake as it is, anything else as one plain sentence.

Every event of the app (the Analyze tab in :mod:`revelio_hub.app.ui`, the
Explain, Neuron, Compare and Concepts tabs in :mod:`revelio_hub.app.interpret_ui`)
runs inside :func:`user_errors`; it lives here, below both, so neither UI
module has to reach into the other for it.
"""

from __future__ import annotations

import contextlib
import html
import logging
from typing import Iterator

import gradio as gr

from revelio_hub.app.workers import WorkerDied

logger = logging.getLogger(__name__)

#: The one answer for an entry without a classifier, wherever it is met (the Analyze tab's predictions,
#: "Why this class?", ``/attribute_json``): it says what is missing, what that costs, and where to go instead.
NO_DIFFC = ("No Diff-C classifier at {layer} t={t}, so there are no predicted classes to show or explain. "
            "Entries with both a k-SAE and a Diff-C: {where}.")


@contextlib.contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Show ``ValueError``s as they are (HTML-escaped) and anything else as one plain sentence.

    Gradio renders error messages as HTML, and messages may quote what the
    user sent (a file name, a layer name): escaping keeps that text inert.
    """
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, WorkerDied) as exc:
        raise gr.Error(html.escape(str(exc), quote=False), print_exception=False) from None
    except Exception as exc:  # the user gets a sentence; the log its kind, the traceback at DEBUG level
        # An exception's message and traceback may quote what a client sent (a path, a huge string), so the
        # default log level gets one line; an operator chasing a bug turns on DEBUG for the traceback.
        logger.error("Unexpected %s while %s (traceback at DEBUG level)", type(exc).__name__, action)
        logger.debug("Traceback of the unexpected error while %s", action, exc_info=True)
        raise gr.Error(
            f"Something went wrong while {action} ({type(exc).__name__}). "
            "Try another image or setting; the server log names the error.",
            print_exception=False,
        ) from None


__all__ = ["NO_DIFFC", "user_errors"]
