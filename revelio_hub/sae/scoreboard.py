"""Ground-truth scores of an SAE on data whose factors are known, and the table that shows them.

Why: FVU says how much an SAE reconstructs, not whether its neurons mean
anything. On the toy shapes every image's factors (shape, colour, size,
background) are known, so three questions have answers:

* **matched correlation**: pair every factor value with its own neuron
  (one-to-one, Hungarian on the Pearson correlation between the neuron's
  image activation and the value's indicator) and average the paired
  correlations: 1 = a dedicated neuron per value.
* **sparse probing**: per factor, keep the m neurons per value whose mean
  activation differs most between that value and the rest (on the probe's
  training half), fit a multinomial logistic regression on them, report held-out
  accuracy next to the same probe on all raw features (dense).
* **Diff-C loss recovered** (computed by the benchmark): the release's classifier's
  accuracy on SAE reconstructions ÷ on the raw features.

:func:`scoreboard_markdown` renders a ``benchmarks/bench_sae_variants.py --json``
report as the Markdown table used in ``docs/benchmarks.md`` and in release cards.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Sequence

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["factor_indicators", "matched_correlation", "probe_accuracy", "sparse_probe_accuracy",
           "scoreboard_markdown", "merge_reports", "card_section", "with_card_section"]


def factor_indicators(labels: dict[str, torch.Tensor], n_values: dict[str, int]) -> tuple[torch.Tensor, list[str]]:
    """One-hot columns N×(Σ values) for the given factors, and their names ``"factor=i"``."""
    cols, names = [], []
    for factor, y in labels.items():
        for v in range(n_values[factor]):
            cols.append((y == v).float())
            names.append(f"{factor}={v}")
    return torch.stack(cols, 1), names


def matched_correlation(acts: torch.Tensor, indicators: torch.Tensor) -> float:
    """Mean Pearson correlation of the one-to-one (Hungarian) pairing of indicator columns with neurons.

    ``acts``: N×n_neurons image activations; ``indicators``: N×n_values. Neurons that never
    vary have correlation 0. Needs n_neurons ≥ n_values.
    """
    a = acts.double() - acts.double().mean(0)
    b = indicators.double() - indicators.double().mean(0)
    a_norm, b_norm = a.norm(dim=0), b.norm(dim=0)
    corr = (b.T @ a) / (b_norm[:, None] * a_norm[None, :]).clamp_min(1e-12)
    corr[:, a_norm == 0] = 0
    rows, cols = linear_sum_assignment(-corr.numpy())
    return float(corr[rows, cols].mean())


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mu) / sd, (test - mu) / sd


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   n_classes: int, l2: float = 1e-3, iters: int = 200) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS, small L2) on standardised inputs."""
    xtr, xte = _standardise(train_x.double(), test_x.double())
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, train_y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == test_y).double().mean())


def sparse_probe_accuracy(train_acts: torch.Tensor, train_y: torch.Tensor, test_acts: torch.Tensor,
                          test_y: torch.Tensor, n_classes: int, per_value: int) -> float:
    """Probe on ``per_value`` neurons per class, chosen on the training half by mean-activation difference."""
    chosen: list[int] = []
    for c in range(n_classes):
        inside = train_y == c
        if inside.all() or not inside.any():
            continue
        diff = train_acts[inside].mean(0) - train_acts[~inside].mean(0)
        if chosen:
            diff[chosen] = float("-inf")  # one neuron serves one value
        chosen += diff.topk(per_value).indices.tolist()
    cols = torch.tensor(sorted(set(chosen)))
    return probe_accuracy(train_acts[:, cols], train_y, test_acts[:, cols], test_y, n_classes)


