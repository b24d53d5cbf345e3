"""Training and evaluating Diff-C heads, and the layer × timestep probe sweep.

The paper recomputes diffusion features every epoch, paying the backbone thirty
times for a thirty-epoch run. Here the default path trains from a *feature
store* holding a few augmented views per image (RandomResizedCrop 0.8–1.0 +
flip), sampling one view per image per epoch, so the backbone runs once.
:func:`train_diffc_online` keeps the paper's fresh-augmentation-every-epoch
behaviour for those who want it; both share one training loop (:func:`fit`)
and differ only in where batches come from (:class:`CachedSource`,
:class:`OnlineSource`). The layer × timestep probe sweep lives in
:mod:`revelio_hub.diffc.sweep`.

Protocol guarantees a user relies on:

* the validation split is carved from the *training* images by image id,
  stratified and deterministic, with all views of an image on the same side;
  validation uses the plain view (view 0) only;
* model selection (best validation top-1) happens inside :func:`fit`, which
  never receives the test data; the test set is handed over as a callable that
  :func:`train_diffc` calls only once the best model is on disk;
* every epoch is a deterministic function of (seed, epoch), so a run killed
  and restarted with the same command resumes from its last checkpoint and
  ends with exactly the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from revelio_hub.cli import option
from revelio_hub.diffc.model import HEADS, DiffC
from revelio_hub.distributed import make_accelerator
from revelio_hub.data import carve_validation
from revelio_hub.features import augment_view
from revelio_hub.images import to_rgb
from revelio_hub.diffc.metrics import per_class_accuracy, topk_accuracy
from revelio_hub.recipe import FeatureRecipe
from revelio_hub.training_recipes import DEFAULT_RECIPE, RECIPE_NAMES, DiffCRecipe, get_recipe

VIEW_MODES = ("sample", "all")
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------- config


@dataclass
class DiffCTrainConfig:
    """Hyper-parameters of a Diff-C run.

    ``recipe`` (``"default"`` or ``"paper"``, see :mod:`revelio_hub.training_recipes`) fills the
    fields left at ``None`` (dropout, schedule, warm-up, ``cosine_t_max``, validation share,
    online extraction, fresh noise) from its :class:`~revelio_hub.training_recipes.DiffCRecipe`.
    The numbers (30 epochs, batch 16, AdamW 1e-4, weight decay 0.01 as AdamW's default) are the
    paper's in both.

    Attributes:
        recipe: the preset that fills the ``None`` fields, recorded in the model's config.
        head: ``"conv"`` (paper head) or ``"linear"`` (pooled probe).
        hidden: width of the conv head.
        dropout: dropout probability of the conv head (paper: 0.0).
        epochs: passes over the training images (30 in the paper).
        batch_size: images per optimiser step (16 in the paper).
        lr: AdamW learning rate (1e-4 in the paper).
        weight_decay: AdamW weight decay.
        schedule: ``"warmup_cosine_per_step"`` or ``"cosine_per_epoch"`` (the paper's
            ``CosineAnnealingLR(T_max=cosine_t_max)`` stepped after every epoch).
        warmup_fraction: fraction of all steps spent in linear warm-up before the cosine decay.
        cosine_t_max: ``T_max`` of the per-epoch cosine, in epochs (paper: 90).
        val_fraction: fraction of training images (per class) held out for model selection
            (0: every image trains and the last epoch is kept, the paper).
        online: features recomputed from a fresh augmentation every epoch (``train_diffc_online``);
            recorded, the caller picks the trainer.
        fresh_noise: with ``online``, new diffusion noise every epoch.
        views: ``"sample"`` draws one cached view per image each epoch (all views,
            the plain one included, equally likely); ``"all"`` uses every cached view each epoch.
        seed: seeds the validation split, the view sampling, shuffling, init and dropout.
        eval_batch_size: batch size for validation and test passes.
        checkpoint_every: save a resumable checkpoint every this many epochs (and at the end).
        keep_checkpoint: keep ``checkpoint/`` (optimizer state, several times the model) after the
            run finished; by default it is removed and ``trainer_state.json`` records the finished run.
        mixed_precision: passed to ``accelerate.Accelerator`` (``"no"``, ``"bf16"``, ``"fp16"``).
    """

    recipe: str = field(default=DEFAULT_RECIPE, metadata=option(
        "paper: the original Revelio code's training (dropout 0, CosineAnnealingLR(T_max=90) per epoch, no warm-up, "
        "every training image, last epoch kept, fresh augmentation and noise every epoch: needs --online); default: "
        "the same, and also allows cached views (--train-store), measured less accurate. Options below override "
        "single choices (default: %(default)s)", choices=list(RECIPE_NAMES)))
    head: str = field(default="conv", metadata=option(choices=list(HEADS)))
    hidden: int = 1024
    dropout: Optional[float] = field(default=None, metadata=option(
        "conv head dropout (default: the recipe's, 0.0)"))
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    schedule: Optional[str] = field(default=None, metadata=option(
        "learning-rate schedule (default: the recipe's, cosine_per_epoch: CosineAnnealingLR(T_max=90) stepped per "
        "epoch)", choices=["cosine_per_epoch", "warmup_cosine_per_step"]))
    warmup_fraction: Optional[float] = field(default=None, metadata=option(
        "share of steps in linear warm-up before a per-step cosine decay (default: the recipe's per-epoch cosine, "
        "which has none)"))
    cosine_t_max: Optional[int] = field(default=None, metadata=option(
        "T_max of the per-epoch cosine, in epochs (default: the recipe's, 90)"))
    val_fraction: Optional[float] = field(default=None, metadata=option(
        "training images per class held out for model selection (default: the recipe's, 0: every image trains, "
        "the last epoch is kept)"))
    online: Optional[bool] = field(default=None, metadata=option(hidden=True))  # the script's --online picks it
    fresh_noise: Optional[bool] = field(default=None, metadata=option(hidden=True))
    views: str = field(default="sample", metadata=option(
        "'sample': one cached view per image per epoch; 'all': every view", flag="--view-mode",
        choices=["sample", "all"]))
    seed: int = 0
    eval_batch_size: int = 128
    checkpoint_every: int = 1
    mixed_precision: str = field(default="no", metadata=option(
        "autocast precision of the head (accelerate's mixed_precision)", choices=["no", "bf16", "fp16"]))
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        preset = asdict(get_recipe(self.recipe).diffc)
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        DiffCRecipe(**{name: getattr(self, name) for name in preset})  # validates the recipe fields
        if self.schedule == "cosine_per_epoch" and (self.cosine_t_max is None or self.cosine_t_max < 1):
            raise ValueError(f"cosine_per_epoch needs cosine_t_max ≥ 1 epochs, got {self.cosine_t_max}.")
        if self.head not in HEADS:
            raise ValueError(f"Unknown head {self.head!r}; valid: {list(HEADS)}.")
        if self.views not in VIEW_MODES:
            raise ValueError(f"Unknown views mode {self.views!r}; valid: {list(VIEW_MODES)}.")
        for name in ("epochs", "batch_size", "hidden", "eval_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")

    # Fields that change the result; a checkpoint made with different values is not resumed.
    def identity(self) -> dict[str, Any]:
        data = asdict(self)
        for volatile in ("eval_batch_size", "checkpoint_every", "keep_checkpoint"):
            data.pop(volatile)
        return data


# --------------------------------------------------------------------- data


class FeatureSetLike(Protocol):
    features: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    views: torch.Tensor


@dataclass
class LabeledFeatures:
    """Features with one row per (image, view): the in-memory form the trainer works on.

    Mirrors ``revelio_hub.features.FeatureSet`` (any object with ``features``,
    ``labels``, ``image_ids`` and ``views`` converts via :meth:`of`), so the
    trainer can be driven by a feature store or by tensors built in a test.
    ``features`` is ``N×C×H×W`` (any float dtype; fp16 from stores is cast per batch) or ``N×C``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    views: torch.Tensor

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        self.image_ids = (
            torch.arange(n) if self.image_ids is None else torch.as_tensor(self.image_ids, dtype=torch.long).reshape(-1)
        )
        self.views = (
            torch.zeros(n, dtype=torch.long) if self.views is None else torch.as_tensor(self.views, dtype=torch.long).reshape(-1)
        )
        for name in ("labels", "image_ids", "views"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, features have {n}.")
        if n and self.labels.min() < 0:
            raise ValueError("Diff-C needs labelled features; found negative (missing) labels.")

    @classmethod
    def of(cls, data: Any) -> "LabeledFeatures":
        if isinstance(data, LabeledFeatures):
            return data
        missing = [a for a in ("features", "labels") if not hasattr(data, a)]
        if missing:
            raise ValueError(f"Expected a FeatureSet-like object with features/labels/image_ids/views, missing {missing}.")
        return cls(data.features, data.labels, getattr(data, "image_ids", None), getattr(data, "views", None))

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def rows(self, index: torch.Tensor) -> "LabeledFeatures":
        return LabeledFeatures(self.features[index], self.labels[index], self.image_ids[index], self.views[index])

    def plain_view(self) -> "LabeledFeatures":
        """Only the un-augmented view of each image (what evaluation uses)."""
        mask = self.views == 0
        if not bool(mask.any()):
            # A store without plain views: fall back to the first view of each image.
            _, first = np.unique(self.image_ids.numpy(), return_index=True)
            return self.rows(torch.as_tensor(np.sort(first)))
        return self.rows(mask.nonzero().squeeze(1))

    def image_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique image ids (sorted) and the label of each."""
        ids, first = np.unique(self.image_ids.numpy(), return_index=True)
        return ids, self.labels.numpy()[first]

    def select_images(self, image_ids: np.ndarray) -> "LabeledFeatures":
        mask = torch.from_numpy(np.isin(self.image_ids.numpy(), image_ids))
        return self.rows(mask.nonzero().squeeze(1))


def split_by_image(
    data: LabeledFeatures, val_fraction: float, seed: int = 0
) -> tuple[LabeledFeatures, LabeledFeatures]:
    """Stratified, deterministic train/val split by image id (all views of an image stay together)."""
    ids, labels = data.image_table()
    train_idx, val_idx = carve_validation(labels, val_fraction, seed=seed)
    return data.select_images(ids[train_idx]), data.select_images(ids[val_idx])


def _batch_slices(n: int, batch_size: int) -> list[slice]:
    """Contiguous batches; a trailing batch of one joins the previous one (BatchNorm needs ≥ 2)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def _epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + salt) % (2**63))


