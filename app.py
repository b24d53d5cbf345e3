"""Revelio Hub app: upload an image, pick a layer and a timestep, see its neurons and classes.

    python app.py                                  # the bundled toy release, http://127.0.0.1:7860
    python app.py --release user/revelio-sd15-pets --release ./my-release --device cuda --dtype bfloat16
    REVELIO_RELEASE=user/a,user/b python app.py   # same as two --release flags
    python app.py --mcp                            # also an MCP server for LLM agents (REVELIO_MCP=1 on a Space)

All logic lives in ``revelio_hub.app``; this file only parses options and launches.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from revelio_hub.app.gradio_version import warn_if_untested_gradio
from revelio_hub.app.mcp_tools import MCP_ENV, mcp_requested, mcp_unavailable
from revelio_hub.app.run_folder import GracefulStop, claim_run_folder
from revelio_hub.app.state import (
    DEFAULT_RELEASE_PATH,
    RELEASE_ENV,
    AppConfig,
    AppState,
    default_concurrency,
    default_release_ids,
    default_threads,
)
from revelio_hub.app.workers import default_workers
from revelio_hub.cli import add_options, option


@dataclass(kw_only=True)
class AppOptions:
    """The command line of app.py: which releases, on what device, served where."""

    release: Optional[list[str]] = field(default=None, metadata=option(
        "Release to serve: a Hub repo id or a local release folder. Repeat to offer several "
        f"(a dropdown switches between them; the first is the default). Default: ${RELEASE_ENV} "
        f"(comma-separated) or the bundled toy release ({DEFAULT_RELEASE_PATH.name}).",
        repeat=True, metavar="ID_OR_PATH"))
    device: str = field(default_factory=lambda: os.environ.get("REVELIO_DEVICE", "cpu"), metadata=option(
        "torch device for the backbone (cpu, cuda, cuda:1, mps), or auto: load on the CPU and run "
        "the backbone on CUDA when there is one (the ZeroGPU pattern; `pip install spaces`). $REVELIO_DEVICE."))
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata=option("backbone dtype."))
    host: str = field(default_factory=lambda: os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), metadata=option(
        "interface to listen on (0.0.0.0 to accept remote connections; $GRADIO_SERVER_NAME)."))
    port: int = field(default_factory=lambda: int(os.environ.get("GRADIO_SERVER_PORT", 7860)), metadata=option(
        "port to listen on ($GRADIO_SERVER_PORT)."))
    share: bool = field(default=False, metadata=option("also create a temporary public gradio.live link."))
    concurrency: Optional[int] = field(default=None, metadata=option(
        f"analyses run at once (default: from the CPU count, here {default_concurrency()})."))
    threads: Optional[int] = field(default=None, metadata=option(
        "torch CPU threads (default: CPU count / concurrency; raise it with --concurrency 1 "
        "for a large backbone on CPU)."))
    workers: Optional[int] = field(default=None, metadata=option(
        "processes that run the backbone passes, CPU only (default: 1 on a CPU with 2+ cores, "
        f"else 0; here {default_workers('cpu')} for --device cpu). Python in one process runs on one "
        "core at a time; a worker lets the server use another. 0 runs passes in the server process."))
    cache_size: int = field(default=64, metadata=option(
        "images × timesteps whose backbone features are kept in memory."))
    mcp: bool = field(default=False, metadata=option(
        "also serve the JSON API as Model Context Protocol tools for LLM agents, at "
        "/gradio_api/mcp/ (needs the optional mcp package: pip install \"revelio-hub[mcp]\"). "
        f"${MCP_ENV}=1 does the same (a Space's variable)."))
    no_warmup: bool = field(default=False, metadata=option(
        "do not load the default backbone in the background after start-up (first request pays for it)."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Revelio Hub: explore diffusion-model neurons (k-SAE), their atlas and Diff-C predictions in a browser.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_options(parser, AppOptions)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per HTTP request is noise: huggingface_hub's client (httpx2) checks every file of a
    # Hub release at start-up (thousands of HEAD requests for an atlas's thumbnails), gradio's (httpx) too.
    for http_logger in ("httpx", "httpx2"):
        logging.getLogger(http_logger).setLevel(logging.WARNING)

    from revelio_hub.app.ui import build_ui, launch_kwargs  # after parsing: --help answers without building the UI

    warn_if_untested_gradio()  # one line naming both versions; the app still starts
    mcp = mcp_requested(args.mcp)
    if mcp and mcp_unavailable():
        raise SystemExit(f"app.py: error: {mcp_unavailable()}")
    try:
        config = AppConfig(
            releases=args.release or default_release_ids(),
            device=args.device,
            dtype=args.dtype,
            concurrency=args.concurrency,
            feature_cache_size=args.cache_size,
            workers=default_workers(args.device) if args.workers is None else args.workers,
        )
    except ValueError as exc:
        raise SystemExit(f"app.py: error: {exc}") from None
    if args.device in ("cpu", "auto"):  # the heads run on the CPU in both
        torch.set_num_threads(args.threads or default_threads(config.concurrency))
    try:
        state = AppState.from_config(config)
    except ValueError as exc:  # a bad --release is a usage error, not a crash
        raise SystemExit(f"app.py: error: {exc}") from None
    # A temp folder of this run's own (earlier runs' leftovers deleted), removed again when the app stops,
    # SIGTERM included: nothing users uploaded outlives the process.
    run = claim_run_folder()
    try:
        with GracefulStop() as stop:
            demo = stop.blocks = build_ui(state)
            if not args.no_warmup:
                threading.Thread(target=state.warmup, name="revelio-warmup", daemon=True).start()
            demo.launch(server_name=args.host, server_port=args.port, share=args.share, mcp_server=mcp,
                        **launch_kwargs(state))
    except KeyboardInterrupt:  # stopped before the server was up
        pass
    finally:
        run.remove()  # first: a container's grace period after SIGTERM is short (Docker: 10 s)
        state.close()


if __name__ == "__main__":
    main()
