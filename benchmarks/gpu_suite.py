#!/usr/bin/env python
"""One command that runs and measures every CUDA path of the project at the paper's sizes.

GPU time is scarce (minutes, now and then), so whoever has a GPU runs this once,
reads one table, fixes what broke and reruns. It builds SD-1.5- and
DiT-XL/2-256-architecture models with random weights (``paper_models.py``: the
real configs, no Hub), opens them with ``revelio_hub.load_backbone`` and runs,
each step guarded (a failure is recorded with its traceback tail and the next
step runs) and under its own share of ``--budget-s`` (``suite_runner.py``):

0. ``models``: writes the two model folders (time and size), so that their
   cost does not eat into the extraction step's cap;
1. ``extract``: original-style (fp32, full UNet, hook) vs ``Backbone.extract_pixels``
   (bf16 on CUDA, channels_last, early exit; then ``Backbone.compile``, cold and
   warm) for ``bottleneck`` and ``up_ft1`` at 512 px and ``bottleneck`` at 256 px,
   batch 32, plus DiT-XL/2 at 256 px: img/s, and GFLOP/s from FLOPs counted once
   per config with ``torch.utils.flop_counter`` (logic of ``bench_extract.py``);
2. ``ksae``: the k-SAE training step at paper size (d_in 1280, 81,920 latents,
   k 32, batch 8192), original-style fp32 dense vs ``train_sae``: samples/s, peak
   memory, held-out FVU after the same number of steps (``bench_ksae.py``);
3. ``diffc``: one epoch of cached-feature Diff-C training on 512-px ``up_ft1``
   maps (1280×32×32), images/s;
4. ``atlas``: streaming atlas statistics with the paper-size SAE, images/s
   (``bench_atlas.py``);
5. ``app``: ``/analyze_json`` p50/p95 through ``gradio_client`` (uploads) against
   an in-process server, SD-1.5-architecture backbone at 512 px on the device,
   release assembled by ``assemble_release`` with a random SAE, Diff-C and atlas;
6. ``multigpu``: ``training/train_ksae.py`` under ``accelerate launch --multi_gpu
   --num_processes 2`` (skipped, and said so, with fewer than 2 GPUs).

Prints one table (stdout) and writes one JSON (``--json``): machine, versions,
every figure, every failure with its traceback tail, each step's status (ok,
failed, skipped, timed out). ``docs/benchmarks.md`` explains how to read it.

Packages are checked first. The steps that need only torch (``ksae``,
``diffc``, ``atlas``, ``multigpu``) run without diffusers or gradio; the others
are skipped with the command that brings the missing wheels
(``bash benchmarks/gpu_suite.sh`` on a machine with network).

    python benchmarks/gpu_suite.py --json gpu_suite.json          # on the GPU machine
    python benchmarks/gpu_suite.py --small --device cpu --json out.json   # CPU dry run (CI)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from suite_runner import Step, StepRecord, print_now, render_table, run_steps  # noqa: E402

#: Goals on one H200 at paper size (issue 14; the external estimates they rest on are in docs/benchmarks.md).
GOAL_EXTRACT = "≥ 290 img/s on H200"
GOAL_KSAE = "≥ 640k samples/s on H200"
GOAL_APP = "≤ 60 ms p50 on H200"

#: What each step imports beyond torch (and the project's own requirements the GPU image has).
STEP_PACKAGES = {
    "models": ("diffusers", "transformers"),
    "extract": ("diffusers", "transformers"),
    "ksae": ("accelerate", "safetensors", "huggingface_hub"),
    "diffc": ("accelerate", "transformers"),
    "atlas": ("safetensors", "huggingface_hub"),
    "app": ("diffusers", "transformers", "gradio", "gradio_client"),
    "multigpu": ("accelerate",),
}

#: Wheels a GPU image with torch/transformers/accelerate/huggingface_hub lacks: diffusers, gradio,
#: gradio_client and their pure-python needs (+ three small binary ones), pinned to the versions the
#: project is tested with. ``gpu_suite.sh`` downloads them; together about 42 MB.
DEVICE_WHEELS = {
    "diffusers": "0.42.1", "gradio": "6.31.0", "gradio_client": "2.7.2", "hf-gradio": "0.4.1",
    "fastapi": "0.165.0", "starlette": "1.10.0", "uvicorn": "0.54.0", "pydantic": "2.13.4",
    "pydantic_core": "2.46.4", "annotated-types": "0.7.0", "typing-inspection": "0.4.2", "groovy": "0.1.2",
    "orjson": "3.13.0", "brotli": "1.2.1", "pydub": "0.25.1", "python-multipart": "0.0.34",
    "safehttpx": "0.1.7", "semantic-version": "2.10.0", "tomlkit": "0.14.0", "opentelemetry-api": "1.45.2",
    "pytz": "2026.6",
}
WHEEL_DIR = "wheels"
WHEEL_PYTHON = "3.12"  # the GPU image's python


def wheel_download_command(python_version: str = WHEEL_PYTHON) -> str:
    """The pip command (run with network, in the repo root) that fetches :data:`DEVICE_WHEELS` into ``wheels/``."""
    platforms = " ".join(f"--platform {p}" for p in (
        "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"))
    pins = " ".join(f"{name}=={version}" for name, version in DEVICE_WHEELS.items())
    return (f"python -m pip download --no-deps --only-binary=:all: --python-version {python_version} "
            f"--implementation cp {platforms} -d {WHEEL_DIR}/ {pins}")


def wheel_install_command() -> str:
    """Install the carried wheels without network and put them and the repo on the path."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {WHEEL_DIR}/*.whl "
            "&& export PYTHONPATH=/tmp/site:$PWD")


