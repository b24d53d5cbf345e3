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

**Sessions of scripts are not kept.** A session is also where Gradio keeps
a call's ``gr.State`` values (the Analyze tab's result, with its images),
and it keeps up to 10,000 sessions: 2,000 scripted calls mixing every
endpoint grew the server by 371.7 MB before this, 30.0 MB after
(``bench_app.py --soak``, ``docs/benchmarks.md``, issue 22). A browser tab holds a heartbeat connection
(``GET /gradio_api/heartbeat/<session>``) for as long as it is open; a script
never opens one. :class:`HeartbeatMarker` (ASGI middleware) tells the session
store which sessions have an open heartbeat, and :class:`LeanStateHolder`
keeps every other session only among the last :data:`UNCONFIRMED_SESSIONS`:
enough for a script that chains a few calls in one session, and for a page
whose first event reaches the server before its heartbeat does. A tab that
closes its heartbeat joins them, so its state goes soon after it.

**Why not Gradio's documented clean-up.** ``launch(state_session_capacity=...)``
counts an open browser tab like a script's call, ``gr.State(time_to_live=...)``,
``delete_callback`` and ``Blocks.unload`` clean state values, not sessions, and
none avoids rendering every component per new session (6.578 ms and 173.2 KB
for Gradio's own, 0.072 ms and 17.9 KB lean: ``bench_sessions.py``, cpu2,
2026-12-03, ``docs/benchmarks.md``). This relies on Gradio internals, tested on
the version ``pyproject.toml`` pins (:mod:`revelio_hub.app.gradio_version`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Iterable, Iterator, MutableMapping

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


#: Sessions without an open browser heartbeat (API scripts) kept at once; older ones are dropped with their state.
UNCONFIRMED_SESSIONS = 32


class LeanStateHolder(StateHolder):
    """Gradio's ``StateHolder`` creating :class:`LeanSessionState` sessions, and keeping only a few of the
    sessions that no open browser tab holds (:data:`UNCONFIRMED_SESSIONS`, oldest dropped first)."""

    #: How many sessions without an open heartbeat are kept (an instance may set its own).
    unconfirmed_limit: int = UNCONFIRMED_SESSIONS

    def _bookkeeping(self) -> None:
        if "_unconfirmed" not in vars(self):  # the instance was switched to this class after it was made
            self._unconfirmed: "OrderedDict[str, None]" = OrderedDict()
            self._browser: set[str] = set()

    def __getitem__(self, session_id: str) -> SessionState:
        self._bookkeeping()
        with self.lock:
            if session_id not in self.session_data:
                self.session_data[session_id] = LeanSessionState(self.blocks)
                if session_id not in self._browser:
                    self._remember(session_id)
        return super().__getitem__(session_id)

    def _remember(self, session_id: str) -> None:
        """Count ``session_id`` among the unconfirmed sessions; drop the oldest beyond the limit (lock held)."""
        self._unconfirmed[session_id] = None
        self._unconfirmed.move_to_end(session_id)
        while len(self._unconfirmed) > self.unconfirmed_limit:
            old, _ = self._unconfirmed.popitem(last=False)
            self.session_data.pop(old, None)
            self.time_last_used.pop(old, None)
            self._forget_queue_entries(old)

    def _forget_queue_entries(self, session_id: str) -> None:
        """Drop what Gradio's queue keeps per session once none of its events is pending.

        Gradio 6.31 keeps, for every session that ever sent an event, its set
        of pending event ids (never removed once empty) and its message queue
        (the last 2,000): one of each per scripted call, for ever.
        """
        queue = getattr(getattr(self, "blocks", None), "_queue", None)
        pending = getattr(queue, "pending_event_ids_session", None)
        messages = getattr(queue, "pending_messages_per_session", None)
        if not isinstance(pending, dict) or pending.get(session_id):  # an event of it still waits or runs
            return
        pending.pop(session_id, None)
        if isinstance(messages, dict):
            messages.pop(session_id, None)

    def heartbeat_opened(self, session_id: str) -> None:
        """A browser tab holds ``session_id`` open: keep it as Gradio would."""
        self._bookkeeping()
        with self.lock:
            self._browser.add(session_id)
            self._unconfirmed.pop(session_id, None)

    def heartbeat_closed(self, session_id: str) -> None:
        """The tab went away: its session is kept like a script's, so it goes once newer ones push it out."""
        self._bookkeeping()
        with self.lock:
            self._browser.discard(session_id)
            if session_id in self.session_data:
                self._remember(session_id)

    @property
    def browser_sessions(self) -> frozenset:
        """Sessions whose browser tab holds a heartbeat open now."""
        self._bookkeeping()
        return frozenset(self._browser)

    @property
    def unconfirmed(self) -> int:
        """How many sessions without an open heartbeat are kept now."""
        self._bookkeeping()
        return len(self._unconfirmed)


_HEARTBEAT = re.compile(r"/heartbeat/([^/]+)/?$")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class HeartbeatMarker:
    """ASGI middleware: tells the app's session store when a browser opens and closes its heartbeat.

    Added with ``launch(app_kwargs={"middleware": [Middleware(HeartbeatMarker)]})``; the store is the
    serving app's own (``scope["app"].state_holder``), so two apps in one process never share one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        match = _HEARTBEAT.search(scope.get("path", "")) if scope.get("type") == "http" else None
        holder = getattr(scope.get("app"), "state_holder", None) if match else None
        if not isinstance(holder, LeanStateHolder):
            await self.app(scope, receive, send)
            return
        session_id = match.group(1)
        holder.heartbeat_opened(session_id)
        try:
            await self.app(scope, receive, send)
        finally:
            holder.heartbeat_closed(session_id)


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


__all__ = [
    "HeartbeatMarker",
    "LazyConfigs",
    "LeanSessionState",
    "LeanStateHolder",
    "UNCONFIRMED_SESSIONS",
    "lean_sessions_supported",
    "use_lean_sessions",
]
