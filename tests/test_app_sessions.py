"""Lean Gradio sessions (revelio_hub.app.sessions): the same session, rendered only where read.

Every API call without a session id makes Gradio create a session; the app's
lean sessions must hold exactly what Gradio's would, once read, while a call
renders only the components it touches.
"""

from __future__ import annotations

import os

import pytest
from app_inputs import FILEDATA_TAG, app_release_path, call, shape_image, upload  # noqa: E402

from gradio.state_holder import SessionState  # noqa: E402

from revelio_hub.app.sessions import LazyConfigs, LeanSessionState, LeanStateHolder, lean_sessions_supported  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402
from revelio_hub.app.ui import ANALYTICS_EVERY, ANALYTICS_EVERY_ENV, build_ui  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return build_ui(AppState.from_config(AppConfig(releases=[app_release_path()])))


def test_a_lean_session_holds_what_gradios_own_holds(demo):
    plain, lean = SessionState(demo), LeanSessionState(demo)
    assert set(vars(lean)) == set(vars(plain))
    assert lean.blocks_config.blocks == plain.blocks_config.blocks
    assert not lean.config_values.loaded
    key = list(plain.config_values)[len(plain.config_values) // 2]
    assert key in lean.config_values and len(lean.config_values) == len(plain.config_values)
    assert lean.config_values[key] == plain.config_values[key]
    assert not lean.config_values.loaded  # one key read, one key rendered
    assert list(lean.config_values) == list(plain.config_values)  # same components, same order
    assert dict(lean.config_values.items()) == dict(plain.config_values)
    assert lean_sessions_supported(demo)


def test_lazy_configs_keep_values_set_before_rendering():
    rendered = []

    def render(k):
        rendered.append(k)
        return {"k": k}

    cfg = LazyConfigs([1, 2, 3], render)
    cfg[2] = {"set": True}
    assert rendered == [] and 2 in cfg and 4 not in cfg
    del cfg[3]
    assert 3 not in cfg and len(cfg) == 2
    assert cfg.get(1) == {"k": 1} and rendered == [1]
    cfg[9] = {"extra": True}
    assert list(cfg.items()) == [(1, {"k": 1}), (2, {"set": True}), (9, {"extra": True})]
    assert rendered == [1]


def test_the_served_app_answers_api_calls_with_lean_sessions(tmp_path):
    from app_inputs import LaunchedApp

    app = LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()])))
    try:
        holder = app.demo.state_holder
        assert type(holder) is LeanStateHolder and app.demo.server_app.state_holder is holder
        before = set(holder.session_data)
        path = upload(app, shape_image(tmp_path / "a.png"))
        event, payload = call(app, "analyze_json", [{"path": path, "meta": FILEDATA_TAG}, "", -1, ""])
        assert event == "complete" and payload[0]["neurons"], payload
        new = [holder.session_data[s] for s in set(holder.session_data) - before]
        assert len(new) == 1 and isinstance(new[0], LeanSessionState)
        assert not new[0].config_values.loaded  # the call rendered only what it touched
        # The UI still works through sessions (a browser-like client with a session id).
        from gradio_client import Client, handle_file

        client = Client(app.url, verbose=False)
        out = client.predict(handle_file(str(tmp_path / "a.png")), "", -1, "", api_name="/analyze_json")
        assert out == payload[0]
    finally:
        app.close()


def test_the_queue_summarises_analytics_every_n_events_and_leaves_the_environment_alone(demo, monkeypatch):
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == ANALYTICS_EVERY
    assert ANALYTICS_EVERY_ENV not in os.environ
    monkeypatch.setenv(ANALYTICS_EVERY_ENV, "7")  # an operator's setting wins
    other = build_ui(AppState.from_config(AppConfig(releases=[app_release_path()])))
    assert other._queue.ANAYLTICS_CACHE_FREQUENCY == 7 and os.environ[ANALYTICS_EVERY_ENV] == "7"


def _fn_index(demo, name: str) -> int:
    return next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__name__", "") == name)


def test_sessions_of_scripts_are_dropped_and_a_browser_tabs_session_is_kept(tmp_path):
    """Scripted calls (no heartbeat) keep at most a few sessions, whatever their number; a tab with an open
    heartbeat keeps its analysis through them; once the tab closes, its session goes too (issue 22)."""
    import time
    import uuid

    from app_inputs import Heartbeat, LaunchedApp, queue_event

    with LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()]))) as app:
        holder = app.demo.state_holder
        holder.unconfirmed_limit = 4  # the default (32) works the same way, with more calls
        rel = app.state.get_release()
        layer, t = rel.default_entry()
        image = {"path": upload(app, shape_image(tmp_path / "a.png")), "meta": FILEDATA_TAG}
        tab, script = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
        heartbeat = Heartbeat(app.url, tab)
        deadline = time.monotonic() + 10
        while tab not in holder.browser_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tab in holder.browser_sessions
        analyze, select = _fn_index(app.demo, "analyze"), _fn_index(app.demo, "select_row")
        for session in (tab, script):
            first = queue_event(app, analyze, [image, layer, t, rel.name], session)
            assert first["success"], first
        neuron = first["output"]["data"][3]["value"]
        for i in range(12):  # scripted calls, each a new session
            assert call(app, "search_neurons", [["red", "circle"][i % 2], "", -1, ""])[0] == "complete"
        assert holder.unconfirmed <= 4 and len(holder.session_data) <= 5
        row = {"index": [0, 0], "value": neuron, "row_value": [neuron, 1.0, 1.0, ""], "selected": True}
        shown = queue_event(app, select, [None, layer, t, rel.name], tab, row)
        assert shown["success"] and shown["output"]["data"][1], shown  # the tab's analysis is still there
        gone = queue_event(app, select, [None, layer, t, rel.name], script, row)
        assert not gone["success"] and "Analyze an image first" in gone["output"]["error"], gone
        heartbeat.close()
        deadline = time.monotonic() + 10
        while tab in holder.browser_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tab not in holder.browser_sessions
        for i in range(6):
            call(app, "search_neurons", ["red", "", -1, ""])
        assert tab not in holder.session_data and len(holder.session_data) <= 4


def test_a_short_soak_of_every_endpoint_keeps_a_bounded_number_of_sessions(tmp_path):
    """100 scripted calls mixing every public endpoint (``bench_app.py --soak``'s mix, a new session each):
    the sessions, Gradio's per-session queue entries and the decoded uploads stay within their bounds."""
    from app_inputs import LaunchedApp
    from app_soak import soak

    from revelio_hub.app.decoded_images import DEFAULT_MAX_IMAGES
    from revelio_hub.app.sessions import UNCONFIRMED_SESSIONS

    images = [shape_image(tmp_path / f"{i}.png", color=(40 * i, 200 - 30 * i, 90)) for i in range(4)]
    with LaunchedApp(AppState.from_config(AppConfig(releases=[app_release_path()]))) as app:
        result = soak(app.url, os.getpid(), tmp_path / "unused", images, 100, ("", -1, ""))
        queue = app.demo._queue
        assert result["errors"] == 0 and result["warmup_errors"] == 0, result
        assert len(app.demo.state_holder.session_data) <= UNCONFIRMED_SESSIONS
        assert len(queue.pending_event_ids_session) <= UNCONFIRMED_SESSIONS
        assert len(queue.pending_messages_per_session) <= UNCONFIRMED_SESSIONS
        assert 0 < len(app.state.decoded) <= DEFAULT_MAX_IMAGES
