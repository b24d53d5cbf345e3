"""Tiny random-weight diffusion models saved as folders laid out like Hub repos.

Each builder keeps the structural options of the real checkpoint's config
(block types, linear projections, per-block head counts, added conditioning,
learned sigma, schedulers, tokenizers) and only shrinks widths and depths, so
the code paths the real models take are the ones the tests exercise. Nothing
is downloaded: the CLIP and T5 tokenizers are generated here.

Every builder is ``make_tiny_<family>(path) -> path`` and is deterministic
(fixed torch seed), so two calls produce identical weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

PathLike = Union[str, os.PathLike]

_DIFFUSERS_VERSION = "0.42.1"


# ------------------------------------------------------------------ helpers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "circle", "square"]


def write_tiny_clip_tokenizer(folder: PathLike, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``folder``.

    The vocabulary holds every byte symbol (plain and word-final ``</w>``) plus
    merges spelling a few words, so any prompt tokenizes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": pad_token}))
    return folder


def write_tiny_t5_tokenizer(folder: PathLike) -> Path:
    """Write a tiny T5 (Unigram) tokenizer built from a handful of pieces."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=120)
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def _write_index(path: Path, pipeline: str, components: dict[str, tuple[str, str]], **extra) -> None:
    index = {"_class_name": pipeline, "_diffusers_version": _DIFFUSERS_VERSION}
    index.update({k: list(v) for k, v in components.items()})
    index.update(extra)
    (path / "model_index.json").write_text(json.dumps(index, indent=1))


def _tiny_vae(scaling_factor: float = 0.18215, force_upcast: bool = True):
    """4 blocks like the real SD VAE (factor 8, 4 latent channels), tiny widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def _tiny_clip_text(hidden: int = 32, projection_dim: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=600, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=projection_dim or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def _fix_clip_ids(model, tokenizer_folder: Path) -> None:
    """Point the text config's special ids at the generated vocabulary (pooling uses eos)."""
    vocab = json.loads((tokenizer_folder / "vocab.json").read_text())
    model.config.bos_token_id = vocab["<|startoftext|>"]
    model.config.eos_token_id = vocab["<|endoftext|>"]
    model.config.pad_token_id = vocab["<|endoftext|>"]


def _sd_unet(**overrides):
    """SD 1.5's UNet structure with tiny widths."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def _save_text_stack(path: Path, text_encoder, tokenizer_dir: str = "tokenizer",
                     encoder_dir: str = "text_encoder", pad_token: str = "<|endoftext|>") -> None:
    tok = write_tiny_clip_tokenizer(path / tokenizer_dir, pad_token=pad_token)
    _fix_clip_ids(text_encoder, tok)
    text_encoder.save_pretrained(path / encoder_dir, safe_serialization=True)


# ------------------------------------------------------------------ builders


def make_tiny_sd15(path: PathLike) -> Path:
    """SD 1.5 layout: CLIPTextModel, 4-block UNet (3 cross-attn + 1 plain), PNDM scheduler, epsilon."""
    from diffusers import PNDMScheduler

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _sd_unet().save_pretrained(path / "unet")
    _tiny_vae().save_pretrained(path / "vae")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, num_train_timesteps=1000).save_pretrained(path / "scheduler")
    _save_text_stack(path, _tiny_clip_text(32, act="quick_gelu"))
    _write_index(path, "StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "PNDMScheduler"), "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "safety_checker": ("stable_diffusion", "StableDiffusionSafetyChecker"),
        "feature_extractor": ("transformers", "CLIPImageProcessor"),
    }, requires_safety_checker=True)
    return path


def make_tiny_sd21(path: PathLike, sample_size: int = 24) -> Path:
    """SD 2.1 layout: linear projections, per-block head counts, upcast attention, OpenCLIP-style
    (gelu) text encoder, DDIM scheduler with v-prediction. Default image size 8 × ``sample_size``."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _sd_unet(sample_size=sample_size, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
             upcast_attention=True, cross_attention_dim=32).save_pretrained(path / "unet")
    _tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                  num_train_timesteps=1000).save_pretrained(path / "scheduler")
    _save_text_stack(path, _tiny_clip_text(32, act="gelu"), pad_token="!")
    _write_index(path, "StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "DDIMScheduler"), "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "safety_checker": (None, None),
        "feature_extractor": (None, None),
    }, requires_safety_checker=False)
    return path


