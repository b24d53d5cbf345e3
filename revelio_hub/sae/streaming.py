"""Training k-SAEs straight from the backbone, without a feature store.

A feature store keeps every vector of every (layer, t): a few MB for the paper's
pooled Pets run, terabytes per entry for token-level SAEs on ImageNet-size data.
Here each step decodes its images, runs the backbone once for every requested
(layer, t) and feeds each SAE its vectors. Every entry keeps its own
:class:`~revelio_hub.sae.training.SAETrainer` (Adam, dead-latent tracker,
checkpoint, log) and writes the same folder as :func:`~revelio_hub.sae.training.train_sae`.

Reproducible as the in-memory trainer is: the images of step ``s`` are a pure
function of (seed, step) (:class:`~revelio_hub.sae.training.BatchOrder` over
image positions), and an image's features a pure function of its id (the
backbone seeds the noise per image), so a killed run resumes to the same
weights, and N processes see exactly the images of one. An entry whose
checkpoint is ahead of the others just skips the steps it already took.

Differences from training on a store, by design: the input statistics (mean for
``b_pre``, the scale of ``normalize_input``) come from the first global batch's
images rather than from every training vector, and the evaluation needs held-out
images (``eval_fraction > 0``); ``dead_fraction`` is counted on them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from revelio_hub.distributed import make_accelerator
from revelio_hub.features import check_request, extract_rows, prepare_rows
from revelio_hub.sae.training import (
    BatchOrder,
    Normalisation,
    SAETrainConfig,
    SAETrainer,
    TrainResult,
    whole_set_batches,
    final_evaluation,
    initial_model,
    open_run,
    sample_tokens,
    save_run,
)

__all__ = ["FeatureStream", "train_sae_stream", "entry_dir"]

LayerKey = tuple[str, int]


def entry_dir(root: Union[str, Path], layer: str, timestep: int) -> Path:
    """Where the SAE of (layer, t) goes: ``root/<layer>/t<t>``, the layout of a release."""
    return Path(root) / layer / f"t{int(timestep)}"


@dataclass
class FeatureStream:
    """Pooled features of any images of a dataset, for every (layer, t), computed on demand.

    The images are prepared and passed through the backbone exactly as
    :func:`revelio_hub.features.extract_to_store` does for view 0, so a streamed
    vector equals the stored one.
    """

    backbone: Any
    source: Any
    layers: list[str]
    timesteps: list[int]
    noise_seed: int = 0
    ensemble: int = 1
    batch_size: int = 8
    num_workers: int = 0
    #: ``"pooled"``: one mean-pooled vector per image; ``"token"``: ``tokens_per_image`` sampled positions per map
    granularity: str = "pooled"
    tokens_per_image: int = 64
    #: how positions are drawn (:data:`~revelio_hub.sae.training.TOKEN_SAMPLINGS`)
    token_sampling: str = "uniform"

    @property
    def keys(self) -> list[LayerKey]:
        return [(layer, t) for layer in self.layers for t in self.timesteps]

    def features(self, ids: Sequence[int]) -> dict[LayerKey, torch.Tensor]:
        """``{(layer, t): rows×C}`` for the images ``ids`` that decode (a corrupt image is left out).

        Pooled: one row per image. Token: ``tokens_per_image`` rows per image, at positions drawn
        from the image's id (and the noise seed), so an image gives the same tokens in any batch,
        epoch or process count, as a store's sampled tokens do.
        """
        prepared = prepare_rows(self.source, [int(i) for i in ids], 1, self.backbone.image_size, self.noise_seed,
                                self.num_workers, getattr(self.backbone, "resize", "bicubic"))
        spatial = self.granularity == "token"
        pooled, maps = extract_rows(self.backbone, prepared.row_images, prepared.row_ids, self.layers, self.timesteps,
                                    spatial=spatial, batch_size=self.batch_size, seed=self.noise_seed,
                                    ensemble=self.ensemble)
        empty = {key: torch.zeros(0, self.backbone.channels(key[0])) for key in self.keys}
        if not spatial:
            return {key: torch.cat(parts) if parts else empty[key] for key, parts in pooled.items()}
        return {key: self._tokens(torch.cat(parts).float(), prepared.row_ids) if parts else empty[key]
                for key, parts in maps.items()}

    def _tokens(self, maps: torch.Tensor, image_ids: Sequence[int]) -> torch.Tensor:
        return torch.cat([sample_tokens(maps[j:j + 1], self.tokens_per_image,
                                        seed=self.noise_seed * 1_000_003 + int(i), sampling=self.token_sampling)[0]
                          for j, i in enumerate(image_ids)])

    def recipe(self, key: LayerKey) -> dict[str, Any]:
        return self.backbone.recipe(key[0], key[1], granularity=self.granularity, ensemble=self.ensemble,
                                    seed=self.noise_seed).to_dict()


@dataclass
class _Entry:
    """One (layer, t) SAE under training: its trainer, input scale, output folder and first step."""

    trainer: SAETrainer
    scale: float
    out: Path
    start: int


def _split_images(n: int, cfg: SAETrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train positions, held-out positions)``: the seeded split of :func:`~revelio_hub.sae.training.split_features`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = max(int(round(n * cfg.eval_fraction)), 2)
    if cfg.eval_fraction <= 0 or n - n_eval < 1:
        raise ValueError(
            f"streaming training evaluates on held-out images: give eval_fraction > 0 (--eval-fraction) and a "
            f"dataset of more than 2 images (got eval_fraction={cfg.eval_fraction}, {n} images)"
        )
    return perm[n_eval:], perm[:n_eval]


def _open_entries(stream: FeatureStream, first: dict[LayerKey, torch.Tensor], cfg: SAETrainConfig, acc: Any,
                  out_dir: Path, n_train: int, *, resume: bool, overwrite: bool,
                  ) -> tuple[dict[LayerKey, _Entry], dict[LayerKey, TrainResult]]:
    """A trainer per (layer, t), resumed where a checkpoint exists; finished entries return their result."""
    entries: dict[LayerKey, _Entry] = {}
    finished: dict[LayerKey, TrainResult] = {}
    for key in stream.keys:
        rows = first[key]
        n_latents = cfg.n_latents or cfg.expansion * rows.shape[1]
        if cfg.k > n_latents:
            raise ValueError(f"k={cfg.k} exceeds n_latents={n_latents} for {key[0]} (d_in {rows.shape[1]})")
        norm = Normalisation.of(rows, cfg)
        model = initial_model(rows, norm, cfg, n_latents=n_latents, granularity=stream.granularity,
                              recipe=stream.recipe(key))
        trainer = SAETrainer(model, cfg, acc, var_total=norm.var_total, window=min(cfg.dead_window, n_train),
                             total=cfg.total_steps)
        out = entry_dir(out_dir, *key)
        start = open_run(out, trainer, resume=resume, overwrite=overwrite)
        if isinstance(start, TrainResult):
            finished[key] = start
            continue
        trainer.prepare()
        entries[key] = _Entry(trainer, norm.scale, out, start)
    return entries, finished


def _global_batch(n_local: int, acc: Any) -> int:
    """The step's global sample count (smaller than the batch when an image failed to decode)."""
    if acc.num_processes == 1:
        return n_local
    return int(acc.reduce(torch.tensor([n_local], device=acc.device), "sum").item())