def nameable_listings(acts: torch.Tensor, labels: dict[str, torch.Tensor], fit: torch.Tensor, *, top: int = 5,
                      precision: float = 0.9, strong: float = 1.5, dense_frequency: float = 0.5,
                      min_firings: int = 3) -> tuple[float, float]:
    """How often the neurons an image lists could be named, and how often that name is then true.

    The app lists an image's ``top`` most relevant neurons (activation ÷ the
    neuron's mean activation when firing; neurons firing on more than
    ``dense_frequency`` of images hidden). Here each neuron is named, from the
    ``fit`` images, by the label value most common on the images it fires
    strongly on (≥ ``strong`` × its mean), when that value holds on at least
    ``precision`` of them (and it fired strongly ``min_firings`` times); this
    labeller knows every factor, so it bounds what any summary rule can name.
    Returns (share of the other images' listings whose neuron is named, share
    of those named listings whose value is true of the image): an SAE whose
    neurons carry single values scores high on both.
    """
    fired = acts[fit] > 0
    mean = acts[fit].sum(0) / fired.sum(0).clamp_min(1)
    dense = fired.float().mean(0) > dense_frequency
    strong_fit = (acts[fit] >= strong * mean) & fired
    values = torch.cat([torch.nn.functional.one_hot(y.clamp_min(0), int(y.max()) + 1) * (y >= 0)[:, None]
                        for y in labels.values()], 1).float()  # images × all values
    counts = strong_fit.float().t() @ values[fit]  # neurons × values
    n = strong_fit.sum(0)
    best_count, best_value = counts.max(1)
    named = (n >= min_firings) & (best_count >= precision * n.clamp_min(1))
    relevance = torch.where(acts[~fit] > 0, acts[~fit] / mean.clamp_min(1e-12), torch.full_like(acts[~fit], -1.0))
    relevance[:, dense] = -1.0
    rel, listed = relevance.topk(min(top, acts.shape[1]), dim=1)
    shown = rel > 0
    is_named = named[listed] & shown
    true = values[~fit].gather(1, best_value[listed]) > 0
    total, n_named = int(shown.sum()), int(is_named.sum())
    return (n_named / total if total else float("nan"),
            int((true & is_named).sum()) / n_named if n_named else float("nan"))


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def scoreboard_markdown(report: dict[str, Any], columns: Sequence[str] = ("fvu", "l0", "dead_fraction",
                        "matched_correlation", "probe_1", "probe_5", "probe_dense", "nameable", "nameable_precision",
                        "diffc_loss_recovered")) -> str:
    """The per-(entry, variant) rows of a ``bench_sae_variants.py --json`` report as a Markdown table.

    Also the synthetic rows (MCC of decoder atoms) when the report has them. Used by
    ``docs/benchmarks.md`` and by release cards (:mod:`revelio_hub.cards` may embed it).
    """
    heads = {"fvu": "FVU", "l0": "L0", "dead_fraction": "dead", "matched_correlation": "matched corr.",
             "probe_1": "probe 1/value", "probe_5": "probe 5/value", "probe_dense": "dense probe",
             "nameable": "nameable listings", "nameable_precision": "…true", "diffc_loss_recovered": "Diff-C loss rec."}
    lines = ["| entry | variant | " + " | ".join(heads.get(c, c) for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in report.get("toy", []):
        lines.append(f"| {row['entry']} | {row['variant']} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    synthetic = report.get("synthetic", [])
    if synthetic:
        lines += ["", "| synthetic | variant | MCC | FVU | L0 | dead |", "|---|---|---|---|---|---|"]
        for row in synthetic:
            lines.append(f"| d {row['d']}, {row['n_atoms']} atoms | {row['variant']} | {_fmt(row['mcc'])} | "
                         f"{_fmt(row['fvu'])} | {_fmt(row['l0'], 1)} | {_fmt(row['dead_fraction'])} |")
    return "\n".join(lines)


#: The release card's section heading for the scoreboard (replaced, not duplicated, when written again).
CARD_HEADING = "## SAE variants: ground-truth scoreboard"
#: The scoreboard's rows as stored next to the card, so every number in the section has its data in the release.
SCOREBOARD_FILE = "sae_variants.json"


def _arm(report: dict[str, Any], variant: str) -> str:
    """A row's label: the variant, the learning rate (``lr 0`` in a report = the default rule), the steps it was
    trained for and the training positions per image with how they were drawn."""
    if variant == "release":
        return "this release"
    settings = report.get("settings") or {}
    lr, steps, tokens = settings.get("lr"), settings.get("steps"), settings.get("tokens_per_image")
    drawn = settings.get("token_sampling", "uniform")  # reports from before the choice drew uniformly
    return (f"{variant} · {'default lr rule' if not lr else f'lr {lr:g}'}" + (f" · {steps} steps" if steps else "")
            + (f" · {tokens} {drawn} positions" if tokens else ""))


def merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One scoreboard from several ``bench_sae_variants.py`` reports (e.g. one per learning rate).

    Rows keep their numbers; their ``variant`` names the arm with its learning rate. A report's
    ``release`` rows scored the release it was run on, so only the last report's are kept.
    """
    toy: list[dict[str, Any]] = []
    synthetic: list[dict[str, Any]] = []
    for i, report in enumerate(reports):
        last = i == len(reports) - 1
        toy += [dict(r, variant=_arm(report, r["variant"])) for r in report.get("toy", [])
                if r["variant"] != "release" or last]
        # the synthetic part trains at the default recipe's rate whatever --lr says; each row records its rate
        synthetic += [dict(r, variant=f"{r['variant']} · lr {r['lr']:.2g}" if r.get("lr") else r["variant"])
                      for r in report.get("synthetic", [])]
    toy.sort(key=lambda r: (r["entry"], r["variant"] != "this release", r["variant"]))
    return {"benchmark": "sae_variants", "toy": toy, "synthetic": synthetic,
            "settings": [_without_paths(r.get("settings")) for r in reports]}


def _without_paths(value: Any) -> Any:
    """``value`` with every absolute path cut to its last part: the scoreboard is published with the release,
    and the folders a benchmark ran in say nothing about its rows but where they were made."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and PurePath(value).is_absolute():
        return PurePath(value).name
    return value


def card_section(report: dict[str, Any]) -> str:
    """The release card's scoreboard section: how the rows were made, then the table."""
    return (f"{CARD_HEADING}\n\nEach variant trained on the same features as this release's SAEs, with the "
            "settings its row names, and scored on held-out shapes at the same L0 (`python "
            "benchmarks/bench_sae_variants.py --help` says how each column is computed; the rows are in "
            f"`{SCOREBOARD_FILE}`). Matched correlation pairs each of the 16 values of "
            "shape, colour, size and background with its own neuron (1 = a dedicated neuron per value); Diff-C loss "
            "recovered is the release's Diff-C accuracy on SAE reconstructions ÷ on the raw features. Rows compare at "
            "equal L0 only: a row whose L0 is far from k did not reach matched sparsity." + _unscored_note(report)
            + "\n\n" + scoreboard_markdown(report) + "\n")


def _unscored_note(report: dict[str, Any]) -> str:
    """Entries with variant rows but no "this release" row: the release's SAE there is not token-level (the
    variants are; ``bench_sae_variants.py`` does not score a pooled SAE on tokens)."""
    rows = report.get("toy", [])
    missing = sorted({r["entry"] for r in rows} - {r["entry"] for r in rows if r["variant"] == "this release"})
    if not missing:
        return ""
    return (f" The variants are token-level SAEs; at {', '.join(missing)} this release's SAE is trained on pooled "
            "vectors instead, so it has no row there (on tokens it would be scored off its inputs).")


def with_card_section(card: str, section: str) -> str:
    """``card`` with its scoreboard section replaced by ``section`` (appended when it has none)."""
    start = card.find(CARD_HEADING)
    if start < 0:
        return card.rstrip("\n") + "\n\n" + section
    nxt = card.find("\n## ", start + len(CARD_HEADING))
    return card[:start] + section + ("" if nxt < 0 else "\n" + card[nxt + 1:])