def make_tiny_sdxl(path: PathLike) -> Path:
    """SDXL layout: 3-block UNet (plain, cross-attn ×2) with per-block transformer depths, linear
    projections, ``text_time`` added conditioning sized consistently with the second text encoder's
    projection, two text encoders (CLIPTextModel + CLIPTextModelWithProjection), Euler scheduler,
    VAE scaling 0.13025 with ``force_upcast``."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hidden_1, hidden_2, projection, time_dim = 32, 32, 32, 8
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=hidden_1 + hidden_2, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=time_dim * 6 + projection,
        norm_num_groups=8,
    ).save_pretrained(path / "unet")
    _tiny_vae(scaling_factor=0.13025, force_upcast=True).save_pretrained(path / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading", num_train_timesteps=1000).save_pretrained(path / "scheduler")
    _save_text_stack(path, _tiny_clip_text(hidden_1, act="quick_gelu"))
    torch.manual_seed(1)
    _save_text_stack(path, _tiny_clip_text(hidden_2, projection_dim=projection, act="gelu"),
                     tokenizer_dir="tokenizer_2", encoder_dir="text_encoder_2", pad_token="!")
    _write_index(path, "StableDiffusionXLPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "EulerDiscreteScheduler"), "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
    }, force_zeros_for_empty_prompt=True)
    return path


def make_tiny_dit(path: PathLike) -> Path:
    """DiT-XL/2 layout: class-conditional ``ada_norm_zero`` transformer with 1000 classes (+ null),
    patch 2, learned sigma (8 output channels), saved under the legacy ``Transformer2DModel`` class
    name as on the Hub; DDIM scheduler."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        activation_fn="gelu-approximate", attention_bias=True,
    ).save_pretrained(path / "transformer")
    config_path = path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "Transformer2DModel"
    config_path.write_text(json.dumps(config, indent=1))
    _tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(path / "scheduler")
    _write_index(path, "DiTPipeline", {
        "transformer": ("diffusers", "Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "KarrasDiffusionSchedulers"),
    }, id2label={"0": "tench", "1": "goldfish"})
    return path


def make_tiny_pixart(path: PathLike, additional_conditions: bool = True) -> Path:
    """PixArt-α layout: ``ada_norm_single`` transformer with caption projection from a tiny T5
    encoder (gated-gelu, like T5 v1.1), learned sigma, and — like PixArt-α 1024 — the resolution and
    aspect-ratio micro-conditions (``additional_conditions=False`` gives the 256/512 variant)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tiny_t5_tokenizer(path / "tokenizer")
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(path / "tokenizer")))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )).eval()
    t5.save_pretrained(path / "text_encoder", safe_serialization=True)
    PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=16,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=additional_conditions,
    ).save_pretrained(path / "transformer")
    _tiny_vae().save_pretrained(path / "vae")
    DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(path / "scheduler")
    _write_index(path, "PixArtAlphaPipeline", {
        "transformer": ("diffusers", "PixArtTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "DPMSolverMultistepScheduler"), "text_encoder": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "T5Tokenizer"),
    })
    return path


def make_tiny_pixel(path: PathLike, image_size: int = 32) -> Path:
    """The toy pixel-space layout of docs/CONTRACTS.md: 3-channel UNet2DConditionModel, DDPM
    scheduler, and a stored 1×L×D null conditioning instead of a text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cross = 16
    UNet2DConditionModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(path / "scheduler")
    save_file({"encoder_hidden_states": torch.randn(1, 4, cross)}, str(path / "null_conditioning.safetensors"))
    _write_index(path, "RevelioPixelPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler"),
    })
    return path


BUILDERS = {
    "sd15": make_tiny_sd15, "sd21": make_tiny_sd21, "sdxl": make_tiny_sdxl,
    "dit": make_tiny_dit, "pixart": make_tiny_pixart, "pixel": make_tiny_pixel,
}
