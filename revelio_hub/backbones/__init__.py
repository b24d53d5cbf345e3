"""Diffusion models as feature extractors (SD 1.x/2.x, SDXL, DiT, PixArt, pixel-space UNets).

``load_backbone(id_or_folder)`` returns a :class:`Backbone` whose ``extract``
noises images to timestep t, runs the denoiser once and returns the requested
blocks' outputs. See :mod:`.base` for what makes that fast and reproducible.
"""

from .base import Backbone
from .dit import DiTBackbone, PixArtBackbone
from .loading import BackboneNotFoundError, detect_family, load_backbone
from .noise import image_noise, noise_seed
from .pixel import PixelBackbone
from .stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone
from .unet import UNetBackbone

__all__ = [
    "Backbone", "load_backbone", "BackboneNotFoundError", "detect_family", "UNetBackbone",
    "StableDiffusionBackbone", "StableDiffusionXLBackbone", "DiTBackbone", "PixArtBackbone",
    "PixelBackbone", "image_noise", "noise_seed",
]
