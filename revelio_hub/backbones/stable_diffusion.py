"""Stable Diffusion 1.x/2.x and SDXL UNet backbones.

The conditioning is the prompt's text embedding ("" in the paper), computed
once when the backbone is built; the text encoders are not kept afterwards.
SD 1.x/2.x use the CLIP text encoder's last hidden state. SDXL concatenates the
penultimate hidden states of its two encoders, and its UNet also needs the
second encoder's pooled projection (``text_embeds``) and the micro-conditioning
``time_ids`` = (original size, crop corner, target size), which we set to an
uncropped ``image_size`` square.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .unet import UNetBackbone


def _tokenize(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


def _encoder_device_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # One prompt is cheap; on the CPU half precision is slow or unsupported for some ops.
    return dtype if device.type == "cuda" else torch.float32


@torch.inference_mode()
def encode_prompt_sd(text_encoder: nn.Module, tokenizer: Any, prompt: str, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """SD 1.x/2.x conditioning: CLIP last hidden state, 1×77×D."""
    text_encoder = text_encoder.to(device, _encoder_device_dtype(device, dtype)).eval()
    ids = _tokenize(tokenizer, prompt).to(device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = torch.ones_like(ids)
    return text_encoder(ids, attention_mask=mask)[0].float().cpu()


@torch.inference_mode()
def encode_prompt_sdxl(text_encoders: list[nn.Module], tokenizers: list[Any], prompt: str,
                       device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: (1×77×(D1+D2) penultimate states, 1×P pooled projection of encoder 2)."""
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        encoder = encoder.to(device, _encoder_device_dtype(device, dtype)).eval()
        out = encoder(_tokenize(tokenizer, prompt).to(device), output_hidden_states=True)
        pooled = out[0]  # for CLIPTextModelWithProjection: text_embeds
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1).float().cpu(), pooled.float().cpu()


class StableDiffusionBackbone(UNetBackbone):
    """SD 1.x / 2.x (``StableDiffusionPipeline`` checkpoints).

    Build from components (as the benchmark and tests do) with either a text
    encoder + tokenizer or a precomputed ``prompt_embeds`` (1×L×D).
    """

    family = "sd"

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: Any, *, text_encoder: Optional[nn.Module] = None,
                 tokenizer: Any = None, prompt_embeds: Optional[torch.Tensor] = None, prompt: str = "",
                 device: Any = "cpu", dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        device = torch.device(device)
        if prompt_embeds is None:
            if text_encoder is None or tokenizer is None:
                raise ValueError("Give either text_encoder and tokenizer, or prompt_embeds (1×L×D).")
            prompt_embeds = encode_prompt_sd(text_encoder, tokenizer, prompt, device, dtype)
        super().__init__(unet, scheduler, vae, prompt_embeds, device=device, dtype=dtype, prompt=prompt, **kwargs)
        self.conditioning = {"prompt_embeds": prompt_embeds.float().cpu()}


class StableDiffusionXLBackbone(UNetBackbone):
    """SDXL (``StableDiffusionXLPipeline`` checkpoints): two text encoders and text-time added conditioning."""

    family = "sdxl"

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: Any, *,
                 text_encoder: Optional[nn.Module] = None, text_encoder_2: Optional[nn.Module] = None,
                 tokenizer: Any = None, tokenizer_2: Any = None, prompt_embeds: Optional[torch.Tensor] = None,
                 pooled_prompt_embeds: Optional[torch.Tensor] = None, prompt: str = "", device: Any = "cpu",
                 dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        device = torch.device(device)
        if prompt_embeds is None or pooled_prompt_embeds is None:
            encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
            tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
            if not encoders or len(encoders) != len(tokenizers):
                raise ValueError("Give text encoders with their tokenizers, or prompt_embeds and pooled_prompt_embeds.")
            prompt_embeds, pooled_prompt_embeds = encode_prompt_sdxl(encoders, tokenizers, prompt, device, dtype)
        # time_ids depend on image_size, which the base class resolves; start empty, fill below.
        super().__init__(unet, scheduler, vae, prompt_embeds, device=device, dtype=dtype, prompt=prompt, **kwargs)
        s = self.image_size
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32)
        expected = self.denoiser.config.projection_class_embeddings_input_dim
        got = self.denoiser.config.addition_time_embed_dim * time_ids.shape[1] + pooled_prompt_embeds.shape[-1]
        if expected is not None and expected != got:
            raise ValueError(
                f"SDXL UNet expects {expected}-d added conditioning but the text encoder gives a "
                f"{pooled_prompt_embeds.shape[-1]}-d pooled embedding ({got} in total); components do not match."
            )
        self.conditioning = {"prompt_embeds": prompt_embeds.float().cpu(),
                             "pooled_prompt_embeds": pooled_prompt_embeds.float().cpu()}
        self._added = {"text_embeds": pooled_prompt_embeds.to(self.device, self.dtype),
                       "time_ids": time_ids.to(self.device, self.dtype)}