def missing_packages(names) -> list[str]:
    return [n for n in dict.fromkeys(names) if importlib.util.find_spec(n) is None]


def install_hint(missing: list[str]) -> str:
    return (f"missing {', '.join(missing)}: on a machine with network run `bash benchmarks/gpu_suite.sh` "
            f"(or `{wheel_download_command()}`), carry {WHEEL_DIR}/ here, then `{wheel_install_command()}`")


# ------------------------------------------------------------------ sizes and context


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the paper's (GPU) or tiny ones for the CPU dry run (``--small``)."""

    hi_px: int = 512
    lo_px: int = 256
    dit_px: int = 256
    extract_batch: int = 32
    repeats: int = 3
    ksae_d: int = 1280
    ksae_latents: int = 81_920
    ksae_k: int = 32
    ksae_batch: int = 8192
    ksae_steps: int = 60
    ksae_warmup: int = 3
    ksae_batches: int = 8          # training set = this many batches
    ksae_heldout: int = 4096
    diffc_images: int = 512
    diffc_channels: int = 1280
    diffc_map: int = 32
    diffc_hidden: int = 1024
    diffc_batch: int = 16
    atlas_images: int = 16_384
    atlas_batch: int = 256
    app_px: int = 512
    app_calls: int = 30
    app_warmup: int = 3
    app_atlas_images: int = 256
    app_classes: int = 37
    multigpu_steps: int = 50

    @classmethod
    def small(cls) -> "Sizes":
        return cls(hi_px=128, lo_px=64, dit_px=64, extract_batch=2, repeats=1, ksae_d=64, ksae_latents=512,
                   ksae_k=8, ksae_batch=256, ksae_steps=4, ksae_warmup=1, ksae_batches=4, ksae_heldout=256,
                   diffc_images=32, diffc_channels=32, diffc_map=8, diffc_hidden=16, diffc_batch=8,
                   atlas_images=64, atlas_batch=32, app_px=64, app_calls=3, app_warmup=1, app_atlas_images=16,
                   app_classes=5, multigpu_steps=4)


