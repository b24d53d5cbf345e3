"""SAE variants that share one model, one trainer and the sparse kernels.

Why several: the paper trains TopK SAEs, but later work recovers known features
better with other sparsity rules, and the toy release (whose true factors are
known) lets us choose by measurement (``benchmarks/bench_sae_variants.py``).
Every variant keeps the same weights (``W_enc``, ``b_enc``, ``W_dec``, ``b_pre``)
and the sparse ``(values, indices)`` code, so decoding, heat maps, the atlas and
the app treat them alike; only the rule choosing the active latents and the
training loss differ.

* ``topk``: each sample keeps its k largest pre-activations (the paper; OpenAI's TopK SAE).
* ``batchtopk``: during training the batch keeps its k·N largest (ReLU'd)
  pre-activations, so a sample may use more or fewer than k (BatchTopK, Bussmann,
  Leask & Nanda 2024). Inference cannot depend on the batch, so it uses a
  threshold θ learned during training, an exponential running mean of the
  smallest selected activation per batch (the BatchTopK paper averages the same
  quantity): a latent is active
  when its pre-activation exceeds θ. Codes keep a fixed width of
  :data:`BATCHTOPK_WIDTH` × k slots (inactive slots hold 0), so an input with
  more than that many latents above θ keeps its largest ones only.
* ``matryoshka``: TopK codes, but the loss sums the reconstruction error of
  nested prefixes of the dictionary (latents ``[0, m_1)``, ``[0, m_2)``, …, all),
  so early latents must reconstruct on their own and learn general features
  while later ones refine (Matryoshka SAEs: Nabeshima 2024; Bussmann et al. 2025).
* ``multitopk``: TopK codes trained with ``L(k) + L(4k)/8`` (Multi-TopK, Gao et
  al. 2024), so the dictionary also works when more latents are allowed;
  inference uses k.

Nothing here imports the model class: the trainer and the model both use these
rules, and the model passes itself in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from revelio_hub.sae.kernels import topk_encode
from revelio_hub.training_recipes import SAE_VARIANTS as VARIANTS

__all__ = ["VARIANTS", "TrainCodes", "encode_for_training", "default_prefixes", "check_prefixes",
           "code_width", "select_active", "update_threshold", "BATCHTOPK_WIDTH", "MULTI_TOPK_FACTOR",
           "MULTI_TOPK_WEIGHT", "THRESHOLD_MOMENTUM"]

#: Inference code width of a BatchTopK SAE, in multiples of k (inputs with more latents above θ keep the largest).
BATCHTOPK_WIDTH = 4
#: Multi-TopK trains with ``L(k) + MULTI_TOPK_WEIGHT · L(MULTI_TOPK_FACTOR · k)`` (Gao et al. 2024's 4k and 1/8).
MULTI_TOPK_FACTOR = 4
MULTI_TOPK_WEIGHT = 1 / 8
#: Weight of the newest batch in BatchTopK's running threshold (the first batch sets it outright). Slow on
#: purpose for long runs; after a few dozen steps θ still remembers the first batches (docs/benchmarks.md,
#: "SAE variants": L0 31 instead of 8 after 32 steps), so short BatchTopK runs need more steps.
THRESHOLD_MOMENTUM = 0.01


def default_prefixes(n_latents: int) -> list[int]:
    """Matryoshka prefix ends: n/16, n/8, n/4, n/2, n (fewer when n is small); the last is always n."""
    ends = sorted({max(1, n_latents // 2**i) for i in range(4, -1, -1)})
    return ends


def check_prefixes(prefixes: Sequence[int], n_latents: int) -> list[int]:
    """Validate Matryoshka prefix ends: strictly increasing, positive, the last equal to n_latents."""
    ends = [int(p) for p in prefixes]
    if not ends or ends[-1] != n_latents or ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"matryoshka prefixes must increase strictly from ≥ 1 to n_latents={n_latents}, got {ends}")
    return ends


def code_width(variant: str, k: int, n_latents: int) -> int:
    """Slots per sample in an inference code: k, or BATCHTOPK_WIDTH·k for BatchTopK (capped at n_latents)."""
    return min(n_latents, BATCHTOPK_WIDTH * k) if variant == "batchtopk" else k


def select_active(pre: torch.Tensor, variant: str, k: int, relu: bool,
                  threshold: Optional[torch.Tensor] = None, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference rule: (values, indices) of the active latents from dense pre-activations ``N×n``.

    TopK-coded variants keep the k largest (ReLU'd when ``relu``); BatchTopK keeps
    every pre-activation above its learned threshold θ, in :func:`code_width` slots.
    """
    width = code_width(variant, k, pre.shape[-1])
    vals, idx = pre.topk(width, dim=-1, sorted=sorted)
    if variant == "batchtopk":
        theta = threshold if threshold is not None else vals.new_zeros(())
        vals = torch.where(vals > theta.clamp_min(0), vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    elif relu:
        vals = vals.clamp_min(0)
    return vals, idx


@dataclass
class TrainCodes:
    """What one training forward pass gives the trainer.

    ``vals``/``idx``: the primary code (its reconstruction is the logged FVU, its
    active latents feed the dead-latent tracker and AuxK's residual). ``terms``:
    ``(weight, values, indices)`` whose weighted reconstruction errors sum to the
    main loss; the primary code is ``terms[0]`` with weight 1.
    """

    vals: torch.Tensor
    idx: torch.Tensor
    aux_vals: torch.Tensor
    aux_idx: torch.Tensor
    terms: list[tuple[float, torch.Tensor, torch.Tensor]]


def encode_for_training(model: Any, x_centred: torch.Tensor, *, k: int, relu: bool,
                        aux_ids: Optional[torch.Tensor], k_aux: int, compute_dtype: Optional[torch.dtype],
                        aux_mask: Optional[torch.Tensor]) -> TrainCodes:
    """The variant's training code of ``x − b_pre`` through the sparse kernel, and its loss terms."""
    variant = model.variant
    width = MULTI_TOPK_FACTOR * k if variant == "multitopk" else k
    width = min(width, model.n_latents)
    vals, idx, aux_vals, aux_idx = topk_encode(
        x_centred, model.W_enc, model.b_enc, width, relu=relu or variant == "batchtopk", aux_ids=aux_ids,
        k_aux=k_aux, compute_dtype=compute_dtype, aux_mask=aux_mask, batch_topk=variant == "batchtopk")
    if variant == "multitopk":
        top = vals.detach().topk(min(k, width), dim=-1).indices
        k_vals, k_idx = vals.gather(1, top), idx.gather(1, top)
        terms = [(1.0, k_vals, k_idx), (MULTI_TOPK_WEIGHT, vals, idx)]
        return TrainCodes(k_vals, k_idx, aux_vals, aux_idx, terms)
    terms = [(1.0, vals, idx)]
    if variant == "matryoshka":
        zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
        terms += [(1.0, torch.where(idx < end, vals, zero), idx) for end in model.prefixes[:-1]]
    return TrainCodes(vals, idx, aux_vals, aux_idx, terms)


@torch.no_grad()
def update_threshold(model: Any, vals: torch.Tensor) -> None:
    """BatchTopK: move θ toward this batch's smallest selected (positive) activation.

    The first batch sets θ outright (the buffer starts at −1), later ones by
    :data:`THRESHOLD_MOMENTUM`; a batch without positive activations leaves θ as is.
    """
    if model.variant != "batchtopk":
        return
    low = vals.detach().float().masked_fill(vals <= 0, float("inf")).min()  # no host sync
    theta = model.threshold
    new = torch.where(theta < 0, low, (1 - THRESHOLD_MOMENTUM) * theta + THRESHOLD_MOMENTUM * low)
    theta.copy_(torch.where(torch.isfinite(low), new, theta))
