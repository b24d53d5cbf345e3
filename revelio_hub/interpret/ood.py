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

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

__all__ = ["OODConfig", "OODReport", "image_reconstruction_error", "sae_error", "assess", "ordinal"]


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


def sae_error(sae: Any, fmap: torch.Tensor) -> float:
    """The check's number for one image: ``sae``'s reconstruction error on its ``1×C×H×W`` map.

    One function for the app's server process and its backbone workers, so both give the same float.
    """
    with torch.inference_mode():
        return float(image_reconstruction_error(sae, fmap)[0])


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
    """What the app says about one image's distance from the release's data.

    ``reconstruction_error``/``error_percentile`` are the analysed entry's;
    ``layers`` holds every layer that was checked (layer → error, percentile);
    the image is flagged when any of them is beyond the threshold: a shallow
    layer at a large t sees mostly noise and may not notice a blank image that
    the bottleneck rebuilds worse than any atlas image.
    """

    reconstruction_error: float
    error_percentile: Optional[float]  # None: the atlas has no error distribution (older release)
    diffc_confidence: Optional[float]  # the top Diff-C probability, None without Diff-C
    out_of_distribution: bool
    message: str
    layers: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reconstruction_error"] = round(self.reconstruction_error, 6)
        if self.error_percentile is not None:
            d["error_percentile"] = round(self.error_percentile, 2)
        if self.diffc_confidence is not None:
            d["diffc_confidence"] = round(self.diffc_confidence, 6)
        d["layers"] = {k: {"reconstruction_error": round(v["reconstruction_error"], 6),
                           "error_percentile": None if v["error_percentile"] is None else round(v["error_percentile"], 2)}
                       for k, v in self.layers.items()}
        return d


def ordinal(n: int) -> str:
    """``n`` with its English suffix (1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 71st, 112th): messages read as prose."""
    n = int(n)
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def assess(error: float, percentile: Optional[float], diffc_confidence: Optional[float] = None,
           config: OODConfig = OODConfig(), layer: str = "",
           others: Optional[dict[str, tuple[float, Optional[float]]]] = None) -> OODReport:
    """Turn reconstruction errors (and their percentiles among atlas images) into a verdict and a sentence.

    ``error``/``percentile`` are the analysed ``layer``'s; ``others`` maps
    further layers (same image, same t) to theirs. The worst layer decides.
    """
    checked = {layer: (float(error), percentile), **(others or {})}
    layers = {k: {"reconstruction_error": float(e), "error_percentile": None if q is None else float(q)}
              for k, (e, q) in checked.items()}
    known = {k: v for k, v in checked.items() if v[1] is not None}
    if not known:
        return OODReport(float(error), None, diffc_confidence, False,
                         "This release records no reconstruction-error distribution: no out-of-distribution check.",
                         layers)
    worst = max(known, key=lambda k: known[k][1])
    w_err, w_pct = known[worst]
    flagged = w_pct > config.max_percentile
    if flagged:
        than = "for any atlas image" if w_pct >= 100 else f"for {w_pct:.1f}% of the atlas images"
        where = f" at layer {worst}" if worst else ""
        message = (f"This image is unlike the release's data: the SAE{where} rebuilds its features worse than "
                   f"{than} (relative error {w_err:.3f}). Predictions and neuron summaries are unreliable for it.")
    else:  # quote the layer that decided (the one closest to the threshold), not only the analysed one
        at = f" at layer {worst}" if worst else ""
        message = (f"Like the release's data: reconstruction error {w_err:.3f}{at} is at the {ordinal(round(w_pct))} "
                   "percentile of the atlas images" + (" (the highest of the checked layers)." if len(known) > 1 else "."))
    return OODReport(float(error), None if percentile is None else float(percentile), diffc_confidence, flagged,
                     message, layers)