class Context:
    """Settings shared by the steps, and the model folders, built once on first use."""

    def __init__(self, device: str, small: bool, work: Path, compile_backend: str) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.small = small
        self.sizes = Sizes.small() if small else Sizes()
        self.work = work
        self.compile_backend = compile_backend
        self._folders: dict[str, Path] = {}
        self._accelerator = None

    def folder(self, kind: str) -> Path:
        """The ``sd15`` or ``dit`` model folder (written on first call)."""
        if kind not in self._folders:
            import paper_models

            writer = {"sd15": paper_models.write_sd15, "dit": paper_models.write_dit_xl2}[kind]
            start = time.perf_counter()
            self._folders[kind] = writer(self.work / kind, small=self.small)
            print_now(f"  built {kind} folder in {time.perf_counter() - start:.1f} s")
        return self._folders[kind]

    def accelerator(self):
        """One ``Accelerator`` for the process (its state is global): on the CPU when ``--device cpu``."""
        if self._accelerator is None:
            from revelio_hub.distributed import make_accelerator

            self._accelerator = make_accelerator(cpu=not self.cuda)
        return self._accelerator

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> Optional[float]:
        """Peak accelerator memory since :meth:`reset_peak` (GiB); ``None`` on the CPU (not measured)."""
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class _CompileLog(logging.Handler):
    """Collects torch.compile warnings (recompile limits, graph-break fallbacks) for the table's notes."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:160])

    def __enter__(self) -> "_CompileLog":
        for name in ("torch._dynamo", "torch._inductor"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("torch._dynamo", "torch._inductor"):
            logging.getLogger(name).removeHandler(self)


# ------------------------------------------------------------------ 0. model folders


def step_models(ctx: Context, rec: StepRecord) -> None:
    """Write both model folders up front, so their cost (random init, GBs of safetensors) shows on its own."""
    for kind, label in (("sd15", "SD-1.5 architecture"), ("dit", "DiT-XL/2-256 architecture")):
        start = time.perf_counter()
        folder = ctx.folder(kind)
        size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        rec.add(f"{label} folder written", time.perf_counter() - start, "s",
                note=(f"{size / 1e9:.2f} GB" if size > 1e9 else f"{size / 1e6:.1f} MB") + " of fp32 safetensors")


# ------------------------------------------------------------------ 1. extraction


def step_extract(ctx: Context, rec: StepRecord) -> None:
    import torch
    from bench_extract import OriginalStyleExtractor, timed_pair
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    import paper_models
    from revelio_hub import load_backbone

    S, dev = ctx.sizes, ctx.device
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    tag = "bf16" if ctx.cuda else "fp32"
    bs, t = S.extract_batch, 25
    sd = ctx.folder("sd15")
    big = not ctx.small
    eager_need = 15.0 if big else 0.5

    # Original style: the components in fp32, loaded as the original Revelio code loads them, one full UNet pass per (layer, t).
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    scheduler = PNDMScheduler.from_pretrained(sd, subfolder="scheduler")
    ours = {px: load_backbone(str(sd), device=dev, dtype=dtype, image_size=px, channels_last=True)
            for px in (S.hi_px, S.lo_px)}
    original = OriginalStyleExtractor(unet, vae, scheduler, ours[S.hi_px].conditioning["prompt_embeds"], dev)
    configs = [(S.hi_px, "bottleneck"), (S.hi_px, "up_ft1"), (S.lo_px, "bottleneck")]
    pixels = {px: torch.rand(bs, 3, px, px, generator=torch.Generator().manual_seed(px)) * 2 - 1
              for px in (S.hi_px, S.lo_px)}
    gflop: dict[str, float] = {}

    def ours_fn(px: int, layer: str) -> Callable[[], Any]:
        return lambda: ours[px].extract_pixels(pixels[px], [layer], [t], batch_size=bs)

    for px, layer in configs:
        key = f"{layer}@{px}px"
        if not rec.fits(eager_need, f"{key} eager"):
            continue
        original_fn = lambda px=px, layer=layer: original(pixels[px], layer, t)  # noqa: E731
        original_gf = count_flops(original_fn) / bs / 1e9
        gflop[key] = count_flops(ours_fn(px, layer)) / bs / 1e9
        times = timed_pair({"original": original_fn, "ours": ours_fn(px, layer)}, dev, S.repeats)
        original_ips, ours_ips = bs / times["original"][0], bs / times["ours"][0]
        goal = GOAL_EXTRACT if (big and key == "bottleneck@512px") else None
        rec.add(f"{key} original-style fp32", original_ips, "img/s")
        rec.add(f"{key} original-style", original_ips * original_gf, "GFLOP/s", note=f"{original_gf:.1f} GFLOP/img counted")
        rec.add(f"{key} ours {tag} eager", ours_ips, "img/s", goal=goal)
        rec.add(f"{key} ours eager", ours_ips * gflop[key], "GFLOP/s", note=f"{gflop[key]:.1f} GFLOP/img counted")
        rec.add(f"{key} eager speed-up", ours_ips / original_ips, "x")
    del original, unet, vae
    ctx.free()

    # DiT-XL/2 at 256 px (our path; the original Revelio code has no DiT extractor).
    if rec.fits(eager_need, "DiT eager"):
        dit_folder = ctx.folder("dit")
        dit = load_backbone(str(dit_folder), device=dev, dtype=dtype, image_size=S.dit_px, channels_last=True)
        layer = f"block{paper_models.dit_xl2_config(ctx.small)['num_layers'] // 2}"
        px_dit = torch.rand(bs, 3, S.dit_px, S.dit_px, generator=torch.Generator().manual_seed(1)) * 2 - 1
        fn = lambda: dit.extract_pixels(px_dit, [layer], [t], batch_size=bs)  # noqa: E731
        gf = count_flops(fn) / bs / 1e9
        ips = bs / timed_pair({"ours": fn}, dev, S.repeats)["ours"][0]
        rec.add(f"DiT {layer}@{S.dit_px}px ours {tag} eager", ips, "img/s")
        rec.add(f"DiT {layer}@{S.dit_px}px ours eager", ips * gf, "GFLOP/s", note=f"{gf:.1f} GFLOP/img counted")
        del dit
        ctx.free()

    # Backbone.compile: cold (first call, compilation included) and warm.
    with _CompileLog() as compile_log:
        try:
            _compiled_runs(ctx, rec, ours, ours_fn, configs, gflop, tag)
        finally:  # keep what torch.compile complained about even when the cap cuts the step
            for message in dict.fromkeys(compile_log.messages):
                if len(rec.notes) < 8:
                    rec.notes.append(f"compile: {message}")


def _compiled_runs(ctx: Context, rec: StepRecord, ours: dict, ours_fn: Callable, configs: list, gflop: dict,
                   tag: str) -> None:
    """``Backbone.compile`` at each size, then per layer the first call (cold) and the best of the timed ones.

    ``--small`` compiles at one size only: dynamo's tracing dominates a CPU dry run and a second size adds no path.
    """
    from bench_extract import timed_pair

    S, bs, big = ctx.sizes, ctx.sizes.extract_batch, not ctx.small
    for px in ((S.hi_px,) if ctx.small else (S.hi_px, S.lo_px)):
        layers = [layer for p, layer in configs if p == px]
        if not rec.fits(60.0 if big else 2.0, f"compile at {px}px ({', '.join(layers)})"):
            continue
        ours[px].compile(backend=ctx.compile_backend)
        for layer in layers:
            key = f"{layer}@{px}px"
            ctx.sync()
            start = time.perf_counter()
            ours_fn(px, layer)()
            ctx.sync()
            rec.add(f"{key} compile cold", time.perf_counter() - start, "s",
                    note=f"first call, {ctx.compile_backend}" + (", increment" if layer != layers[0] else ""))
            ips = bs / timed_pair({"ours": ours_fn(px, layer)}, ctx.device, S.repeats)["ours"][0]
            goal = GOAL_EXTRACT if (big and key == "bottleneck@512px") else None
            rec.add(f"{key} ours {tag} compiled", ips, "img/s", goal=goal)
            if key in gflop:
                rec.add(f"{key} ours compiled", ips * gflop[key], "GFLOP/s")


# ------------------------------------------------------------------ 2. k-SAE step


def step_ksae(ctx: Context, rec: StepRecord) -> None:
    import bench_ksae

    from revelio_hub.sae import metrics
    from revelio_hub.sae.training import SAETrainConfig, evaluate_sae, train_sae

    S, dev = ctx.sizes, ctx.device
    n_train = S.ksae_batches * S.ksae_batch
    x = bench_ksae.make_data(n_train + S.ksae_heldout, S.ksae_d, seed=0)
    train_x, held_out = x[:n_train], x[n_train:]
    lr, samples = 4e-4, S.ksae_steps * S.ksae_batch
    mem_note = None if ctx.cuda else "not measured on CPU"
    rec.notes.append(f"d_in {S.ksae_d}, {S.ksae_latents} latents, k {S.ksae_k}, batch {S.ksae_batch}, "
                     f"{S.ksae_steps} timed steps each")

    bench_ksae.original_style_train(train_x, S.ksae_warmup, S.ksae_batch, S.ksae_latents, S.ksae_k, lr, 0, dev)
    ctx.reset_peak()
    seconds, reconstruct = bench_ksae.original_style_train(train_x, S.ksae_steps, S.ksae_batch, S.ksae_latents,
                                                       S.ksae_k, lr, 0, dev)
    rec.add("original-style fp32 dense", samples / seconds, "samples/s")
    rec.add("original-style peak memory", ctx.peak_gib(), "GiB", note=mem_note)
    rec.add("original-style held-out FVU", metrics.fvu(held_out, reconstruct(held_out)), "FVU")
    del reconstruct
    ctx.free()

    acc = ctx.accelerator()

    def ours(steps: int):
        cfg = SAETrainConfig(k=S.ksae_k, n_latents=S.ksae_latents, batch_size=S.ksae_batch, steps=steps, lr=lr,
                             warmup_steps=0, eval_fraction=0.0, log_every=10, checkpoint_every=0,
                             dead_window=min(10_000_000, n_train), seed=0, mixed_precision="auto")
        return train_sae(train_x, cfg, accelerator=acc, progress=False)

    ours(S.ksae_warmup)
    ctx.reset_peak()
    result = ours(S.ksae_steps)
    ips = samples / result.train_seconds
    rec.add("ours (train_sae)", ips, "samples/s", goal=None if ctx.small else GOAL_KSAE)
    rec.add("ours peak memory", ctx.peak_gib(), "GiB", note=mem_note)
    rec.add("ours held-out FVU", evaluate_sae(result.model.to(dev), held_out, batch_size=S.ksae_batch)["fvu"], "FVU")
    rec.add("speed-up", ips / rec.figures["original-style fp32 dense"].value, "x")


# ------------------------------------------------------------------ 3. Diff-C epoch


def step_diffc(ctx: Context, rec: StepRecord) -> None:
    import torch

    from revelio_hub.diffc.training import DiffCTrainConfig, LabeledFeatures, train_diffc

    S = ctx.sizes
    c, m, n = S.diffc_channels, S.diffc_map, S.diffc_images
    # Stores hold fp16 maps; a bank of distinct maps tiled to n rows costs what n distinct rows cost to train on.
    bank = torch.randn(min(n, 64), c, m, m, generator=torch.Generator().manual_seed(0)).half()
    feats = bank.repeat((n + len(bank) - 1) // len(bank), 1, 1, 1)[:n]
    classes = [f"class {i}" for i in range(37)]
    labels = torch.arange(n) % len(classes)
    ctx.accelerator()  # fix the process's accelerate state (device) before the trainer makes its own
    cfg = DiffCTrainConfig(epochs=1, batch_size=S.diffc_batch, hidden=S.diffc_hidden, val_fraction=0.0, seed=0)
    warm = min(n, 4 * S.diffc_batch)
    train_diffc(LabeledFeatures(feats[:warm], labels[:warm], None, None), classes, ctx.work / "diffc_warm", cfg,
                progress=False)
    result = train_diffc(LabeledFeatures(feats, labels, None, None), classes, ctx.work / "diffc", cfg, progress=False)
    seconds = result.fit.history[-1]["train_seconds"]
    rec.add(f"one epoch, {c}x{m}x{m} maps, batch {S.diffc_batch}", n / seconds, "img/s",
            note=f"{n} images, mixed_precision=no (the trainer default)")


# ------------------------------------------------------------------ 4. atlas


def step_atlas(ctx: Context, rec: StepRecord) -> None:
    import bench_atlas

    S = ctx.sizes
    args = bench_atlas.parse_args([
        "--images", str(S.atlas_images), "--d-in", str(S.ksae_d), "--n-latents", str(S.ksae_latents),
        "--k", str(S.ksae_k), "--batch-size", str(S.atlas_batch), "--device", str(ctx.device), "--repeats", "2"])
    report = bench_atlas.measure(args)
    rec.add(f"ours streaming, {S.ksae_latents} latents", report["ours_img_per_s"], "img/s")
    rec.add("original-style dense N x n_latents", report["original_style_img_per_s"], "img/s")
    rec.add("dense matrix at 100k images", report["dense_matrix_gb_at_100k_images"], "GB",
            note="what the original-style path would hold")
    if not report["same_top_images"]:
        raise AssertionError("the streaming atlas picked other top images than the dense baseline")


# ------------------------------------------------------------------ 5. the app


def build_release(ctx: Context) -> Path:
    """A release for the SD-1.5-architecture folder: random SAE, Diff-C and atlas on ``up_ft1`` at t = 25."""
    import torch
    from PIL import Image

    import paper_models
    from revelio_hub.interpret.atlas_builder import build_atlas
    from revelio_hub.interpret.atlas_config import AtlasConfig
    from revelio_hub.diffc.model import DiffC
    from revelio_hub.recipe import FeatureRecipe
    from revelio_hub.release import EntrySource, assemble_release
    from revelio_hub.sae.model import KSparseAutoencoder

    S = ctx.sizes
    sd = ctx.folder("sd15")
    d = paper_models.sd15_layer_channels(ctx.small)["up_ft1"]
    base = dict(backbone=str(sd), layer="up_ft1", timestep=25, image_size=S.app_px, d_in=d, family="sd")
    recipe = FeatureRecipe(**base, granularity="pooled").to_dict()
    root = ctx.work / "app"
    torch.manual_seed(0)
    sae = KSparseAutoencoder(d, S.ksae_latents, k=S.ksae_k, recipe=recipe)
    sae.save_pretrained(root / "sae")
    classes = [f"class {i}" for i in range(S.app_classes)]
    DiffC(d, classes, head="conv", hidden=S.diffc_hidden,
          recipe=FeatureRecipe(**base, granularity="spatial").to_dict()).save_pretrained(root / "diffc")
    n = S.app_atlas_images
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) + 1.0
    labels, ids = torch.arange(n) % len(classes), torch.arange(n)
    batches = [(feats[i:i + 64], labels[i:i + 64], ids[i:i + 64]) for i in range(0, n, 64)]
    build_atlas(batches, classes, sae=sae,
                config=AtlasConfig(top_n=10, purity_top=10, summary_neurons=min(1000, S.ksae_latents),
                                   thumbnail_size=64),
                thumbnails=lambda i: Image.new("RGB", (64, 64), (int(i) * 37 % 256, 90, 160)),
                out=root / "atlas", extra_meta={"recipe": recipe, "layer": "up_ft1", "timestep": 25})
    return assemble_release(root / "release", [EntrySource(sae=root / "sae", diffc=root / "diffc",
                                                           atlas=root / "atlas", layer="up_ft1", timestep=25)],
                            backbone=str(sd), name="gpu-suite-sd15-random", overwrite=True, figure=False)


def _app_images(folder: Path, n: int, size: int) -> list[Path]:
    """Distinct images (each a new backbone pass), saved as PNG uploads."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        pixels = (rng.random((size // 8, size // 8, 3)) * 255).astype("uint8")
        path = folder / f"upload_{i}.png"
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def step_app(ctx: Context, rec: StepRecord) -> None:
    from bench_app import _free_port, _summary
    from gradio_client import Client, handle_file

    from revelio_hub.app.state import AppConfig, AppState
    from revelio_hub.app.ui import build_ui, launch_kwargs

    S = ctx.sizes
    release = build_release(ctx)
    state = AppState.from_config(AppConfig(releases=[str(release)], device=str(ctx.device),
                                           dtype="bfloat16" if ctx.cuda else "float32"))
    demo = build_ui(state)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(state))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        images = _app_images(ctx.work / "uploads", 1 + S.app_warmup + S.app_calls, S.app_px)

        def call(path: Path) -> float:
            start = time.perf_counter()
            out = client.predict(handle_file(str(path)), "", -1, "", api_name="/analyze_json")
            seconds = time.perf_counter() - start
            if not out.get("neurons"):
                raise AssertionError(f"/analyze_json returned no neurons: {str(out)[:300]}")
            return seconds

        rec.add("first call (loads the backbone)", call(images[0]), "s")
        for path in images[1:1 + S.app_warmup]:
            call(path)
        new = _summary([call(p) for p in images[1 + S.app_warmup:]])
        repeated = _summary([call(images[0]) for _ in range(S.app_calls)])
        note = f"{S.app_px}px upload, {'bf16' if ctx.cuda else 'fp32'}, n={new['n']}"
        rec.add("/analyze_json new image p50", new["p50_ms"], "ms", goal=None if ctx.small else GOAL_APP, note=note)
        rec.add("/analyze_json new image p95", new["p95_ms"], "ms")
        rec.add("/analyze_json repeated image p50", repeated["p50_ms"], "ms", note="feature cache hit")
    finally:
        demo.close()


