"""What a toy build trains with, shared by the build (:mod:`revelio_hub.toy.pipeline`) and its benchmark.

The ground-truth monosemanticity benchmark (:mod:`revelio_hub.toy.monosemanticity`)
trains a random-weights control exactly as the build trained the release's
SAEs, so both need the build's settings, the stable name the backbone is opened
under and the SAE trainer (token-level, or mean-pooled per layer). They live here, below both, so that the
build can run the benchmark without the benchmark reaching back into the build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from revelio_hub.backbones import PixelBackbone
from revelio_hub.sae.training import TOKEN_SAMPLINGS, SAETrainConfig, sample_tokens, train_sae
from revelio_hub.toy.backbone_training import ToyBackboneConfig

#: The backbone id recorded in every recipe of the toy release. Features are only
#: comparable when the backbone *name* matches, so the build and every consumer
#: load the embedded folder under this stable name instead of its path.
TOY_BACKBONE_NAME = "revelio-hub/toy-shapes-ddpm"
#: The build settings, written into the release so the benchmark can train its control the same way.
TOY_BUILD_FILE = "toy_build.json"
#: the release SAEs' sparsity rule and learning rate (None: the default recipe's scaled rule), chosen by
#: benchmarks/bench_sae_variants.py (see ToyBuildConfig.full)
TOY_SAE_VARIANT = "topk"
TOY_SAE_LR: Optional[float] = None
#: training steps of the release SAEs: at 1,000 they were under-trained (an image's listed neurons could be named
#: at precision 0.9 for 26-86 % of listings by an all-knowing labeller, 59-94 % at 6,000, with lower FVU at
#: every layer; docs/benchmarks.md, "SAE training length")
TOY_SAE_STEPS = 6000
#: layers whose release SAE is trained on each image's mean-pooled vector (the paper's granularity) instead of
#: sampled positions. A token SAE's neurons there are local patterns that fire on 30-50 % of images: over three
#: training seeds each, an all-knowing labeller could name at precision 0.9 only 22-30 % (up_ft1) and 48-61 %
#: (down_ft1) of the app's listings, against 92-97 % and 88-91 % for pooled SAEs, and the app named 16-32 % against
#: 66-71 % at up_ft1 and 40-46 % against 53-67 % at down_ft1. At bottleneck and up_ft0 the token SAE named more and
#: "Why this class?" held better (docs/benchmarks.md, "Pooled SAEs at down_ft1 and up_ft1").
TOY_SAE_POOLED_LAYERS: tuple[str, ...] = ("down_ft1", "up_ft1")
#: how the token-level release SAEs draw their training positions, and how many per image. Drawn in proportion to
#: their squared distance from the map's mean (sae.training.sample_tokens), 8 per image against 32 uniform ones gave,
#: over three training seeds on tuning images, "Why this class?" neurons named for the class in 61-62 % of images
#: against 37-47 % at the bottleneck (63-66 % against 62 % at up_ft0) and named listings 0.91-0.98 against
#: 0.80-0.90, for a held-out FVU of 0.104-0.108 against 0.094-0.096 (docs/benchmarks.md, "Token sampling by
#: deviation"). 16 such positions named less (55-60 % at the bottleneck), 16 uniform ones less still (29-45 %).
TOY_SAE_TOKEN_SAMPLING = "deviation"
TOY_SAE_TOKENS_PER_IMAGE = 8


@dataclass
class ToyBuildConfig:
    """Sizes and seeds of one toy-release build (everything that changes the result).

    ``train_seed``/``test_seed`` select disjoint shape streams (and the backbone's
    own ``data_seed`` a third), so the test split and the benchmark's images are
    never seen in training.
    """

    backbone: ToyBackboneConfig = field(default_factory=ToyBackboneConfig)
    train_images: int = 2000
    test_images: int = 600
    train_seed: int = 0
    test_seed: int = 1
    layers: tuple[str, ...] = ("down_ft1", "bottleneck", "up_ft0", "up_ft1")
    timesteps: tuple[int, ...] = (25, 100, 200)
    noise_seed: int = 0
    extract_batch_size: int = 64
    # k-SAE: token-level (sampled positions of each map), except at ``sae_pooled_layers``
    sae_expansion: int = 8
    sae_k: int = 8
    sae_tokens_per_image: int = 32
    #: how token-level SAEs draw positions (sae.training.TOKEN_SAMPLINGS); "uniform" for a toy_build.json written
    #: before the choice existed; :meth:`full` names the release's. Held-out metrics always use uniform draws.
    sae_token_sampling: str = "uniform"
    sae_steps: int = 1000
    sae_batch_size: int = 1024
    #: None: the default recipe's rule (revelio_hub.sae.schedule); 2e-3 here for toy_build.json files written before it
    sae_lr: Optional[float] = 2e-3
    sae_warmup_steps: int = 100
    #: AuxK: latents in the auxiliary code (None: d_in // 2, as OpenAI) and its loss weight.
    sae_aux_k: Optional[int] = None
    sae_aux_coef: float = 1 / 32
    #: sparsity rule (revelio_hub.sae.variants). "topk" here, because a toy_build.json written before variants
    #: existed holds no such key and was TopK; :meth:`full` and :meth:`smoke` name the one the scoreboard chose.
    sae_variant: str = "topk"
    #: layers whose SAE is trained on mean-pooled vectors (one per training image) instead of positions; empty
    #: for a toy_build.json written before the choice existed (all token-level); :meth:`full` names the release's.
    sae_pooled_layers: tuple[str, ...] = ()
    # Diff-C (conv head on spatial maps, small hidden width for CPU)
    diffc_hidden: int = 32
    diffc_epochs: int = 30
    diffc_batch_size: int = 64
    diffc_lr: float = 3e-3
    diffc_dropout: float = 0.0  # dropout lost held-out accuracy side by side (docs/benchmarks.md)
    #: Diff-C is trained for these layers only: on 32×32 maps (up_ft1) it costs
    #: minutes per entry on CPU and the coarser layers already classify shapes.
    diffc_layers: tuple[str, ...] = ("down_ft1", "bottleneck", "up_ft0")
    # atlas
    atlas_top_k: int = 10
    #: Atlases cover the first ``atlas_images`` test images: their thumbnails are most of an entry's size.
    atlas_images: int = 300
    # ground-truth monosemanticity benchmark written into the card
    bench_images: int = 1000
    bench_random_train_images: int = 1000
    #: Test images (the first ones: the atlas images) the reliability score is calibrated on; 0 skips the stage.
    reliability_images: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = ToyBackboneConfig.from_dict(self.backbone)
        self.layers = tuple(self.layers)
        self.diffc_layers = tuple(l for l in self.diffc_layers if l in self.layers)
        self.sae_pooled_layers = tuple(l for l in self.sae_pooled_layers if l in self.layers)
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if self.train_images < 16 or self.test_images < 16:
            raise ValueError("train_images and test_images must be at least 16")
        if self.sae_token_sampling not in TOKEN_SAMPLINGS:
            raise ValueError(f"sae_token_sampling must be one of {', '.join(TOKEN_SAMPLINGS)}, "
                             f"got {self.sae_token_sampling!r}")

    @classmethod
    def full(cls) -> "ToyBuildConfig":
        """The committed release's settings.

        The SAEs' variant is the one ``benchmarks/bench_sae_variants.py`` chose on the toy data's held-out
        shapes (``docs/benchmarks.md``, "SAE variants", gives the numbers and the reason); their training
        length, the one measured in "SAE training length".
        """
        return cls(sae_variant=TOY_SAE_VARIANT, sae_lr=TOY_SAE_LR, sae_steps=TOY_SAE_STEPS,
                   sae_pooled_layers=TOY_SAE_POOLED_LAYERS, sae_token_sampling=TOY_SAE_TOKEN_SAMPLING,
                   sae_tokens_per_image=TOY_SAE_TOKENS_PER_IMAGE)

    @classmethod
    def smoke(cls) -> "ToyBuildConfig":
        """Same stages, tiny sizes: a CI check that the pipeline is wired correctly (not a useful model)."""
        return cls(
            backbone=ToyBackboneConfig(block_out_channels=(16, 32, 32), cross_attention_dim=32, steps=4,
                                       batch_size=8, warmup_steps=2, checkpoint_every=0, sample_steps=4,
                                       sample_count=16),
            train_images=48, test_images=32, layers=("bottleneck", "up_ft0"), timesteps=(25, 200),
            extract_batch_size=32, sae_expansion=2, sae_k=4, sae_tokens_per_image=8, sae_steps=20,
            sae_token_sampling=TOY_SAE_TOKEN_SAMPLING,
            sae_batch_size=64, sae_warmup_steps=2, sae_variant=TOY_SAE_VARIANT, diffc_hidden=16, diffc_epochs=2, diffc_batch_size=16,
            atlas_top_k=5, bench_images=48, bench_random_train_images=48, reliability_images=24,
            sae_pooled_layers=("up_ft0",),  # both SAE granularities go through every stage
        )

    def sae_granularity(self, layer: str) -> str:
        """``"pooled"`` or ``"token"``: what the release SAE of ``layer`` is trained on."""
        return "pooled" if layer in self.sae_pooled_layers else "token"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["layers"] = list(self.layers)
        d["diffc_layers"] = list(self.diffc_layers)
        d["sae_pooled_layers"] = list(self.sae_pooled_layers)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyBuildConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def load_toy_backbone(folder: str | Path, **kwargs: Any):
    """Open a toy backbone folder under the release's stable backbone name (see :data:`TOY_BACKBONE_NAME`)."""
    kwargs.setdefault("name", TOY_BACKBONE_NAME)
    return PixelBackbone.from_pretrained(str(folder), **kwargs)


