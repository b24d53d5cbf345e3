"""Training metrics of the k-SAE: FVU, L0, reconstruction cosine, dead latents.

Defined once, here, next to the trainer that logs them, so that a number printed
during training, the one in ``eval.json`` and the one in a model card mean the
same thing. All functions take torch tensors (any device) and return python
floats; none of them mutate inputs.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_2d",
    "fvu",
    "explained_variance",
    "l0",
    "reconstruction_cosine",
    "dead_fraction",
    "DeadLatentTracker",
]


def as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as N×d (a vector becomes N×1); anything else is refused with its shape."""
    if x.dim() == 1:
        return x[:, None]
    if x.dim() != 2:
        raise ValueError(f"{name} must be N×d (or N), got shape {tuple(x.shape)}")
    return x


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, centred: Σ‖x − x̂‖² / Σ‖x − mean(x)‖².

    Centring matters: an autoencoder that only outputs the data mean scores 1,
    not the (much smaller, flattering) value obtained against raw ‖x‖².
    Computed in float64 so large batches of fp32/bf16 features stay exact.
    """
    x = as_2d(x, "x").double()
    x_hat = as_2d(x_hat, "x_hat").double()
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.shape[0] < 2:
        raise ValueError("FVU needs at least 2 samples (the variance of one sample is 0)")
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    if total == 0:
        raise ValueError("FVU is undefined: the inputs have zero variance")
    return float(resid / total)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 − FVU."""
    return 1.0 - fvu(x, x_hat)


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero entries per sample.

    Works on dense codes (N×n_latents) and on the sparse form's values (N×k):
    with ReLU after TopK some of the k values can be 0, so L0 ≤ k.
    """
    codes = as_2d(codes, "codes")
    return float((codes != 0).sum(-1).double().mean())


def reconstruction_cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean cosine similarity between each input and its reconstruction."""
    x = as_2d(x, "x").double()
    x_hat = as_2d(x_hat, "x_hat").double()
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).mean())


def dead_fraction(fire_counts: torch.Tensor) -> float:
    """Fraction of latents whose fire count (over some window) is zero."""
    return float((fire_counts == 0).double().mean())


class DeadLatentTracker:
    """Which latents have not fired within the last ``window`` samples.

    Keeps one counter per latent (samples since it last fired) on the device of
    the codes, so updating it costs no host sync; only :meth:`fraction` reads a
    number back. Mirrors the "dead if not fired in the last 10M tokens" rule of
    OpenAI's TopK SAE paper; the trainer clamps ``window`` to the dataset size.
    """

    def __init__(self, n_latents: int, window: int, device: torch.device | str = "cpu") -> None:
        if window <= 0:
            raise ValueError(f"window must be a positive number of samples, got {window}")
        self.n_latents = n_latents
        self.window = int(window)
        self.since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, fired: torch.Tensor, n_samples: int) -> None:
        """``fired``: bool (n_latents,) of latents active at least once in these ``n_samples``."""
        self.since_fired += n_samples
        self.since_fired.masked_fill_(fired, 0)

    def update_from_indices(self, indices: torch.Tensor, values: torch.Tensor, n_samples: int) -> torch.Tensor:
        """Update from a sparse code; returns the per-latent fire counts of this batch."""
        counts = torch.zeros(self.n_latents, dtype=torch.long, device=indices.device)
        counts.scatter_add_(0, indices.reshape(-1), (values.reshape(-1) > 0).long())
        self.update(counts > 0, n_samples)
        return counts

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.window

    def fraction(self) -> float:
        return float(self.dead_mask.double().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since_fired.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.since_fired.copy_(state["since_fired"].to(self.since_fired))
