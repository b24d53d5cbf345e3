"""EleutherAI sparsify's TopK trainer, driven on an in-memory tensor, for side-by-side benchmarks.

sparsify's ``Trainer`` reads activations through hooks on a Hugging Face language
model; our benchmarks train on fixed tensors. So this module runs sparsify's own
parts (``SparseCoder``, its ``SignSGD`` in ``schedulefree``'s ``ScheduleFreeWrapper``
with momentum 0.95, its auto learning rate ``5e-3 / √(n_latents / 2¹⁴)``) in the
order its ``Trainer.fit`` uses them per step: ``b_dec`` set to the first batch's
mean, decoder rows renormalised before the forward, FVU over the batch's
centred variance as the loss, parallel decoder-gradient component removed, step.
Defaults are sparsify 1.3.3's (``signum``, no AuxK). Needs ``pip install eai-sparsify``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SparsifyRun:
    """A trained sparsify ``SparseCoder`` and the wall time of its training loop."""

    model: object
    seconds: float


def sparsify_available() -> bool:
    try:
        import schedulefree  # noqa: F401
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


def train_sparsify(x: torch.Tensor, *, k: int, n_latents: int, batch_size: int, steps: int, seed: int = 0,
                   lr: Optional[float] = None) -> SparsifyRun:
    """Train sparsify's default TopK coder on rows of ``x`` for ``steps`` batches (epochs reshuffle by seed)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(seed)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(k=k, num_latents=n_latents))
    rate = lr if lr is not None else 5e-3 / (n_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": rate}]), momentum=0.95)
    opt.train()
    n = x.shape[0]
    per_epoch = max(1, n // batch_size)
    t0 = time.perf_counter()
    perm = None
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))
        batch = x[perm[pos * batch_size:(pos + 1) * batch_size]]
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves them
    sae.set_decoder_norm_to_unit_norm()
    return SparsifyRun(sae, time.perf_counter() - t0)


@torch.no_grad()
def sparsify_metrics(sae, x: torch.Tensor, chunk: int = 8192) -> dict:
    """Held-out centred FVU and dead fraction (never in the top k with a value > 0) of a sparsify coder."""
    resid, fired = 0.0, torch.zeros(sae.num_latents, dtype=torch.bool)
    for start in range(0, x.shape[0], chunk):
        b = x[start:start + chunk]
        out = sae(b)
        resid += float((out.sae_out - b).double().pow(2).sum())
        fired[out.latent_indices[out.latent_acts > 0]] = True
    centred = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": resid / centred, "dead_fraction": float((~fired).float().mean())}
