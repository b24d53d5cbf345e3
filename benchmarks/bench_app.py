"""Latency of the app's ``/analyze_json`` through ``gradio_client``, and the cold start of ``python app.py``.

Starts the real app (``python app.py``) in a subprocess and measures:

* cold start: seconds from spawning the process until the server answers HTTP
  (what a Space visitor waits for), and until the first ``/analyze_json``
  result (includes loading the backbone);
* ``/analyze_json`` latency p50/p95 through ``gradio_client``, for new images
  (each call a different image: one backbone pass) and for a repeated image
  (feature-cache hit);
* two baselines run in this process: the same analysis called directly
  (``revelio_hub.app.analysis.analyze``, no server), and Gradio's floor, a
  no-op endpoint with the same signature and queue settings served here and
  called through the same kind of client (upload + queue + JSON, no work).
  On a busy machine the floor dominates; compare against it;
* with ``--clients N`` (N > 1), throughput under load: the same server is
  driven by 1 client and then by N clients at once (plain HTTP API clients,
  as ``curl`` users call it, on distinct new images, so every request runs
  the backbone), ``--rounds`` times in alternation, giving requests/s (all
  rounds' requests over their wall time), p50/p95 latency and errors at each,
  the ratio throughput@N / throughput@1 with each round's own ratio, and how
  many answers differ from the same analysis run one at a time in this
  process (must be 0: concurrency must not change answers). One round of 48
  requests per side lasts 2–3 s; on cpu2 its ratio alone ranged 1.42–1.91×
  for the same build (docs/benchmarks.md), hence several rounds.

    python benchmarks/bench_app.py            # bundled toy release
    python benchmarks/bench_app.py --calls 50 --json
    python benchmarks/bench_app.py --clients 8 --json
    python benchmarks/bench_app.py --soak 2000 --json   # memory and temp folder under scripted traffic

``--soak N`` measures something else instead (issue 22, :mod:`app_soak`): the
server's and its worker's resident memory and the temp folder's file count
before and after N raw-HTTP calls that mix every public endpoint (each a new
Gradio session, as from ``curl``), after a warm-up that visits every
(endpoint, image) pair once; and the server CPU per ``/analyze_json`` call that
references one uploaded 40-megapixel PNG again (``--big-image-calls``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app_soak import cpu_seconds, repeated_big_image, soak  # noqa: E402 (this folder: run as a script)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(_percentile(ms, 50), 2), "p95_ms": round(_percentile(ms, 95), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "n": len(ms)}


def _images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """Distinct shape images (the toy release's own kind of data), 96 px PNGs."""
    from revelio_hub.toy.shapes import image_spec, render

    paths = []
    for i in range(start, start + n):
        path = folder / f"bench_{i}.png"
        render(image_spec(i, seed=4242), image_size=96).save(path)
        paths.append(path)
    return paths


class _HttpClient:
    """A light API client (what ``curl`` users do): upload, ``/call/<api>``, read the result stream.

    ``gradio_client`` costs about twice the server's CPU per call (measured with
    this script); on a 2-core machine that would measure the client, not the
    server, so the load runs use plain HTTP through one keep-alive connection
    per client.
    """

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=300)

    def analyze_json(self, path: Path, layer: str, timestep: int) -> dict:
        with open(path, "rb") as f:
            up = self.http.post(f"{self.url}/gradio_api/upload", files={"files": (path.name, f, "image/png")})
        up.raise_for_status()
        image = {"path": up.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        call = self.http.post(f"{self.url}/gradio_api/call/analyze_json", json={"data": [image, layer, timestep, ""]})
        call.raise_for_status()
        event, data = None, None
        with self.http.stream("GET", f"{self.url}/gradio_api/call/analyze_json/{call.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = line.split(":", 1)[1].strip()
                    break
        if event != "complete":
            raise RuntimeError(f"/analyze_json failed: {data}")
        return json.loads(data)[0]

    def close(self) -> None:
        self.http.close()


def _load(url: str, images: list[Path], clients: int, layer: str, timestep: int, server_pid: int) -> dict:
    """``/analyze_json`` on every image, from ``clients`` concurrent API clients (:class:`_HttpClient`).

    Returns throughput (requests/s over the wall time of the whole batch),
    latency percentiles of the successful requests, the error count, the CPU
    time per request of the server and of this (client) process, and the
    answers (``None`` for an error), in the order of ``images``.
    """
    sessions = [_HttpClient(url) for _ in range(clients)]

    def call(indexed: tuple[int, Path]) -> tuple[float, object]:
        i, path = indexed
        start = time.perf_counter()
        try:
            answer = sessions[i % clients].analyze_json(path, layer, timestep)
        except Exception as exc:  # counted, not raised: errors under load are a result
            answer = exc
        return time.perf_counter() - start, answer

    start, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(call, enumerate(images)))
    wall = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    for session in sessions:
        session.close()
    ok = [seconds for seconds, answer in done if not isinstance(answer, Exception)]
    errors = [f"{type(a).__name__}: {a}"[:200] for _, a in done if isinstance(a, Exception)]
    return {"clients": clients, "requests": len(images), "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 2), **_summary(ok), "errors": len(errors), "seconds": ok,
            "server_cpu_ms_per_request": round(1000 * server_cpu / len(images), 1),
            "client_cpu_ms_per_request": round(1000 * client_cpu / len(images), 1),
            "first_errors": errors[:3], "answers": [None if isinstance(a, Exception) else a for _, a in done]}


def _merge_rounds(runs: list[dict]) -> dict:
    """One side's rounds as one measurement: requests over total wall time, latencies pooled, errors summed."""
    wall = sum(r["wall_s"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    ok = requests - sum(r["errors"] for r in runs)
    seconds = [s for r in runs for s in r["seconds"]]
    return {"clients": runs[0]["clients"], "requests": requests, "rounds": len(runs), "wall_s": round(wall, 2),
            "throughput_rps": round(ok / wall, 2), **_summary(seconds), "errors": sum(r["errors"] for r in runs),
            "differences": sum(r["differences"] for r in runs),
            "rounds_rps": [r["throughput_rps"] for r in runs],
            "server_cpu_ms_per_request": round(sum(r["server_cpu_ms_per_request"] * r["requests"] for r in runs) / requests, 1),
            "client_cpu_ms_per_request": round(sum(r["client_cpu_ms_per_request"] * r["requests"] for r in runs) / requests, 1),
            "first_errors": [e for r in runs for e in r["first_errors"]][:3]}


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"app.py did not answer {url} within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """Ask the served app to stop (SIGTERM: its run folder is cleaned), kill it if it lingers past 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _gradio_floor(images: list[Path], calls: int, warmup: int, concurrency: int) -> tuple[list[float], list[float]]:
    """Latency of a no-op ``/analyze_json`` (same signature, same queue) through gradio_client."""
    import gradio as gr
    from gradio import FileData
    from gradio_client import Client, handle_file

    def analyze_json(image: FileData, layer: str = "", timestep: int = -1, release: str = "") -> dict:
        return {"release": release, "layer": layer, "timestep": timestep, "predictions": {}, "neurons": []}

    # Real types (this module uses postponed annotations; gr.api resolves hints at runtime).
    analyze_json.__annotations__ = {"image": FileData, "layer": str, "timestep": int, "release": str, "return": dict}

    with gr.Blocks() as demo:
        gr.api(analyze_json, api_name="analyze_json")
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    port = _free_port()
    with contextlib.redirect_stdout(sys.stderr):  # keep --json output clean of gradio's messages
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)

        def call(path: Path) -> float:
            start = time.perf_counter()
            client.predict(handle_file(str(path)), "", -1, "", api_name="/analyze_json")
            return time.perf_counter() - start

        call(images[0])
        for path in images[1:1 + warmup]:
            call(path)
        new = [call(p) for p in images[1 + warmup:]]
        same = [call(images[0]) for _ in range(calls)]
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            demo.close()
    return new, same


def _big_png(path: Path) -> Path:
    """A 8000×5000 (40-megapixel, the app's limit) PNG of a few shapes: about 0.1 MB on disk, 120 MB decoded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (8000, 5000), (245, 245, 235))
    ImageDraw.Draw(img).ellipse((2000, 1000, 6000, 4000), fill=(220, 40, 40))
    img.save(path, optimize=True)
    return path


def run_soak(args: argparse.Namespace) -> dict:
    """``--soak``: serve ``app.py`` with its own temp folder and measure what scripted traffic leaves behind."""
    from revelio_hub.app.state import DEFAULT_RELEASE_PATH

    release = args.release or str(DEFAULT_RELEASE_PATH)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        temp_root = Path(tmp) / "gradio"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(temp_root))
        cmd = [sys.executable, str(REPO / "app.py"), "--release", release, "--port", str(port), "--host", "127.0.0.1",
               "--device", args.device, "--dtype", args.dtype]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        images = _images(Path(tmp), args.soak_images)
        big = _big_png(Path(tmp) / "big_40mp.png") if args.big_image_calls else None
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_http(url, proc, timeout=120)
            entry = (args.layer, args.timestep, "")
            log = (lambda line: print(line, file=sys.stderr)) if args.json else print
            result = {"release": release, "device": args.device,
                      "soak": soak(url, proc.pid, temp_root, images, args.soak, entry, log=log)}
            if big is not None:
                result["repeated_40mp_png"] = repeated_big_image(url, proc.pid, big, args.big_image_calls, entry)
        finally:
            _stop(proc)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["soak"]
        print(f"{s['calls']} calls after {s['warmup_calls']} warm-up calls ({s['errors']} errors, {s['wall_s']} s): "
              f"server + workers RSS grew {s['rss_growth_mb']} MB (target ≤ 50), temp folder "
              f"{s['temp_file_growth']} files / {s['temp_mb_growth']} MB (target ≤ 100 files)")
        if "repeated_40mp_png" in result:
            b = result["repeated_40mp_png"]
            print(f"40-MP PNG ({b['file_kib']} KiB) referenced again: {b['server_cpu_ms_per_repeated_call']} ms of "
                  f"server CPU per call (first call {b['first_call_server_cpu_ms']} ms)")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default=None, help="release id or folder (default: the bundled toy release)")
    parser.add_argument("--calls", type=int, default=30, help="timed /analyze_json calls per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layer", default="", help="entry layer (default: the release's first entry)")
    parser.add_argument("--timestep", type=int, default=-1, help="entry timestep (default: the release's first)")
    parser.add_argument("--clients", type=int, default=1,
                        help="N > 1: also measure throughput with 1 and with N concurrent clients (distinct images)")
    parser.add_argument("--load-calls", type=int, default=48,
                        help="requests per throughput measurement (each a new image) with --clients")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --clients: alternate 1-client and N-client measurements this many times")
    parser.add_argument("--workers", type=int, default=None,
                        help="backbone worker processes of the served app (app.py --workers; default: app.py's own, "
                        "1 on a CPU with 2+ cores); 0 runs passes in the server process, the baseline of issue 10")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="instead: memory and temp-folder growth over N raw-HTTP calls mixing every endpoint")
    parser.add_argument("--soak-images", type=int, default=16, help="distinct images the --soak calls cycle through")
    parser.add_argument("--big-image-calls", type=int, default=10,
                        help="with --soak: repeated /analyze_json calls on one uploaded 40-megapixel PNG (0: skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.soak:
        return run_soak(args)
    if args.clients < 1 or args.load_calls < 1 or args.rounds < 1:
        parser.error("--clients, --load-calls and --rounds must be at least 1")

    from revelio_hub.app.state import DEFAULT_RELEASE_PATH

    release = args.release or str(DEFAULT_RELEASE_PATH)
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "app.py"), "--release", release, "--port", str(port), "--host", "127.0.0.1",
           "--device", args.device, "--dtype", args.dtype, "--no-warmup"]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    url = f"http://127.0.0.1:{port}/"

    load_runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = _images(Path(tmp), args.warmup + args.calls + 1)
        # Fresh images for each load measurement: every request is a cache miss (one backbone pass).
        sides = list(dict.fromkeys([1, args.clients])) if args.clients > 1 else []
        load_images = {(r, n): _images(Path(tmp), args.load_calls, start=10_000 * (1 + r * len(sides) + k))
                       for r in range(args.rounds) for k, n in enumerate(sides)}
        t_spawn = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            t_http = _wait_http(url, proc, timeout=120)
            from gradio_client import Client, handle_file

            client = Client(url, verbose=False)

            def call(path: Path) -> float:
                start = time.perf_counter()
                client.predict(handle_file(str(path)), args.layer, args.timestep, "", api_name="/analyze_json")
                return time.perf_counter() - start

            call(images[0])
            t_first = time.perf_counter()
            for path in images[1:1 + args.warmup]:
                call(path)
            new_images = [call(p) for p in images[1 + args.warmup:]]
            repeated = [call(images[0]) for _ in range(args.calls)]
            rounds: dict[tuple[int, int], dict] = {}
            for (r, n), batch in load_images.items():  # round by round, 1 client then N
                rounds[(r, n)] = _load(url, batch, n, args.layer, args.timestep, proc.pid)
        finally:
            _stop(proc)

        # Baseline: the same analysis in this process, no server.
        import torch

        from revelio_hub.app import analysis
        from revelio_hub.app.state import AppConfig, AppState, default_threads
        from revelio_hub.app.workers import default_workers

        config = AppConfig(releases=[release], device=args.device, dtype=args.dtype)
        if args.device == "cpu":
            torch.set_num_threads(default_threads(config.concurrency))  # what app.py uses
        state = AppState.from_config(config)
        layer = args.layer or None
        t = None if args.timestep < 0 else args.timestep
        for path in images[1:1 + args.warmup]:
            analysis.analyze(state, str(path), layer, t)
        direct_new, direct_repeated = [], []
        for path in images[1 + args.warmup:]:
            start = time.perf_counter()
            analysis.analyze(state, str(path), layer, t)
            direct_new.append(time.perf_counter() - start)
        analysis.analyze(state, str(images[0]), layer, t)
        for _ in range(args.calls):
            start = time.perf_counter()
            analysis.analyze(state, str(images[0]), layer, t)
            direct_repeated.append(time.perf_counter() - start)

        # The answers under load, against the same analysis one at a time in this process.
        for key, run in (rounds.items() if sides else []):
            answers = run.pop("answers")
            run["differences"] = sum(
                1 for path, got in zip(load_images[key], answers)
                if got is not None and got != analysis.analyze(state, str(path), layer, t).to_json()
            )
        for n in sides:
            load_runs[n] = _merge_rounds([rounds[(r, n)] for r in range(args.rounds)])

        for attempt in range(3):  # gradio's own localhost probe can time out on a saturated machine
            try:
                floor_new, floor_repeated = _gradio_floor(images, args.calls, args.warmup, config.concurrency)
                break
            except ValueError as exc:
                if attempt == 2:
                    raise
                print(f"bench_app: no-op gradio floor did not start ({exc}); retrying", file=sys.stderr)

    result = {
        "release": release,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
        "workers": args.workers if args.workers is not None else default_workers(args.device),
        "cold_start_s": {"http": round(t_http - t_spawn, 2), "first_analysis": round(t_first - t_spawn, 2)},
        "analyze_json_new_image": _summary(new_images),
        "analyze_json_repeated_image": _summary(repeated),
        "direct_new_image": _summary(direct_new),
        "direct_repeated_image": _summary(direct_repeated),
        "gradio_floor_new_image": _summary(floor_new),
        "gradio_floor_repeated_image": _summary(floor_repeated),
    }
    result["ratio_client_vs_direct_p50"] = {
        "new_image": round(result["analyze_json_new_image"]["p50_ms"] / max(result["direct_new_image"]["p50_ms"], 1e-9), 2),
        "repeated_image": round(result["analyze_json_repeated_image"]["p50_ms"]
                                / max(result["direct_repeated_image"]["p50_ms"], 1e-9), 2),
    }
    result["ratio_client_vs_gradio_floor_p50"] = {
        "new_image": round(result["analyze_json_new_image"]["p50_ms"]
                           / max(result["gradio_floor_new_image"]["p50_ms"], 1e-9), 2),
        "repeated_image": round(result["analyze_json_repeated_image"]["p50_ms"]
                                / max(result["gradio_floor_repeated_image"]["p50_ms"], 1e-9), 2),
    }
    result["targets"] = {"analyze_json_p50_ms": 150, "cold_start_http_s": 10}
    if load_runs:
        one, many = load_runs[1], load_runs[args.clients]
        per_round = [round(m / max(o, 1e-9), 2) for o, m in zip(one["rounds_rps"], many["rounds_rps"])]
        result["load"] = {
            "clients_1": one,
            f"clients_{args.clients}": many,
            "errors": one["errors"] + many["errors"],
            "differences": one["differences"] + many["differences"],
            f"throughput_ratio_{args.clients}_vs_1": round(many["throughput_rps"] / max(one["throughput_rps"], 1e-9), 2),
            "ratio_per_round": per_round,
        }
        result["targets"].update({"load_errors": 0, "load_differences": 0, f"throughput_ratio_{args.clients}_vs_1": 1.5})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cs = result["cold_start_s"]
        print(f"release {release} on {args.device} ({args.dtype}), {result['cpu_threads']} torch threads, "
              f"{result['workers']} backbone worker process(es)")
        print(f"cold start: server answers after {cs['http']} s (target ≤ 10 s); first analysis after {cs['first_analysis']} s")
        for name in ("analyze_json_new_image", "analyze_json_repeated_image", "direct_new_image",
                     "direct_repeated_image", "gradio_floor_new_image", "gradio_floor_repeated_image"):
            s = result[name]
            print(f"{name:30s} p50 {s['p50_ms']:8.1f} ms   p95 {s['p95_ms']:8.1f} ms   (n={s['n']})")
        r = result["ratio_client_vs_direct_p50"]
        print(f"gradio_client / direct (p50): new image {r['new_image']}×, repeated image {r['repeated_image']}×")
        r = result["ratio_client_vs_gradio_floor_p50"]
        print(f"gradio_client / no-op gradio floor (p50): new image {r['new_image']}×, repeated image {r['repeated_image']}×")
        if load_runs:
            for n, run in load_runs.items():
                print(f"{n} client(s), {run['requests']} new images: {run['throughput_rps']:.2f} req/s, "
                      f"p50 {run['p50_ms']:.1f} ms, p95 {run['p95_ms']:.1f} ms, {run['errors']} errors, "
                      f"{run['differences']} answers differ from one-at-a-time; CPU per request: server "
                      f"{run['server_cpu_ms_per_request']} ms, client {run['client_cpu_ms_per_request']} ms")
            load = result["load"]
            print(f"throughput {args.clients} clients / 1 client: "
                  f"{load[f'throughput_ratio_{args.clients}_vs_1']}× over {args.rounds} round(s) (target ≥ 1.5×); "
                  f"per round: {', '.join(f'{r}×' for r in load['ratio_per_round'])}")
    return result


if __name__ == "__main__":
    main()
