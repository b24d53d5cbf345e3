"""Training recipes: the paper's, reproduced formula by formula, and the project's default.

A recipe is every choice that is not a plain hyper-parameter but a *way* of
training: how the k-SAE is initialised and normalised, which loss and schedule
it follows, how Diff-C is regularised, scheduled and fed, how images become
features. One name (``--recipe paper`` / ``--recipe default``) picks a whole
preset, and each trainer records the name in every model's config, in
``train_config.json``, ``release.json`` and the model card, so a number can
always be traced to the recipe that produced it.

``paper`` is the original Revelio code (``revelio-diffusion/revelio``) as it
runs, read line by line:

* k-SAE (``SD-kSAE/``): ``z = TopK(W_encᵀ(x − b_dec) + b_enc)`` without a ReLU
  and without input normalisation; ``W_enc`` (d_in × n) and ``W_dec`` (n × d_in)
  drawn separately with ``kaiming_uniform_`` (bounds √(6/n) and √(6/d_in)), decoder
  rows then scaled to unit norm; ``b_dec`` = the mean of the first batch (of the
  whole training set when one batch holds it all, as on Pets; here always the
  training set's mean, the one difference left); loss
  ``mean((x̂ − x)²) / mean((x − mean_batch(x))²)``, no AuxK; decoder rows
  renormalised at the *start* of every step and the gradient's parallel component
  removed before Adam's step; the scheduler is stepped before the optimiser, so
  step i (from 0) runs at ``lr · min(1, (i + 2) / warmup)``, constant afterwards;
  a shuffled loader with a partial last batch; every sample trains (no hold-out);
  fp32.
* Diff-C (``diffc_image_classification/``, ``run.sh``): dropout 0.0, AdamW,
  ``CosineAnnealingLR(T_max=90)`` stepped once per epoch and stopped after 30
  epochs (no warm-up), every training image trains (no validation split, the
  last epoch is kept), a fresh ``RandomResizedCrop(0.8–1)`` + flip and fresh
  noise every epoch (online extraction).
* extraction: fp32, ``Resize(size)`` (bilinear, antialiased, long side
  truncated) + ``CenterCrop`` (offsets rounded).

``default`` keeps a deviation from that only where it won when measured side by
side on the same data (``benchmarks/bench_paper_recipe.py``, table in
``docs/benchmarks.md``, "Paper recipe vs. default"). None of the measured ones
did (input normalisation, tied init, ReLU, AuxK, a hold-out; Diff-C dropout,
warm-up schedule, validation split, cached views), so ``default`` is ``paper``
with bf16 matmuls for k-SAE training on CUDA (speed), Pillow's bicubic resize
(about one pixel from the original's; unmeasured, and a no-op on the toy data)
and a k-SAE learning rate and warm-up scaled to the dictionary size and the run
length instead of the fixed 4e-4 / 500 steps, which left a 1M-sample run
underfit (synthetic atoms recovered at MCC 0.33 against 0.996 with the rule;
``benchmarks/bench_sae_defaults.py``, ``docs/benchmarks.md``, "SAE defaults").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from revelio_hub.images import RESIZES

__all__ = ["SAERecipe", "DiffCRecipe", "ExtractionRecipe", "TrainingRecipe", "RECIPES", "get_recipe",
           "RECIPE_NAMES", "DEFAULT_RECIPE"]

SAE_INITS = ("tied", "kaiming_uniform")
LOSS_NORMS = ("dataset", "batch")
DECODER_RENORMS = ("after_step", "before_step")
#: the k-SAE sparsity rules, described in revelio_hub.sae.variants (defined here, in the leaf module every
#: config imports, so the recipe can name one without importing the SAE package)
SAE_VARIANTS = ("topk", "batchtopk", "matryoshka", "multitopk")
DIFFC_SCHEDULES = ("warmup_cosine_per_step", "cosine_per_epoch")


@dataclass(frozen=True)
class SAERecipe:
    """How a k-SAE is trained, beyond its hyper-parameters.

    Attributes:
        normalize_input: scale inputs so their mean centred squared norm is 1 (recorded in the model).
        init: ``"tied"`` (``W_enc = W_decᵀ``, random unit rows) or ``"kaiming_uniform"`` (two
            separate ``kaiming_uniform_`` draws, decoder rows then unit-norm).
        relu: ReLU after TopK.
        auxk: the AuxK loss against dead latents (OpenAI's TopK paper).
        eval_fraction: share of the samples held out for ``eval.json`` (0: train on all,
            evaluate on a separate split).
        loss_norm: normalised MSE over the whole training set's variance (``"dataset"``,
            a constant) or over each batch's (``"batch"``).
        warmup_offset: step i runs at ``lr · min(1, (i + warmup_offset) / warmup_steps)``.
        decoder_renorm: decoder rows set to unit norm after each optimiser step, or before
            each forward pass (the last update then stays unnormalised).
        drop_last: drop the partial last batch of an epoch (else it trains as a smaller batch).
        mixed_precision: ``"auto"`` (bf16 matmuls on CUDA) or ``"no"`` (fp32).
        variant: the sparsity rule (:data:`revelio_hub.sae.variants.VARIANTS`; the paper: ``"topk"``).
        lr: Adam's learning rate after warm-up; ``None`` scales it with the dictionary size and the
            run length (:func:`revelio_hub.sae.schedule.auto_lr`).
        warmup_steps: linear warm-up length; ``None`` = a share of the run (:func:`revelio_hub.sae.schedule.auto_warmup`).
    """

    normalize_input: bool
    init: str
    relu: bool
    auxk: bool
    eval_fraction: float
    loss_norm: str
    warmup_offset: int
    decoder_renorm: str
    drop_last: bool
    mixed_precision: str
    variant: str
    lr: Optional[float]
    warmup_steps: Optional[int]

    def __post_init__(self) -> None:
        for name, value, allowed in (("init", self.init, SAE_INITS), ("loss_norm", self.loss_norm, LOSS_NORMS),
                                     ("decoder_renorm", self.decoder_renorm, DECODER_RENORMS),
                                     ("variant", self.variant, SAE_VARIANTS)):
            if value not in allowed:
                raise ValueError(f"SAE recipe {name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class DiffCRecipe:
    """How a Diff-C head is trained, beyond its hyper-parameters.

    Attributes:
        dropout: dropout of the conv head.
        schedule: ``"warmup_cosine_per_step"`` (linear warm-up for ``warmup_fraction`` of the
            steps, then cosine to 0 at the last step) or ``"cosine_per_epoch"``
            (``CosineAnnealingLR(T_max=cosine_t_max)`` stepped once per epoch).
        warmup_fraction: warm-up share of all steps (``warmup_cosine_per_step`` only).
        cosine_t_max: ``T_max`` in epochs (``cosine_per_epoch`` only; the original: 90, for 30 epochs run).
        val_fraction: training images held out to pick the best epoch (0: the last epoch is kept).
        online: recompute features from a fresh augmentation of every image each epoch
            (else cached views are sampled).
        fresh_noise: with ``online``, draw new diffusion noise every epoch (else each image
            keeps its seeded noise).
    """

    dropout: float
    schedule: str
    warmup_fraction: float
    cosine_t_max: Optional[int]
    val_fraction: float
    online: bool
    fresh_noise: bool

    def __post_init__(self) -> None:
        if self.schedule not in DIFFC_SCHEDULES:
            raise ValueError(f"Diff-C recipe schedule must be one of {DIFFC_SCHEDULES}, got {self.schedule!r}")


@dataclass(frozen=True)
class ExtractionRecipe:
    """How images become features: compute precision and the resize of ``Resize + CenterCrop``."""

    dtype: str
    resize: str

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")


@dataclass(frozen=True)
class TrainingRecipe:
    """One named preset for every stage."""

    name: str
    description: str
    sae: SAERecipe
    diffc: DiffCRecipe
    extraction: ExtractionRecipe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER = TrainingRecipe(
    name="paper",
    description="the original Revelio code (revelio-diffusion/revelio), reproduced formula by formula",
    sae=SAERecipe(normalize_input=False, init="kaiming_uniform", relu=False, auxk=False, eval_fraction=0.0,
                  loss_norm="batch", warmup_offset=2, decoder_renorm="before_step", drop_last=False,
                  mixed_precision="no", variant="topk", lr=4e-4, warmup_steps=500),
    diffc=DiffCRecipe(dropout=0.0, schedule="cosine_per_epoch", warmup_fraction=0.0, cosine_t_max=90,
                      val_fraction=0.0, online=True, fresh_noise=True),
    extraction=ExtractionRecipe(dtype="float32", resize="bilinear"),
)

DEFAULT = TrainingRecipe(
    name="default",
    description="Revelio Hub's: the paper's, with the deviations that won side by side (docs/benchmarks.md)",
    # Every measured k-SAE deviation lost on the interpretability metrics (docs/benchmarks.md): only bf16
    # matmuls on CUDA remain (speed; CPU runs fp32).
    sae=replace(PAPER.sae, mixed_precision="auto", lr=None, warmup_steps=None),
    # Every measured Diff-C deviation (dropout 0.3, warm-up + per-step cosine, a validation split, 3 cached views
    # with fixed noise) lost held-out accuracy: the default trains as the paper does.
    diffc=PAPER.diffc,
    extraction=ExtractionRecipe(dtype="float32", resize="bicubic"),
)

RECIPES: dict[str, TrainingRecipe] = {r.name: r for r in (PAPER, DEFAULT)}
RECIPE_NAMES = tuple(RECIPES)
DEFAULT_RECIPE = DEFAULT.name


def get_recipe(name: str) -> TrainingRecipe:
    """The preset called ``name``; a clear error names the valid ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid: {list(RECIPES)}") from None
