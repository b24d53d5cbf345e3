"""Train the toy pixel-space diffusion backbone (a small DDPM on procedural shapes).

The model is a ``diffusers`` ``UNet2DConditionModel`` with a constant, learned
"null" conditioning (``encoder_hidden_states``), so feature extraction walks the
same code path as Stable Diffusion with the empty prompt. It is saved in the
pixel-backbone folder layout of ``docs/CONTRACTS.md`` so that
``revelio_hub.load_backbone(folder)`` opens it like any checkpoint.

Why these defaults: 32 px images and block widths (32, 64, 64) with attention
only at the lowest resolution (attention at 32×32 tokens costs ~20× more per step
on CPU) train at roughly half a second per batch of 64 on two cores. Training
images are rendered on the fly from an endless deterministic stream, so the
model never sees the same image twice and nothing has to be stored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..cli import option
from .shapes import image_spec, render

NULL_CONDITIONING_FILE = "null_conditioning.safetensors"
TRAINING_CONFIG_FILE = "toy_training_config.json"
SAMPLE_GRID_FILE = "sample_grid.png"


@dataclass
class ToyBackboneConfig:
    """Architecture and training schedule of the toy backbone (all seeds fixed).

    ``data_seed`` selects the stream of training shapes; evaluation images should
    come from a different seed so they are truly held out. The fields double as
    ``training/train_toy_backbone.py``'s options (:func:`revelio_hub.cli.add_options`).

    Attributes:
        image_size: training resolution in pixels.
        block_out_channels: UNet block widths; attention only in the last (lowest-resolution) block.
        layers_per_block: resnet layers per UNet block.
        cross_attention_dim: width of the constant null-conditioning tokens the attention block reads.
        attention_head_dim: channels per attention head.
        null_tokens: how many null-conditioning tokens.
        num_train_timesteps: DDPM timesteps of the noise schedule.
        steps: optimiser steps.
        batch_size: images per optimiser step.
        learning_rate: peak learning rate (warm-up, then cosine).
        warmup_steps: linear learning-rate warm-up steps.
        weight_decay: AdamW weight decay.
        ema_decay: EMA decay of the weights; 0 disables EMA weights.
        seed: model init and noise seed.
        data_seed: seed of the endless stream of training shapes.
        checkpoint_every: steps between checkpoints (0: none).
        sample_steps: ancestral DDPM sampling steps for the sample grid.
        sample_count: images in the sample grid.
    """

    image_size: int = 32
    block_out_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata=option(flag="--widths", metavar="WIDTH"))
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    null_tokens: int = 2
    num_train_timesteps: int = 1000
    steps: int = 4800
    batch_size: int = 32
    learning_rate: float = field(default=1e-3, metadata=option(flag="--lr"))
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    seed: int = 0
    data_seed: int = 1000
    checkpoint_every: int = 100
    sample_steps: int = 250
    sample_count: int = 64

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.image_size < 8 or self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be >= 8 and divisible by 2**(len(block_out_channels)-1)"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyBackboneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def architecture(self) -> dict[str, Any]:
        """The subset of fields that changes the model (used to decide if a cache is reusable)."""
        keys = ("image_size", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "null_tokens", "num_train_timesteps")
        return {k: self.to_dict()[k] for k in keys}


def build_unet(config: ToyBackboneConfig):
    """A small ``UNet2DConditionModel``: cross-attention only at the lowest resolution."""
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    down = tuple("DownBlock2D" for _ in range(n - 1)) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + tuple("UpBlock2D" for _ in range(n - 1))
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=min(32, min(config.block_out_channels)),
    )


def build_scheduler(config: ToyBackboneConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule="linear", prediction_type="epsilon")


class ToyDiffusionModel(torch.nn.Module):
    """The UNet plus its learned constant conditioning, trained together."""

    def __init__(self, config: ToyBackboneConfig):
        super().__init__()
        self.unet = build_unet(config)
        g = torch.Generator().manual_seed(config.seed + 1)
        self.null_conditioning = torch.nn.Parameter(
            torch.randn(1, config.null_tokens, config.cross_attention_dim, generator=g)
        )

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        cond = self.null_conditioning.expand(noisy.shape[0], -1, -1)
        return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample


def shape_batch(indices: Sequence[int], seed: int, image_size: int) -> torch.Tensor:
    """Render shape images ``indices`` of stream ``seed`` as a B×3×S×S tensor in [-1, 1]."""
    arrays = [np.asarray(render(image_spec(int(i), seed), image_size)) for i in indices]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors + JSON, so checkpoints are safetensors, never pickles."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = float(value)
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _load_flat_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta["scalars"].items():
        for key, value in st.items():
            state.setdefault(int(pid), {})[key] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, step: int, model, ema: dict, optimizer, config: ToyBackboneConfig) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(path / "ema.safetensors"))
    tensors, meta = _flat_optimizer_state(optimizer)
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "state.json").write_text(json.dumps({"step": step, "config": config.to_dict(), "optimizer": meta}))


def latest_checkpoint(folder: Path) -> Optional[Path]:
    ckpts = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts and (ckpts[-1] / "state.json").exists() else None


@torch.no_grad()
def sample_images(model: ToyDiffusionModel, config: ToyBackboneConfig, n: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Ancestral DDPM sampling over ``steps`` evenly spaced timesteps; returns N×3×S×S in [-1, 1].

    Ancestral sampling, not DDIM: on a briefly trained model deterministic DDIM
    (eta 0) collapses to noisy grey textures, while the stochastic sampler gives
    recognisable objects on their backgrounds.
    """
    sched = build_scheduler(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, config.image_size, config.image_size, generator=g)
    model.eval()
    for t in sched.timesteps:
        eps = model(x, t.expand(n))
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


