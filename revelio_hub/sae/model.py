"""The k-sparse autoencoder: the paper's lens on diffusion features.

``z = ReLU(TopK(W_enc (x·s − b_pre) + b_enc))``, ``x̂ = (W_dec z + b_pre) / s``
with unit-norm decoder rows, as in the paper. ``s`` is an optional scalar input
normalisation recorded in the config (``input_norm={"scale": s}``), so users
feed the raw backbone features and get reconstructions in the same units.

The model is a ``PyTorchModelHubMixin``: ``save_pretrained`` writes
``config.json`` (d_in, n_latents, k, granularity, the full feature recipe,
input normalisation) and ``model.safetensors``; ``from_pretrained`` reads a
local folder, a Hub repo, or a ``subfolder`` of either (one entry of a
release), strictly. Codes are kept sparse, as ``(values, indices)`` with last
dimension k; decoding gathers the k active decoder rows (``embedding_bag``)
and never builds an N × n_latents matrix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from revelio_hub.hub_model import StrictHubMixin
from revelio_hub.recipe import FeatureRecipe
from revelio_hub.sae.kernels import sparse_decode
from revelio_hub.sae.variants import VARIANTS, check_prefixes, code_width, default_prefixes, select_active

__all__ = ["KSparseAutoencoder", "GRANULARITIES"]

GRANULARITIES = ("pooled", "token")


class KSparseAutoencoder(
    nn.Module,
    StrictHubMixin,
    library_name="revelio-hub",
    tags=["sparse-autoencoder", "k-sparse-autoencoder", "interpretability", "diffusion-features"],
    # a FeatureRecipe passed as ``recipe`` is written to config.json as its dict
    coders={FeatureRecipe: (lambda r: r.to_dict(), FeatureRecipe.from_dict)},
):
    """TopK sparse autoencoder over diffusion-model features.

    Args:
        d_in: feature dimension (channels of the backbone block).
        n_latents: dictionary size (expansion × d_in; the paper uses 64×).
        k: number of active latents per input.
        granularity: what it was trained on: ``"pooled"`` (one mean-pooled
            vector per image, the paper) or ``"token"`` (vectors of single
            spatial positions). Decides how :meth:`image_activations` turns a
            feature map into image-level activations.
        recipe: ``FeatureRecipe.to_dict()`` of the training features; used by
            :meth:`check_recipe` and in error messages. ``None`` for SAEs
            trained on anonymous tensors.
        input_norm: ``None`` or ``{"scale": s}``: inputs are multiplied by
            ``s`` before encoding and reconstructions divided by ``s``.
        relu: apply ReLU after TopK (ours, default). ``False`` reproduces the
            original Revelio code's plain TopK (see :meth:`from_original_checkpoint`).
        training_recipe: name of the training recipe that produced the weights
            (``"paper"`` or ``"default"``, see :mod:`revelio_hub.training_recipes`);
            recorded in ``config.json``, ``None`` when unknown.
        variant: the sparsity rule, one of :data:`~revelio_hub.sae.variants.VARIANTS`
            (see :mod:`revelio_hub.sae.variants`). Configs written before variants existed
            have no such key and load as ``"topk"``, which is what they are.
        prefixes: Matryoshka prefix ends (``"matryoshka"`` only; default n/16 … n).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int = 32,
        granularity: str = "pooled",
        recipe: Optional[dict] = None,
        input_norm: Optional[dict] = None,
        relu: bool = True,
        training_recipe: Optional[str] = None,
        variant: str = "topk",
        prefixes: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        if d_in < 1 or n_latents < 1:
            raise ValueError(f"d_in and n_latents must be positive, got d_in={d_in}, n_latents={n_latents}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must lie in [1, n_latents={n_latents}], got {k}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if prefixes is not None and variant != "matryoshka":
            raise ValueError(f"prefixes belong to the 'matryoshka' variant, not {variant!r}")
        if input_norm is not None:
            scale = input_norm.get("scale") if isinstance(input_norm, dict) else None
            if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"input_norm must be None or {{'scale': positive float}}, got {input_norm!r}")
        if recipe is not None:
            if isinstance(recipe, FeatureRecipe):
                recipe = recipe.to_dict()
            parsed = FeatureRecipe.from_dict(recipe)
            if parsed.d_in != d_in:
                raise ValueError(f"recipe d_in={parsed.d_in} differs from the SAE's d_in={d_in}")
        self.d_in = int(d_in)
        self.n_latents = int(n_latents)
        self.k = int(k)
        self.granularity = granularity
        self.recipe = dict(recipe) if recipe is not None else None
        self.input_norm = dict(input_norm) if input_norm is not None else None
        self.relu = bool(relu)
        self.training_recipe = training_recipe
        self.variant = variant
        self.prefixes = (check_prefixes(prefixes if prefixes is not None else default_prefixes(n_latents), n_latents)
                         if variant == "matryoshka" else None)

        # Tied, unit-norm initialisation (OpenAI TopK paper): W_enc starts as W_decᵀ.
        w_dec = torch.randn(n_latents, d_in)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        if variant == "batchtopk":
            # θ, learned during training; −1 = "not set yet" (the trainer's first batch sets it)
            self.register_buffer("threshold", torch.full((), -1.0))

    @property
    def code_width(self) -> int:
        """Slots per sample in a code: k, or more for BatchTopK (inactive slots hold 0)."""
        return code_width(self.variant, self.k, self.n_latents)

    # ------------------------------------------------------------------ helpers

    @property
    def scale(self) -> float:
        return float(self.input_norm["scale"]) if self.input_norm else 1.0

    def _describe_training(self) -> str:
        if not self.recipe:
            return "no recorded recipe"
        r = self.recipe
        return f"trained on {r.get('backbone')!r} layer {r.get('layer')!r} at t={r.get('timestep')}, {r.get('image_size')} px"

    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[int, int, int]]]:
        """N×d → (N×d, None); N×d×H×W → ((N·H·W)×d, (N, H, W)). Raises on anything else."""
        if x.dim() not in (2, 4):
            raise ValueError(
                f"KSparseAutoencoder expects features of shape N×{self.d_in} or N×{self.d_in}×H×W, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.d_in:
            raise ValueError(
                f"This SAE expects d_in={self.d_in} features ({self._describe_training()}), "
                f"got {x.shape[1]} channels (input shape {tuple(x.shape)}). Extract features with the SAE's recipe."
            )
        if x.dim() == 2:
            return x, None
        n, _, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n * h * w, self.d_in), (n, h, w)

    def _to_param(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def preactivations(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations of already-normalised N×d inputs (used by the trainer and tests)."""
        return F.linear(x_norm - self.b_pre, self.W_enc, self.b_enc)

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_active(pre, self.variant, self.k, self.relu, getattr(self, "threshold", None))

    def _encode_flat(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._select(self.preactivations(x_norm))

    # ------------------------------------------------------------------ public API

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code of ``x``: (values, indices), last dimension :attr:`code_width` (k for TopK), sorted by value.

        ``x``: N×d_in → N×k; a map N×d_in×H×W is encoded per position → N×H×W×k.
        With ReLU some of the k values can be 0 (fewer than k latents active);
        a BatchTopK code holds 0 in every slot below its threshold.
        """
        flat, grid = self._flatten(x)
        vals, idx = self._encode_flat(self._to_param(flat) * self.scale)
        if grid is not None:
            vals, idx = vals.reshape(*grid, vals.shape[-1]), idx.reshape(*grid, idx.shape[-1])
        return vals, idx

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense code: N×n_latents for N×d_in inputs, N×n_latents×H×W for maps.

        Memory is N·n_latents floats (times H·W): chunk large batches.
        """
        vals, idx = self.encode(x)
        dense = vals.new_zeros(*vals.shape[:-1], self.n_latents).scatter_(-1, idx, vals)
        return dense.permute(0, 3, 1, 2) if x.dim() == 4 else dense

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruct from a sparse code (``...×k`` each) → ``...×d_in`` in input units."""
        if values.shape != indices.shape:
            raise ValueError(f"values and indices must have the same shape, got {tuple(values.shape)} and {tuple(indices.shape)}")
        out = sparse_decode(values.to(self.W_dec.dtype), indices, self.W_dec) + self.b_pre
        return out / self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction shaped like ``x``, values, indices)."""
        vals, idx = self.encode(x)
        recon = self.decode(vals, idx)
        if x.dim() == 4:
            recon = recon.permute(0, 3, 1, 2)
        return recon, vals, idx

    def image_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense image-level activations N×n_latents of the TopK code, respecting the training granularity.

        Pooled SAE: a map N×d×H×W is mean-pooled over space first (what it was
        trained on). Token SAE: every position is encoded and an image's
        activation of a neuron is its max over positions (0 where it never
        fires). N×d inputs are encoded as they are. Callers chunk large N.
        """
        return self.image_codes(x)[0]

    def image_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level ``(TopK code, ReLU of the pre-TopK activations)``, both N×n_latents, from one matmul.

        The second is what the original Revelio code ranks a neuron's top images by and computes
        σ_label on (it hooks the encoder before ``select_topk`` and applies a ReLU): a neuron
        there "fires" on every image whose pre-activation is positive, selected by TopK or not.
        Pooling follows :meth:`image_activations`: mean-pooled maps for a pooled SAE, the max
        over positions for a token SAE.
        """
        if x.dim() == 4 and self.granularity == "pooled":
            x = self._to_param(x).mean(dim=(2, 3))  # average in fp32 even for fp16 stored maps
        flat, grid = self._flatten(x)
        pre = self.preactivations(self._to_param(flat) * self.scale)
        vals, idx = self._select(pre)
        codes = pre.new_zeros(pre.shape).scatter_(-1, idx, vals)
        dense = pre.clamp_min_(0)
        if grid is None:
            return codes, dense
        n = grid[0]
        return codes.reshape(n, -1, self.n_latents).amax(1), dense.reshape(n, -1, self.n_latents).amax(1)

    def activation_map(self, x_map: torch.Tensor, neuron_ids: Union[torch.Tensor, list[int], int]) -> torch.Tensor:
        """Per-position activations of selected neurons: N×len(neuron_ids)×H×W heat maps.

        Each position's vector is encoded on its own. For a token-level SAE
        that is exactly its training distribution; a pooled SAE never saw
        single-position vectors (their norm and mixture differ from an image
        mean), so its maps are an off-distribution approximation: useful for
        *where*, not calibrated for *how much*.
        """
        if x_map.dim() != 4:
            raise ValueError(f"activation_map needs a feature map N×{self.d_in}×H×W, got shape {tuple(x_map.shape)}")
        ids = torch.as_tensor(neuron_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_latents):
            raise ValueError(f"neuron ids must lie in [0, {self.n_latents}), got {ids.tolist()[:10]}")
        vals, idx = self.encode(x_map)  # N×H×W×k
        ids = ids.to(idx.device)
        hit = idx.unsqueeze(-1) == ids  # N×H×W×k×m
        maps = (vals.unsqueeze(-1) * hit).sum(-2)  # N×H×W×m
        return maps.permute(0, 3, 1, 2)

    def check_recipe(self, recipe: Union[FeatureRecipe, dict, None]) -> None:
        """Raise ``ValueError`` if features made with ``recipe`` are not what this SAE expects.

        Compares backbone, layer, timestep, image size and d_in (granularity is
        not compared: a token SAE consumes maps, a pooled SAE their means).
        """
        if recipe is None:
            return
        other = recipe if isinstance(recipe, FeatureRecipe) else FeatureRecipe.from_dict(recipe)
        if other.d_in != self.d_in:
            raise ValueError(
                f"This SAE expects d_in={self.d_in} features ({self._describe_training()}), "
                f"the features have d_in={other.d_in} ({other.backbone!r} layer {other.layer!r})."
            )
        if self.recipe is not None:
            FeatureRecipe.from_dict(self.recipe).check_compatible(other, what="features")

    @torch.no_grad()
    def kaiming_init_(self, generator: Optional[torch.Generator] = None) -> None:
        """The original Revelio code's initialisation: two separate ``kaiming_uniform_`` draws, untied.

        It draws ``W_enc`` as d_in × n_latents (fan-in n_latents: bound √(6 / n_latents)), stored
        here transposed, and ``W_dec`` as n_latents × d_in (bound √(6 / d_in)) whose rows are then
        scaled to unit norm; ``b_enc`` starts at 0. ``b_pre`` is left to the caller (the data mean).
        """
        w_enc = nn.init.kaiming_uniform_(torch.empty(self.d_in, self.n_latents), generator=generator)
        w_dec = nn.init.kaiming_uniform_(torch.empty(self.n_latents, self.d_in), generator=generator)
        self.W_enc.copy_(w_enc.t())
        self.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))
        self.b_enc.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the trainer calls this after every step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to the row.

        With unit-norm rows that component only changes the norm, which the
        renormalisation undoes anyway; removing it keeps Adam's moments honest.
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # ------------------------------------------------------------------ loading

    _hub_kind = "k-SAE"

    def _describe_architecture(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, variant={self.variant!r}"

    @classmethod
    def from_original_checkpoint(
        cls,
        path: Union[str, Path],
        *,
        k: Optional[int] = None,
        relu: bool = False,
        granularity: str = "pooled",
        recipe: Optional[dict] = None,
    ) -> "KSparseAutoencoder":
        """Import a ``.pt`` file written by the paper's code (``KSparseAutoencoder.save_model``).

        The original Revelio code saves ``torch.save({"cfg": SDSAERunnerConfig(...), "state_dict": {W_enc,
        b_enc, W_dec, b_dec}})``, with ``k`` only inside ``cfg``. The file is read with
        ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
        only; the one extra class admitted is the original Revelio code's config, which becomes a plain
        mapping (see :func:`read_original_checkpoint`). Anything else in the pickle, such as
        a function call smuggled in by a malicious file, is refused with ``ValueError``.

        The original Revelio code's layout is ``W_enc`` d_in×n, ``W_dec`` n×d_in, ``b_dec`` the
        pre-encoder bias (our ``b_pre``). ``k`` comes from the checkpoint's config
        unless given. The original Revelio code encodes ``z = TopK(W_encᵀ(x − b_dec) + b_enc)``
        *without* a ReLU, so by default (``relu=False``) the imported model
        reproduces its reconstructions exactly. ``relu=True`` switches to our
        activation; the two agree whenever the k selected pre-activations are
        positive. Decoder rows are kept as stored (not renormalised), to keep
        reconstructions equal.
        """
        ckpt = read_original_checkpoint(path)
        state = ckpt.get("state_dict", ckpt)
        original_cfg = ckpt.get("cfg") if isinstance(ckpt.get("cfg"), dict) else {}
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a k-SAE checkpoint of the original Revelio code (expected a dict with 'state_dict')")
        need = ("W_enc", "W_dec", "b_enc", "b_dec")
        missing = [n for n in need if n not in state]
        if missing:
            raise ValueError(f"{path} lacks the original Revelio code's tensors {missing}; found keys {sorted(state)}")
        w_enc, w_dec = state["W_enc"], state["W_dec"]
        d_in, n_latents = w_enc.shape
        if tuple(w_dec.shape) != (n_latents, d_in):
            raise ValueError(f"W_dec has shape {tuple(w_dec.shape)}, expected {(n_latents, d_in)} from W_enc {tuple(w_enc.shape)}")
        if original_cfg.get("d_sae") not in (None, n_latents) or original_cfg.get("d_in") not in (None, d_in):
            raise ValueError(f"{path}: cfg says d_in={original_cfg.get('d_in')}, d_sae={original_cfg.get('d_sae')}, "
                             f"but W_enc has shape {tuple(w_enc.shape)}")
        if k is None:
            stored = original_cfg.get("k", ckpt.get("k"))
            if stored is None:
                raise ValueError(f"{path} does not record k (no cfg.k); pass k=... (the paper uses 32)")
            k = int(stored)
        model = cls(d_in, n_latents, k=int(k), granularity=granularity, recipe=recipe, relu=relu)
        with torch.no_grad():
            model.W_enc.copy_(w_enc.t())
            model.W_dec.copy_(w_dec)
            model.b_enc.copy_(state["b_enc"].reshape(-1))
            model.b_pre.copy_(state["b_dec"].reshape(-1))
        return model


#: Where the paper's code defines its run config (``SD-kSAE/training/config.py``).
ORIGINAL_CONFIG_CLASS = "training.config.SDSAERunnerConfig"


class _OriginalConfig(dict):
    """Stands in for the original Revelio code's ``SDSAERunnerConfig`` while unpickling: its fields become a plain dict.

    The real class is never imported (it pulls in ``wandb`` and runs code in
    ``__post_init__``); pickle's BUILD hands the instance's ``__dict__`` to
    :meth:`__setstate__`, which only stores it.
    """

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ValueError(f"unexpected state of the original Revelio code's config: {type(state).__name__}")
        self.update(state)


def read_original_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read a ``.pt`` file of the original Revelio code as tensors, plain containers and the original Revelio code's config as a dict.

    ``torch.load(weights_only=True)`` with one extra allowed global, the original Revelio code's
    config class mapped to :class:`_OriginalConfig`; every other global (``os.system``,
    arbitrary classes, ...) makes the unpickler stop with an error, reported here
    as ``ValueError``. Nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(".pkl.gz"):
        raise ValueError(f"{path}: the original Revelio code's .pkl.gz format is a plain pickle and is not read; save it as .pt")
    try:
        with torch.serialization.safe_globals([(_OriginalConfig, ORIGINAL_CONFIG_CLASS)]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: refuse, never fall back to a full unpickle
        raise ValueError(
            f"{path} holds objects other than tensors, plain containers and the original Revelio code's {ORIGINAL_CONFIG_CLASS}, "
            f"so it is not loaded (read with torch.load(weights_only=True)): {exc}"
        ) from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a k-SAE checkpoint of the original Revelio code (expected a dict, got {type(ckpt).__name__})")
    if isinstance(ckpt.get("cfg"), _OriginalConfig):
        ckpt = {**ckpt, "cfg": dict(ckpt["cfg"])}
    return ckpt
