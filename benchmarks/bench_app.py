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
  On a busy machine the floor dominates; compare against it.

    python benchmarks/bench_app.py            # bundled toy release
    python benchmarks/bench_app.py --calls 50 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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


def _images(folder: Path, n: int) -> list[Path]:
    """Distinct shape images (the toy release's own kind of data), 96 px PNGs."""
    from revelio_hub.toy.shapes import image_spec, render

    paths = []
    for i in range(n):
        path = folder / f"bench_{i}.png"
        render(image_spec(i, seed=4242), image_size=96).save(path)
        paths.append(path)
    return paths


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
        demo.close()
    return new, same


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default=None, help="release id or folder (default: the bundled toy release)")
    parser.add_argument("--calls", type=int, default=30, help="timed /analyze_json calls per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layer", default="", help="entry layer (default: the release's first entry)")
    parser.add_argument("--timestep", type=int, default=-1, help="entry timestep (default: the release's first)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    from revelio_hub.app.state import DEFAULT_RELEASE_PATH

    release = args.release or str(DEFAULT_RELEASE_PATH)
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "app.py"), "--release", release, "--port", str(port), "--host", "127.0.0.1",
           "--device", args.device, "--dtype", args.dtype, "--no-warmup"]
    url = f"http://127.0.0.1:{port}/"

    with tempfile.TemporaryDirectory() as tmp:
        images = _images(Path(tmp), args.warmup + args.calls + 1)
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
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

        # Baseline: the same analysis in this process, no server.
        import torch

        from revelio_hub.app import analysis as A
        from revelio_hub.app.state import AppConfig, AppState, default_threads

        config = AppConfig(releases=[release], device=args.device, dtype=args.dtype)
        if args.device == "cpu":
            torch.set_num_threads(default_threads(config.concurrency))  # what app.py uses
        state = AppState.from_config(config)
        layer = args.layer or None
        t = None if args.timestep < 0 else args.timestep
        for path in images[1:1 + args.warmup]:
            A.analyze(state, str(path), layer, t)
        direct_new, direct_repeated = [], []
        for path in images[1 + args.warmup:]:
            start = time.perf_counter()
            A.analyze(state, str(path), layer, t)
            direct_new.append(time.perf_counter() - start)
        A.analyze(state, str(images[0]), layer, t)
        for _ in range(args.calls):
            start = time.perf_counter()
            A.analyze(state, str(images[0]), layer, t)
            direct_repeated.append(time.perf_counter() - start)

        floor_new, floor_repeated = _gradio_floor(images, args.calls, args.warmup, config.concurrency)

    result = {
        "release": release,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
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
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cs = result["cold_start_s"]
        print(f"release {release} on {args.device} ({args.dtype}), {result['cpu_threads']} torch threads")
        print(f"cold start: server answers after {cs['http']} s (target ≤ 10 s); first analysis after {cs['first_analysis']} s")
        for name in ("analyze_json_new_image", "analyze_json_repeated_image", "direct_new_image",
                     "direct_repeated_image", "gradio_floor_new_image", "gradio_floor_repeated_image"):
            s = result[name]
            print(f"{name:30s} p50 {s['p50_ms']:8.1f} ms   p95 {s['p95_ms']:8.1f} ms   (n={s['n']})")
        r = result["ratio_client_vs_direct_p50"]
        print(f"gradio_client / direct (p50): new image {r['new_image']}×, repeated image {r['repeated_image']}×")
        r = result["ratio_client_vs_gradio_floor_p50"]
        print(f"gradio_client / no-op gradio floor (p50): new image {r['new_image']}×, repeated image {r['repeated_image']}×")
    return result


if __name__ == "__main__":
    main()
