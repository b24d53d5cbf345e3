"""Why this class? Which SAE neurons made Diff-C predict it, measured by removing them.

"Neuron *j* made Diff-C say *circle*" is a causal claim, so it is measured the
causal way: encode the features with the entry's k-SAE, remove
neuron *j* while keeping the SAE's reconstruction error (see
:mod:`revelio_hub.interpret.ablation`: with nothing removed Diff-C sees the
original features exactly), re-run Diff-C, and read the change in the target
class's probability and logit.

* **Token-level SAEs** encode every position; a neuron is removed at every
  position where it fires.
* **Pooled SAEs** encode the spatial mean; a neuron's contribution
  ``a_j · d_j`` (activation times decoder row) is subtracted from every
  position, which removes it exactly from the mean the SAE sees.

Exact effects cost one Diff-C forward pass per neuron, so they are measured
for the ``top`` neurons only, all ablated copies in one batch (no backbone
pass: the features are reused). Every active neuron also gets a first-order
estimate, gradient × activation: ``∇f(x) · (z_j ⊗ d_j)``, one backward pass
for all of them. The estimate picks which neurons are measured exactly, and
its Spearman rank correlation with the exact effects over those neurons says
how far to trust it for the rest. ``benchmarks/bench_attribution.py`` checks
both orderings with deletion curves (docs/benchmarks.md, "Attribution
faithfulness").

Sign convention everywhere: **effect = f(original) − f(neuron removed)**; a
positive effect means the neuron pushes the class up, a negative one that it
holds the class down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch

from revelio_hub.interpret.ablation import NeuronCodes, as_maps, encode_codes
from revelio_hub.interpret.metrics import spearman

__all__ = ["Attribution", "attribute", "check_pair", "resolve_targets"]

Target = Union[None, int, str, Sequence[Union[int, str]]]


@dataclass
class Attribution:
    """Attribution of one image's Diff-C prediction to SAE neurons.

    The main fields describe the ``top`` neurons whose effect was measured
    exactly, ordered by the size of their estimated effect on the probability
    (largest first); the ``all_*`` fields give the first-order estimate for
    every neuron active in the image.

    Attributes:
        target: class index explained (the predicted class unless one was given).
        target_name: its name.
        predicted: Diff-C's top class on the original features.
        prob, logit: the target's probability and logit on the original features.
        neurons: ids of the exactly measured neurons.
        activations: their image-level activations (max over positions for a
            token SAE, the code of the mean for a pooled one).
        effects_prob, effects_logit: exact ``f(original) − f(neuron removed)``.
        estimates_prob, estimates_logit: gradient × activation estimates of the same.
        summaries: the atlas' one-line summary of each measured neuron ("" without an atlas).
        spearman, spearman_logit: rank correlation of estimate and exact effect
            over the measured neurons (``nan`` with fewer than two, or constant values).
        all_neurons, all_activations, all_estimates_prob, all_estimates_logit:
            the same for every active neuron, ordered by ``|all_estimates_prob|``.
        layer, timestep: the release entry, when known.
    """

    target: int
    target_name: str
    predicted: int
    prob: float
    logit: float
    neurons: torch.Tensor
    activations: torch.Tensor
    effects_prob: torch.Tensor
    effects_logit: torch.Tensor
    estimates_prob: torch.Tensor
    estimates_logit: torch.Tensor
    summaries: list[str]
    spearman: float
    spearman_logit: float
    all_neurons: torch.Tensor = field(repr=False)
    all_activations: torch.Tensor = field(repr=False)
    all_estimates_prob: torch.Tensor = field(repr=False)
    all_estimates_logit: torch.Tensor = field(repr=False)
    layer: Optional[str] = None
    timestep: Optional[int] = None

    def __len__(self) -> int:
        return int(self.neurons.numel())

    def rows(self) -> list[dict[str, Any]]:
        """One dict per measured neuron: id, activation, effects, estimates, summary."""
        return [
            {
                "neuron": int(self.neurons[i]),
                "activation": float(self.activations[i]),
                "effect_prob": float(self.effects_prob[i]),
                "effect_logit": float(self.effects_logit[i]),
                "estimate_prob": float(self.estimates_prob[i]),
                "estimate_logit": float(self.estimates_logit[i]),
                "summary": self.summaries[i],
            }
            for i in range(len(self))
        ]

    def pushing(self, direction: str = "up", n: Optional[int] = None) -> list[dict[str, Any]]:
        """Measured neurons that push the target ``"up"`` (positive effect) or ``"down"``, strongest first."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        sign = 1.0 if direction == "up" else -1.0
        rows = [r for r in self.rows() if sign * r["effect_prob"] > 0]
        rows.sort(key=lambda r: -sign * r["effect_prob"])
        return rows[:n] if n is not None else rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``/attribute_json`` returns, without the per-release keys)."""

        def num(x: float) -> Optional[float]:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "target": self.target_name,
            "target_index": self.target,
            "predicted": self.predicted,
            "prob": round(self.prob, 6),
            "logit": round(self.logit, 6),
            "neurons": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows()],
            "spearman": num(self.spearman),
            "spearman_logit": num(self.spearman_logit),
            "active_neurons": int(self.all_neurons.numel()),
        }


def check_pair(sae: Any, diffc: Any) -> None:
    """Refuse an SAE and a Diff-C that do not read the same features (layer, timestep, backbone, channels).

    Image sizes may differ (the paper trains pooled SAEs at 256 px and Diff-C at
    512 px): attribution runs on the Diff-C's features, which the SAE then encodes.
    """
    if sae is None or diffc is None:
        raise ValueError("Attribution needs both a k-SAE and a Diff-C head.")
    if int(sae.d_in) != int(diffc.in_channels):
        raise ValueError(f"The SAE reads {sae.d_in}-channel features, the Diff-C head {diffc.in_channels}-channel ones.")
    a, b = sae.recipe or {}, diffc.recipe or {}
    differ = [k for k in ("backbone", "layer", "timestep") if k in a and k in b and a[k] != b[k]]
    if differ:
        raise ValueError(
            "The SAE and the Diff-C head read different features: "
            + ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in differ)
        )


def resolve_targets(target: Target, class_names: Sequence[str], n: int) -> Optional[list[int]]:
    """Class indices to explain for ``n`` images (``None``: each image's predicted class).

    ``target`` may be one class (index or name) for every image, or one per image.
    """
    if target is None:
        return None

    def one(t: Any) -> int:
        if isinstance(t, str):
            if t not in class_names:
                raise ValueError(f"Unknown class {t!r}; the Diff-C classes are: {', '.join(class_names)}.")
            return list(class_names).index(t)
        if isinstance(t, torch.Tensor):
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, int) and not (isinstance(t, float) and t.is_integer()):
            raise ValueError(f"A target must be a class name or index, got {t!r}.")
        t = int(t)
        if not 0 <= t < len(class_names):
            raise ValueError(f"Class index {t} is out of range: the Diff-C has {len(class_names)} classes.")
        return t

    if isinstance(target, (str, int, float)) or (isinstance(target, torch.Tensor) and target.dim() == 0):
        return [one(target)] * n
    targets = [one(t) for t in target]
    if len(targets) != n:
        raise ValueError(f"Got {len(targets)} targets for {n} images; give one target, or one per image.")
    return targets


def _estimates(codes: NeuronCodes, grad: torch.Tensor) -> torch.Tensor:
    """Gradient × activation for every active neuron: ``∇f · (z_j ⊗ d_j)`` summed over positions."""
    c = grad.shape[0]
    if codes.amap.shape[0] > 1:  # token SAE: per-position gradients
        g = grad.reshape(c, -1).t()  # Q×C
    else:  # pooled SAE: the same delta at every position -> the summed gradient
        g = grad.reshape(c, -1).sum(1, keepdim=True).t()  # 1×C
    return (codes.amap * (g @ codes.directions.t())).sum(0)


def _logits_and_grads(diffc: Any, maps: torch.Tensor, targets: Optional[list[int]]):
    """Logits of ``maps`` and the gradients of the targets' logit and probability with respect to them."""
    with torch.inference_mode(False), torch.enable_grad():
        x = maps.detach().clone().requires_grad_(True)
        logits = diffc(x).float()
        t = logits.argmax(1) if targets is None else torch.tensor(targets, device=logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        chosen_logit = logits[rows, t]
        chosen_prob = torch.softmax(logits, dim=1)[rows, t]
        g_logit, = torch.autograd.grad(chosen_logit.sum(), x, retain_graph=True)
        g_prob, = torch.autograd.grad(chosen_prob.sum(), x)
    return logits.detach(), t.detach().cpu(), g_logit.detach(), g_prob.detach()


@torch.no_grad()
def _run(diffc: Any, maps: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([diffc(maps[i : i + batch_size]).float() for i in range(0, maps.shape[0], batch_size)])


def attribute(
    sae: Any,
    diffc: Any,
    features: torch.Tensor,
    target: Target = None,
    top: Optional[int] = 10,
    *,
    atlas: Any = None,
    batch_size: int = 256,
    layer: Optional[str] = None,
    timestep: Optional[int] = None,
) -> list[Attribution]:
    """Attribute Diff-C's prediction on each image to the SAE neurons active in it.

    Args:
        sae: the entry's :class:`~revelio_hub.sae.model.KSparseAutoencoder` (token or pooled).
        diffc: the entry's :class:`~revelio_hub.diffc.model.DiffC` (same layer and timestep).
        features: the Diff-C's input, ``N×C×H×W`` (or one ``C×H×W`` map; ``N×C``
            vectors for a linear head), e.g. from ``Backbone.extract``. Reused as is:
            no backbone pass happens here.
        target: class to explain: ``None`` (each image's predicted class), a
            class name or index, or one per image.
        top: how many neurons get an exact effect (by largest ``|estimate|``);
            ``None`` measures every active neuron.
        atlas: the entry's atlas, for one-line summaries of the measured neurons.
        batch_size: ablated maps per Diff-C forward pass.

    Returns:
        One :class:`Attribution` per image, in order.
    """
    maps = _checked_maps(sae, diffc, features, top, batch_size)
    n = maps.shape[0]
    targets = resolve_targets(target, diffc.class_names, n)

    # Dropout off, BatchNorm on running statistics: one image never affects another's output.
    modules = [m for m in (sae, diffc) if m.training]  # toggling walks every submodule: only when needed
    for m in modules:
        m.eval()
    try:
        _, t, g_logit, g_prob = _logits_and_grads(diffc, maps, targets)
        codes = encode_codes(sae, maps)
        plans = [_plan(codes[i], maps[i], g_prob[i], g_logit[i], top) for i in range(n)]
        logits = _run(diffc, torch.cat([p.batch for p in plans]), int(batch_size)).cpu()
    finally:
        for m in modules:
            m.train()

    results, start = [], 0
    for i, plan in enumerate(plans):
        block = logits[start : start + 1 + plan.measured.numel()]
        start += block.shape[0]
        results.append(_attribution(plan, block, int(t[i]), diffc.class_names, atlas, layer, timestep))
    return results


def _checked_maps(sae: Any, diffc: Any, features: torch.Tensor, top: Optional[int], batch_size: int) -> torch.Tensor:
    """The features as N×C×H×W maps on Diff-C's device and dtype, after checking the pair and the options."""
    check_pair(sae, diffc)
    maps = as_maps(features)
    if maps.shape[1] != int(diffc.in_channels):
        raise ValueError(f"The features have {maps.shape[1]} channels; this entry reads {diffc.in_channels}.")
    if top is not None and (isinstance(top, bool) or int(top) != top or top < 0):
        raise ValueError(f"top must be a whole number ≥ 0 (or None for every active neuron), got {top!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    device = diffc.fc.weight.device
    return maps.to(device=device, dtype=diffc.fc.weight.dtype)


class _Plan(NamedTuple):
    """One image's active neurons ordered by estimate, the ones to measure, and the maps Diff-C will read."""

    codes: NeuronCodes
    order: torch.Tensor
    measured: torch.Tensor
    estimates_prob: torch.Tensor
    estimates_logit: torch.Tensor
    batch: torch.Tensor  # row 0: nothing removed; row 1 + j: measured neuron j removed


def _plan(codes: NeuronCodes, image_map: torch.Tensor, grad_prob: torch.Tensor, grad_logit: torch.Tensor,
          top: Optional[int]) -> _Plan:
    """Rank one image's active neurons by ``|estimate|`` and build the ablated maps of the ``top`` measured."""
    est_p = _estimates(codes, grad_prob).cpu()
    est_l = _estimates(codes, grad_logit).cpu()
    order = torch.argsort(est_p.abs(), descending=True, stable=True)
    m = len(codes) if top is None else min(int(top), len(codes))
    measured = order[:m]
    ablated = image_map[None] - codes.deltas(measured.to(codes.amap.device)).to(image_map.dtype)
    return _Plan(codes, order, measured, est_p, est_l, torch.cat([image_map[None], ablated]))


def _attribution(plan: _Plan, block: torch.Tensor, target: int, class_names: Sequence[str], atlas: Any,
                 layer: Optional[str], timestep: Optional[int]) -> Attribution:
    """One image's :class:`Attribution` from Diff-C's logits on its plan's maps (row 0 untouched)."""
    c, order, measured, est_p, est_l = plan.codes, plan.order, plan.measured, plan.estimates_prob, plan.estimates_logit
    probs = torch.softmax(block, dim=1)[:, target]
    eff_p = probs[0] - probs[1:]
    eff_l = block[0, target] - block[1:, target]
    ids = c.neurons[measured]
    acts = c.activations[measured].cpu()
    summaries = [str(atlas.summary_on_image(int(j), float(x))) if atlas is not None else ""
                 for j, x in zip(ids.tolist(), acts.tolist())]
    return Attribution(
        target=target,
        target_name=str(class_names[target]),
        predicted=int(block[0].argmax()),
        prob=float(probs[0]),
        logit=float(block[0, target]),
        neurons=ids,
        activations=acts,
        effects_prob=eff_p,
        effects_logit=eff_l,
        estimates_prob=est_p[measured],
        estimates_logit=est_l[measured],
        summaries=summaries,
        spearman=spearman(est_p[measured], eff_p),
        spearman_logit=spearman(est_l[measured], eff_l),
        all_neurons=c.neurons[order],
        all_activations=c.activations[order].cpu(),
        all_estimates_prob=est_p[order],
        all_estimates_logit=est_l[order],
        layer=layer,
        timestep=timestep,
    )
