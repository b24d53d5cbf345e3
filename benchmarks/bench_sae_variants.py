#!/usr/bin/env python
"""SAE variant scoreboard: ground truth on synthetic atoms and on the toy shapes, per variant, same L0.

Synthetic (``revelio_hub.sae.synthetic``): 512 unit atoms in d 128, 5–10 active
per sample; per variant, MCC of decoder rows against the true atoms (Hungarian
matching of |cosine|, SAELens's definition), held-out FVU, L0, dead fraction.

Toy (every ``--layers`` entry at ``--timestep``, features of the toy build's
work folder ``--work``: ``features/train`` trains, ``features/test`` = held-out
shapes scores): per variant trained exactly like the release's SAEs (token
level, ``--tokens-per-image`` positions per image drawn as ``--token-sampling``, k, expansion, steps, lr
of the toy build), plus the bundled release's SAE as ``release``:

* FVU, L0 and dead fraction (never active with a value > 0) on held-out tokens;
* matched correlation: one-to-one (Hungarian) Pearson correlation between
  neurons' image activations (max over positions) and the indicators of the 16
  values of shape, colour, size and background (position left out), on all
  held-out images;
* probe 1 / probe 5: per factor, multinomial logistic regression on the 1 or 5
  neurons per value with the largest mean-activation difference, fitted on the
  even held-out images, accuracy on the odd ones, mean over the four factors;
  ``probe_dense``: the same probe on all raw mean-pooled channels;
* nameable listings / …true: of the 5 neurons each odd held-out image lists (as
  the app: most relevant, dense hidden), the share whose neuron an all-knowing
  labeller, fitted on the even images, names with a value holding on ≥ 90 % of
  its strong firings, and the share of those names true of the image
  (:func:`revelio_hub.sae.scoreboard.nameable_listings`);
* Diff-C loss recovered: the release's Diff-C shape accuracy on the SAE's
  reconstruction of every position of the held-out maps ÷ on the raw maps
  (entries whose release has a Diff-C head).

Subsampling, to run in minutes on 2 CPU cores: training uses the toy build's
sampled tokens (32 per image), held-out FVU/L0/dead use 32 sampled positions per
held-out image; the synthetic set is ``--synthetic-samples`` rows (one pass).
``--json`` prints the report; :func:`revelio_hub.sae.scoreboard.scoreboard_markdown`
renders it as the table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from revelio_hub.diffc.model import DiffC
from revelio_hub.diffc.training import predict_logits
from revelio_hub.features import FeatureStore
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.sae.scoreboard import (SCOREBOARD_FILE, card_section, factor_indicators, matched_correlation,
                                        merge_reports, nameable_listings, probe_accuracy, scoreboard_markdown,
                                        sparse_probe_accuracy, with_card_section)
from revelio_hub.sae.synthetic import SyntheticAtoms, atom_mcc, make_synthetic
from revelio_hub.sae.training import (TOKEN_SAMPLINGS, SAETrainConfig, evaluate_sae, load_store_features,
                                      sample_tokens, train_sae)
from revelio_hub.sae.variants import VARIANTS
from revelio_hub.toy.build_recipe import TOY_SAE_TOKEN_SAMPLING, TOY_SAE_TOKENS_PER_IMAGE
from revelio_hub.toy.shapes import FACTORS

SCORED_FACTORS = ("shape", "color", "size", "background")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/toy-build",
                   help="Toy build work folder (features/, data/test; training/build_toy_release.py --work) (default: %(default)s).")
    p.add_argument("--release", default="releases/toy-shapes", help="Toy release (its SAEs and Diff-C heads) (default: %(default)s).")
    p.add_argument("--layers", nargs="*", default=["down_ft1", "bottleneck", "up_ft0", "up_ft1"],
                   help="Toy entries to score (none: synthetic only) (default: %(default)s).")
    p.add_argument("--timestep", type=int, default=25)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="Variants to train; none (`--variants` alone) scores only the release's own SAEs "
                        "(default: all).")
    p.add_argument("--k", type=int, default=8, help="Active latents, all variants (default: the toy build's, %(default)s).")
    p.add_argument("--expansion", type=int, default=8, help="(default: the toy build's, %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="(default: the toy build's, %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024, help="(default: the toy build's, %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="(default: the toy build's, %(default)s; 0 = the default recipe's rule for lr and warm-up)")
    p.add_argument("--warmup-steps", type=int, default=100, help="(default: the toy build's, %(default)s)")
    p.add_argument("--tokens-per-image", type=int, default=TOY_SAE_TOKENS_PER_IMAGE,
                   help="training positions per image (default: the toy build's, %(default)s)")
    p.add_argument("--token-sampling", choices=TOKEN_SAMPLINGS, default=TOY_SAE_TOKEN_SAMPLING,
                   help="how they are drawn (default: the toy build's, %(default)s); held-out tokens are uniform")
    p.add_argument("--synthetic-samples", type=int, default=1_000_000, help="0 skips the synthetic part (default: %(default)s).")
    p.add_argument("--synthetic-k", type=int, default=8)
    p.add_argument("--synthetic-latents", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="Print the report as one JSON object.")
    p.add_argument("--out", default=None, help="Also write the JSON report here.")
    p.add_argument("--merge", nargs="+", default=[], metavar="REPORT",
                   help="Earlier --out reports (e.g. one per --lr) to show with this run's rows in one scoreboard.")
    p.add_argument("--card", default=None, metavar="RELEASE",
                   help="Write the (merged) scoreboard into this release: sae_variants.json and the card's "
                        "'SAE variants' section (replaced when present).")
    return p.parse_args(argv)


def synthetic_rows(a) -> list[dict]:
    spec = SyntheticAtoms(seed=a.seed)
    n_eval = 50_000
    data, atoms = make_synthetic(spec, a.synthetic_samples + n_eval)
    x, ev = data[:a.synthetic_samples], data[a.synthetic_samples:]
    rows = []
    for variant in a.variants:
        cfg = SAETrainConfig(k=a.synthetic_k, n_latents=a.synthetic_latents, batch_size=8192,
                             steps=max(1, a.synthetic_samples // 8192), eval_fraction=0.0, checkpoint_every=0,
                             log_every=10**9, seed=a.seed, variant=variant, dead_eval_min_samples=n_eval)
        r = train_sae(x, cfg, progress=False, eval_features=ev)
        rows.append({"variant": variant, "d": spec.d, "n_atoms": spec.n_atoms, "mcc": atom_mcc(r.model.W_dec, atoms),
                     "fvu": r.eval["fvu"], "l0": r.eval["l0"], "dead_fraction": r.eval["dead_fraction"],
                     "lr": r.eval["lr"], "samples": a.synthetic_samples, "train_seconds": r.train_seconds})
        log(f"synthetic {variant}: MCC {rows[-1]['mcc']:.3f} FVU {rows[-1]['fvu']:.3f}", a)
    return rows


def log(msg: str, a) -> None:
    print(msg, file=sys.stderr, flush=True)


class HeldOut:
    """The held-out shapes of one entry: maps, sampled tokens, factor labels, pooled raw features."""

    def __init__(self, work: Path, layer: str, t: int, tokens_per_image: int, seed: int):
        import datasets

        fs = FeatureStore(work / "features" / "test")
        got = fs.load(layer, t, kind="spatial", views=[0])
        self.maps = got.features.float()
        self.tokens, _ = sample_tokens(self.maps, tokens_per_image, seed=seed + 1)
        rows = datasets.load_from_disk(str(work / "data" / "test"))
        order = {int(i): j for j, i in enumerate(rows["image_id"])}
        pick = torch.tensor([order[int(i)] for i in got.image_ids])
        self.labels = {f: torch.tensor(rows[f])[pick] for f in SCORED_FACTORS}
        self.shape_labels = got.labels.long()
        self.pooled = self.maps.mean(dim=(2, 3))
        self.indicators, _ = factor_indicators(self.labels, {f: len(FACTORS[f]) for f in SCORED_FACTORS})
        self.fit = torch.arange(self.maps.shape[0]) % 2 == 0


@torch.no_grad()
def image_acts(model: KSparseAutoencoder, maps: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    return torch.cat([model.image_activations(maps[i:i + chunk]) for i in range(0, maps.shape[0], chunk)])


def probes(acts: torch.Tensor, h: HeldOut) -> dict:
    out = {}
    for name, per in (("probe_1", 1), ("probe_5", 5)):
        out[name] = sum(sparse_probe_accuracy(acts[h.fit], y[h.fit], acts[~h.fit], y[~h.fit], len(FACTORS[f]), per)
                        for f, y in h.labels.items()) / len(h.labels)
    return out


@torch.no_grad()
def diffc_accuracy(head: DiffC, maps: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_logits(head, maps).argmax(1) == labels).float().mean())


@torch.no_grad()
def reconstruct_maps(model: KSparseAutoencoder, maps: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    return torch.cat([model(maps[i:i + chunk])[0] for i in range(0, maps.shape[0], chunk)])


def score(model: KSparseAutoencoder, h: HeldOut, head, raw_acc) -> dict:
    ev = evaluate_sae(model, h.tokens)
    acts = image_acts(model, h.maps)
    row = {"fvu": ev["fvu"], "l0": ev["l0"], "dead_fraction": ev["dead_fraction"],
           "matched_correlation": matched_correlation(acts, h.indicators), **probes(acts, h)}
    row["nameable"], row["nameable_precision"] = nameable_listings(acts, h.labels, h.fit)
    if head is not None:
        row["diffc_loss_recovered"] = diffc_accuracy(head, reconstruct_maps(model, h.maps), h.shape_labels) / raw_acc
    return row


def toy_rows(a) -> list[dict]:
    work, release, rows = Path(a.work), Path(a.release), []
    for layer in a.layers:
        entry = f"{layer}/t{a.timestep}"
        h = HeldOut(work, layer, a.timestep, a.tokens_per_image, a.seed)
        dense = sum(probe_accuracy(h.pooled[h.fit], y[h.fit], h.pooled[~h.fit], y[~h.fit], len(FACTORS[f]))
                    for f, y in h.labels.items()) / len(h.labels)
        head_dir = release / layer / f"t{a.timestep}" / "diffc"
        head = DiffC.from_pretrained(head_dir) if (head_dir / "model.safetensors").exists() else None
        raw_acc = diffc_accuracy(head, h.maps, h.shape_labels) if head is not None else None
        x, recipe = load_store_features(work / "features" / "train", layer, a.timestep, "token", a.tokens_per_image,
                                        [0], a.seed, a.token_sampling)
        bundled = release / layer / f"t{a.timestep}" / "sae"
        models = [("release", KSparseAutoencoder.from_pretrained(bundled), 0.0)] if bundled.exists() else []
        if models and models[0][1].granularity != "token":  # scored on tokens, a pooled SAE is off its inputs
            log(f"{entry}: the bundled SAE is {models[0][1].granularity}, not token-level; not scored here", a)
            models = []
        for variant in a.variants:
            cfg = SAETrainConfig(k=a.k, expansion=a.expansion, batch_size=a.batch_size, steps=a.steps,
                                 lr=a.lr or None, warmup_steps=a.warmup_steps if a.lr else None,  # 0: the rule
                                 eval_fraction=0.0, checkpoint_every=0,
                                 log_every=10**9, seed=a.seed, variant=variant)
            r = train_sae(x, cfg, progress=False, eval_features=h.tokens, recipe=recipe, granularity="token")
            models.append((variant, r.model, r.train_seconds))
        for variant, model, seconds in models:
            row = {"entry": entry, "variant": variant, **score(model, h, head, raw_acc), "probe_dense": dense,
                   "diffc_raw_accuracy": raw_acc, "train_seconds": seconds}
            rows.append(row)
            log(f"{entry} {variant}: FVU {row['fvu']:.3f} L0 {row['l0']:.1f} dead {row['dead_fraction']:.3f} "
                f"corr {row['matched_correlation']:.3f} probe1 {row['probe_1']:.3f} probe5 {row['probe_5']:.3f} "
                f"dense {dense:.3f} diffc {row.get('diffc_loss_recovered')}", a)
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    report = {"benchmark": "sae_variants", "settings": {k: v for k, v in vars(a).items() if k not in ("json", "out")},
              "toy": toy_rows(a) if a.layers else [],
              "synthetic": synthetic_rows(a) if a.synthetic_samples > 0 else [],
              "threads": torch.get_num_threads()}
    report["seconds"] = time.perf_counter() - t0
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    if a.merge or a.card:
        report = merge_reports([json.loads(Path(f).read_text()) for f in a.merge] + [report])
    if a.card:
        write_to_release(Path(a.card), report)
    print(json.dumps(report) if a.json else scoreboard_markdown(report))
    return 0


def write_to_release(release: Path, report: dict) -> None:
    """The scoreboard's rows next to the card, and its section in the card."""
    card = release / "README.md"
    if not card.exists():
        raise SystemExit(f"--card: {release} has no README.md (a release folder written by make_release.py)")
    (release / SCOREBOARD_FILE).write_text(json.dumps(report, indent=1) + "\n")
    card.write_text(with_card_section(card.read_text(), card_section(report)))


if __name__ == "__main__":
    sys.exit(main())