# ------------------------------------------------------------------ 6. two processes


def multigpu_skip_reason(ctx: Context) -> Optional[str]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not ctx.cuda or gpus < 2:
        return f"needs 2 CUDA GPUs for accelerate launch --multi_gpu; this run has {gpus if ctx.cuda else 0}"
    return None


def step_multigpu(ctx: Context, rec: StepRecord) -> None:
    import bench_ksae
    from safetensors.torch import save_file

    S = ctx.sizes
    folder = ctx.work / "multigpu"
    folder.mkdir(parents=True, exist_ok=True)
    n = S.ksae_batches * S.ksae_batch + S.ksae_heldout
    save_file({"features": bench_ksae.make_data(n, S.ksae_d, seed=0)}, str(folder / "features.safetensors"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(REPO / "training" / "train_ksae.py"), "--features", str(folder / "features.safetensors"),
           "--k", str(S.ksae_k), "--n-latents", str(S.ksae_latents), "--batch-size", str(S.ksae_batch),
           "--steps", str(S.multigpu_steps), "--warmup-steps", "0", "--checkpoint-every", "0",
           "--out", str(folder / "run"), "--no-progress", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(5.0, rec.time_left() - 2))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}:\n{tail}")
    evals = json.loads((folder / "run" / "eval.json").read_text())
    rec.add("2-process wall time (start-up included)", wall, "s")
    rec.add("2-process throughput (start-up included)", S.multigpu_steps * S.ksae_batch / wall, "samples/s")
    rec.add("2-process held-out FVU", evals["fvu"], "FVU")


