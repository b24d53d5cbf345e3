"""Transformer backbones: DiT (class-conditional) and PixArt (T5-conditioned).

``block{i}`` is the output of ``transformer_blocks[i]``: patch tokens
(B×N×C, row-major over the h×w patch grid) reshaped to a B×C×h×w map so that
every family returns the same kind of tensor.

DiT is conditioned on the null class (id ``num_embeds_ada_norm`` = 1000, the
class-dropout token). PixArt is conditioned on the T5 embedding of the empty
prompt with its attention mask; PixArt-α 1024 also takes the resolution and
aspect-ratio micro-conditions, which we set to an uncropped square.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import Backbone
from .layers import tokens_to_map, transformer_layer_modules


class TransformerBackbone(Backbone):
    """Shared layer bookkeeping of patch-token diffusion transformers."""

    def _make_layer_modules(self) -> dict[str, nn.Module]:
        return transformer_layer_modules(self.denoiser)

    @property
    def transformer(self) -> nn.Module:
        return self.denoiser

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    def default_image_size(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_factor

    def size_multiple(self) -> int:
        return self.vae_factor * self.patch_size

    @property
    def hidden_size(self) -> int:
        cfg = self.denoiser.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    def _feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        g = self.grid_size
        return {name: (self.hidden_size, g, g) for name in self.layers}

    def _to_map(self, layer: str, output: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(output, self.grid_size, self.grid_size)


class DiTBackbone(TransformerBackbone):
    """DiT (``DiTPipeline`` checkpoints, e.g. ``facebook/DiT-XL-2-256``) with the null class."""

    family = "dit"

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any, *,
                 class_label: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(denoiser=transformer, vae=vae, scheduler=scheduler, **kwargs)
        num_classes = self.denoiser.config.num_embeds_ada_norm
        self.class_label = int(num_classes if class_label is None else class_label)

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> Any:
        labels = torch.full((noisy.shape[0],), self.class_label, dtype=torch.long, device=noisy.device)
        return self.denoiser(noisy, timestep=timesteps, class_labels=labels, return_dict=False)


@torch.inference_mode()
def encode_prompt_t5(text_encoder: nn.Module, tokenizer: Any, prompt: str, max_length: int,
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt conditioning: T5 last hidden state (1×L×D) and its attention mask (1×L)."""
    enc_dtype = dtype if device.type == "cuda" else torch.float32
    text_encoder = text_encoder.to(device, enc_dtype).eval()
    tokens = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    states = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return states.float().cpu(), mask.cpu()


class PixArtBackbone(TransformerBackbone):
    """PixArt-α/Σ (``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` checkpoints)."""

    family = "pixart"

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any, *,
                 text_encoder: Optional[nn.Module] = None, tokenizer: Any = None,
                 prompt_embeds: Optional[torch.Tensor] = None, prompt_attention_mask: Optional[torch.Tensor] = None,
                 max_sequence_length: int = 120, prompt: str = "", device: Any = "cpu",
                 dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        device = torch.device(device)
        if prompt_embeds is None:
            if text_encoder is None or tokenizer is None:
                raise ValueError("Give text_encoder and tokenizer, or prompt_embeds (1×L×D) with its mask.")
            prompt_embeds, prompt_attention_mask = encode_prompt_t5(
                text_encoder, tokenizer, prompt, max_sequence_length, device, dtype)
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long)
        super().__init__(denoiser=transformer, vae=vae, scheduler=scheduler, device=device, dtype=dtype,
                         prompt=prompt, **kwargs)
        self._context = prompt_embeds.to(self.device, self.dtype)
        self._mask = prompt_attention_mask.to(self.device)
        self.conditioning = {"prompt_embeds": prompt_embeds.float().cpu(),
                             "prompt_attention_mask": prompt_attention_mask.long().cpu()}

    def _added_conditions(self, batch: int) -> dict[str, Optional[torch.Tensor]]:
        if not getattr(self.denoiser, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        s = float(self.image_size)
        return {
            "resolution": torch.tensor([[s, s]], device=self.device, dtype=self.dtype).expand(batch, 2),
            "aspect_ratio": torch.tensor([[1.0]], device=self.device, dtype=self.dtype).expand(batch, 1),
        }

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> Any:
        b = noisy.shape[0]
        return self.denoiser(
            noisy, encoder_hidden_states=self._context.expand(b, -1, -1),
            encoder_attention_mask=self._mask.expand(b, -1), timestep=timesteps,
            added_cond_kwargs=self._added_conditions(b), return_dict=False,
        )
