#!/usr/bin/env python
"""Our k-SAE trainer against EleutherAI sparsify's, same data, same samples, same batch, one run.

Both train a TopK SAE (k, n_latents equal) on the same synthetic set with known
atoms (``revelio_hub.sae.synthetic``) for the same steps; sparsify with its
defaults (``benchmarks/peer_trainers.py``: signum + schedule-free, its auto lr),
ours with the default recipe for each ``--variants`` entry. Rounds alternate
the trainers (ours, sparsify, ours, ...) so a change in machine load hits both.
Prints per trainer the training-loop seconds (median over rounds), the ratio
``ours / sparsify`` (≤ 1 = ours as fast or faster), held-out FVU, dead fraction
and atom MCC. ``--json``: one JSON line. Needs ``pip install eai-sparsify``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from peer_trainers import sparsify_available, sparsify_metrics, train_sparsify
from revelio_hub.sae.synthetic import SyntheticAtoms, atom_mcc, make_synthetic
from revelio_hub.sae.training import SAETrainConfig, train_sae
from revelio_hub.training_recipes import get_recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=262_144, help="Training samples per trainer (default: %(default)s).")
    p.add_argument("--batch-size", type=int, default=4096, help="(default: %(default)s)")
    p.add_argument("--k", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--n-latents", type=int, default=4096, help="(default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="Our variants (default: topk and the default recipe's variant).")
    p.add_argument("--rounds", type=int, default=2, help="Alternating rounds (default: %(default)s).")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both (default: %(default)s).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not sparsify_available():
        print("bench_peers needs sparsify: pip install eai-sparsify", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    variants = a.variants or sorted({"topk", get_recipe("default").sae.variant})
    data, atoms = make_synthetic(SyntheticAtoms(seed=a.seed), a.samples + 20_000)
    x, ev = data[:a.samples], data[a.samples:]
    steps = max(1, a.samples // a.batch_size)
    times: dict[str, list[float]] = {v: [] for v in variants + ["sparsify"]}
    quality: dict[str, dict] = {}
    for _ in range(a.rounds):
        for v in variants:
            cfg = SAETrainConfig(k=a.k, n_latents=a.n_latents, batch_size=a.batch_size, steps=steps, variant=v,
                                 eval_fraction=0.0, checkpoint_every=0, log_every=10**9, seed=a.seed,
                                 dead_eval_min_samples=ev.shape[0])
            r = train_sae(x, cfg, progress=False, eval_features=ev)
            times[v].append(r.train_seconds)
            quality[v] = {"fvu": r.eval["fvu"], "dead_fraction": r.eval["dead_fraction"],
                          "mcc": atom_mcc(r.model.W_dec, atoms), "lr": r.eval["lr"]}
            s = train_sparsify(x, k=a.k, n_latents=a.n_latents, batch_size=a.batch_size, steps=steps, seed=a.seed)
            times["sparsify"].append(s.seconds)
            quality["sparsify"] = {**sparsify_metrics(s.model, ev), "mcc": atom_mcc(s.model.W_dec, atoms)}
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"trainer": name, "seconds": med[name], "ratio_vs_sparsify": med[name] / med["sparsify"], **quality[name]}
            for name in times]
    if a.json:
        print(json.dumps({"benchmark": "peers", "samples": a.samples, "batch_size": a.batch_size, "k": a.k,
                          "n_latents": a.n_latents, "steps": steps, "rounds": a.rounds, "threads": a.threads,
                          "rows": rows}))
    else:
        for r in rows:
            print(f"{r['trainer']:>10}  {r['seconds']:7.1f} s  ×{r['ratio_vs_sparsify']:.2f}  FVU {r['fvu']:.4f}  "
                  f"dead {100 * r['dead_fraction']:.1f}%  MCC {r['mcc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