def train_toy_sae(config: ToyBuildConfig, layer: str, maps: torch.Tensor, recipe: dict, out: Optional[Path] = None,
                  progress: bool = False, eval_maps: Optional[torch.Tensor] = None):
    """The k-SAE of ``layer`` on N×C×H×W maps, at the layer's granularity (:meth:`ToyBuildConfig.sae_granularity`).

    Token level: ``sae_tokens_per_image`` positions of each map, drawn as ``sae_token_sampling`` says (held-out
    metrics on uniform draws, as every position is encoded in use);
    pooled: each map's mean over positions. Used for the release's SAEs and,
    with the same settings, for the benchmark's random-weights control, so
    both sides get exactly the same training. ``recipe`` must be the
    backbone's recipe at that granularity.
    """
    granularity = config.sae_granularity(layer)

    def rows(m: torch.Tensor, sampling: str) -> torch.Tensor:
        if granularity == "pooled":
            return m.float().mean(dim=(2, 3))
        return sample_tokens(m.float(), config.sae_tokens_per_image, seed=config.seed, sampling=sampling)[0]

    x = rows(maps, config.sae_token_sampling)
    cfg = SAETrainConfig(
        k=config.sae_k, expansion=config.sae_expansion, batch_size=min(config.sae_batch_size, len(x) // 2),
        steps=config.sae_steps, lr=config.sae_lr, warmup_steps=config.sae_warmup_steps,
        dead_window=len(x), checkpoint_every=0, log_every=max(1, config.sae_steps // 10), seed=config.seed,
        aux_k=config.sae_aux_k, aux_coef=config.sae_aux_coef, variant=config.sae_variant,
    )
    return train_sae(x, cfg, out_dir=out, recipe=recipe, granularity=granularity, progress=progress,
                     eval_features=rows(eval_maps, "uniform") if eval_maps is not None else None)
