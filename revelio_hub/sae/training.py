"""Training k-sparse autoencoders: config, data helpers, the trainer loop, evaluation.

One loop serves two recipes (:mod:`revelio_hub.training_recipes`). ``paper``
reproduces the original Revelio code (revelio-diffusion/revelio) step by step:
plain TopK, no input normalisation, two separate Kaiming-uniform matrices, the
batch-variance-normalised MSE, no AuxK, no hold-out, its warm-up (one step ahead)
and its order of decoder renormalisation. ``default`` is the project's: the
same numbers (k 32, 64× expansion, batch 8192, ``b_pre`` at the data mean,
unit-norm decoder rows with the parallel gradient component removed) with the
deviations that won when measured side by side, among them a learning rate
and warm-up scaled to the dictionary and the run (:mod:`revelio_hub.sae.schedule`;
the paper's fixed Adam 4e-4 with 500 warm-up steps underfits short runs). The
sparsity rule (TopK, BatchTopK, Matryoshka, Multi-TopK) is the config's
``variant`` (:mod:`revelio_hub.sae.variants`). Both get a held-out or separate-split evaluation, resumable checkpoints
and data parallelism.

Design choices that make runs reproducible:

* Batches are a pure function of (seed, step): epoch e uses the permutation
  ``randperm(n_train, seed + e)``; the global batch is sliced across ranks.
  Nothing in the loop draws random numbers, so a resumed run needs only the
  step, the weights, Adam's moments and the dead-latent counters, and a
  2-process run sees exactly the samples of the 1-process run.
* The default recipe normalises the MSE by the training set's variance (a
  constant), the paper's by the global batch's (reduced across ranks first);
  either way per-rank losses sum to the global loss (at batch 8192 the two
  normalisers agree to <1%). Gradients are synced by DDP (``accelerator.prepare``),
  which averages: each rank's loss is scaled by the world size so the average is
  the global gradient. The decoder projection and renormalisation then act on
  identical synced gradients and weights on every rank, and the dead-latent
  counters are summed across ranks before they update.
* No host syncs in the inner loop: metrics are accumulated on device and read
  back at logging steps only.

Speed: the encoder is :class:`~revelio_hub.sae.kernels.TopKEncode` (dense
forward matmul + topk, backward only at the k active latents per sample), the
decoder is ``embedding_bag`` over the k active rows, matmuls run in bf16 on CUDA
(``mixed_precision="auto"``) with fp32 master weights and fp32 loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from revelio_hub.cli import option
from revelio_hub.sae import metrics as sae_metrics
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.training_recipes import DEFAULT_RECIPE, RECIPE_NAMES, SAE_VARIANTS, SAERecipe, get_recipe
from revelio_hub.sae.kernels import sparse_decode
from revelio_hub.sae.schedule import auto_lr, auto_warmup
from revelio_hub.sae.variants import encode_for_training, update_threshold

__all__ = [
    "SAETrainConfig",
    "TrainResult",
    "train_sae",
    "SAETrainer",
    "BatchOrder",
    "Normalisation",
    "initial_model",
    "open_run",
    "final_evaluation",
    "save_run",
    "split_features",
    "evaluate_sae",
    "sample_tokens",
    "TOKEN_SAMPLINGS",
    "geometric_median",
    "load_store_features",
    "load_tensor_features",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TRAIN_CONFIG_FILE = "train_config.json"

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"checkpoint_every", "eval_batch_size", "dead_eval_min_samples"}


@dataclass
class SAETrainConfig:
    """Hyper-parameters of one k-SAE run.

    ``recipe`` (``"default"`` or ``"paper"``, see :mod:`revelio_hub.training_recipes`) fills
    every field left at ``None`` below from its :class:`~revelio_hub.training_recipes.SAERecipe`;
    a value given explicitly wins. The numbers (k 32, 64×, batch 8192, 83.9M samples) are the
    paper's in both recipes; Adam 4e-4 with 500 warm-up steps is the paper recipe's rate, the
    default recipe scales it (:mod:`revelio_hub.sae.schedule`).

    Attributes:
        recipe: the preset that fills the ``None`` fields, recorded in the model's config.
        k: active latents per sample.
        expansion: n_latents = expansion × d_in (ignored when ``n_latents`` is set).
        n_latents: explicit dictionary size.
        batch_size: global batch (split evenly across processes).
        total_samples: training length in samples (83.9M in the paper); ``steps`` overrides it.
        steps: training length in optimizer steps.
        lr: Adam learning rate after warm-up (``None``: the recipe's; the default recipe's is
            scaled to the dictionary size and run length, :func:`revelio_hub.sae.schedule.auto_lr`).
        warmup_steps: linear warm-up length (``None``: the recipe's; default recipe: :func:`~revelio_hub.sae.schedule.auto_warmup`).
        lr_decay_fraction: final fraction of training with linear decay to 0 (0 = constant, the paper).
        adam_betas / adam_eps: Adam settings.
        aux_k: latents in the AuxK code (default d_in // 2, as OpenAI) when ``auxk`` is on.
        aux_coef: AuxK loss weight (1/32). The AuxK loss is OpenAI's: the squared error of
            reconstructing the main code's residual from the dead latents, divided by the
            residual's centred batch variance, so it is ≈ 1 whatever the residual's scale.
        dead_window: a latent is dead if it did not fire in this many samples (10M; clamped to
            the training-set size, so on small data sets "dead" means "silent for an epoch").
            The dead set feeding AuxK is refreshed every step (a device-side mask, no host sync).
        dead_eval_min_samples: ``eval.json``'s ``dead_fraction`` counts latents that never fire
            on the held-out rows when there are at least this many of them; otherwise on all
            rows (training + held-out), because a latent firing on 1 sample in 10,000 looks
            dead on a few hundred. ``dead_fraction_over`` in ``eval.json`` says which.
        b_pre_init: ``"mean"`` (paper), ``"geometric_median"`` (OpenAI) or ``"zeros"``.
        eval_batch_size: chunk size of the evaluation.
        checkpoint_every: steps between resumable checkpoints (0 = only at the end).
        log_every: steps between log lines.
        seed: seeds the init, the split and the batch order.
        normalize_input / init / relu / auxk / eval_fraction / loss_norm: the recipe's choices (see
            :class:`~revelio_hub.training_recipes.SAERecipe`); ``None`` takes the recipe's.
        warmup_offset / decoder_renorm / drop_last / mixed_precision / variant: the same.
    """

    # ``option(...)``: how a field reads on train_ksae.py's command line, where its docstring entry does not say it
    recipe: str = field(default=DEFAULT_RECIPE, metadata=option(
        "paper: the original Revelio code's training exactly (TopK without ReLU, no input normalisation, two "
        "Kaiming-uniform matrices, batch-normalised MSE, no AuxK, no hold-out: pass --eval-store); default: the same "
        "with bf16 matmuls on CUDA, since no measured deviation won (README, 'Paper recipe vs. default'). Options "
        "below override single choices (default: %(default)s).", choices=list(RECIPE_NAMES)))
    k: int = 32
    expansion: int = 64
    n_latents: Optional[int] = field(default=None, metadata=option(
        "Explicit dictionary size (overrides --expansion; default: expansion x d_in)."))
    batch_size: int = 8192
    total_samples: int = field(default=83_886_080, metadata=option(
        "Training samples; with a batch larger than the data, each step uses the whole set and counts as "
        "batch-size samples, as in the original Revelio code (default: %(default)s).", flag="--samples", metavar="N"))
    steps: Optional[int] = field(default=None, metadata=option(
        "Training steps (overrides --samples; default: samples / batch size)."))
    lr: Optional[float] = field(default=None, metadata=option(
        "Adam learning rate (default: the recipe's; paper: 4e-4, default: scaled to the dictionary size and run "
        "length, revelio_hub.sae.schedule)."))
    warmup_steps: Optional[int] = field(default=None, metadata=option(
        "Linear warm-up (default: the recipe's; paper: 500, default: a share of the run)."))
    lr_decay_fraction: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    aux_k: Optional[int] = field(default=None, metadata=option(
        "AuxK latents when the recipe uses AuxK (default: d_in // 2; 0 disables AuxK)."))
    aux_coef: float = field(default=1 / 32, metadata=option("AuxK loss weight (default: 1/32)."))
    dead_window: int = field(default=10_000_000, metadata=option(
        "Samples without firing after which a latent counts as dead (default: %(default)s, clamped to the "
        "training-set size)."))
    dead_eval_min_samples: int = 100_000
    b_pre_init: str = field(default="mean", metadata=option(choices=["mean", "geometric_median", "zeros"]))
    eval_batch_size: int = 8192
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    normalize_input: Optional[bool] = field(default=None, metadata=option(
        "Do not record a scalar input normalisation (default: the recipe's; the default recipe scales so "
        "E|x-mean|^2 = 1, paper: none).", flag="--no-normalize-input", const=False))
    init: Optional[str] = None
    relu: Optional[bool] = None
    auxk: Optional[bool] = None
    eval_fraction: Optional[float] = field(default=None, metadata=option(
        "Held-out share for the final evaluation (default: the recipe's, 0.05; paper: 0)."))
    loss_norm: Optional[str] = None
    warmup_offset: Optional[int] = None
    decoder_renorm: Optional[str] = None
    drop_last: Optional[bool] = None
    mixed_precision: Optional[str] = field(default=None, metadata=option(
        "auto: bf16 matmuls on CUDA, fp32 on CPU (default: the recipe's; auto, paper: no).",
        choices=["auto", "bf16", "no"]))
    variant: Optional[str] = field(default=None, metadata=option(
        "Sparsity rule: topk (the paper), batchtopk, matryoshka or multitopk; see revelio_hub.sae.variants "
        "(default: the recipe's).", choices=list(SAE_VARIANTS)))

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        preset = asdict(get_recipe(self.recipe).sae)
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        SAERecipe(**{name: getattr(self, name) for name in preset})  # validates the recipe fields
        if self.b_pre_init not in ("mean", "geometric_median", "zeros"):
            raise ValueError(f"b_pre_init must be 'mean', 'geometric_median' or 'zeros', got {self.b_pre_init!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        for name in ("k", "expansion", "batch_size", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must lie in [0, 1], got {self.lr_decay_fraction}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.total_samples / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAETrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What :func:`train_sae` returns: the trained model (on CPU, eval mode) and its held-out metrics."""

    model: KSparseAutoencoder
    eval: dict[str, Any]
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the training loop of this call (no setup, no eval)


# ---------------------------------------------------------------- data helpers


#: How :func:`sample_tokens` draws positions: ``"uniform"``, or ``"deviation"``: in proportion to each position's
#: squared distance from its map's mean, so object positions get more of the budget than plain background.
TOKEN_SAMPLINGS = ("uniform", "deviation")


def sample_tokens(maps: torch.Tensor, n_per_image: int, seed: int = 0,
                  sampling: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample per-position vectors from spatial maps to train a token-level SAE.

    ``maps``: N×C×H×W. Draws ``n_per_image`` distinct positions per image
    (all positions when ``n_per_image ≥ H·W``) with a seeded generator.
    ``sampling="deviation"`` draws them (still distinct) with probability
    proportional to ``‖x_p − mean_p(x)‖²``: most positions of a map are
    background alike, and uniform draws spend the SAE's dictionary on them. At
    the toy bottleneck, 8 such positions per image gave "Why this class?"
    neurons named for the class in 61-62 % of tuning images against 37-47 % for
    32 uniform ones, at a 10-16 % higher held-out FVU (docs/benchmarks.md, "Token
    sampling by deviation"). A map that is the same everywhere is drawn uniformly.
    Returns ``(tokens (N·n)×C, image_index (N·n))`` where ``image_index[i]`` is
    the row of ``maps`` token i came from.
    """
    if maps.dim() != 4:
        raise ValueError(f"sample_tokens needs maps of shape N×C×H×W, got {tuple(maps.shape)}")
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be ≥ 1, got {n_per_image}")
    if sampling not in TOKEN_SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(TOKEN_SAMPLINGS)}, got {sampling!r}")
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w)
    m = min(n_per_image, h * w)
    g = torch.Generator().manual_seed(seed)
    if m == h * w:
        pos = torch.arange(h * w).expand(n, -1)
    elif sampling == "uniform":
        pos = torch.rand(n, h * w, generator=g).argsort(dim=1)[:, :m]
    else:
        dev = (flat - flat.mean(2, keepdim=True)).float().pow(2).sum(1).cpu()  # N×HW
        weight = dev / dev.sum(1, keepdim=True).clamp_min(1e-30) + 1e-9  # > 0 everywhere: m distinct draws exist
        pos = torch.multinomial(weight, m, replacement=False, generator=g)
    pos = pos.to(maps.device)
    tokens = torch.gather(flat, 2, pos.unsqueeze(1).expand(n, c, m))  # N×C×m
    tokens = tokens.permute(0, 2, 1).reshape(n * m, c)
    image_index = torch.arange(n, device=maps.device).repeat_interleave(m)
    return tokens, image_index


def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to rows of ``x``.

    More robust than the mean to the heavy-tailed outliers of diffusion features
    (OpenAI initialise ``b_pre`` with it).
    """
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * y.norm().clamp_min(1.0):
            y = y_new
            break
        y = y_new
    return y.float()


def load_store_features(
    store: Union[str, Path],
    layer: str,
    timestep: int,
    granularity: str = "pooled",
    tokens_per_image: int = 64,
    views: Optional[list[int]] = None,
    seed: int = 0,
    token_sampling: str = "uniform",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Training vectors and their recipe from a feature store (``revelio_hub.features``).

    ``pooled``: the stored N×C pooled vectors. ``token``: ``tokens_per_image``
    positions sampled from each spatial map (:func:`sample_tokens`, drawn as
    ``token_sampling`` says); the store must have been extracted with
    ``--spatial``. ``views`` keeps only those augmented views (default: all).
    """
    from revelio_hub.features import FeatureStore

    if granularity not in ("pooled", "token"):
        raise ValueError(f"granularity must be 'pooled' or 'token', got {granularity!r}")
    fs = FeatureStore(store)
    if (layer, int(timestep)) not in fs.entries:
        raise ValueError(f"{store} has no entry ({layer!r}, t={timestep}); it holds {fs.entries}")
    recipe = fs.recipe(layer, int(timestep), granularity).to_dict()
    if granularity == "pooled":
        feats = fs.load(layer, int(timestep), kind="pooled", views=views).features.float()
    else:
        maps = fs.load(layer, int(timestep), kind="spatial", views=views).features
        feats, _ = sample_tokens(maps.float(), tokens_per_image, seed=seed, sampling=token_sampling)
    return feats, recipe


def load_tensor_features(path: Union[str, Path], key: Optional[str] = None) -> tuple[torch.Tensor, Optional[dict]]:
    """N×d training vectors from a plain safetensors file (tensor ``key``, or its only tensor).

    A ``recipe`` entry in the file's metadata (JSON of ``FeatureRecipe.to_dict()``) is returned too.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        meta = f.metadata() or {}
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{path} holds tensors {names}; name the one to train on (--features-key)")
            key = names[0]
        if key not in names:
            raise ValueError(f"{path} has no tensor {key!r}; it holds {names}")
        feats = f.get_tensor(key)
    if feats.dim() != 2:
        raise ValueError(f"{path}:{key} must be N×d_in, got shape {tuple(feats.shape)}")
    recipe = json.loads(meta["recipe"]) if "recipe" in meta else None
    return feats.float(), recipe


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_sae(model: KSparseAutoencoder, features: torch.Tensor, batch_size: int = 8192) -> dict[str, Any]:
    """Held-out metrics in the units users see: FVU, explained variance, L0, dead fraction, cosine.

    ``dead_fraction`` here is the share of latents that never fire on these samples.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"evaluate_sae needs ≥ 2 samples of shape N×d, got {tuple(features.shape)}")
    device = model.W_enc.device
    resid = torch.zeros((), dtype=torch.float64, device=device)
    nnz = torch.zeros((), dtype=torch.float64, device=device)
    cos = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(model.n_latents, dtype=torch.long, device=device)
    total_sum = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device=device, dtype=torch.float32)
        recon, vals, idx = model(x)
        resid += (x - recon).double().pow(2).sum()
        nnz += (vals != 0).sum()
        cos += torch.nn.functional.cosine_similarity(x.double(), recon.double(), dim=-1, eps=1e-12).sum()
        fired.scatter_add_(0, idx.reshape(-1), (vals.reshape(-1) != 0).long())
        total_sum += x.double().sum(0)
        total_sq += x.double().pow(2).sum()
    n = features.shape[0]
    centred = total_sq - total_sum.pow(2).sum() / n
    fvu = float(resid / centred)
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(nnz / n),
        "dead_fraction": sae_metrics.dead_fraction(fired),
        "cosine": float(cos / n),
        "n_samples": int(n),
    }


# ---------------------------------------------------------------- trainer


def _adam(model: KSparseAutoencoder, cfg: SAETrainConfig) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch build supports it (a faster step, most of all on CPU; unmeasured here)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


def _with_schedule(cfg: SAETrainConfig, n_latents: int) -> SAETrainConfig:
    """``cfg`` with a learning rate and warm-up: given ones, else the default recipe's scaled rule.

    Only the optimiser sees the result; the saved ``train_config.json`` keeps ``None`` (the rule), so
    rerunning the same command resumes or finds the same run. ``eval.json`` records the values used.
    """
    lr = cfg.lr if cfg.lr is not None else auto_lr(n_latents, cfg.total_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else auto_warmup(cfg.total_steps)
    return replace(cfg, lr=lr, warmup_steps=warmup)


def _lr_at(step: int, cfg: SAETrainConfig, total: int) -> float:
    lr = cfg.lr * min(1.0, (step + cfg.warmup_offset) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
    decay_steps = int(round(cfg.lr_decay_fraction * total))
    if decay_steps > 0 and step >= total - decay_steps:
        lr *= (total - step) / decay_steps
    return lr


def _save_checkpoint(path: Path, step: int, model, opt, tracker, cfg: SAETrainConfig) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        for key, val in opt.state.get(param, {}).items():
            t = torch.as_tensor(val).detach().cpu()
            tensors[f"optim.{name}.{key}"] = (t.reshape(1) if t.dim() == 0 else t).contiguous()
    tensors["tracker.since_fired"] = tracker.since_fired.cpu()
    meta = {
        "step": str(step),
        "train_config": json.dumps(cfg.to_dict()),
        "model_config": json.dumps(model._hub_mixin_config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model, opt, tracker, cfg: SAETrainConfig) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    diffs = _config_diffs(json.loads(meta["train_config"]), cfg)
    if diffs:
        raise ValueError(
            f"{path} was written by a run with different settings {diffs} (saved, now); "
            "rerun with the original settings to resume, or pass overwrite=True (--overwrite) to start over."
        )
    tensors = load_file(str(path), device=str(model.W_enc.device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    # through load_state_dict, so Adam places each tensor as its variant needs (fused: step on the device)
    saved = opt.state_dict()
    for i, (name, _) in enumerate(model.named_parameters()):
        state = {key: tensors[f"optim.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq") if f"optim.{name}.{key}" in tensors}
        if state:
            state["step"] = state["step"].reshape(()).float().cpu()
            saved["state"][i] = state
    opt.load_state_dict(saved)
    tracker.load_state_dict({"since_fired": tensors["tracker.since_fired"]})
    return int(meta["step"])


class _TrainingForward(torch.nn.Module):
    """One training step's forward pass (encode, decode, loss) as a module of its own.

    ``accelerator.prepare`` wraps it in DDP when there are several processes. DDP
    syncs gradients only for a backward that followed *its* forward, and the
    trainer never calls :meth:`KSparseAutoencoder.forward` (it uses the sparse
    kernels directly), so the training computation itself is the module's forward.
    This is also the one place a variant's activation or loss plugs in.
    """

    def __init__(self, sae: KSparseAutoencoder, cfg: SAETrainConfig, acc: Any,
                 compute_dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.sae, self.cfg, self.acc, self.compute_dtype = sae, cfg, acc, compute_dtype

    def forward(self, x: torch.Tensor, batch: int, var_total: float, aux_ids: Optional[torch.Tensor],
                aux_mask: Optional[torch.Tensor], aux_k: int) -> tuple[torch.Tensor, ...]:
        """``(loss, main loss, AuxK loss, values, indices)`` of this process's share ``x`` of a global batch of ``batch``."""
        sae, cfg, world = self.sae, self.cfg, self.acc.num_processes
        codes = encode_for_training(  # the variant's code and loss terms (revelio_hub.sae.variants)
            sae, x - sae.b_pre, k=cfg.k, relu=cfg.relu, aux_ids=aux_ids, k_aux=aux_k,
            compute_dtype=self.compute_dtype, aux_mask=aux_mask)
        denom = _loss_denominator(x, batch, var_total, cfg, self.acc, world)
        errs = [(w, x - (sparse_decode(v, i, sae.W_dec).float() + sae.b_pre)) for w, v, i in codes.terms]
        err = errs[0][1]
        main = err.pow(2).sum() / denom
        loss = sum(w * e.pow(2).sum() for w, e in errs) / denom if len(errs) > 1 else main
        aux_loss = torch.zeros((), device=x.device)
        if aux_k > 0:
            aux_loss = _auxk_loss(err.detach(), sparse_decode(codes.aux_vals, codes.aux_idx, sae.W_dec).float(),
                                  self.acc, world)
            loss = loss + cfg.aux_coef * aux_loss
        return loss, main, aux_loss, codes.vals, codes.idx


@dataclass
class TrainingData:
    """What a run trains and evaluates on, after the seeded split.

    ``cfg`` is the run's config with a batch larger than the data trimmed to the
    whole training set (see :func:`whole_set_batches`).
    """

    cfg: SAETrainConfig
    train_cpu: torch.Tensor
    train: torch.Tensor  # the same rows, on the device when they fit
    eval_x: torch.Tensor
    eval_over: str


def split_features(features: torch.Tensor, cfg: SAETrainConfig, acc: Any,
                   eval_features: Optional[torch.Tensor] = None) -> TrainingData:
    """The seeded hold-out split (identical on every rank) and where the training rows live."""
    n_all, d_in = features.shape
    perm = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = int(round(n_all * cfg.eval_fraction))
    if cfg.eval_fraction > 0:
        n_eval = max(n_eval, 2)
    n_train = n_all - n_eval
    if n_train < cfg.batch_size:
        cfg = whole_set_batches(cfg, n_train, acc.num_processes, acc.is_main_process)
    eval_x, train_cpu, eval_over = features[perm[:n_eval]].float(), features[perm[n_eval:]].float(), "held_out"
    if eval_features is not None:
        if eval_features.dim() != 2 or eval_features.shape[1] != d_in:
            raise ValueError(f"eval_features must be N×{d_in}, got shape {tuple(eval_features.shape)}")
        eval_x, eval_over = eval_features.float(), "eval_split"
    device = acc.device
    # keep the training data on the device when it fits comfortably
    on_device = device.type != "cuda" or train_cpu.numel() * 4 < 0.4 * torch.cuda.mem_get_info(device)[0]
    train = train_cpu.to(device) if on_device else train_cpu.pin_memory() if device.type == "cuda" else train_cpu
    return TrainingData(cfg, train_cpu, train, eval_x, eval_over)


@dataclass
class Normalisation:
    """The data statistics a run starts from: the mean (for ``b_pre``) and the input scale.

    ``var_total`` is the mean centred squared norm after scaling: the ``"dataset"`` loss normaliser.
    """

    mean: torch.Tensor
    scale: float
    var_total: float

    @classmethod
    def of(cls, rows: torch.Tensor, cfg: SAETrainConfig) -> "Normalisation":
        mean = rows.double().mean(0)
        centred_sq = (rows.double() - mean).pow(2).sum(1).mean()
        if centred_sq <= 0:
            raise ValueError("the training features have zero variance; nothing to learn")
        scale = float(torch.sqrt(1.0 / centred_sq)) if cfg.normalize_input else 1.0
        return cls(mean, scale, float(centred_sq) * scale**2)


def initial_model(rows: torch.Tensor, norm: Normalisation, cfg: SAETrainConfig, *, n_latents: int, granularity: str,
                  recipe: Optional[dict], init_fn: Optional[Callable[[KSparseAutoencoder], None]] = None,
                  ) -> KSparseAutoencoder:
    """A seeded new SAE with ``b_pre`` at the data's mean / geometric median (of ``rows``), as ``cfg`` asks."""
    model = _new_model(rows.shape[1], n_latents, cfg, granularity, recipe, norm.scale)
    with torch.no_grad():
        if cfg.b_pre_init == "mean":
            model.b_pre.copy_((norm.mean * norm.scale).float())
        elif cfg.b_pre_init == "geometric_median":
            pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:32768]
            model.b_pre.copy_(geometric_median(rows[pick] * norm.scale))
        if init_fn is not None:
            init_fn(model)
    return model


class BatchOrder:
    """Which rows step ``s`` trains on: a pure function of (seed, step), the same on every process.

    Epoch ``e`` is ``randperm(n, seed · 1,000,003 + e + 1)``; each global batch is sliced
    across the processes, so N processes see exactly the samples of one.
    """

    def __init__(self, n: int, cfg: SAETrainConfig, rank: int, world: int, device: torch.device) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world, self.device = n, cfg.batch_size, cfg.seed, rank, world, device
        self.steps_per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> tuple[torch.Tensor, int]:
        """(this process's row ids, the global batch size) of ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).to(self.device)
        gidx = self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]
        b = gidx.numel()  # smaller than batch_size only for the last batch of an epoch without drop_last
        local = self.batch_size // self.world
        mine = gidx[self.rank * local : (self.rank + 1) * local] if b == self.batch_size else gidx.tensor_split(self.world)[self.rank]
        return mine, b


class SAETrainer:
    """One SAE's optimisation: Adam, the dead-latent tracker, the (DDP-wrapped) step and its log.

    Fed from outside, one batch per :meth:`step`, so the same code trains from a
    feature matrix (:func:`train_sae`) or from backbone passes, several SAEs at once
    (:mod:`revelio_hub.sae.streaming`).
    """

    def __init__(self, model: KSparseAutoencoder, cfg: SAETrainConfig, acc: Any, *, var_total: float,
                 window: int, total: int) -> None:
        self.model, self.cfg, self.acc, self.var_total, self.window, self.total = model, cfg, acc, var_total, window, total
        device = acc.device
        model.to(device).train()
        #: the learning rate and warm-up actually used (the default recipe's rule when ``cfg`` leaves them None)
        self.sched = _with_schedule(cfg, model.n_latents)
        self.opt = _adam(model, self.sched)
        aux_k = (cfg.aux_k if cfg.aux_k is not None else model.d_in // 2) if cfg.auxk else 0
        self.aux_k = min(aux_k, model.n_latents)
        self.tracker = sae_metrics.DeadLatentTracker(model.n_latents, window, device=device)
        self._compute_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" or (
            cfg.mixed_precision == "auto" and device.type == "cuda") else None
        self.step_forward: Optional[torch.nn.Module] = None  # set by prepare()
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fvu, l0, aux
        self.n_acc = 0
        self.history: list[dict[str, Any]] = []

    def prepare(self) -> None:
        """Wrap the step's forward for the processes (DDP when there are several).

        Called after a resume loaded the weights: DDP starts by broadcasting rank 0's parameters.
        """
        self.step_forward = self.acc.prepare(_TrainingForward(self.model, self.cfg, self.acc, self._compute_dtype))

    def _aux_selection(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
        """AuxK on the latents dead *now*, refreshed every step: ``(ids, mask, k_aux)``.

        On an accelerator as a mask from the device-side counter (listing the dead ids would be a
        host sync per step); on the CPU, where reading a value costs nothing, as the list of dead
        ids, so only their columns are searched.
        """
        if not (self.aux_k > 0 and self.cfg.aux_coef > 0):
            return None, None, 0
        if self.acc.device.type == "cpu":
            ids = torch.nonzero(self.tracker.dead_mask).reshape(-1)
            return (ids, None, self.aux_k) if ids.numel() > 0 else (None, None, 0)
        return None, self.tracker.dead_mask, self.aux_k

    def step(self, step: int, x: torch.Tensor, batch: int) -> None:
        """One optimiser step on this process's share ``x`` (scaled inputs) of a global batch of ``batch``."""
        cfg, model, world = self.cfg, self.model, self.acc.num_processes
        if cfg.decoder_renorm == "before_step":
            model.normalize_decoder()
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, self.sched, self.total)
        aux_ids, aux_mask, aux_k = self._aux_selection()
        loss, main, aux_loss, vals, idx = self.step_forward(x, batch, self.var_total, aux_ids, aux_mask, aux_k)
        # DDP averages the gradients of the processes; each one's loss is its share of the global loss
        # (summed over ranks it is the global loss), so scaling by the world size makes the average a sum.
        self.acc.backward(loss * world if world > 1 else loss)
        counts = torch.zeros(model.n_latents, dtype=torch.float32, device=x.device)
        counts.index_add_(0, idx.reshape(-1), (vals.reshape(-1) != 0).float())
        stats = torch.stack([loss.detach(), main.detach(), (vals != 0).sum().float() / batch, aux_loss.detach()])
        if world > 1:  # gradients are synced by DDP; the firing counts and the logged numbers are reduced here
            flat = self.acc.reduce(torch.cat([counts, stats.float()]), "sum")
            counts, stats = flat[: model.n_latents], flat[model.n_latents :]
        model.remove_parallel_decoder_grad()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.decoder_renorm == "after_step":
            model.normalize_decoder()
        update_threshold(model, vals)
        self.tracker.update(counts > 0, batch)
        self.sums += stats.double()
        self.n_acc += 1

    def log(self, step: int, out: Optional[Path]) -> Optional[dict[str, Any]]:
        """At a logging step: the mean numbers since the last one (appended to ``metrics.jsonl``)."""
        done = step + 1
        if not (done % self.cfg.log_every == 0 or done == self.total):
            return None
        means = (self.sums / self.n_acc).tolist()
        rec = {"step": done, "samples": done * self.cfg.batch_size, "lr": _lr_at(step, self.sched, self.total),
               "loss": means[0], "fvu": means[1], "l0": means[2], "aux_loss": means[3],
               "dead_fraction": self.tracker.fraction()}
        self.history.append(rec)
        if out is not None and self.acc.is_main_process:
            with open(out / METRICS_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.sums.zero_()
        self.n_acc = 0
        return rec

    def checkpoint(self, step: int, out: Optional[Path]) -> None:
        """At a checkpoint step (not the last): the resumable state, written by rank 0."""
        done = step + 1
        if out is None or self.cfg.checkpoint_every <= 0 or done % self.cfg.checkpoint_every or done >= self.total:
            return
        if self.acc.is_main_process:
            _save_checkpoint(out / CHECKPOINT_DIR / CHECKPOINT_FILE, done, self.model, self.opt, self.tracker, self.cfg)
        self.acc.wait_for_everyone()


def open_run(out: Optional[Path], trainer: SAETrainer, *, resume: bool, overwrite: bool) -> Union[int, TrainResult]:
    """Prepare ``out`` for the run: clear it (``overwrite``), resume its checkpoint, or return its finished result.

    Returns the step to start from, or the saved :class:`TrainResult` of a finished run.
    """
    acc, cfg = trainer.acc, trainer.cfg
    if out is None:
        return 0
    if overwrite and acc.is_main_process:
        for name in (CHECKPOINT_DIR, METRICS_FILE, EVAL_FILE, TRAIN_CONFIG_FILE, "config.json", "model.safetensors"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    acc.wait_for_everyone()
    ckpt_path, start = out / CHECKPOINT_DIR / CHECKPOINT_FILE, 0
    if resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, trainer.model, trainer.opt, trainer.tracker, cfg)
        if acc.is_main_process:
            print(f"resuming from step {start} of {cfg.total_steps} ({ckpt_path})", file=sys.stderr)
    elif not overwrite and (out / "model.safetensors").exists():
        return _finished_run(out, cfg)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / METRICS_FILE, start)
    return start


def final_evaluation(trainer: SAETrainer, eval_x: torch.Tensor, eval_over: str, train_rows: Optional[torch.Tensor],
                     n_train: int) -> dict[str, Any]:
    """``eval.json``: held-out (or separate-split) metrics, the original code's numbers, and the dead fractions.

    ``train_rows`` (``None`` when training streamed them) join the dead-fraction count when the
    held-out rows are few, and stand in for them when there are fewer than two.
    """
    model, cfg = trainer.model, trainer.cfg
    model.eval()
    metrics: dict[str, Any] = {}
    if eval_x.shape[0] >= 2:
        metrics = evaluate_sae(model, eval_x, cfg.eval_batch_size)
        metrics["evaluated_on"] = eval_over
    dead_report = _dead_fraction_report(model, eval_x, train_rows, cfg)
    rows = eval_x if eval_x.shape[0] >= 2 else train_rows
    original = original_code_metrics(model, rows, cfg.eval_batch_size)
    metrics.update({f"original_{k}": v for k, v in original.items() if k != "n_samples"})
    metrics["original_metrics_over"] = eval_over if eval_x.shape[0] >= 2 else "train"
    metrics["recipe"] = cfg.recipe
    metrics.update({"variant": cfg.variant, "lr": trainer.sched.lr, "warmup_steps": trainer.sched.warmup_steps})
    if "dead_fraction" in metrics and dead_report["dead_fraction_over"] != "held_out":
        metrics["dead_fraction_held_out"] = metrics["dead_fraction"]  # kept, but too few rows to trust
    metrics.update(dead_report)
    metrics.update({"dead_fraction_train": trainer.tracker.fraction(), "dead_window_samples": trainer.window,
                    "steps": trainer.total, "samples_seen": trainer.total * cfg.batch_size, "n_train": n_train})
    return metrics


def save_run(out: Optional[Path], trainer: SAETrainer, metrics: dict[str, Any]) -> None:
    """Write the final weights, ``eval.json`` and ``train_config.json``; drop the resumable state."""
    if out is None:
        return
    if trainer.acc.is_main_process:
        trainer.model.save_pretrained(out)
        (out / EVAL_FILE).write_text(json.dumps(metrics, indent=2))
        (out / TRAIN_CONFIG_FILE).write_text(json.dumps(trainer.cfg.to_dict(), indent=2))
        # the weights are final: the resumable state (3× the model with Adam's moments) is not needed
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    trainer.acc.wait_for_everyone()


def _check_inputs(features: torch.Tensor, cfg: SAETrainConfig, world: int) -> int:
    """The dictionary size, after refusing inputs the trainer cannot use."""
    if features.dim() != 2:
        raise ValueError(f"features must be N×d_in (pooled vectors or sampled tokens), got shape {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise ValueError(f"features must be floating point, got {features.dtype}")
    n_latents = cfg.n_latents or cfg.expansion * features.shape[1]
    if cfg.k > n_latents:
        raise ValueError(f"k={cfg.k} exceeds n_latents={n_latents}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    return n_latents


def _run_steps(trainer: SAETrainer, train: torch.Tensor, scale: float, start: int, stop: int, out: Optional[Path],
               progress: bool) -> tuple[int, float]:
    """Steps ``start``..``stop`` on rows of ``train``, logging and checkpointing; ``(steps done, seconds)``."""
    from tqdm.auto import tqdm

    acc = trainer.acc
    order = BatchOrder(train.shape[0], trainer.cfg, acc.process_index, acc.num_processes, train.device)
    bar = tqdm(total=trainer.total, initial=start, desc="k-SAE", disable=not (progress and acc.is_main_process),
               dynamic_ncols=True)
    completed, t0 = start, time.perf_counter()
    for step in range(start, stop):
        mine, b = order.rows(step)
        trainer.step(step, train[mine].to(acc.device, non_blocking=True) * scale, b)
        rec = trainer.log(step, out)
        if rec is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", fvu=f"{rec['fvu']:.4f}", l0=f"{rec['l0']:.1f}",
                            dead=f"{100 * rec['dead_fraction']:.1f}%")
        trainer.checkpoint(step, out)
        completed = step + 1
        bar.update(1)
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    bar.close()
    return completed, time.perf_counter() - t0


def train_sae(
    features: torch.Tensor,
    config: Optional[SAETrainConfig] = None,
    *,
    out_dir: Optional[Union[str, Path]] = None,
    recipe: Optional[dict] = None,
    granularity: str = "pooled",
    accelerator: Any = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: Optional[int] = None,
    init_fn: Optional[Callable[[KSparseAutoencoder], None]] = None,
    eval_features: Optional[torch.Tensor] = None,
) -> TrainResult:
    """Train a k-SAE on ``features`` (N×d_in, pooled vectors or sampled tokens).

    Args:
        features: training + held-out samples (any float dtype; kept on the
            accelerator device when it fits).
        config: hyper-parameters (default: the paper's).
        out_dir: where to write ``config.json``/``model.safetensors`` (the
            weights), ``eval.json``, ``metrics.jsonl`` and ``checkpoint/``.
            ``None`` trains in memory without checkpoints.
        recipe: ``FeatureRecipe.to_dict()`` recorded in the model config.
        granularity: ``"pooled"`` or ``"token"`` (what ``features`` are).
        accelerator: an ``accelerate.Accelerator``; default creates one. With
            several processes each rank computes batch_size / world samples and
            DDP syncs the gradients, so results match one process.
        resume: continue from ``out_dir/checkpoint`` if present (the settings must match).
        overwrite: delete a previous run in ``out_dir`` first.
        progress: show a tqdm bar (main process only).
        stop_after_step: stop after this many steps without the final save;
            simulates a killed run (tests) or splits a run into sessions.
        init_fn: called (under ``torch.no_grad``) on the freshly initialised
            model before training, e.g. to warm-start from another SAE's weights.
            Must be deterministic: it also runs before a resume overwrites the weights.
        eval_features: a separate evaluation split (N×d_in, e.g. the test images' features);
            ``eval.json`` is then computed on it instead of the held-out share (the paper
            recipe holds nothing out).
    """
    from accelerate import Accelerator

    cfg = config or SAETrainConfig()
    acc = accelerator or Accelerator()
    n_latents = _check_inputs(features, cfg, acc.num_processes)
    data = split_features(features, cfg, acc, eval_features)
    cfg, n_train = data.cfg, data.train_cpu.shape[0]
    norm = Normalisation.of(data.train_cpu, cfg)
    model = initial_model(data.train_cpu, norm, cfg, n_latents=n_latents, granularity=granularity, recipe=recipe,
                          init_fn=init_fn)
    trainer = SAETrainer(model, cfg, acc, var_total=norm.var_total, window=min(cfg.dead_window, n_train),
                         total=cfg.total_steps)
    out = Path(out_dir) if out_dir is not None else None
    start = open_run(out, trainer, resume=resume, overwrite=overwrite)
    if isinstance(start, TrainResult):
        return start
    trainer.prepare()
    stop = cfg.total_steps if stop_after_step is None else min(cfg.total_steps, stop_after_step)
    completed, train_seconds = _run_steps(trainer, data.train, norm.scale, start, stop, out, progress)
    model.eval()
    metrics: dict[str, Any] = {}
    if stop_after_step is None or stop_after_step >= cfg.total_steps:
        metrics = final_evaluation(trainer, data.eval_x, data.eval_over, data.train_cpu, n_train)
        save_run(out, trainer, metrics)
    return TrainResult(model=model.cpu(), eval=metrics, steps=completed, history=trainer.history,
                       train_seconds=train_seconds)


def _new_model(d_in: int, n_latents: int, cfg: SAETrainConfig, granularity: str, recipe: Optional[dict],
               scale: float) -> KSparseAutoencoder:
    """A freshly initialised SAE as the recipe wants it (tied or the original's two Kaiming draws), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = KSparseAutoencoder(
            d_in,
            n_latents,
            k=cfg.k,
            granularity=granularity,
            recipe=recipe,
            input_norm={"scale": scale} if cfg.normalize_input else None,
            relu=cfg.relu,
            training_recipe=cfg.recipe,
            variant=cfg.variant,
        )
        if cfg.init == "kaiming_uniform":
            model.kaiming_init_()
    return model


def _loss_denominator(x: torch.Tensor, batch: int, var_total: float, cfg: SAETrainConfig, acc: Any,
                      world: int) -> torch.Tensor:
    """What the squared error is divided by: the training set's variance × batch, or the batch's own.

    ``"batch"`` is the original's ``mean((x̂ − x)²) / mean((x − mean_batch(x))²)`` written as a ratio of
    sums over the *global* batch (reduced across processes), so per-process losses still sum to it.
    """
    if cfg.loss_norm == "dataset":
        return torch.tensor(batch * var_total, dtype=torch.float32, device=x.device)
    xd = x.detach().double()
    sums = torch.cat([xd.sum(0), xd.pow(2).sum().reshape(1), torch.tensor([float(x.shape[0])], device=x.device,
                                                                           dtype=torch.float64)])
    if world > 1:
        sums = acc.reduce(sums, "sum")
    total_sum, total_sq, n = sums[:-2], sums[-2], sums[-1]
    return (total_sq - total_sum.pow(2).sum() / n.clamp_min(1)).float().clamp_min(1e-12)


@torch.no_grad()
def original_code_metrics(model: KSparseAutoencoder, features: torch.Tensor, batch_size: int = 8192,
                          dead_threshold: float = 1e-6) -> dict[str, Any]:
    """The quantities the original Revelio code logs, under their own names, on ``features``.

    It counts activity on the *dense pre-TopK* activations (``hidden_pre > 0``), not on the
    TopK code: ``l0_dense_pre_topk`` is the mean number of positive pre-activations per sample
    and ``dead_fraction_dense_pre_topk`` the share of latents positive on fewer than
    ``dead_threshold`` of the samples (its ``dead_feature_threshold``, 1e-6). Its explained
    variance is uncentred: the mean over samples of ``1 − ‖x̂ − x‖² / ‖x‖²``. None of these
    equals our FVU, L0 or dead fraction; they are here so that a user can compare with its logs.
    """
    device = model.W_enc.device
    positive = torch.zeros(model.n_latents, dtype=torch.float64, device=device)
    l0 = ev = torch.zeros((), dtype=torch.float64, device=device)
    n = features.shape[0]
    for start in range(0, n, batch_size):
        x = features[start : start + batch_size].to(device=device, dtype=torch.float32)
        pre = model.preactivations(x * model.scale) > 0
        positive += pre.sum(0).double()
        l0 = l0 + pre.sum().double()
        recon, _, _ = model(x)
        ev = ev + (1 - (recon - x).double().pow(2).sum(1) / x.double().pow(2).sum(1).clamp_min(1e-30)).sum()
    return {"l0_dense_pre_topk": float(l0 / n),
            "dead_fraction_dense_pre_topk": float((positive / n < dead_threshold).double().mean()),
            "explained_variance_uncentred": float(ev / n), "n_samples": int(n)}


def whole_set_batches(cfg: SAETrainConfig, n_train: int, world: int, verbose: bool) -> SAETrainConfig:
    """A batch larger than the data becomes the whole training set per step, as in the original.

    The original's loader (a shuffled ``DataLoader`` with ``batch_size`` > dataset) simply
    yields every sample each step while its counter adds ``batch_size``: on Oxford
    Pets its 83.9M "samples" are 10,240 full-set steps. We keep that step count and
    record the batch actually used (trimmed to a multiple of the process count).
    """
    batch = n_train - n_train % world
    if batch < 1:
        raise ValueError(f"{n_train} training samples cannot be split over {world} processes")
    steps = cfg.total_steps
    if verbose:
        logger.warning(
            "warning: batch_size=%d exceeds the %d training samples: each of the %d steps uses the whole "
            "training set (%d samples, as the original Revelio code's loader does), %s samples in all",
            cfg.batch_size, n_train, steps, batch, f"{steps * batch:,}",
        )
    return replace(cfg, batch_size=batch, steps=steps)


def _auxk_loss(err: torch.Tensor, err_hat: torch.Tensor, acc: Any, world: int) -> torch.Tensor:
    """OpenAI's AuxK loss: ‖e − ê‖² over the residual's centred variance Σ‖e − mean(e)‖² (whole global batch).

    Centring matters once the main code is good: the residual's mean is a
    sizeable part of its raw norm, and dividing by the raw norm would make the
    loss (and its pull on dead latents) smaller than the reference's.
    Per-rank numerators over the global denominator, so gradients sum across ranks.
    """
    n = torch.tensor(float(err.shape[0]), device=err.device, dtype=torch.float64)
    sums = torch.cat([err.double().sum(0), err.double().pow(2).sum().reshape(1), n.reshape(1)])
    if world > 1:
        sums = acc.reduce(sums, "sum")
    total_sum, total_sq, total_n = sums[:-2], sums[-2], sums[-1]
    denom = (total_sq - total_sum.pow(2).sum() / total_n.clamp_min(1)).float()
    return (err - err_hat).pow(2).sum() / denom.clamp_min(1e-12)


@torch.no_grad()
def _dead_fraction_report(model: KSparseAutoencoder, eval_x: torch.Tensor, train_x: Optional[torch.Tensor],
                          cfg: SAETrainConfig) -> dict[str, Any]:
    """Dead fraction over enough samples: the held-out rows if there are ``dead_eval_min_samples``, else all rows.

    Without ``train_x`` (a streamed run keeps no training rows) the held-out rows are all there is.
    """
    if eval_x.shape[0] >= cfg.dead_eval_min_samples or train_x is None:
        rows, over = [eval_x], "held_out"
    else:
        rows, over = [train_x, eval_x], "all_rows"
    device = model.W_enc.device
    fired = torch.zeros(model.n_latents, dtype=torch.long, device=device)
    n = 0
    for part in rows:
        for start in range(0, part.shape[0], cfg.eval_batch_size):
            x = part[start : start + cfg.eval_batch_size].to(device=device, dtype=torch.float32)
            _, vals, idx = model(x)
            fired.scatter_add_(0, idx.reshape(-1), (vals.reshape(-1) != 0).long())
            n += x.shape[0]
    return {"dead_fraction": sae_metrics.dead_fraction(fired), "dead_fraction_over": over, "dead_fraction_samples": n}


def _config_diffs(saved: dict[str, Any], cfg: SAETrainConfig) -> dict[str, Any]:
    return {
        k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    }


def _finished_run(out: Path, cfg: SAETrainConfig) -> TrainResult:
    """Rerunning a finished run's command returns its result instead of training again."""
    cfg_path, eval_path = out / TRAIN_CONFIG_FILE, out / EVAL_FILE
    if not (cfg_path.exists() and eval_path.exists()):
        raise ValueError(f"{out} already holds an SAE from an unknown run; pass overwrite=True (--overwrite) to replace it")
    diffs = _config_diffs(json.loads(cfg_path.read_text()), cfg)
    if diffs:
        raise ValueError(
            f"{out} holds a finished run with different settings {diffs} (saved, now); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output folder."
        )
    model = KSparseAutoencoder.from_pretrained(out)
    return TrainResult(model=model, eval=json.loads(eval_path.read_text()), steps=cfg.total_steps)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so metrics.jsonl reads like one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
