"""What Gradio's per-call bookkeeping costs the app, and what the app's settings save (issue 10 §2).

Every API call without a session id (curl, httpx) makes Gradio create a
session, and every finished event makes its queue recompute a monitoring
summary. Measured here on the app's own Blocks, in this process:

* creating a session: Gradio's ``SessionState`` vs the app's
  ``LeanSessionState`` (``revelio_hub/app/sessions.py``), time and memory
  kept per session (``tracemalloc``), and the lean session after an
  ``/analyze_json`` call's reads (its image input's entry rendered);
* the queue's analytics summary (``Queue.compute_analytics_summary``) over
  200 and 10,000 recorded events, recomputed after every event (Gradio's
  default) vs every ``ANALYTICS_EVERY`` events (the app's setting).

    python benchmarks/bench_sessions.py [--json]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc


def _per_call_ms(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - start) / n


def _kept_kb(make, n: int) -> float:
    kept = []
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        kept.append(make())
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200, help="sessions created per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from gradio.state_holder import SessionState

    from revelio_hub.app.sessions import LeanSessionState
    from revelio_hub.app.state import AppConfig, AppState, DEFAULT_RELEASE_PATH
    from revelio_hub.app.ui import ANALYTICS_EVERY, build_ui

    demo = build_ui(AppState.from_config(AppConfig(releases=[str(DEFAULT_RELEASE_PATH)])))
    image_input = next(fn for fn in demo.fns.values() if fn.api_name == "analyze_json").inputs[0]._id

    def lean_after_call():
        session = LeanSessionState(demo)
        _ = image_input in session.config_values and session.config_values[image_input]  # what preprocessing reads
        return session

    n = args.sessions
    result = {
        "components": len(demo.blocks),
        "session_ms": {"gradio": round(_per_call_ms(lambda: SessionState(demo), n), 3),
                       "lean": round(_per_call_ms(lambda: LeanSessionState(demo), n), 3),
                       "lean_after_call": round(_per_call_ms(lean_after_call, n), 3)},
        "session_kept_kb": {"gradio": round(_kept_kb(lambda: SessionState(demo), n), 1),
                            "lean": round(_kept_kb(lambda: LeanSessionState(demo), n), 1),
                            "lean_after_call": round(_kept_kb(lean_after_call, n), 1)},
    }
    result["session_speedup"] = round(result["session_ms"]["gradio"] / result["session_ms"]["lean_after_call"], 1)

    queue = demo._queue
    summaries = {}
    for events in (200, 10_000):
        records = [{"time": time.time(), "status": "success", "function": f"fn{i % 5}", "process_time": 0.05,
                    "session_hash": f"s{i}"} for i in range(events)]

        def summary(every: int) -> float:
            queue.ANAYLTICS_CACHE_FREQUENCY = every
            queue.events_recorded, queue.event_count_at_last_cache = 0, 0
            rounds = max(20, 3 * every)  # finished events; one recomputation per ``every`` of them
            start = time.perf_counter()
            for _ in range(rounds):
                queue.events_recorded += 1
                queue.compute_analytics_summary(records)
            return 1000 * (time.perf_counter() - start) / rounds

        queue.events_recorded, queue.event_count_at_last_cache = 1, 0
        queue.compute_analytics_summary(records)  # warm-up: pandas is imported on first use

        summaries[str(events)] = {"gradio_default_ms_per_event": round(summary(1), 3),
                                  "app_ms_per_event": round(summary(ANALYTICS_EVERY), 3)}
    result["analytics_summary"] = {"every": ANALYTICS_EVERY, "events": summaries}

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ms, kb = result["session_ms"], result["session_kept_kb"]
        print(f"app Blocks with {result['components']} components")
        print(f"new session: Gradio {ms['gradio']} ms, lean {ms['lean']} ms, lean after an /analyze_json call's "
              f"reads {ms['lean_after_call']} ms ({result['session_speedup']}× faster)")
        print(f"kept per session: Gradio {kb['gradio']} KB, lean {kb['lean']} KB, after a call {kb['lean_after_call']} KB")
        for events, row in summaries.items():
            print(f"analytics summary with {events} events recorded: {row['gradio_default_ms_per_event']} ms per event "
                  f"(every event) vs {row['app_ms_per_event']} ms (every {ANALYTICS_EVERY})")
    return result


if __name__ == "__main__":
    main()
