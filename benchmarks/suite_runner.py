"""Guarded, time-capped steps for the GPU suite, and the one table and one JSON they report.

GPU time comes in minutes, so one run must say as much as possible: every step
runs in a guard (an exception is recorded with its traceback tail and the next
step runs), under its own time cap carved from the total budget, and keeps the
figures it measured before it failed or ran out of time.

A step's cap is its share of the budget still left, so time a fast step does
not use goes to the steps after it. The cap is enforced twice: steps ask
:meth:`StepRecord.time_left` before each piece of work and leave out what no
longer fits (their status becomes ``timed out``, the left-out pieces listed in
``notes``); and an interval timer (``SIGALRM``, main thread on POSIX) raises
:class:`StepTimeout` into a step that overruns anyway.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

#: Status values of a step, as they appear in the table and the JSON.
OK, FAILED, SKIPPED, TIMED_OUT = "ok", "failed", "skipped", "timed out"
TRACEBACK_TAIL_LINES = 12


class StepTimeout(BaseException):
    """Raised into a step that runs past its time cap (a ``BaseException``, so that
    ``except Exception`` blocks inside the measured code cannot swallow it)."""


@dataclass
class Figure:
    """One measured number. ``value`` is ``None`` when it cannot be measured here (``note`` says why)."""

    value: Optional[float]
    unit: str
    goal: Optional[str] = None
    note: Optional[str] = None


@dataclass
class StepRecord:
    """What one step did: status, time, the figures it measured, and why it failed or was skipped."""

    name: str
    title: str
    status: str = "not run"
    seconds: float = 0.0
    cap_s: float = 0.0
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reason: Optional[str] = None
    error: Optional[dict[str, str]] = None
    _deadline: float = field(default=math.inf, repr=False)
    _cut: bool = field(default=False, repr=False)

    def add(self, key: str, value: Optional[float], unit: str, goal: Optional[str] = None,
            note: Optional[str] = None) -> None:
        """Record a figure as soon as it is measured (it survives a later failure)."""
        self.figures[key] = Figure(None if value is None else float(value), unit, goal, note)

    def time_left(self) -> float:
        return self._deadline - time.monotonic()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` of work still fit under the cap; if not, note ``what`` as left out."""
        if self.time_left() >= seconds:
            return True
        self._cut = True
        self.notes.append(f"left out (time cap): {what}")
        return False

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["seconds"] = round(self.seconds, 2)
        data["cap_s"] = round(self.cap_s, 1)
        return data


@dataclass
class Step:
    """A unit of the suite: ``run(record)`` measures and calls ``record.add``.

    ``skip`` returns a reason to skip (missing package, too few GPUs) or ``None``.
    ``share`` is the step's weight when the budget is divided.
    """

    name: str
    title: str
    run: Callable[[StepRecord], None]
    share: float = 1.0
    skip: Callable[[], Optional[str]] = lambda: None


def _traceback_tail(exc: BaseException, lines: int = TRACEBACK_TAIL_LINES) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return "\n".join(text[-lines:])


class _Alarm:
    """Raise :class:`StepTimeout` after ``seconds`` (no-op off the main thread or without SIGALRM)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _fire(self, signum, frame):  # noqa: ARG002
        raise StepTimeout(f"step ran past its {self.seconds:.0f} s cap")

    def __enter__(self) -> "_Alarm":
        if self.armed:
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.01))
        return self

    def __exit__(self, *exc) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


def run_steps(steps: list[Step], budget_s: float, log: Callable[[str], None] = print,
              cleanup: Optional[Callable[[], None]] = None) -> list[StepRecord]:
    """Run ``steps`` in order, each guarded and capped; return one record per step.

    A step's cap is ``budget left × share / shares of the steps still to run``
    (steps skipped up front take no share). ``cleanup`` runs after every step
    (free accelerator memory) and its own errors are only logged.
    """
    records = [StepRecord(s.name, s.title) for s in steps]
    to_run = []
    for step, record in zip(steps, records):
        try:
            reason = step.skip()
        except Exception as exc:  # a broken skip check is a failure of that step, not of the suite
            record.status, record.error = FAILED, {"type": type(exc).__name__, "message": str(exc),
                                                   "traceback_tail": _traceback_tail(exc)}
            continue
        if reason:
            record.status, record.reason = SKIPPED, reason
            log(f"[{step.name}] skipped: {reason}")
        else:
            to_run.append((step, record))
    end = time.monotonic() + budget_s
    for i, (step, record) in enumerate(to_run):
        left = end - time.monotonic()
        shares = sum(s.share for s, _ in to_run[i:])
        record.cap_s = max(1.0, left * step.share / shares)
        record._deadline = time.monotonic() + record.cap_s
        log(f"[{step.name}] {step.title} (cap {record.cap_s:.0f} s)")
        start = time.monotonic()
        try:
            with _Alarm(record.cap_s):
                step.run(record)
            record.status = TIMED_OUT if record._cut else OK
        except StepTimeout as exc:
            record.status = TIMED_OUT
            record.notes.append(str(exc))
        except Exception as exc:
            record.status = FAILED
            record.error = {"type": type(exc).__name__, "message": str(exc).splitlines()[0] if str(exc) else "",
                            "traceback_tail": _traceback_tail(exc)}
            log(f"[{step.name}] FAILED: {type(exc).__name__}: {record.error['message']}")
        finally:
            record.seconds = time.monotonic() - start
        if cleanup is not None:
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001
                log(f"[{step.name}] cleanup: {type(exc).__name__}: {exc}")
        log(f"[{step.name}] {record.status} in {record.seconds:.1f} s")
    return records


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.4g}"


def render_table(records: list[StepRecord], header: str = "") -> str:
    """One plain-text table: a line per step (status, time/cap), then a line per figure."""
    rows = [header] if header else []
    rows.append(f"{'step':<10} {'status':<10} {'time/cap s':>11}  {'figure':<46} {'value':>12}  unit / goal")
    rows.append("-" * 110)
    for r in records:
        timing = f"{r.seconds:.0f}/{r.cap_s:.0f}" if r.status != SKIPPED else "-"
        first = f"{r.name:<10} {r.status:<10} {timing:>11}  "
        lines = []
        for key, fig in r.figures.items():
            tail = fig.unit + (f"  (goal {fig.goal})" if fig.goal else "") + (f"  [{fig.note}]" if fig.note else "")
            lines.append(f"{key:<46} {_fmt(fig.value):>12}  {tail}")
        if r.reason:
            lines.append(f"reason: {r.reason}")
        if r.error:
            lines.append(f"error: {r.error['type']}: {r.error['message']}"[:110])
        lines += r.notes
        if not lines:
            lines = [""]
        rows.append(first + lines[0])
        rows += [" " * len(first) + line for line in lines[1:]]
    return "\n".join(rows)


def print_now(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
