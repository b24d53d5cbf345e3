"""Is this image like the release's data? The SAE's reconstruction error as an out-of-distribution signal.

A k-SAE is trained to rebuild the features of one dataset from a few
dictionary directions. On images unlike that data (a blank frame, noise, a
photo for a shapes model) the features leave the span it learnt and the
reconstruction error jumps. Diff-C, a classifier, has no such signal: it is
often *most* confident on such images (a white image is "star" at p > 0.97 on
the toy release). So the atlas records the error of every atlas image
(:func:`image_reconstruction_error`, quantiles in ``atlas.json``), and the app
compares an uploaded image's error with that distribution
(:func:`assess`): beyond :attr:`OODConfig.max_percentile` it says plainly
that the predictions are unreliable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

__all__ = ["OODConfig", "OODReport", "image_reconstruction_error", "assess"]


@torch.no_grad()
def image_reconstruction_error(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Relative reconstruction error of each image: Σ‖x − x̂‖² / Σ‖x − b_pre‖² over its SAE inputs.

    ``x``: B×d pooled vectors or B×d×H×W maps. A token-level SAE sums over the
    image's positions; a pooled SAE reconstructs the image's mean vector (what
    it was trained on). ``b_pre`` (the data mean the SAE subtracts) makes the
    ratio FVU-like: 0 = perfect, 1 = no better than predicting the mean.
    Returns a float32 tensor of B errors on the CPU.
    """
    if x.dim() == 4 and getattr(sae, "granularity", "pooled") == "pooled":
        x = x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype).mean(dim=(2, 3))
    recon, _, _ = sae(x)
    x = x.to(recon.dtype)
    centre = (sae.b_pre / sae.scale).to(recon.dtype)
    if x.dim() == 4:
        resid = (x - recon).pow(2).sum(dim=(1, 2, 3))
        total = (x - centre[None, :, None, None]).pow(2).sum(dim=(1, 2, 3))
    else:
        resid = (x - recon).pow(2).sum(dim=1)
        total = (x - centre[None, :]).pow(2).sum(dim=1)
    return (resid.double() / total.double().clamp_min(1e-12)).float().cpu()


@dataclass(frozen=True)
class OODConfig:
    """When the app warns that an image is unlike the release's data.

    Attributes:
        max_percentile: flag when the image's reconstruction error is above this
            percentile of the atlas images' errors. Chosen with
            ``benchmarks/bench_explain.py`` on the toy release (docs/benchmarks.md):
            blank, noise and gradient images land far beyond the atlas maximum,
            held-out shapes almost never beyond its 99.5th percentile.
    """

    max_percentile: float = 99.5

    def __post_init__(self) -> None:
        if not 50 <= self.max_percentile <= 100:
            raise ValueError(f"max_percentile must lie in [50, 100], got {self.max_percentile}")


@dataclass(frozen=True)
class OODReport:
    """What the app says about one image's distance from the release's data."""

    reconstruction_error: float
    error_percentile: Optional[float]  # None: the atlas has no error distribution (older release)
    diffc_confidence: Optional[float]  # the top Diff-C probability, None without Diff-C
    out_of_distribution: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reconstruction_error"] = round(self.reconstruction_error, 6)
        if self.error_percentile is not None:
            d["error_percentile"] = round(self.error_percentile, 2)
        if self.diffc_confidence is not None:
            d["diffc_confidence"] = round(self.diffc_confidence, 6)
        return d


def assess(error: float, percentile: Optional[float], diffc_confidence: Optional[float] = None,
           config: OODConfig = OODConfig()) -> OODReport:
    """Turn an image's reconstruction error (and its percentile among atlas images) into a verdict and a sentence."""
    if percentile is None:
        return OODReport(float(error), None, diffc_confidence, False,
                         "This release records no reconstruction-error distribution: no out-of-distribution check.")
    flagged = percentile > config.max_percentile
    if flagged:
        than = "for any atlas image" if percentile >= 100 else f"for {percentile:.1f}% of the atlas images"
        message = (f"This image is unlike the release's data: the SAE rebuilds its features worse than "
                   f"{than} (relative error {error:.3f}). Predictions and neuron summaries are unreliable for it.")
    else:
        message = (f"Like the release's data: reconstruction error {error:.3f} is at the {percentile:.0f}th "
                   "percentile of the atlas images.")
    return OODReport(float(error), float(percentile), diffc_confidence, flagged, message)
