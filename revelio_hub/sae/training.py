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
  either way per-rank losses sum to the global loss and gradients can be summed
  across ranks (at batch 8192 the two normalisers agree to <1%).
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

from revelio_hub.interpret import metrics as M
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.training_recipes import DEFAULT_RECIPE, SAERecipe, get_recipe
from revelio_hub.sae.kernels import sparse_decode
from revelio_hub.sae.schedule import auto_lr, auto_warmup
from revelio_hub.sae.variants import encode_for_training, update_threshold

__all__ = [
    "SAETrainConfig",
    "TrainResult",
    "train_sae",
    "evaluate_sae",
    "sample_tokens",
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
        normalize_input, init, relu, auxk, eval_fraction, loss_norm, warmup_offset, decoder_renorm,
        drop_last, mixed_precision, variant: the recipe's choices (see :class:`~revelio_hub.training_recipes.SAERecipe`);
            ``None`` takes the recipe's.
    """

    recipe: str = DEFAULT_RECIPE
    k: int = 32
    expansion: int = 64
    n_latents: Optional[int] = None
    batch_size: int = 8192
    total_samples: int = 83_886_080
    steps: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    lr_decay_fraction: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    aux_k: Optional[int] = None
    aux_coef: float = 1 / 32
    dead_window: int = 10_000_000
    dead_eval_min_samples: int = 100_000
    b_pre_init: str = "mean"
    eval_batch_size: int = 8192
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    normalize_input: Optional[bool] = None
    init: Optional[str] = None
    relu: Optional[bool] = None
    auxk: Optional[bool] = None
    eval_fraction: Optional[float] = None
    loss_norm: Optional[str] = None
    warmup_offset: Optional[int] = None
    decoder_renorm: Optional[str] = None
    drop_last: Optional[bool] = None
    mixed_precision: Optional[str] = None
    variant: Optional[str] = None

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


def sample_tokens(maps: torch.Tensor, n_per_image: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample per-position vectors from spatial maps to train a token-level SAE.

    ``maps``: N×C×H×W. Draws ``n_per_image`` distinct positions per image
    (all positions when ``n_per_image ≥ H·W``) with a seeded generator.
    Returns ``(tokens (N·n)×C, image_index (N·n))`` where ``image_index[i]`` is
    the row of ``maps`` token i came from.
    """
    if maps.dim() != 4:
        raise ValueError(f"sample_tokens needs maps of shape N×C×H×W, got {tuple(maps.shape)}")
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be ≥ 1, got {n_per_image}")
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w)
    m = min(n_per_image, h * w)
    if m == h * w:
        pos = torch.arange(h * w).expand(n, -1)
    else:
        g = torch.Generator().manual_seed(seed)
        pos = torch.rand(n, h * w, generator=g).argsort(dim=1)[:, :m]
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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Training vectors and their recipe from a feature store (``revelio_hub.features``).

    ``pooled``: the stored N×C pooled vectors. ``token``: ``tokens_per_image``
    positions sampled from each spatial map (:func:`sample_tokens`); the store
    must have been extracted with ``--spatial``. ``views`` keeps only those
    augmented views (default: all).
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
        feats, _ = sample_tokens(maps.float(), tokens_per_image, seed=seed)
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
        "dead_fraction": M.dead_fraction(fired),
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
            gradients are summed, so results match one process.
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
    from tqdm.auto import tqdm

    cfg = config or SAETrainConfig()
    if features.dim() != 2:
        raise ValueError(f"features must be N×d_in (pooled vectors or sampled tokens), got shape {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise ValueError(f"features must be floating point, got {features.dtype}")
    acc = accelerator or Accelerator()
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    n_all, d_in = features.shape
    n_latents = cfg.n_latents or cfg.expansion * d_in
    if cfg.k > n_latents:
        raise ValueError(f"k={cfg.k} exceeds n_latents={n_latents}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")

    # ---- split (seeded, identical on every rank)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n_all, generator=g)
    n_eval = int(round(n_all * cfg.eval_fraction))
    if cfg.eval_fraction > 0:
        n_eval = max(n_eval, 2)
    n_train = n_all - n_eval
    if n_train < cfg.batch_size:
        cfg = _whole_set_batches(cfg, n_train, world, acc.is_main_process)
    eval_x = features[perm[:n_eval]].float()
    train_cpu = features[perm[n_eval:]].float()
    eval_over = "held_out"
    if eval_features is not None:
        if eval_features.dim() != 2 or eval_features.shape[1] != d_in:
            raise ValueError(f"eval_features must be N×{d_in}, got shape {tuple(eval_features.shape)}")
        eval_x, eval_over = eval_features.float(), "eval_split"

    # keep the training data on the device when it fits comfortably
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        on_device = train_cpu.numel() * 4 < 0.4 * free
    else:
        on_device = True
    train = train_cpu.to(device) if on_device else train_cpu.pin_memory() if device.type == "cuda" else train_cpu

    # ---- normalisation and init
    mean = train_cpu.double().mean(0)
    centred_sq = (train_cpu.double() - mean).pow(2).sum(1).mean()
    if centred_sq <= 0:
        raise ValueError("the training features have zero variance; nothing to learn")
    scale = float(torch.sqrt(1.0 / centred_sq)) if cfg.normalize_input else 1.0
    var_total = float(centred_sq) * scale**2  # mean centred squared norm after scaling
    model = _new_model(d_in, n_latents, cfg, granularity, recipe, scale)
    with torch.no_grad():
        if cfg.b_pre_init == "mean":
            model.b_pre.copy_((mean * scale).float())
        elif cfg.b_pre_init == "geometric_median":
            sub = train_cpu[torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))[:32768]]
            model.b_pre.copy_(geometric_median(sub * scale))
        if init_fn is not None:
            init_fn(model)
    model.to(device).train()
    sched = _with_schedule(cfg, n_latents)
    opt = _adam(model, sched)

    aux_k = (cfg.aux_k if cfg.aux_k is not None else d_in // 2) if cfg.auxk else 0
    aux_k = min(aux_k, n_latents)
    window = min(cfg.dead_window, n_train)
    tracker = M.DeadLatentTracker(n_latents, window, device=device)
    compute_dtype = (
        torch.bfloat16
        if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
        else None
    )

    # ---- output folder and resume
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE if out else None
    start = 0
    if out is not None:
        if overwrite and acc.is_main_process:
            for name in (CHECKPOINT_DIR, METRICS_FILE, EVAL_FILE, TRAIN_CONFIG_FILE, "config.json", "model.safetensors"):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        acc.wait_for_everyone()
        if resume and ckpt_path.exists():
            start = _load_checkpoint(ckpt_path, model, opt, tracker, cfg)
            if acc.is_main_process:
                print(f"resuming from step {start} of {cfg.total_steps} ({ckpt_path})", file=sys.stderr)
        elif not overwrite and (out / "model.safetensors").exists():
            return _finished_run(out, cfg)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _truncate_log(out / METRICS_FILE, start)

    total = cfg.total_steps
    local_b = cfg.batch_size // world
    steps_per_epoch = n_train // cfg.batch_size if cfg.drop_last else math.ceil(n_train / cfg.batch_size)
    params = list(model.parameters())
    history: list[dict[str, Any]] = []
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fvu, l0, aux
    n_acc = 0
    cached_epoch, epoch_perm = -1, None
    bar = tqdm(total=total, initial=start, desc="k-SAE", disable=not (progress and acc.is_main_process), dynamic_ncols=True)

    completed = start
    t0 = time.perf_counter()
    for step in range(start, total):
        if stop_after_step is not None and step >= stop_after_step:
            break
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != cached_epoch:
            ep_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 1)
            epoch_perm = torch.randperm(n_train, generator=ep_gen).to(train.device)
            cached_epoch = epoch
        gidx = epoch_perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        b = gidx.numel()  # smaller than batch_size only for the last batch of an epoch without drop_last
        mine = gidx[rank * local_b : (rank + 1) * local_b] if b == cfg.batch_size else gidx.tensor_split(world)[rank]
        x = train[mine].to(device, non_blocking=True) * scale
        if cfg.decoder_renorm == "before_step":
            model.normalize_decoder()

        for group in opt.param_groups:
            group["lr"] = _lr_at(step, sched, total)

        # AuxK on the latents dead *now*, refreshed every step. On an accelerator as a mask from the
        # device-side counter (listing the dead ids would be a host sync per step); on the CPU, where
        # reading a value costs nothing, as the list of dead ids, so only their columns are searched.
        use_aux = aux_k > 0 and cfg.aux_coef > 0
        aux_mask = aux_ids = None
        if use_aux and device.type == "cpu":
            aux_ids = torch.nonzero(tracker.dead_mask).reshape(-1)
            use_aux = aux_ids.numel() > 0
        elif use_aux:
            aux_mask = tracker.dead_mask
        codes = encode_for_training(  # the variant's code and loss terms (revelio_hub.sae.variants)
            model, x - model.b_pre, k=cfg.k, relu=cfg.relu, aux_ids=aux_ids if use_aux else None,
            k_aux=aux_k if use_aux else 0, compute_dtype=compute_dtype, aux_mask=aux_mask if use_aux else None)
        vals, idx, aux_vals, aux_idx = codes.vals, codes.idx, codes.aux_vals, codes.aux_idx
        denom = _loss_denominator(x, b, var_total, cfg, acc, world)
        errs = [(w, x - (sparse_decode(v, i, model.W_dec).float() + model.b_pre)) for w, v, i in codes.terms]
        err = errs[0][1]
        main = err.pow(2).sum() / denom
        loss = sum(w * e.pow(2).sum() for w, e in errs) / denom if len(errs) > 1 else main
        aux_loss = torch.zeros((), device=device)
        if use_aux:
            aux_loss = _auxk_loss(err.detach(), sparse_decode(aux_vals, aux_idx, model.W_dec).float(), acc, world)
            loss = loss + cfg.aux_coef * aux_loss
        loss.backward()

        counts = torch.zeros(n_latents, dtype=torch.float32, device=device)
        counts.index_add_(0, idx.reshape(-1), (vals.reshape(-1) != 0).float())
        stats = torch.stack([loss.detach(), main.detach(), (vals != 0).sum().float() / b, aux_loss.detach()])
        if world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [counts, stats.float()])
            flat = acc.reduce(flat, "sum")
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            counts = flat[offset : offset + n_latents]
            stats = flat[offset + n_latents :]
        model.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.decoder_renorm == "after_step":
            model.normalize_decoder()
        update_threshold(model, vals)
        tracker.update(counts > 0, b)
        sums += stats.double()
        n_acc += 1

        done = completed = step + 1
        if done % cfg.log_every == 0 or done == total:
            means = (sums / n_acc).tolist()
            dead = tracker.fraction()
            rec = {
                "step": done,
                "samples": done * cfg.batch_size,
                "lr": _lr_at(step, sched, total),
                "loss": means[0],
                "fvu": means[1],
                "l0": means[2],
                "aux_loss": means[3],
                "dead_fraction": dead,
            }
            history.append(rec)
            bar.set_postfix(loss=f"{means[0]:.4f}", fvu=f"{means[1]:.4f}", l0=f"{means[2]:.1f}", dead=f"{100 * dead:.1f}%")
            if out is not None and acc.is_main_process:
                with open(out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sums.zero_()
            n_acc = 0
        if out is not None and cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < total:
            if acc.is_main_process:
                _save_checkpoint(ckpt_path, done, model, opt, tracker, cfg)
            acc.wait_for_everyone()
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - t0
    bar.close()

    finished = stop_after_step is None or stop_after_step >= total
    model.eval()
    eval_metrics: dict[str, Any] = {}
    if finished:
        if eval_x.shape[0] >= 2:
            eval_metrics = evaluate_sae(model, eval_x, cfg.eval_batch_size)
            eval_metrics["evaluated_on"] = eval_over
        dead_report = _dead_fraction_report(model, eval_x, train_cpu, cfg)
        rows = eval_x if eval_x.shape[0] >= 2 else train_cpu
        original = original_code_metrics(model, rows, cfg.eval_batch_size)
        eval_metrics.update({f"original_{k}": v for k, v in original.items() if k != "n_samples"})
        eval_metrics["original_metrics_over"] = eval_over if eval_x.shape[0] >= 2 else "train"
        eval_metrics["recipe"] = cfg.recipe
        eval_metrics.update({"variant": cfg.variant, "lr": sched.lr, "warmup_steps": sched.warmup_steps})
        if "dead_fraction" in eval_metrics and dead_report["dead_fraction_over"] != "held_out":
            eval_metrics["dead_fraction_held_out"] = eval_metrics["dead_fraction"]  # kept, but too few rows to trust
        eval_metrics.update(dead_report)
        eval_metrics.update(
            {"dead_fraction_train": tracker.fraction(), "dead_window_samples": window, "steps": total,
             "samples_seen": total * cfg.batch_size, "n_train": n_train}
        )
        if out is not None and acc.is_main_process:
            model.save_pretrained(out)
            with open(out / EVAL_FILE, "w") as f:
                json.dump(eval_metrics, f, indent=2)
            with open(out / TRAIN_CONFIG_FILE, "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
            # the weights are final: the resumable state (3× the model with Adam's moments) is not needed
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        if out is not None:
            acc.wait_for_everyone()
    return TrainResult(model=model.cpu(), eval=eval_metrics, steps=completed, history=history, train_seconds=train_seconds)


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


def _whole_set_batches(cfg: SAETrainConfig, n_train: int, world: int, verbose: bool) -> SAETrainConfig:
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
def _dead_fraction_report(model: KSparseAutoencoder, eval_x: torch.Tensor, train_x: torch.Tensor,
                          cfg: SAETrainConfig) -> dict[str, Any]:
    """Dead fraction over enough samples: the held-out rows if there are ``dead_eval_min_samples``, else all rows."""
    if eval_x.shape[0] >= cfg.dead_eval_min_samples:
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
    return {"dead_fraction": M.dead_fraction(fired), "dead_fraction_over": over, "dead_fraction_samples": n}


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
