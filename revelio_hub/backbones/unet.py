"""What every UNet backbone shares (SD 1.x/2.x, SDXL, the pixel-space toy).

Layer names follow the paper: ``down_ft{i}`` is the hidden state of
``down_blocks[i]``, ``bottleneck`` the ``mid_block`` output and ``up_ft{i}`` the
output of ``up_blocks[i]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import Backbone
from .layers import unet_feature_shapes, unet_layer_modules


class UNetBackbone(Backbone):
    """A ``UNet2DConditionModel`` conditioned on a fixed, precomputed embedding.

    Args:
        unet: the denoiser.
        scheduler: any diffusers scheduler of the checkpoint (its beta schedule is used).
        vae: ``AutoencoderKL``, or ``None`` for a pixel-space model.
        encoder_hidden_states: 1×L×D conditioning (the empty prompt's embedding).
        added_cond_kwargs: extra 1×... conditioning tensors (SDXL's ``text_embeds``/``time_ids``).
        **kwargs: see :class:`Backbone`.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        vae: Optional[nn.Module],
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(denoiser=unet, scheduler=scheduler, vae=vae, **kwargs)
        expected = self.denoiser.config.cross_attention_dim
        if encoder_hidden_states.ndim != 3 or (isinstance(expected, int) and encoder_hidden_states.shape[-1] != expected):
            raise ValueError(
                f"encoder_hidden_states must be 1×L×{expected} for this UNet, got {tuple(encoder_hidden_states.shape)}."
            )
        self._context = encoder_hidden_states.to(self.device, self.dtype)
        self._added = {k: v.to(self.device, self.dtype) for k, v in (added_cond_kwargs or {}).items()}

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    def _make_layer_modules(self) -> dict[str, nn.Module]:
        return unet_layer_modules(self.denoiser)

    def default_image_size(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_factor

    def size_multiple(self) -> int:
        # Each down block but the last halves the latent; sizes that do not
        # divide evenly make skip connections and feature maps misalign.
        return self.vae_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def _feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        return unet_feature_shapes(self.denoiser.config, self.latent_size)

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> Any:
        b = noisy.shape[0]
        context = self._context.expand(b, -1, -1)
        added = {k: v.expand(b, *v.shape[1:]) for k, v in self._added.items()} or None
        return self.denoiser(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)
