"""Gradio sessions that cost nothing until used: the per-call price of an API request.

Gradio keeps a ``SessionState`` per session id, and an API call without one
(``curl``, ``httpx``: every ``/call/<api>`` request) is a new session, kept
until 10,000 newer ones push it out. Building it renders the configuration of
every component of the app (103 here) through ``inspect.signature``:
4.8 ms of Python per request, and 156 KB kept per call, against 0.04 ms and
18 KB for a lean session after a call's reads (``benchmarks/bench_sessions.py``,
figures in ``docs/benchmarks.md``, issue 10). On the toy release that was one
of the largest costs of ``/analyze_json`` after the backbone.

That configuration is read whole only by Gradio's deep links; an event reads
the entries of its own inputs and outputs. :class:`LeanSessionState` renders
each entry on first read instead (:class:`LazyConfigs`), with Gradio's own
code; everything else about the session is Gradio's. :func:`use_lean_sessions` switches one app's
``StateHolder`` to create such sessions. If a Gradio version builds sessions
differently, the check in :func:`lean_sessions_supported` fails and Gradio's
own sessions are used, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

from gradio.state_holder import SessionState, StateHolder

logger = logging.getLogger(__name__)


class LazyConfigs(dict):
    """A dict of per-component configs, each rendered on first read of its key.

    ``keys`` are the components the dict stands for; ``render(key)`` makes
    one's config. A key is "in" the dict before it is rendered (Gradio asks
    ``key in configs`` before reading one, on every call with a file input);
    anything that walks the whole dict renders the rest first, in ``keys``
    order. A key set before it is rendered keeps the value set.
    """

    def __init__(self, keys: Iterable[Any], render: Callable[[Any], dict]) -> None:
        super().__init__()
        self._order = list(keys)
        self._pending = set(self._order)
        self._render = render
        self._ordered = False

    def _load_all(self) -> None:
        """Render what is pending and put the entries in ``keys`` order (once: later keys go last, as in a dict)."""
        if self._ordered:
            return
        done = dict(super().items())
        super().clear()
        for key in self._order:
            if key in done:
                super().__setitem__(key, done.pop(key))
            elif key in self._pending:
                super().__setitem__(key, self._render(key))
        for key, value in done.items():  # keys set from outside that were never pending
            super().__setitem__(key, value)
        self._pending.clear()
        self._ordered = True

    @property
    def loaded(self) -> bool:
        """True once every component's config is rendered."""
        return not self._pending

    def __getitem__(self, key: Any) -> Any:
        if key in self._pending:
            super().__setitem__(key, self._render(key))
            self._pending.discard(key)
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._pending.discard(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        if key in self._pending:
            self._pending.discard(key)
            return
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        return key in self._pending or super().__contains__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[Any]:
        self._load_all()
        return super().__iter__()

    def __len__(self) -> int:
        return len(self._pending) + super().__len__()

    def __eq__(self, other: object) -> bool:
        self._load_all()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def items(self):  # noqa: D102
        self._load_all()
        return super().items()

    def keys(self):  # noqa: D102
        self._load_all()
        return super().keys()

    def values(self):  # noqa: D102
        self._load_all()
        return super().values()

    def copy(self) -> dict:  # noqa: D102
        self._load_all()
        return dict(super().items())


class _ConfigFree:
    """What ``SessionState.__init__`` reads of a Blocks, with no components to render."""

    def __init__(self, blocks: Any) -> None:
        self.default_config = blocks.default_config
        self.blocks: dict = {}


class LeanSessionState(SessionState):
    """Gradio's ``SessionState`` whose ``config_values`` are rendered on first read, not at creation."""

    def __init__(self, blocks: Any) -> None:
        super().__init__(_ConfigFree(blocks))  # Gradio's own set-up, minus the rendering loop
        config = self.blocks_config
        self.config_values = LazyConfigs(
            [k for k in config.blocks if k in blocks.blocks],
            lambda k: config.config_for_block(k, [], config.blocks[k]),
        )


class LeanStateHolder(StateHolder):
    """Gradio's ``StateHolder`` creating :class:`LeanSessionState` sessions."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LeanSessionState(self.blocks)
        return super().__getitem__(session_id)


def lean_sessions_supported(blocks: Any) -> bool:
    """Does a lean session of ``blocks`` hold what Gradio's own would (same attributes, same configs once read)?"""
    try:
        plain, lean = SessionState(blocks), LeanSessionState(blocks)
        return set(vars(plain)) == set(vars(lean)) and dict(plain.config_values) == dict(lean.config_values.items())
    except Exception:  # a Gradio that builds sessions another way
        logger.debug("lean sessions unsupported", exc_info=True)
        return False


def use_lean_sessions(holder: StateHolder) -> StateHolder:
    """Make ``holder`` (an app's ``StateHolder``) create lean sessions; returns it.

    The instance is switched to the subclass in place: Gradio creates it inside
    its app and keeps references to it in several places. Anything but a
    plain ``StateHolder`` is left alone.
    """
    if type(holder) is StateHolder:
        holder.__class__ = LeanStateHolder
    return holder


__all__ = ["LazyConfigs", "LeanSessionState", "LeanStateHolder", "lean_sessions_supported", "use_lean_sessions"]
