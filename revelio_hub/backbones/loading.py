"""``load_backbone``: a Hub id or a local diffusers folder -> the right :class:`Backbone`.

The family is read from ``model_index.json`` (the pipeline class). From the Hub
we download only the components feature extraction needs (no safety checker,
no fp16/ckpt duplicates, no decoder-only extras), as safetensors; weights are
never unpickled. Component classes come from ``model_index.json`` but are only
looked up in ``diffusers`` and ``transformers``.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional, Union

import torch

from .base import Backbone, resolve_dtype

#: pipeline class in model_index.json -> family
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "DiTPipeline": "dit",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "RevelioPixelPipeline": "pixel",
}

#: components each family needs
FAMILY_COMPONENTS = {
    "sd": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "dit": ("transformer", "vae", "scheduler"),
    "pixart": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
    "pixel": ("unet", "scheduler"),
}

_WEIGHT_PATTERNS = (
    "{c}/config.json",
    "{c}/diffusion_pytorch_model.safetensors",
    "{c}/diffusion_pytorch_model-*-of-*.safetensors",
    "{c}/diffusion_pytorch_model.safetensors.index.json",
    "{c}/model.safetensors",
    "{c}/model-*-of-*.safetensors",
    "{c}/model.safetensors.index.json",
)
_OTHER_PATTERNS = {
    "scheduler": ("scheduler/scheduler_config.json",),
    "tokenizer": ("tokenizer/*.json", "tokenizer/*.txt", "tokenizer/*.model"),
    "tokenizer_2": ("tokenizer_2/*.json", "tokenizer_2/*.txt", "tokenizer_2/*.model"),
}


class BackboneNotFoundError(FileNotFoundError, ValueError):
    """The backbone is neither a local folder nor downloadable (offline, typo, gated...)."""


def allow_patterns(family: str) -> list[str]:
    """Files to download for ``family``: just the needed components' configs and safetensors."""
    patterns = ["model_index.json"]
    if family == "pixel":
        patterns.append("null_conditioning.safetensors")
    for component in FAMILY_COMPONENTS[family]:
        patterns += _OTHER_PATTERNS.get(component, [p.format(c=component) for p in _WEIGHT_PATTERNS])
    return patterns


def _how_to_fix(name: str) -> str:
    return (f"Download it once with network access (e.g. `hf download {name}` or "
            f"`huggingface_hub.snapshot_download({name!r})`, without HF_HUB_OFFLINE=1), "
            f"or pass the path of a local folder in diffusers layout "
            f"(model_index.json, unet/ or transformer/, vae/, scheduler/, text_encoder/, tokenizer/).")