class TrainSource(Protocol):
    """Where training batches come from; :func:`fit` only sees this."""

    def num_batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> int: ...

    def batches(self, epoch: int, batch_size: int, seed: int,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class CachedSource:
    """Training batches drawn from cached feature views (one extraction serves every epoch)."""

    def __init__(self, data: LabeledFeatures, views: str = "sample") -> None:
        if views not in VIEW_MODES:
            raise ValueError(f"Unknown views mode {views!r}; valid: {list(VIEW_MODES)}.")
        self.data = data
        self.views = views
        ids = data.image_ids.numpy()
        order = np.argsort(ids, kind="stable")
        uniq, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        self._order = torch.from_numpy(order)
        self._starts = torch.from_numpy(starts)
        self._counts = torch.from_numpy(counts)
        self.num_images = len(uniq)

    def _epoch_rows(self, epoch: int, seed: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        gen = _epoch_generator(seed, epoch, salt=1)
        if self.views == "all":
            rows = torch.arange(len(self.data))
        else:
            pick = (torch.rand(self.num_images, generator=gen) * self._counts).long()
            rows = self._order[self._starts + pick]
        rows = rows[torch.randperm(len(rows), generator=gen)]
        rank, world = shard  # each process takes every world-th row of the same permutation
        return rows[rank::world]

    def num_batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> int:
        n = len(self.data) if self.views == "all" else self.num_images
        return len(_batch_slices(len(range(shard[0], n, shard[1])), batch_size))

    def batches(self, epoch: int, batch_size: int, seed: int,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self._epoch_rows(epoch, seed, shard)
        for sl in _batch_slices(len(rows), batch_size):
            idx = rows[sl]
            yield self.data.features[idx].float(), self.data.labels[idx]


# -------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, features: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Logits for every row, in eval mode, float32 on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [
            model(features[i : i + batch_size].to(device).float()).float().cpu()
            for i in range(0, features.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    n_classes = model.fc.out_features if hasattr(model, "fc") else 0
    return torch.cat(out) if out else torch.empty(0, n_classes)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy, loss and the confusion matrix (rows: true, cols: predicted)."""
    labels = labels.long()
    n_classes = len(class_names)
    pred = logits.argmax(1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = per_class_accuracy(pred, labels, n_classes)
    return {
        "num_samples": int(labels.numel()),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "loss": float(F.cross_entropy(logits, labels)) if labels.numel() else math.nan,
        "per_class_accuracy": {
            name: (None if math.isnan(float(a)) else float(a)) for name, a in zip(class_names, per_class)
        },
        "confusion_matrix": confusion.tolist(),
    }


def save_confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Union[str, Path], title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    side = min(4 + 0.28 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 60:
        ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels=list(class_names), fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Diff-C confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """What :func:`fit` leaves behind: the best model (saved in the output folder) and its history."""

    model: DiffC
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[int] = None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


@dataclass
class _Selection:
    """The resumable trainer state besides the weights: where to start and the best epoch so far."""

    start_epoch: int = 0
    best_epoch: int = -1
    best_key: Optional[tuple[float, float]] = None
    best_val: dict[str, Any] = field(default_factory=dict)
    resumed_from: Optional[int] = None

    def state(self, epoch: int, config: DiffCTrainConfig) -> dict[str, Any]:
        return {"epoch": epoch, "best_epoch": self.best_epoch, "best_key": list(self.best_key),
                "best_val": self.best_val, "config": config.identity()}


def _optimization(model: nn.Module, config: DiffCTrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW and its schedule: the original's per-epoch cosine, or warm-up + cosine per step."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "cosine_per_epoch":  # the original: CosineAnnealingLR(T_max=90) stepped after each epoch
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.cosine_t_max)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)


def _resume(out: Path, config: DiffCTrainConfig, accelerator: Any) -> _Selection:
    """Load ``checkpoint/`` (or a finished run's state) made with the same config; refuse a different one."""
    state_path, finished_path = out / CHECKPOINT_DIR / STATE_FILE, out / STATE_FILE
    if not (state_path.exists() or finished_path.exists()):
        return _Selection()
    state = json.loads((state_path if state_path.exists() else finished_path).read_text())
    if state.get("config") != config.identity():
        raise ValueError(
            f"{out} holds a {'checkpoint' if state_path.exists() else 'finished run'} with a different "
            f"configuration ({state.get('config')}); use a new output folder or delete it."
        )
    if state_path.exists():
        accelerator.load_state(str(out / CHECKPOINT_DIR))
    start = int(state["epoch"]) + 1
    if accelerator.is_main_process and start < config.epochs:
        print(f"resuming from epoch {start} of {config.epochs} ({out / CHECKPOINT_DIR})", file=sys.stderr)
    key = tuple(state["best_key"]) if state.get("best_key") is not None else None
    return _Selection(start, int(state["best_epoch"]), key, dict(state["best_val"]), start)


def _train_epoch(model: nn.Module, optimizer: Any, scheduler: Any, source: TrainSource, epoch: int,
                 config: DiffCTrainConfig, accelerator: Any, progress: bool) -> dict[str, Any]:
    """One pass over this process's shard; the returned numbers are over all processes' samples."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    set_seed(config.seed * 1_000 + epoch)  # dropout etc. depend on (seed, epoch) only: exact resume
    model.train()
    started = time.perf_counter()
    per_epoch = config.schedule == "cosine_per_epoch"
    shard = (accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen
    epoch_lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(source.batches(epoch, config.batch_size, config.seed, shard),
               total=source.num_batches(config.batch_size, shard), desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not (progress and accelerator.is_local_main_process), leave=False)
    for x, y in bar:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if not per_epoch:
            scheduler.step()
        totals += torch.tensor([float(loss.detach()) * len(y), float((logits.detach().argmax(1) == y).sum()), len(y)],
                               dtype=torch.float64)
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}")
    if per_epoch:
        scheduler.step()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    seen = max(float(totals[2]), 1.0)
    return {"epoch": epoch, "train_loss": float(totals[0]) / seen, "train_top1": float(totals[1]) / seen,
            "train_samples": int(totals[2]), "processes": accelerator.num_processes,
            "lr": epoch_lr if per_epoch else scheduler.get_last_lr()[0],
            "train_seconds": time.perf_counter() - started}


def _select(row: dict[str, Any], raw: DiffC, val: Optional[LabeledFeatures], config: DiffCTrainConfig,
            sel: _Selection) -> bool:
    """Add validation numbers to ``row``; True (and ``sel`` updated) if this epoch is the best so far."""
    if val is not None and len(val):
        report = classification_report(predict_logits(raw, val.features, config.eval_batch_size), val.labels, raw.class_names)
        row.update(val_loss=report["loss"], val_top1=report["top1"], val_top5=report["top5"])
        key = (report["top1"], -report["loss"])
    else:
        key = (float(row["epoch"]), 0.0)  # no validation split: keep the last epoch
    improved = sel.best_key is None or key > sel.best_key
    if improved:
        sel.best_key, sel.best_epoch = key, row["epoch"]
        sel.best_val = {k: row[k] for k in ("val_top1", "val_top5", "val_loss") if k in row}
    row["best_epoch"] = sel.best_epoch
    return improved


def _close_run(out: Path, config: DiffCTrainConfig, accelerator: Any, finished: bool) -> None:
    """A finished run's trainer state moves next to the model; the optimizer state goes unless asked to stay."""
    ckpt = out / CHECKPOINT_DIR
    accelerator.wait_for_everyone()
    if finished and accelerator.is_main_process and (ckpt / STATE_FILE).exists():
        shutil.copy2(ckpt / STATE_FILE, out / STATE_FILE)
        if not config.keep_checkpoint:
            shutil.rmtree(ckpt)
    accelerator.wait_for_everyone()


def fit(
    model: DiffC,
    source: TrainSource,
    val: Optional[LabeledFeatures],
    config: DiffCTrainConfig,
    output_dir: Union[str, Path],
    *,
    progress: bool = True,
    stop_after_epoch: Optional[int] = None,
    accelerator: Any = None,
) -> FitResult:
    """Train ``model`` and keep the epoch with the best validation top-1 in ``output_dir``.

    Writes ``output_dir/{config.json, model.safetensors}`` (best model so far),
    ``metrics.jsonl`` (one line per epoch) and ``checkpoint/`` (the last
    epoch's model/optimiser/scheduler via ``accelerate`` plus ``trainer_state.json``).
    If a checkpoint made with the same config exists, training continues from
    it. ``stop_after_epoch`` ends the run early (as if killed), for tests.
    The test split is deliberately not a parameter: selection cannot see it.
    Under ``torchrun`` (CPU included, see :func:`revelio_hub.distributed.make_accelerator`)
    the processes form one data-parallel run: each takes a shard of every epoch.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    accelerator = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    shard = (accelerator.process_index, accelerator.num_processes)
    optimizer, scheduler = _optimization(model, config, source.num_batches(config.batch_size, shard) * config.epochs)
    # The scheduler is not prepared (accelerate would step it once per process per
    # step); it follows this process's own step count and is checkpointed explicitly.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    raw = accelerator.unwrap_model(model)

    sel = _resume(out, config, accelerator)
    history = [r for r in _read_jsonl(metrics_path) if r.get("epoch", 0) < sel.start_epoch]
    if accelerator.is_main_process:
        _write_jsonl(metrics_path, history)  # drop lines of an epoch that never reached its checkpoint

    last_epoch = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
    for epoch in range(sel.start_epoch, last_epoch + 1):
        row = _train_epoch(model, optimizer, scheduler, source, epoch, config, accelerator, progress)
        improved = _select(row, raw, val, config, sel)
        history.append(row)
        if accelerator.is_main_process:
            if improved:
                raw.save_pretrained(out)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if (epoch + 1) % config.checkpoint_every == 0 or epoch == last_epoch:
            _save_checkpoint(accelerator, out / CHECKPOINT_DIR, sel.state(epoch, config))
    _close_run(out, config, accelerator, last_epoch == config.epochs - 1)
    best = DiffC.from_pretrained(out) if (out / "model.safetensors").exists() else raw
    return FitResult(best, sel.best_epoch, sel.best_val, history, sel.resumed_from)


def _save_checkpoint(accelerator: Any, ckpt: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint next to the old one, then swap, so a kill never leaves a half checkpoint."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        old = ckpt.with_name(ckpt.name + ".old")
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------ entry points


TestData = Union[LabeledFeatures, FeatureSetLike, Callable[[], Any], None]


@dataclass
class DiffCResult:
    model: DiffC
    output_dir: Path
    eval: dict[str, Any]
    fit: FitResult


def _new_model(in_channels: int, class_names: Sequence[str], config: DiffCTrainConfig, recipe: Optional[dict]) -> DiffC:
    torch.manual_seed(config.seed)
    return DiffC(in_channels, list(class_names), head=config.head, hidden=config.hidden,
                 dropout=config.dropout, recipe=recipe, training_recipe=config.recipe)


def _finish(
    fitted: FitResult, output_dir: Path, test: TestData, class_names: Sequence[str],
    config: DiffCTrainConfig, recipe: Optional[dict], split_sizes: dict[str, int],
    to_eval: Callable[[Any], LabeledFeatures], accelerator: Any,
) -> DiffCResult:
    """Evaluate the selected model on the test data (first read here) and write eval.json + confusion.png.

    Every process evaluates (the numbers are returned everywhere); only the main one writes.
    """
    main = accelerator.is_main_process
    model = fitted.model
    result: dict[str, Any] = {
        "head": config.head,
        "training_recipe": config.recipe,
        "best_epoch": fitted.best_epoch,
        "epochs": config.epochs,
        "validation": fitted.best_val,
        "recipe": recipe,
        "class_names": list(class_names),
        **split_sizes,
    }
    if test is not None:
        data = to_eval(test() if callable(test) else test)
        report = classification_report(predict_logits(model, data.features, config.eval_batch_size), data.labels, class_names)
        result.update(split="test", **{k: v for k, v in report.items()})
        if main:
            save_confusion_png(report["confusion_matrix"], class_names, output_dir / "confusion.png",
                               title=f"Diff-C ({config.head}) test top-1 {report['top1']:.1%}")
    else:
        result["split"] = None
    if main:
        (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    return DiffCResult(model, output_dir, result, fitted)


def train_diffc(
    train: Union[LabeledFeatures, FeatureSetLike],
    class_names: Sequence[str],
    output_dir: Union[str, Path],
    config: Optional[DiffCTrainConfig] = None,
    *,
    test: TestData = None,
    recipe: Union[FeatureRecipe, dict, None] = None,
    progress: bool = True,
    stop_after_epoch: Optional[int] = None,
    accelerator: Any = None,
) -> DiffCResult:
    """Train Diff-C on cached features and evaluate the selected model on ``test``.

    ``train`` holds every cached view of the training images. ``test`` (view 0
    is used) may be a callable returning the test features: it is called only
    after training and model selection are over, so loading a test store can be
    deferred until then. Writes the model, ``metrics.jsonl``, ``eval.json`` and
    ``confusion.png`` to ``output_dir``; rerunning the same call resumes. ``accelerator``
    (default: :func:`~revelio_hub.distributed.make_accelerator`) makes it one data-parallel run.
    """
    config = config or DiffCTrainConfig()
    accelerator = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    data = LabeledFeatures.of(train)
    class_names = [str(c) for c in class_names]
    if len(data) == 0:
        raise ValueError("No training features given.")
    if int(data.labels.max()) >= len(class_names):
        raise ValueError(f"Labels go up to {int(data.labels.max())} but only {len(class_names)} class names were given.")
    if config.head == "conv" and data.features.ndim != 4:
        raise ValueError(
            f"The conv head trains on spatial maps N×C×H×W, got features of shape {tuple(data.features.shape)}; "
            "extract with spatial features or use head='linear'."
        )
    recipe_dict = recipe.to_dict() if isinstance(recipe, FeatureRecipe) else recipe
    train_part, val_part = split_by_image(data, config.val_fraction, config.seed)
    val_plain = val_part.plain_view() if len(val_part) else None
    model = _new_model(int(data.features.shape[1]), class_names, config, recipe_dict)
    out = Path(output_dir)
    fitted = fit(model, CachedSource(train_part, config.views), val_plain, config, out,
                 progress=progress, stop_after_epoch=stop_after_epoch, accelerator=accelerator)
    sizes = {"num_train_images": len(np.unique(train_part.image_ids.numpy())),
             "num_val_images": 0 if val_plain is None else len(val_plain),
             "num_train_rows": len(train_part)}
    if stop_after_epoch is not None and stop_after_epoch < config.epochs - 1:
        return DiffCResult(fitted.model, out, {}, fitted)
    return _finish(fitted, out, test, class_names, config, recipe_dict, sizes,
                   lambda t: LabeledFeatures.of(t).plain_view(), accelerator)


def train_diffc_from_store(
    train_store: Union[str, Path, Any],
    output_dir: Union[str, Path],
    layer: str,
    timestep: int,
    config: Optional[DiffCTrainConfig] = None,
    *,
    test_store: Union[str, Path, Any, None] = None,
    progress: bool = True,
    accelerator: Any = None,
) -> DiffCResult:
    """Glue: train on ``train_store``'s spatial (or, for the linear head, pooled) features of (layer, t).

    The test store's recipe and class names are checked up front (so a wrong
    store fails before training, not after), but its features are only read
    after training and model selection are over.
    """
    from revelio_hub.features import FeatureStore

    config = config or DiffCTrainConfig()
    store = train_store if hasattr(train_store, "load") else FeatureStore(train_store)
    kind = "spatial" if config.head == "conv" else "pooled"
    recipe = store.recipe(layer, timestep, kind)
    recipe_obj = recipe if isinstance(recipe, FeatureRecipe) else FeatureRecipe.from_dict(recipe)
    ts = None
    if test_store is not None:
        ts = test_store if hasattr(test_store, "load") else FeatureStore(test_store)
        test_recipe = ts.recipe(layer, timestep, kind)
        recipe_obj.check_compatible(
            test_recipe if isinstance(test_recipe, FeatureRecipe) else FeatureRecipe.from_dict(test_recipe),
            what="test features",
        )
        if list(ts.class_names) != list(store.class_names):
            raise ValueError(
                f"The test store's class names {list(ts.class_names)[:5]}... differ from the training store's "
                f"{list(store.class_names)[:5]}...; both splits must come from the same dataset and label column."
            )
    train = store.load(layer, timestep, kind=kind)

    def load_test() -> Any:
        return ts.load(layer, timestep, kind=kind, views=0)

    return train_diffc(train, store.class_names, output_dir, config,
                       test=load_test if ts is not None else None, recipe=recipe_obj, progress=progress,
                       accelerator=accelerator)


# ------------------------------------------------------------ online mode


class OnlineSource:
    """Training batches computed by the backbone from freshly augmented images every epoch (the original's way).

    Augmentation is :func:`revelio_hub.features.augment_view` (RandomResizedCrop
    0.8–1.0 + flip), one new draw per image and epoch; with ``fresh_noise`` the
    diffusion noise is drawn anew every epoch too (seeded by the epoch), as the
    original does, else each image keeps its seeded noise.

    ``images`` is a sequence of images (PIL/arrays) indexed like ``labels``, or
    any object with ``load_images(ids) -> (ok_ids, images, skipped)`` such as
    :class:`revelio_hub.data.ImageSource`; ``image_ids`` are the ids the
    backbone seeds its noise with.
    """

    def __init__(self, backbone: Any, images: Any, labels: Sequence[int], image_ids: Sequence[int],
                 layer: str, timestep: int, *, noise_seed: int = 0, ensemble: int = 1,
                 fresh_noise: bool = False) -> None:
        self.backbone = backbone
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.image_ids = torch.as_tensor(np.asarray(image_ids), dtype=torch.long)
        self.layer, self.timestep = layer, int(timestep)
        self.noise_seed, self.ensemble = noise_seed, ensemble
        self.fresh_noise = bool(fresh_noise)
        self.size = int(backbone.image_size)
        self.extract_seconds = 0.0

    def _load(self, positions: torch.Tensor) -> list[Any]:
        if hasattr(self.images, "load_images"):
            ids = [int(self.image_ids[p]) for p in positions]
            ok, imgs, skipped = self.images.load_images(ids)
            if skipped:
                raise ValueError(f"Images {skipped} could not be decoded.")
            return imgs
        return [self.images[int(p)] for p in positions]

    def num_batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> int:
        return len(_batch_slices(len(range(shard[0], len(self.labels), shard[1])), batch_size))

    def batches(self, epoch: int, batch_size: int, seed: int,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=_epoch_generator(seed, epoch, salt=1))
        order = order[shard[0]::shard[1]]
        for sl in _batch_slices(len(order), batch_size):
            pos = order[sl]
            # Epoch e sees augmentation number e + 1 of each image: the same
            # RandomResizedCrop + flip that a store's view e + 1 holds, so
            # cached and online training see identically distributed data.
            aug = [
                augment_view(to_rgb(img), int(self.image_ids[p]), epoch + 1, self.size, seed=seed,
                             resize=getattr(self.backbone, "resize", "bicubic"))
                for p, img in zip(pos, self._load(pos))
            ]
            started = time.perf_counter()
            # fresh noise (the original draws torch.randn every call): a new seed per epoch, still reproducible
            noise_seed = self.noise_seed + 1_000_003 * (epoch + 1) if self.fresh_noise else self.noise_seed
            maps = self.backbone.extract(aug, [self.layer], [self.timestep], pool=None, seed=noise_seed,
                                         ensemble=self.ensemble, batch_size=len(aug),
                                         image_ids=[int(self.image_ids[p]) for p in pos])
            self.extract_seconds += time.perf_counter() - started
            # clone(): extract runs under inference_mode, whose tensors autograd cannot save.
            yield maps[(self.layer, self.timestep)].float().clone(), self.labels[pos]


def train_diffc_online(
    backbone: Any,
    images: Any,
    labels: Sequence[int],
    class_names: Sequence[str],
    layer: str,
    timestep: int,
    output_dir: Union[str, Path],
    config: Optional[DiffCTrainConfig] = None,
    *,
    image_ids: Optional[Sequence[int]] = None,
    test_images: Any = None,
    test_labels: Optional[Sequence[int]] = None,
    progress: bool = True,
    stop_after_epoch: Optional[int] = None,
    accelerator: Any = None,
) -> DiffCResult:
    """``--online`` mode: features recomputed from freshly augmented images every epoch.

    Validation (carved from the training images, as in cached mode) and test
    use the plain Resize+CenterCrop view, extracted once.
    """
    config = config or DiffCTrainConfig()
    accelerator = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    labels_np = np.asarray(labels, dtype=np.int64)
    ids = np.arange(len(labels_np)) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    train_idx, val_idx = carve_validation(labels_np, config.val_fraction, seed=config.seed)

    def plain(imgs: Any, positions: np.ndarray, lab: np.ndarray, img_ids: np.ndarray) -> LabeledFeatures:
        if hasattr(imgs, "load_images"):
            ok, loaded, _ = imgs.load_images(img_ids[positions].tolist())
            positions = positions[np.isin(img_ids[positions], ok)]  # corrupt images are skipped
        else:
            loaded = [imgs[int(p)] for p in positions]
        maps = backbone.extract(loaded, [layer], [timestep], pool=None, image_ids=img_ids[positions].tolist(),
                                batch_size=config.eval_batch_size)[(layer, timestep)].clone()
        return LabeledFeatures(maps, torch.from_numpy(lab[positions]), torch.from_numpy(img_ids[positions]), None)

    if hasattr(images, "load_images"):
        source_images: Any = images
    else:
        source_images = [images[int(i)] for i in train_idx]
    source = OnlineSource(backbone, source_images, labels_np[train_idx], ids[train_idx], layer, timestep,
                          fresh_noise=config.fresh_noise)
    val = plain(images, val_idx, labels_np, ids) if len(val_idx) else None
    recipe = backbone.recipe(layer, timestep, granularity="spatial").to_dict()
    model = _new_model(backbone.channels(layer), class_names, config, recipe)
    out = Path(output_dir)
    fitted = fit(model, source, val, config, out, progress=progress, stop_after_epoch=stop_after_epoch,
                 accelerator=accelerator)
    sizes = {"num_train_images": int(len(train_idx)), "num_val_images": int(len(val_idx))}
    test = None
    if test_images is not None:
        tl = np.asarray(test_labels, dtype=np.int64)
        test = lambda: plain(test_images, np.arange(len(tl)), tl, np.arange(len(tl)))  # noqa: E731
    return _finish(fitted, out, test, class_names, config, recipe, sizes, LabeledFeatures.of, accelerator)


__all__ = [
    "DiffCTrainConfig",
    "LabeledFeatures",
    "split_by_image",
    "CachedSource",
    "OnlineSource",
    "fit",
    "FitResult",
    "train_diffc",
    "train_diffc_from_store",
    "train_diffc_online",
    "DiffCResult",
    "classification_report",
    "save_confusion_png",
]
