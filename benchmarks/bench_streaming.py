#!/usr/bin/env python
"""Streaming k-SAE training against extract-then-train, on the toy backbone, same images, same settings.

``store``: :func:`revelio_hub.features.extract_to_store` writes the pooled features
of every (layer, t) once, then :func:`revelio_hub.sae.training.train_sae` trains
one SAE per entry from the store. ``stream``:
:func:`revelio_hub.sae.streaming.train_sae_stream` trains all of them from one
backbone pass per batch, with no store. Each mode runs in a fresh child process
(so peak resident memory is its own; ``ru_maxrss``), in alternating rounds.

Prints wall time, peak memory, disk written and the held-out FVU of every entry
for both, and the ratios stream / store (``--json`` for one JSON line). Streaming
extracts every image once per *epoch*, extract-then-train once in all: its wall
time grows with the number of epochs, and what it saves is the store.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=str(REPO / "releases/toy-shapes/backbone"),
                   help="Backbone folder or Hub id (default: the bundled toy backbone).")
    p.add_argument("--images", type=int, default=320, help="Toy shape images to train on (default: %(default)s).")
    p.add_argument("--layers", nargs="+", default=["bottleneck", "up_ft1"], help="default: %(default)s")
    p.add_argument("--timesteps", nargs="+", type=int, default=[25, 100], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=64, help="Images per SAE step (default: %(default)s).")
    p.add_argument("--steps", type=int, default=25, help="SAE steps (default: %(default)s).")
    p.add_argument("--k", type=int, default=8, help="default: %(default)s")
    p.add_argument("--expansion", type=int, default=4, help="default: %(default)s")
    p.add_argument("--extract-batch-size", type=int, default=32, help="Images per backbone call (default: %(default)s).")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each child (default: %(default)s).")
    p.add_argument("--rounds", type=int, default=1, help="Alternating rounds of both modes (default: %(default)s).")
    p.add_argument("--modes", nargs="+", choices=["store", "stream"], default=["store", "stream"],
                   help="Which modes to run (default: both).")
    p.add_argument("--seeds", type=int, default=1,
                   help="store mode also trains SAE seeds 1..N-1 (init, split, order) and reports the FVU spread: "
                        "the noise a stream/store difference is compared with (default: %(default)s).")
    p.add_argument("--json", action="store_true", help="Print one JSON line instead of a table.")
    p.add_argument("--child", choices=["store", "stream"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(a, seed: int = 0):
    from revelio_hub.sae.training import SAETrainConfig

    return SAETrainConfig(k=a.k, expansion=a.expansion, batch_size=a.batch_size, steps=a.steps, lr=2e-3,
                          warmup_steps=min(10, a.steps), eval_fraction=0.1, checkpoint_every=0, log_every=a.steps,
                          seed=seed)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _child(a) -> dict:
    """One mode in this process: wall time, peak RSS, disk, held-out FVU per entry."""
    import torch

    from revelio_hub.backbones import load_backbone
    from revelio_hub.data import open_image_dataset
    from revelio_hub.features import extract_to_store
    from revelio_hub.sae.streaming import train_sae_stream
    from revelio_hub.sae.training import load_store_features, train_sae

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    backbone = load_backbone(a.backbone)
    source = open_image_dataset(str(work / "images"))
    cfg = _config(a)
    t0 = time.perf_counter()
    fvu, disk, spread = {}, 0, {}
    if a.child == "store":
        store = work / "store"
        extract_to_store(backbone, source, store, a.layers, a.timesteps, batch_size=a.extract_batch_size,
                         progress=False, overwrite=True)
        disk = _folder_bytes(store)
        for layer in a.layers:
            for t in a.timesteps:
                feats, recipe = load_store_features(store, layer, t)
                r = train_sae(feats, cfg, recipe=recipe, progress=False)
                fvu[f"{layer}/t{t}"] = r.eval["fvu"]
        seconds = time.perf_counter() - t0  # the extra seeds below are not part of the timed run
        for layer in a.layers:
            for t in a.timesteps:
                feats, recipe = load_store_features(store, layer, t)
                fvus = [fvu[f"{layer}/t{t}"]] + [train_sae(feats, _config(a, seed), recipe=recipe, progress=False).eval["fvu"]
                                                 for seed in range(1, a.seeds)]
                spread[f"{layer}/t{t}"] = max(fvus) - min(fvus)
    else:
        out = work / "stream"
        results = train_sae_stream(backbone, source, out, a.layers, a.timesteps, cfg,
                                   extract_batch_size=a.extract_batch_size, progress=False, overwrite=True)
        fvu = {f"{layer}/t{t}": r.eval["fvu"] for (layer, t), r in results.items()}
        disk = sum(_folder_bytes(out / layer / f"t{t}" / "checkpoint") for layer in a.layers for t in a.timesteps
                   if (out / layer / f"t{t}" / "checkpoint").exists())
        seconds = time.perf_counter() - t0
    return {"mode": a.child, "fvu_seed_spread": spread, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "feature_bytes_on_disk": disk, "fvu": fvu}


def _run_child(a, mode: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--backbone", a.backbone,
           "--layers", *a.layers, "--timesteps", *map(str, a.timesteps), "--batch-size", str(a.batch_size),
           "--steps", str(a.steps), "--k", str(a.k), "--expansion", str(a.expansion),
           "--extract-batch-size", str(a.extract_batch_size), "--threads", str(a.threads), "--seeds", str(a.seeds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        print(json.dumps(_child(a)))
        return 0
    from revelio_hub.toy.shapes import make_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    try:
        make_shapes_dataset(a.images, seed=0, image_size=32).save_to_disk(str(work / "images"))
        runs = {mode: [] for mode in a.modes}
        for _ in range(a.rounds):
            for mode in a.modes:
                runs[mode].append(_run_child(a, mode, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in runs.items()}
    summary = {"images": a.images, "entries": len(a.layers) * len(a.timesteps), "steps": a.steps,
               "batch_size": a.batch_size, "epochs": round(a.steps * a.batch_size / (a.images - round(a.images * 0.1)), 2),
               "threads": a.threads, "rounds": a.rounds, **best}
    if len(best) == 2:
        summary.update(
            time_ratio_stream_over_store=best["stream"]["seconds"] / best["store"]["seconds"],
            peak_rss_ratio_stream_over_store=best["stream"]["peak_rss_mb"] / best["store"]["peak_rss_mb"],
            max_abs_fvu_difference=max(abs(best["stream"]["fvu"][k] - best["store"]["fvu"][k]) for k in best["store"]["fvu"]),
        )
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"{a.images} toy images, {summary['entries']} (layer, t) entries, {a.steps} steps of {a.batch_size} "
          f"({summary['epochs']} epochs), {a.threads} threads, best of {a.rounds} round(s)")
    for mode, r in best.items():
        fvus = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["fvu"].items()))
        print(f"  {mode:6s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"features on disk {r['feature_bytes_on_disk'] / 1e6:6.2f} MB  FVU: {fvus}")
        if r["fvu_seed_spread"] and a.seeds > 1:
            print(f"         FVU spread over {a.seeds} SAE seeds: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["fvu_seed_spread"].items())))
    if len(best) == 2:
        print(f"  stream / store: time {summary['time_ratio_stream_over_store']:.2f}x, peak RSS "
              f"{summary['peak_rss_ratio_stream_over_store']:.2f}x, max |FVU diff| {summary['max_abs_fvu_difference']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