def resolve_folder(name_or_path: Union[str, os.PathLike], revision: Optional[str] = None) -> str:
    """A local folder holding the model: ``name_or_path`` itself, or a (partial) Hub snapshot."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise BackboneNotFoundError(
                f"Folder {name!r} has no model_index.json, so it is not a diffusers model folder. "
                f"Supported pipelines: {', '.join(PIPELINE_FAMILIES)}.")
        return name
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or os.path.exists(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise BackboneNotFoundError(
            f"Backbone {name!r} is not an existing folder nor a valid Hub id. " + _how_to_fix(name))
    try:
        index_path = hf_hub_download(name, "model_index.json", revision=revision)
        family = _family(json.load(open(index_path)), name)
        return snapshot_download(name, revision=revision, allow_patterns=allow_patterns(family))
    except ValueError:
        raise
    except Exception as exc:  # offline, missing, gated, network: all need the same advice
        raise BackboneNotFoundError(
            f"Could not get backbone {name!r}{f' (revision {revision})' if revision else ''} from the "
            f"Hugging Face Hub or its local cache ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            + _how_to_fix(name)) from exc


def _family(index: dict[str, Any], where: str) -> str:
    cls = index.get("_class_name")
    if cls not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{where}: pipeline {cls!r} is not supported; supported pipelines: {', '.join(PIPELINE_FAMILIES)}.")
    return PIPELINE_FAMILIES[cls]


def detect_family(folder: str) -> str:
    """The family of a local model folder, from its ``model_index.json``."""
    with open(os.path.join(folder, "model_index.json")) as f:
        return _family(json.load(f), folder)


def _component_class(folder: str, index: dict[str, Any], component: str, family: str) -> Any:
    entry = index.get(component)
    if not entry or entry[0] not in ("diffusers", "transformers") or not entry[1]:
        raise ValueError(f"{folder}: model_index.json lacks a diffusers/transformers entry for {component!r}.")
    library, cls_name = entry
    if component == "transformer" and cls_name == "Transformer2DModel":
        # Old DiT/PixArt repos name the generic class; diffusers now has dedicated ones.
        cls_name = "DiTTransformer2DModel" if family == "dit" else "PixArtTransformer2DModel"
    if component == "scheduler":
        return None
    return getattr(importlib.import_module(library), cls_name)


def _load_component(folder: str, index: dict[str, Any], component: str, family: str,
                    device: torch.device, dtype: torch.dtype) -> Any:
    """Load one component straight in the precision it will run in (no fp32 detour in RAM).

    Text encoders run once, on the CPU in fp32 unless the backbone is on CUDA;
    the VAE stays fp32 when fp16 is asked for (SD VAEs overflow in fp16).
    """
    cls = _component_class(folder, index, component, family)
    if cls is None:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if component.startswith("tokenizer"):
        return cls.from_pretrained(folder, subfolder=component)
    if component.startswith("text_encoder"):
        return cls.from_pretrained(folder, subfolder=component, use_safetensors=True,
                                   dtype=dtype if device.type == "cuda" else torch.float32)
    load_dtype = torch.float32 if component == "vae" and dtype == torch.float16 else dtype
    return cls.from_pretrained(folder, subfolder=component, use_safetensors=True, torch_dtype=load_dtype)


def load_backbone(
    name_or_path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    dtype: Union[torch.dtype, str] = torch.float32,
    revision: Optional[str] = None,
    image_size: Optional[int] = None,
    **opts: Any,
) -> Backbone:
    """Load a diffusion model as a feature-extracting :class:`Backbone`.

    Args:
        name_or_path: Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local folder
            in diffusers layout.
        device, dtype: where and in which precision to run (outputs are always float32 on CPU).
        revision: Hub revision (branch, tag or commit).
        image_size: input side in pixels; default from the checkpoint's config.
        **opts: ``channels_last``, ``early_exit``, ``prompt`` (SD/SDXL/PixArt),
            ``max_sequence_length`` (PixArt), ``class_label`` (DiT).
    """
    from .dit import DiTBackbone, PixArtBackbone
    from .pixel import PixelBackbone
    from .stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone

    name = os.fspath(name_or_path)
    dtype = resolve_dtype(dtype)
    folder = resolve_folder(name, revision)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    family = _family(index, name)
    common = dict(name=name, revision=revision, device=device, dtype=dtype, image_size=image_size, **opts)
    if family == "pixel":
        return PixelBackbone.from_pretrained(folder, **common)
    parts = {}
    for component in FAMILY_COMPONENTS[family]:
        try:
            parts[component] = _load_component(folder, index, component, family, torch.device(device), dtype)
        except (OSError, ImportError, EnvironmentError) as exc:
            hint = ""
            if component.startswith("tokenizer") and os.path.isfile(os.path.join(folder, component, "spiece.model")):
                hint = " This tokenizer ships only spiece.model: `pip install sentencepiece protobuf`."
            raise BackboneNotFoundError(
                f"Could not load component {component!r} of {name!r} from {folder}: {exc}. "
                f"Weights are read from safetensors files only (pickled .bin/.ckpt files are never loaded)."
                + hint) from exc
    if family == "sd":
        return StableDiffusionBackbone(**parts, **common)
    if family == "sdxl":
        return StableDiffusionXLBackbone(**parts, **common)
    if family == "dit":
        return DiTBackbone(**parts, **common)
    common.setdefault("max_sequence_length", 300 if index["_class_name"] == "PixArtSigmaPipeline" else 120)
    return PixArtBackbone(**parts, **common)