# ------------------------------------------------------------------ machine, CLI


def machine_info(ctx: Context) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(ctx.device), "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}"})
    versions = {}
    for name in ("diffusers", "transformers", "accelerate", "gradio", "gradio_client", "huggingface_hub",
                 "safetensors"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            versions[name] = None
    info["packages"] = versions
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - a copied tree without .git
        info["git_commit"] = None
    return info


def build_steps(ctx: Context) -> list[Step]:
    def needs(name: str, extra: Callable[[], Optional[str]] = lambda: None) -> Callable[[], Optional[str]]:
        def skip() -> Optional[str]:
            missing = missing_packages(STEP_PACKAGES[name])
            return install_hint(missing) if missing else extra()
        return skip

    return [
        Step("models", "SD-1.5 and DiT-XL/2 folders, random weights", lambda r: step_models(ctx, r),
             share=0.10, skip=needs("models")),
        Step("extract", "extraction: original-style vs ours, eager and compiled", lambda r: step_extract(ctx, r),
             share=0.35, skip=needs("extract")),
        Step("ksae", "k-SAE training step: original-style vs train_sae", lambda r: step_ksae(ctx, r), share=0.15,
             skip=needs("ksae")),
        Step("diffc", "Diff-C: one epoch on cached up_ft1 maps", lambda r: step_diffc(ctx, r), share=0.07,
             skip=needs("diffc")),
        Step("atlas", "atlas statistics: streaming vs dense", lambda r: step_atlas(ctx, r), share=0.06,
             skip=needs("atlas")),
        Step("app", "/analyze_json through gradio_client", lambda r: step_app(ctx, r), share=0.17,
             skip=needs("app")),
        Step("multigpu", "train_ksae.py under accelerate launch --multi_gpu (2 processes)",
             lambda r: step_multigpu(ctx, r), share=0.10, skip=needs("multigpu", lambda: multigpu_skip_reason(ctx))),
    ]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device to measure (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="total seconds for all steps; each step gets its share of what is left (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the full report to this JSON file")
    p.add_argument("--small", action="store_true",
                   help="tiny models and workloads (same code paths) for a CPU dry run; figures mean nothing")
    p.add_argument("--only", default=None, help="comma-separated steps to run (default: all): "
                   "models,extract,ksae,diffc,atlas,app,multigpu (extract and app build the models they need)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the compiled extraction (default: inductor; eager with --small, "
                        "which traces with dynamo but skips code generation)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, where a shared machine's descheduled "
                        "threads stall multi-threaded small ops; torch's default otherwise)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary folder (model folders, release)")
    p.add_argument("--print-wheel-command", action="store_true",
                   help="print the pip command that fetches the wheels a GPU image lacks into wheels/, and exit")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_wheel_command:
        print(wheel_download_command())
        return 0
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (torch "
              f"{torch.__version__}); use --device cpu --small for a dry run", file=sys.stderr)
        return 2
    threads = args.threads or (1 if torch.device(args.device).type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    missing = missing_packages({n for names in STEP_PACKAGES.values() for n in names})
    if missing:
        print_now(f"note: {install_hint(missing)}")
    for name in ("diffusers", "transformers"):  # their per-file progress bars would drown the log
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    os.environ["REVELIO_HUB_CACHE"] = str(work / "cache")  # no conditioning cache entries left behind
    backend = args.compile_backend or ("eager" if args.small else "inductor")
    ctx = Context(args.device, args.small, work, backend)
    steps = build_steps(ctx)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            print(f"error: unknown step(s) {unknown}; valid: {', '.join(s.name for s in steps)}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in wanted]
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        records = run_steps(steps, args.budget_s, log=print_now, cleanup=ctx.free)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    info = machine_info(ctx)
    gpu = ", ".join(g["name"] for g in info["gpus"]) or "no GPU"
    header = (f"GPU suite {started:%Y-%m-%d %H:%M} UTC on {args.device} ({gpu}){' --small' if args.small else ''}; "
              f"torch {info['torch']}, CUDA {info['cuda'] or 'n/a'}, budget {args.budget_s:.0f} s")
    print(render_table(records, header))
    report = {
        "suite": "benchmarks/gpu_suite.py", "format_version": 1, "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {"device": args.device, "small": args.small, "budget_s": args.budget_s,
                   "compile_backend": backend, "sizes": asdict(ctx.sizes)},
        "goals": {"extract_bottleneck_512_img_s": GOAL_EXTRACT, "ksae_samples_s": GOAL_KSAE,
                  "app_p50_ms": GOAL_APP},
        "missing_packages": missing,
        "steps": [r.to_json() for r in records],
        "total_seconds": round(sum(r.seconds for r in records), 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print_now(f"wrote {args.json}")
    return 0 if all(r.status in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
