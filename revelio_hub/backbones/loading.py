"""``load_backbone``: a Hub id or a local diffusers folder -> the right :class:`Backbone`.

The family is read from ``model_index.json`` (the pipeline class). From the Hub
we download only the components feature extraction needs (no safety checker,
no fp16/ckpt duplicates, no decoder-only extras), as safetensors; weights are
never unpickled. Component classes come from ``model_index.json`` but are only
looked up in ``diffusers`` and ``transformers``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
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


logger = logging.getLogger(__name__)

_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


def cache_dir() -> Path:
    """Where Revelio Hub caches derived files: ``$REVELIO_HUB_CACHE`` or ``~/.cache/revelio_hub``."""
    return Path(os.environ.get("REVELIO_HUB_CACHE") or Path.home() / ".cache" / "revelio_hub")


def _conditioning_cache_file(folder: str, family: str, settings: dict[str, Any]) -> Path:
    """Cache path of a folder's text conditioning, keyed by its text-encoder/tokenizer files.

    Text encoders are only needed for one prompt, yet PixArt's T5-XXL alone is
    ~10 GB; caching the embedding lets later loads skip them entirely. Any
    change to those files (size or mtime) or to the settings changes the key.
    """
    files = []
    for component in _TEXT_COMPONENTS:
        directory = os.path.join(folder, component)
        if os.path.isdir(directory):
            for filename in sorted(os.listdir(directory)):
                st = os.stat(os.path.join(directory, filename))
                files.append([component, filename, st.st_size, st.st_mtime_ns])
    key = json.dumps({"folder": os.path.realpath(folder), "family": family, "files": files, **settings},
                     sort_keys=True, default=str)
    return cache_dir() / "conditioning" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _save_conditioning(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent loaders never read a partial file
    except OSError as exc:  # a read-only home is no reason to fail
        logger.warning("Could not cache the text conditioning at %s: %s", path, exc)


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
            ``max_sequence_length`` (PixArt), ``class_label`` (DiT), ``cache_conditioning``
            (default True: store the prompt embedding under :func:`cache_dir` and skip
            loading the text encoders next time).
    """
    from .pixel import PixelBackbone

    name = os.fspath(name_or_path)
    dtype = resolve_dtype(dtype)
    folder = resolve_folder(name, revision)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    family = _family(index, name)
    use_cache = bool(opts.pop("cache_conditioning", True))
    common = dict(name=name, revision=revision, device=device, dtype=dtype, image_size=image_size, **opts)
    if family == "pixel":
        return PixelBackbone.from_pretrained(folder, **common)
    if family == "pixart":
        common.setdefault("max_sequence_length", 300 if index["_class_name"] == "PixArtSigmaPipeline" else 120)
    components = list(FAMILY_COMPONENTS[family])
    cache_file, cached = None, {}
    if family in ("sd", "sdxl", "pixart"):
        encoder_dtype = dtype if torch.device(device).type == "cuda" else torch.float32
        settings = {"prompt": common.get("prompt", ""), "max_sequence_length": common.get("max_sequence_length"),
                    "encoder_dtype": str(encoder_dtype)}
        cache_file = _conditioning_cache_file(folder, family, settings) if use_cache else None
        if cache_file is not None and cache_file.is_file():
            from safetensors.torch import load_file

            cached = load_file(str(cache_file))
            components = [c for c in components if c not in _TEXT_COMPONENTS]
    parts: dict[str, Any] = {}
    for component in components:
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
    backbone = _build(family, parts, cached, common)
    if cache_file is not None and not cached:
        _save_conditioning(cache_file, backbone.conditioning)
    return backbone


def _build(family: str, parts: dict[str, Any], conditioning: dict[str, torch.Tensor],
           common: dict[str, Any]) -> Backbone:
    from .dit import DiTBackbone, PixArtBackbone
    from .stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone

    if family == "sd":
        return StableDiffusionBackbone(**parts, **conditioning, **common)
    if family == "sdxl":
        return StableDiffusionXLBackbone(**parts, **conditioning, **common)
    if family == "dit":
        return DiTBackbone(**parts, **common)
    return PixArtBackbone(**parts, **conditioning, **common)
