"""The pixel-space UNet backbone (the project's embedded toy model).

No VAE (images in [-1, 1] are the "latents") and no text encoder: the folder
stores its constant null conditioning in ``null_conditioning.safetensors``.
Folder layout: see ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from .unet import UNetBackbone

NULL_CONDITIONING_FILE = "null_conditioning.safetensors"


class PixelBackbone(UNetBackbone):
    """A pixel-space ``UNet2DConditionModel`` with a stored null conditioning."""

    family = "pixel"

    def __init__(self, unet: Any, scheduler: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(unet, scheduler, None, encoder_hidden_states, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str, *, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                        image_size: Optional[int] = None, **kwargs: Any) -> "PixelBackbone":
        from diffusers import DDPMScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        path = os.path.join(folder, NULL_CONDITIONING_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"Pixel backbone folder {folder!r} lacks {NULL_CONDITIONING_FILE} (see docs/CONTRACTS.md).")
        tensors = load_file(path)
        if "encoder_hidden_states" not in tensors:
            raise ValueError(f"{path} must hold an 'encoder_hidden_states' tensor (1×L×D); found {sorted(tensors)}.")
        kwargs.setdefault("name", folder)
        return cls(unet, scheduler, tensors["encoder_hidden_states"], device=device, dtype=dtype,
                   image_size=image_size, **kwargs)
