"""TopK SAEs from and to the peers' file layouts: EleutherAI sparsify and SAELens.

Why: a user who trained a TopK SAE with sparsify or SAELens on diffusion
features should browse it here, and one trained here should run in their
tools. The weights are the same four tensors under other names and
conventions; only those conventions need care (read from each project's code):

* **sparsify** (``cfg.json`` + ``sae.safetensors``; ``encoder.weight`` n×d,
  ``encoder.bias``, ``W_dec`` n×d, ``b_dec``): ``z = TopK(ReLU(encoder(x − b_dec)))``,
  ``x̂ = zᵀ W_dec + b_dec``. ReLU before TopK keeps the same values as our TopK
  then ReLU (slots of zeros may name other latents; they decode to nothing).
  Decoder rows are used as stored. Transcoders, skip connections and the
  ``groupmax`` activation have no equivalent here and are refused.
* **SAELens** (``cfg.json`` + ``sae_weights.safetensors``; ``W_enc`` d×n,
  ``b_enc``, ``W_dec`` n×d, ``b_dec``; architecture ``"topk"``):
  ``pre = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc``, times the decoder
  row norms when ``rescale_acts_by_decoder_norm`` (then decoded as ``z / norm``);
  TopK then ReLU; ``x̂ = z W_dec + b_dec``. Without the input subtraction the
  encoder bias absorbs ``b_dec W_enc``; with the rescaling the norms move into
  the encoder and the decoder rows become unit. Input normalisations
  other than ``"none"`` are refused (their statistics are not in the file).

Export writes SAELens's layout with ``apply_b_dec_to_input`` true, no rescaling,
no normalisation, the input scale folded into the weights. Our ``relu=False``
models (the paper recipe) become SAELens TopK models with a ReLU; the two agree
whenever the k selected pre-activations are positive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from revelio_hub.sae.model import KSparseAutoencoder

__all__ = ["load_sparsify", "load_saelens", "save_saelens", "SPARSIFY_FILES", "SAELENS_FILES"]

SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
_SAELENS_EXPORTABLE = ("topk", "matryoshka", "multitopk")


def _read(folder: Union[str, Path], files: tuple[str, str], who: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a {who} SAE folder: {', '.join(missing)} missing (expected {', '.join(files)})")
    try:
        cfg = json.loads((folder / files[0]).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / files[0]} is not valid JSON: {exc}") from exc
    tensors = {k: v.float() for k, v in load_file(str(folder / files[1])).items()}
    return cfg, tensors


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{where} lacks tensors {missing}; it holds {sorted(tensors)}")


def _build(w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_pre: torch.Tensor, k: int,
           variant: str, recipe: Optional[dict], granularity: str) -> KSparseAutoencoder:
    n, d = w_dec.shape
    if tuple(w_enc.shape) != (n, d) or tuple(b_enc.shape) != (n,) or tuple(b_pre.shape) != (d,):
        raise ValueError(f"inconsistent shapes: encoder {tuple(w_enc.shape)}, encoder bias {tuple(b_enc.shape)}, "
                         f"decoder {tuple(w_dec.shape)}, decoder bias {tuple(b_pre.shape)}")
    model = KSparseAutoencoder(d, n, k=k, granularity=granularity, recipe=recipe, relu=True, variant=variant)
    with torch.no_grad():
        model.W_enc.copy_(w_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(w_dec)
        model.b_pre.copy_(b_pre)
    return model


def load_sparsify(folder: Union[str, Path], *, recipe: Optional[dict] = None,
                  granularity: str = "pooled") -> KSparseAutoencoder:
    """A TopK SAE saved by sparsify's ``SparseCoder.save_to_disk`` (one hookpoint's folder)."""
    cfg, t = _read(folder, SPARSIFY_FILES, "sparsify")
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in t:
        raise ValueError(f"{folder} holds a sparsify transcoder or skip connection; only plain TopK SAEs load here")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder} uses sparsify's {cfg.get('activation')!r} activation; only 'topk' loads here")
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), f"{folder}/sae.safetensors")
    if "k" not in cfg:
        raise ValueError(f"{folder}/cfg.json does not record k")
    variant = "multitopk" if cfg.get("multi_topk") else "topk"
    return _build(t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], int(cfg["k"]), variant, recipe,
                  granularity)


def load_saelens(folder: Union[str, Path], *, recipe: Optional[dict] = None,
                 granularity: str = "pooled") -> KSparseAutoencoder:
    """A TopK SAE saved by SAELens's ``save_model`` (architecture ``"topk"``)."""
    cfg, t = _read(folder, SAELENS_FILES, "SAELens")
    if cfg.get("architecture") != "topk":
        raise ValueError(f"{folder} holds a SAELens {cfg.get('architecture')!r} SAE; only 'topk' loads here")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{folder} normalises or reshapes its inputs ({cfg.get('normalize_activations')!r}, "
                         f"{cfg.get('reshape_activations')!r}); only 'none' loads here")
    _need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), f"{folder}/sae_weights.safetensors")
    w_enc, b_enc, w_dec, b_dec = t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + w_enc @ b_dec  # encode(x) = (x − b_dec) W + (b_enc + b_dec W)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
    return _build(w_enc, b_enc, w_dec, b_dec, int(cfg["k"]), "topk", recipe, granularity)


def save_saelens(model: KSparseAutoencoder, folder: Union[str, Path], metadata: Optional[dict] = None) -> Path:
    """Write ``model`` in SAELens's TopK layout; returns the folder. The input scale is folded into the weights."""
    if model.variant not in _SAELENS_EXPORTABLE:
        raise ValueError(f"a {model.variant!r} SAE has no SAELens TopK equivalent (exportable: {_SAELENS_EXPORTABLE})")
    s = model.scale
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {"W_enc": (model.W_enc.float() * s).T.contiguous(), "b_enc": model.b_enc.float().clone(),
                   "W_dec": (model.W_dec.float() / s).contiguous(), "b_dec": (model.b_pre.float() / s).contiguous()}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / SAELENS_FILES[1]))
    cfg = {"architecture": "topk", "d_in": model.d_in, "d_sae": model.n_latents, "k": model.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"revelio_hub_recipe": model.recipe, **(metadata or {})}}
    (folder / SAELENS_FILES[0]).write_text(json.dumps(cfg, indent=1))
    return folder
