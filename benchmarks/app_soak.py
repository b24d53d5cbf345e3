"""Scripted raw-HTTP traffic against a served app: does memory or the temp folder grow per call? (issue 22)

Used by ``python benchmarks/bench_app.py --soak N``. Every call is what a
script sends with ``curl``/``httpx``: no browser session, so Gradio sees a new
session each time (``POST /gradio_api/call/<api>``, or ``/gradio_api/queue/join``
with a fresh ``session_hash``). The calls cycle through every public endpoint
and a small pool of distinct images; the warm-up visits every (endpoint, image)
pair once, so what it fills (feature cache, content-addressed files) is full
before the first measurement, and growth after it is what traffic leaks.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

#: Endpoints in the order the soak cycles through them. "join:analyze" is the Analyze event through
#: ``/gradio_api/queue/join`` with a new session hash (what the page does, minus the page).
KINDS = ["upload", "analyze", "analyze_json", "search_neurons", "neuron", "attribute_json", "compare_json",
         "compare", "join:analyze"]
TAG = {"_type": "gradio.FileData"}


def tree_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory (MB) of ``pid`` and of each process below it (the backbone worker, its helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        out[str(p)] = round(rss / 1024, 1)
        todo += children.get(p, [])
    return out


def census(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root``."""
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                size += (Path(dirpath) / name).stat().st_size
                files += 1
            except OSError:
                pass
    return files, size


class SoakClient:
    """One keep-alive HTTP connection that calls the app's endpoints the way a script does."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=300)
        self.config = self.http.get(f"{self.url}/config").json()

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            r = self.http.post(f"{self.url}/gradio_api/upload", files={"files": (path.name, f, "image/png")})
        r.raise_for_status()
        return {"path": r.json()[0], "orig_name": path.name, "meta": TAG}

    def call(self, api_name: str, data: list) -> tuple[str, Any]:
        r = self.http.post(f"{self.url}/gradio_api/call/{api_name}", json={"data": data})
        r.raise_for_status()
        event = None
        with self.http.stream("GET", f"{self.url}/gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    return event, json.loads(line.split(":", 1)[1])
        raise RuntimeError(f"no answer from /{api_name}")

    def join(self, api_name: str, data: list) -> tuple[str, Any]:
        """The event named ``api_name`` through the queue, as the page sends it, from a session of its own."""
        fn_index = next(d["id"] for d in self.config["dependencies"] if d.get("api_name") == api_name)
        session = uuid.uuid4().hex[:11]
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
        self.http.post(f"{self.url}/gradio_api/queue/join", json=body).raise_for_status()
        with self.http.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed":
                    return ("complete" if msg.get("success") else "error"), msg.get("output")
        raise RuntimeError(f"no answer from {api_name} through the queue")

    def close(self) -> None:
        self.http.close()


def _request(client: SoakClient, kind: str, uploads: list[dict], images: list[Path], i: int, entry: tuple) -> str:
    """One call of ``kind`` on pool image ``i``; returns the event ("complete" or "error")."""
    layer, t, release = entry
    n = len(uploads)
    image, other = uploads[i % n], uploads[(i + 1) % n]
    if kind == "upload":
        uploads[i % n] = client.upload(images[i % n])  # the same bytes again: Gradio stores them once
        return "complete"
    if kind == "join:analyze":
        return client.join("analyze", [image, layer, t, release])[0]
    data = {
        "analyze": [image, layer, t, release],
        "analyze_json": [image, layer, t, release],
        "search_neurons": [["red", "circle", "stripes", "large"][i % 4], layer, t, release],
        "neuron": [release, layer, t, i % n],
        "attribute_json": [image, layer, t, release, ""],
        "compare_json": [image, other, layer, t, release],
        "compare": [image, other, layer, t, release],
    }[kind]
    return client.call(kind, data)[0]


def soak(url: str, server_pid: int, temp_root: Path, images: list[Path], calls: int, entry: tuple,
         samples: int = 8, log: Callable[[str], None] = lambda _: None) -> dict:
    """Warm up (every endpoint × image once), then ``calls`` calls; memory and temp folder before, during, after."""
    client = SoakClient(url)
    try:
        uploads = [client.upload(p) for p in images]
        warmup = len(KINDS) * len(images)

        def run(start: int, count: int) -> tuple[int, dict[str, int]]:
            errors, per_kind = 0, {}
            for i in range(start, start + count):
                kind = KINDS[i % len(KINDS)]
                event = _request(client, kind, uploads, images, i // len(KINDS), entry)
                per_kind[kind] = per_kind.get(kind, 0) + 1
                errors += event != "complete"
            return errors, per_kind

        warm_errors, _ = run(0, warmup)
        time.sleep(1)
        trace = [{"calls": 0, "rss_mb": sum(tree_rss_mb(server_pid).values()), "files": census(temp_root)[0]}]
        before = {"rss_mb": tree_rss_mb(server_pid), "temp": census(temp_root)}
        start, errors, per_kind, done = time.perf_counter(), 0, {}, 0
        step = max(1, calls // samples)
        while done < calls:
            count = min(step, calls - done)
            e, kinds = run(warmup + done, count)
            errors += e
            for k, v in kinds.items():
                per_kind[k] = per_kind.get(k, 0) + v
            done += count
            trace.append({"calls": done, "rss_mb": round(sum(tree_rss_mb(server_pid).values()), 1),
                          "files": census(temp_root)[0]})
            log(f"soak: {done}/{calls} calls, {trace[-1]}")
        wall = time.perf_counter() - start
        after = {"rss_mb": tree_rss_mb(server_pid), "temp": census(temp_root)}
    finally:
        client.close()
    rss_before, rss_after = sum(before["rss_mb"].values()), sum(after["rss_mb"].values())
    return {
        "calls": calls, "warmup_calls": warmup, "images": len(images), "endpoints": KINDS, "per_endpoint": per_kind,
        "errors": errors, "warmup_errors": warm_errors, "wall_s": round(wall, 1),
        "rss_mb_before": before["rss_mb"], "rss_mb_after": after["rss_mb"],
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "temp_files_before": before["temp"][0], "temp_files_after": after["temp"][0],
        "temp_file_growth": after["temp"][0] - before["temp"][0],
        "temp_mb_growth": round((after["temp"][1] - before["temp"][1]) / 2**20, 2),
        "trace": trace, "targets": {"rss_growth_mb": 50, "temp_file_growth": 100},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def repeated_big_image(url: str, server_pid: int, path: Path, calls: int, entry: tuple) -> dict:
    """Server CPU of ``/analyze_json`` calls that reference one uploaded large image again and again.

    The first call decodes the file whatever the app does; every later call
    names the same upload, so its cost is what a script can make the server
    spend per 200-byte request.
    """
    layer, t, release = entry
    client = SoakClient(url)
    try:
        image = client.upload(path)
        cpu = cpu_seconds(server_pid)
        first = client.call("analyze_json", [image, layer, t, release])[0]
        first_cpu, cpu = cpu_seconds(server_pid) - cpu, cpu_seconds(server_pid)
        events = [client.call("analyze_json", [image, layer, t, release])[0] for _ in range(calls)]
        cpu = cpu_seconds(server_pid) - cpu
    finally:
        client.close()
    return {"file_kib": round(path.stat().st_size / 1024, 1), "first_call": first,
            "first_call_server_cpu_ms": round(1000 * first_cpu, 1), "calls": calls,
            "errors": sum(e != "complete" for e in events),
            "server_cpu_ms_per_repeated_call": round(1000 * cpu / calls, 1)}