def _stream_steps(stream: FeatureStream, entries: dict[LayerKey, _Entry], train_ids: torch.Tensor,
                  cfg: SAETrainConfig, acc: Any, stop: int, progress: bool) -> float:
    """One backbone pass per step feeding every entry that has not taken the step yet; returns seconds."""
    from tqdm.auto import tqdm

    order = BatchOrder(len(train_ids), cfg, acc.process_index, acc.num_processes, torch.device("cpu"))
    start = min(e.start for e in entries.values())
    bar = tqdm(total=cfg.total_steps, initial=start, desc=f"k-SAE x{len(entries)}", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))
    t0 = time.perf_counter()
    for step in range(start, stop):
        mine, _ = order.rows(step)
        feats = stream.features(train_ids[mine].tolist())
        batch = _global_batch(next(iter(feats.values())).shape[0], acc)
        for key, entry in entries.items():
            if step < entry.start:
                continue
            entry.trainer.step(step, feats[key].to(acc.device) * entry.scale, batch)
            entry.trainer.log(step, entry.out)
            entry.trainer.checkpoint(step, entry.out)
        bar.update(1)
    bar.close()
    return time.perf_counter() - t0


def train_sae_stream(
    backbone: Any,
    source: Any,
    out_dir: Union[str, Path],
    layers: Sequence[str],
    timesteps: Sequence[int],
    config: Optional[SAETrainConfig] = None,
    *,
    accelerator: Any = None,
    noise_seed: int = 0,
    ensemble: int = 1,
    extract_batch_size: int = 8,
    num_workers: int = 0,
    granularity: str = "pooled",
    tokens_per_image: int = 64,
    token_sampling: str = "uniform",
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: Optional[int] = None,
) -> dict[LayerKey, TrainResult]:
    """Train one k-SAE per (layer, t) on ``source``'s images, one backbone pass per batch, no store.

    Args:
        backbone: a loaded :class:`revelio_hub.backbones.Backbone`.
        source: an :class:`~revelio_hub.data.ImageSource` (the split to train on).
        out_dir: root folder; each SAE goes to ``out_dir/<layer>/t<t>`` (:func:`entry_dir`) with the
            files :func:`~revelio_hub.sae.training.train_sae` writes.
        layers, timesteps: the grid of entries.
        config: the SAEs' hyper-parameters (``batch_size`` counts images; ``eval_fraction`` > 0).
        accelerator: default :func:`~revelio_hub.distributed.make_accelerator`; N processes
            each extract and train on their share of every global batch (DDP per SAE).
        noise_seed, ensemble: the extraction's noise seed and noise draws, as in a store.
        extract_batch_size: images per backbone call (a step's share is split into such calls).
        granularity, tokens_per_image: ``"pooled"`` (one vector per image, the paper) or ``"token"``
            (``tokens_per_image`` sampled positions per map; ``batch_size`` still counts images).
        token_sampling: how those positions are drawn (:func:`~revelio_hub.sae.training.sample_tokens`).
        resume, overwrite, progress, stop_after_step: as in ``train_sae``.

    Returns:
        ``{(layer, t): TrainResult}``; ``train_seconds`` is the shared loop's time.
    """
    cfg = config or SAETrainConfig()
    acc = accelerator or make_accelerator()
    layers, timesteps = check_request(backbone, layers, timesteps)
    if granularity not in ("pooled", "token"):
        raise ValueError(f"granularity must be 'pooled' or 'token', got {granularity!r}")
    stream = FeatureStream(backbone, source, layers, timesteps, noise_seed, ensemble, extract_batch_size, num_workers,
                           granularity, tokens_per_image, token_sampling)
    train_ids, eval_ids = _split_images(len(source), cfg)
    if len(train_ids) < cfg.batch_size:
        cfg = whole_set_batches(cfg, len(train_ids), acc.num_processes, acc.is_main_process)
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({acc.num_processes})")
    # the input statistics: the first global batch's images, the same on every process
    first_rows, _ = BatchOrder(len(train_ids), cfg, 0, 1, torch.device("cpu")).rows(0)
    first = stream.features(train_ids[first_rows].tolist())
    entries, results = _open_entries(stream, first, cfg, acc, Path(out_dir), len(train_ids),
                                     resume=resume, overwrite=overwrite)
    if not entries:
        return results
    stop = cfg.total_steps if stop_after_step is None else min(cfg.total_steps, stop_after_step)
    seconds = _stream_steps(stream, entries, train_ids, cfg, acc, stop, progress)
    if stop < cfg.total_steps:
        return {**results, **{k: TrainResult(e.trainer.model.cpu(), {}, stop, e.trainer.history, seconds)
                               for k, e in entries.items()}}
    # held-out metrics on uniformly drawn positions, as every position is encoded in use, whatever the training draw
    held_out = replace(stream, token_sampling="uniform").features(eval_ids.tolist())
    for key, entry in entries.items():
        metrics = final_evaluation(entry.trainer, held_out[key], "held_out", None, len(train_ids))
        save_run(entry.out, entry.trainer, metrics)
        results[key] = TrainResult(entry.trainer.model.cpu(), metrics, cfg.total_steps, entry.trainer.history, seconds)
        if acc.is_main_process:
            print(f"{key[0]} t={key[1]}: held-out FVU {metrics.get('fvu', float('nan')):.4f}, "
                  f"L0 {metrics.get('l0', float('nan')):.1f} -> {entry.out}", file=sys.stderr)
    return results
