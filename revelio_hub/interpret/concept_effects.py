""""Why this class?" by concept: the exact effect of removing, together, the shown neurons that name one value.

A bar per neuron answers "which neurons", not "which concepts": a star may
rest on three neurons each named ``star (shape)`` and one named ``green
(color)``. This groups the neurons an attribution measured (dense ones left
out unless asked, as the app's neuron table does) by the label values their
atlas summaries name, removes each group **at once** through the SAE (the same
removal as the single-neuron effects: reconstruction error kept) and re-runs
Diff-C. The group's effect is therefore measured, not the sum of its members'
effects (which is kept beside it: the two differ when neurons overlap or
interact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from revelio_hub.interpret.ablation import as_maps, encode_codes, remove_neurons

__all__ = ["ConceptEffect", "concept_effects", "shown_neurons"]


@dataclass
class ConceptEffect:
    """The effect on P(target) of removing every shown neuron that names ``column = value``."""

    column: str
    value: str
    neurons: list[int]
    #: P(target) with nothing removed minus P(target) with the whole group removed (exact; > 0: the group pushes up)
    effect_prob: float
    #: the sum of the members' single-neuron exact effects
    summed_prob: float

    def text(self, target_name: str) -> str:
        """``"shape = star neurons (3): −0.41 of P(star) when removed"``."""
        change = -self.effect_prob
        sign = "−" if change < 0 else "+"
        return (f"{self.column} = {self.value} neurons ({len(self.neurons)}): {sign}{abs(change):.2f} of "
                f"P({target_name}) when removed")

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "value": self.value, "neurons": list(self.neurons),
                "effect_prob": round(self.effect_prob, 6), "summed_effect_prob": round(self.summed_prob, 6)}


def shown_neurons(attribution: Any, atlas: Any, include_dense: bool = False) -> list[int]:
    """Indices (into the attribution's measured neurons) that the app shows: dense ones only when asked."""
    if atlas is None or include_dense:
        return list(range(len(attribution)))
    dense = atlas.dense_mask
    return [i for i, j in enumerate(attribution.neurons.tolist()) if not bool(dense[int(j)])]


@torch.no_grad()
def concept_effects(sae: Any, diffc: Any, features: torch.Tensor, attribution: Any, atlas: Any,
                    include_dense: bool = False) -> list[ConceptEffect]:
    """Group the attribution's shown neurons by named value and measure each group's removal; largest first.

    ``features`` is the one map the attribution was computed on (``C×H×W`` or
    ``1×C×H×W``); ``attribution`` one :class:`~revelio_hub.interpret.attribution.Attribution`.
    A neuron joins the groups of the values it names on this image (:meth:`NeuronAtlas.names_on_image`: the
    claims checked for the way it fires here); one that names nothing here forms no group.
    """
    if atlas is None:
        return []
    groups: dict[tuple[str, str], list[int]] = {}
    single: dict[int, float] = {}
    for k in shown_neurons(attribution, atlas, include_dense):
        j = int(attribution.neurons[k])
        single[j] = float(attribution.effects_prob[k])
        for e in atlas.names_on_image(j, float(attribution.activations[k])):
            groups.setdefault((e.column, e.value), []).append(j)
    if not groups:
        return []
    device = diffc.fc.weight.device
    maps = as_maps(features)[:1].to(device=device, dtype=diffc.fc.weight.dtype)
    was_training = [m for m in (sae, diffc) if m.training]
    for m in was_training:
        m.eval()
    try:
        codes = encode_codes(sae, maps)[0]
        keys = list(groups)
        ablated = remove_neurons(codes, maps[0], [groups[k] for k in keys]).to(maps.dtype)
        logits = diffc(torch.cat([maps, ablated])).float().cpu()
    finally:
        for m in was_training:
            m.train()
    probs = torch.softmax(logits, dim=1)[:, int(attribution.target)]
    out = [ConceptEffect(c, v, groups[(c, v)], float(probs[0] - probs[1 + i]),
                         sum(single[j] for j in groups[(c, v)])) for i, (c, v) in enumerate(keys)]
    out.sort(key=lambda g: abs(g.effect_prob), reverse=True)
    return out