SAMPLE_META_FILE = "sample_grid.json"
#: Fields that do not change the trained weights (a backbone trained with other values is reusable).
_NON_TRAINING_FIELDS = ("sample_steps", "sample_count", "checkpoint_every")


def write_sample_grid(model: ToyDiffusionModel, config: ToyBackboneConfig, out: Path) -> Path:
    """Sample ``config.sample_count`` images and save the grid PNG (plus its settings) into ``out``."""
    samples = sample_images(model, config, config.sample_count, config.sample_steps, seed=config.seed)
    image_grid(samples).save(out / SAMPLE_GRID_FILE)
    meta = {"sampler": "ddpm-ancestral", "steps": config.sample_steps, "count": config.sample_count, "seed": config.seed}
    (out / SAMPLE_META_FILE).write_text(json.dumps(meta) + "\n")
    return out / SAMPLE_GRID_FILE


def load_toy_model(folder: str | os.PathLike, config: ToyBackboneConfig) -> ToyDiffusionModel:
    """The saved backbone as a trainable-layout :class:`ToyDiffusionModel` (fp32), e.g. to sample from it."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    model = ToyDiffusionModel(config)
    model.unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / "unet"), use_safetensors=True).float()
    cond = load_file(str(Path(folder) / NULL_CONDITIONING_FILE))["encoder_hidden_states"]
    model.null_conditioning.data.copy_(cond.float())
    return model.eval()


def ensure_sample_grid(folder: str | os.PathLike, config: ToyBackboneConfig) -> Path:
    """(Re)draw the sample grid of a saved backbone when it is missing or was drawn with other settings."""
    folder = Path(folder)
    meta_file = folder / SAMPLE_META_FILE
    want = {"sampler": "ddpm-ancestral", "steps": config.sample_steps, "count": config.sample_count, "seed": config.seed}
    if (folder / SAMPLE_GRID_FILE).exists() and meta_file.exists() and json.loads(meta_file.read_text()) == want:
        return folder / SAMPLE_GRID_FILE
    return write_sample_grid(load_toy_model(folder, config), config, folder)


def image_grid(images: torch.Tensor, nrow: int = 8, scale: int = 2):
    """A PIL grid of N×3×S×S images in [-1, 1], upscaled ``scale``× (nearest) for viewing."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, s = arr.shape[0], arr.shape[1]
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * s, nrow * s, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * s : (r + 1) * s, c * s : (c + 1) * s] = arr[i]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def save_backbone(model: ToyDiffusionModel, config: ToyBackboneConfig, out: Path) -> None:
    """Write the pixel-backbone folder layout of docs/CONTRACTS.md."""
    import diffusers
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # Stored in fp16 (half the release size). The caller rounds the weights first
    # (see :func:`round_to_storage`), so what is sampled and extracted in memory is
    # exactly what a later load reproduces.
    import copy

    copy.deepcopy(model.unet).to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    build_scheduler(config).save_pretrained(out / "scheduler")
    save_file(
        {"encoder_hidden_states": model.null_conditioning.detach().float().contiguous()},
        str(out / NULL_CONDITIONING_FILE),
    )
    index = {
        "_class_name": "RevelioPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / TRAINING_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def round_to_storage(model: ToyDiffusionModel) -> ToyDiffusionModel:
    """Round the UNet weights to fp16 precision (kept in fp32), i.e. to what :func:`save_backbone` stores."""
    with torch.no_grad():
        for p in model.unet.parameters():
            p.copy_(p.half().float())
    return model


def random_backbone(config: ToyBackboneConfig, out: Path, seed: int = 12345) -> Path:
    """The same architecture with random weights, saved in the same layout (the benchmark's control)."""
    torch.manual_seed(seed)
    cfg = ToyBackboneConfig.from_dict({**config.to_dict(), "seed": seed})
    save_backbone(round_to_storage(ToyDiffusionModel(cfg)), cfg, out)
    return out


def is_trained_backbone(folder: Path, config: ToyBackboneConfig) -> bool:
    """True when ``folder`` holds a finished backbone trained with exactly ``config``."""
    cfg_file = Path(folder) / TRAINING_CONFIG_FILE
    if not cfg_file.exists() or not (Path(folder) / "unet").exists():
        return False
    saved = json.loads(cfg_file.read_text())
    want = config.to_dict()
    return all(saved.get(k) == v for k, v in want.items() if k not in _NON_TRAINING_FIELDS)


def train_toy_backbone(
    config: ToyBackboneConfig,
    out: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    accelerator=None,
    log_every: int = 50,
) -> Path:
    """Train the DDPM on an endless stream of shapes and save it to ``out``.

    Checkpoints (safetensors) go to ``out/checkpoints/checkpoint-<step>``; with
    ``resume`` the latest one is picked up. The final folder holds the EMA weights
    (when ``ema_decay`` > 0) in the pixel-backbone layout, a ``sample_grid.png``
    drawn by ancestral DDPM sampling, and the training config. Returns ``out``.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    out = Path(out)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    model = ToyDiffusionModel(config)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_lambda(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        progress_frac = step / max(1, config.steps)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac))))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = 0
    ckpt_dir = out / "checkpoints"
    if resume and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        state = json.loads((ckpt / "state.json").read_text())
        if ToyBackboneConfig.from_dict(state["config"]).to_dict() != config.to_dict():
            raise ValueError(f"Checkpoint {ckpt} was made with a different config; pass resume=False or another --out")
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema = load_file(str(ckpt / "ema.safetensors"))
        _load_flat_optimizer_state(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        start = int(state["step"])
        for _ in range(start):
            lr_sched.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    alphas = scheduler.alphas_cumprod
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="toy DDPM", disable=not progress)
    running = None
    for step in bar:
        model.train()
        idx = range(step * config.batch_size, (step + 1) * config.batch_size)
        x0 = shape_batch(idx, config.data_seed, config.image_size).to(accelerator.device)
        # Per-step generator: the noise, and so the whole run, depends only on the seeds and the step.
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        a = alphas[t.cpu()].to(x0.device).view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(model(noisy, t), noise)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # EMA warm-up: short runs should not be dominated by the random init.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for k, v in raw.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach().cpu(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir / f"checkpoint-{done}", done, raw, ema, optimizer, config)
    final = ToyDiffusionModel(config)
    final.load_state_dict(ema if config.ema_decay > 0 else raw.state_dict())
    round_to_storage(final)
    if accelerator.is_main_process:
        save_backbone(final, config, out)
        write_sample_grid(final, config, out)
        (out / "training_log.json").write_text(json.dumps({"final_loss_ema": running, "steps": config.steps}) + "\n")
    return out
