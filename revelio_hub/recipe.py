"""The feature recipe: everything that determines what a feature vector means.

Every model trained on diffusion features (k-SAE, Diff-C) and every feature store
carries one of these. Two features are only comparable when their recipes agree
on the backbone, layer, timestep, image size and granularity, so consumers call
:meth:`FeatureRecipe.check_compatible` and fail loudly instead of silently
producing meaningless activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional

Granularity = Literal["pooled", "token", "spatial"]

# Fields that must match for features to be interchangeable. The rest
# (revision, prompt, seed, ensemble) are recorded for reproducibility but a
# mismatch there only changes noise, not meaning.
_IDENTITY_FIELDS = ("backbone", "layer", "timestep", "image_size", "d_in")


@dataclass(frozen=True)
class FeatureRecipe:
    """How a feature was extracted.

    Attributes:
        backbone: Hub id or local path of the diffusion model (``"toy"`` aliases allowed).
        layer: canonical layer name (``bottleneck``, ``up_ft1``, ``block3`` ...).
        timestep: diffusion timestep t in ``[0, num_train_timesteps)``.
        image_size: side of the square input image in pixels.
        d_in: channel count of the feature (C of the B×C×H×W map).
        granularity: ``pooled`` (one mean-pooled vector per image), ``token``
            (one vector per spatial position) or ``spatial`` (the whole map).
        revision: backbone revision (commit hash or branch), if known.
        prompt: conditioning prompt (the paper uses the empty prompt).
        noise_seed: base seed of the per-image deterministic noise.
        ensemble: number of noise draws averaged.
        family: backbone family (``sd``, ``sdxl``, ``dit``, ``pixart``, ``pixel``).
        resize: how images were resized before the centre crop (``"bicubic"``, ours, or
            ``"bilinear"``, the original Revelio code's; see ``revelio_hub.images.center_crop_resize``).
    """

    backbone: str
    layer: str
    timestep: int
    image_size: int
    d_in: int
    granularity: Granularity = "pooled"
    revision: Optional[str] = None
    prompt: str = ""
    noise_seed: int = 0
    ensemble: int = 1
    family: Optional[str] = None
    resize: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureRecipe":
        """Build from a dict, ignoring unknown keys (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("backbone", "layer", "timestep", "image_size", "d_in") if k not in data]
        if missing:
            raise ValueError(f"Feature recipe is missing required keys {missing}: {data}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "FeatureRecipe":
        data = self.to_dict()
        data.update(changes)
        return FeatureRecipe(**data)

    def check_compatible(self, other: "FeatureRecipe", *, what: str = "features") -> None:
        """Raise ``ValueError`` naming every field where ``other`` differs in meaning.

        Granularity is not compared: a token-level SAE legitimately consumes
        spatial maps, and a pooled SAE consumes the pooled version of a map.
        """
        diffs = [
            f"{name}: expected {getattr(self, name)!r}, got {getattr(other, name)!r}"
            for name in _IDENTITY_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]
        if diffs:
            raise ValueError(
                f"These {what} were extracted with a different recipe than the model expects ("
                + "; ".join(diffs)
                + "). Extract features with the model's recipe (see its config.json)."
            )
