#!/usr/bin/env python
"""Which learning rate should the default k-SAE recipe use? Synthetic atom recovery at a given run length.

Trains our trainer with several learning-rate rules, and sparsify's defaults
(``benchmarks/peer_trainers.py``, when ``eai-sparsify`` is installed), on the
same synthetic set with known atoms (``revelio_hub.sae.synthetic``: 512 unit
atoms in d 128, 5–10 active per sample) for the same samples and batch, and
prints per arm: MCC of decoder rows against the true atoms (Hungarian matching
of |cosine|, SAELens's definition), held-out FVU, dead fraction (never active
with a value > 0 on the held-out rows) and training seconds. ``--json``: one JSON line.

Arms: ``paper`` (Adam 4e-4, 500 warm-up steps: the original Revelio code's
numbers), ``auto`` (the default recipe's rule, ``revelio_hub.sae.schedule``),
``lr=<x>`` (Adam at a fixed rate, the auto warm-up), ``sparsify`` (its signum +
schedule-free defaults, lr 5e-3/√(n/2¹⁴)).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from peer_trainers import sparsify_available, sparsify_metrics, train_sparsify
from revelio_hub.sae.synthetic import SyntheticAtoms, atom_mcc, make_synthetic
from revelio_hub.sae.training import SAETrainConfig, train_sae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000, help="Training samples seen (default: %(default)s).")
    p.add_argument("--train-rows", type=int, default=1_000_000, help="Distinct training rows (default: %(default)s).")
    p.add_argument("--eval-rows", type=int, default=50_000, help="Held-out rows (default: %(default)s).")
    p.add_argument("--batch-size", type=int, default=8192, help="Batch for every arm (default: ours, %(default)s).")
    p.add_argument("--k", type=int, default=8, help="Active latents (default: %(default)s).")
    p.add_argument("--n-latents", type=int, default=4096, help="Dictionary size (default: %(default)s, 32x d).")
    p.add_argument("--variant", default="topk", help="Our variant (default: %(default)s).")
    p.add_argument("--arms", nargs="+", default=["paper", "auto", "lr=2e-3", "sparsify"],
                   help="paper, auto, lr=<x>, sparsify (default: %(default)s).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print one JSON line.")
    return p.parse_args(argv)


def run_ours(arm: str, x: torch.Tensor, ev: torch.Tensor, atoms: torch.Tensor, a) -> dict:
    steps = max(1, a.samples // a.batch_size)
    rate = dict(paper=dict(lr=4e-4, warmup_steps=500), auto={})[arm] if arm in ("paper", "auto") else \
        dict(lr=float(arm.split("=", 1)[1]))
    cfg = SAETrainConfig(k=a.k, n_latents=a.n_latents, batch_size=a.batch_size, steps=steps, eval_fraction=0.0,
                         checkpoint_every=0, log_every=10**9, seed=a.seed, variant=a.variant,
                         dead_eval_min_samples=ev.shape[0], **rate)
    r = train_sae(x, cfg, progress=False, eval_features=ev)
    return {"arm": arm, "mcc": atom_mcc(r.model.W_dec, atoms), "fvu": r.eval["fvu"],
            "dead_fraction": r.eval["dead_fraction"], "l0": r.eval["l0"], "lr": r.eval["lr"],
            "warmup_steps": r.eval["warmup_steps"], "steps": steps, "train_seconds": r.train_seconds}


def run_sparsify(x: torch.Tensor, ev: torch.Tensor, atoms: torch.Tensor, a) -> dict:
    steps = max(1, a.samples // a.batch_size)
    run = train_sparsify(x, k=a.k, n_latents=a.n_latents, batch_size=a.batch_size, steps=steps, seed=a.seed)
    m = sparsify_metrics(run.model, ev)
    return {"arm": "sparsify", "mcc": atom_mcc(run.model.W_dec, atoms), **m, "steps": steps,
            "lr": 5e-3 / (a.n_latents / 2**14) ** 0.5, "train_seconds": run.seconds}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = SyntheticAtoms(seed=a.seed)
    data, atoms = make_synthetic(spec, a.train_rows + a.eval_rows)
    x, ev = data[: a.train_rows], data[a.train_rows:]
    rows = []
    for arm in a.arms:
        t = time.perf_counter()
        if arm == "sparsify":
            if not sparsify_available():
                print("sparsify is not installed (pip install eai-sparsify): arm skipped", file=sys.stderr)
                continue
            row = run_sparsify(x, ev, atoms, a)
        else:
            row = run_ours(arm, x, ev, atoms, a)
        row["wall_seconds"] = time.perf_counter() - t
        rows.append(row)
        if not a.json:
            print(f"{row['arm']:>10}  MCC {row['mcc']:.3f}  FVU {row['fvu']:.4f}  dead {100 * row['dead_fraction']:.1f}%  "
                  f"lr {row['lr']:.2e}  {row['train_seconds']:.0f} s", flush=True)
    summary = {"benchmark": "sae_defaults", "samples": a.samples, "batch_size": a.batch_size, "k": a.k,
               "n_latents": a.n_latents, "variant": a.variant, "synthetic": {"d": spec.d, "n_atoms": spec.n_atoms,
               "active": [spec.min_active, spec.max_active]}, "threads": torch.get_num_threads(), "arms": rows}
    if a.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
