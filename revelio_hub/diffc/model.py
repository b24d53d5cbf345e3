"""Diff-C: a small classifier head on top of frozen diffusion features.

Diff-C is the paper's evidence that diffusion features carry usable semantics:
a light convolutional head trained on one block's *unpooled* feature map at one
timestep reaches competitive transfer accuracy. The app uses it to show
predicted classes next to the SAE neurons.

Two heads share one class so that a release holds either behind the same API:

``head="conv"`` (the paper's head)
    parameter-free BatchNorm → Conv3×3 (C→hidden) + BN + ReLU + Dropout2d →
    3 × [Conv3×3 stride 2 + BN + ReLU + Dropout2d] → global average pool →
    Dropout → Linear. Padding 1 keeps every stride-2 block at ≥ 1×1, so the
    small maps of a bottleneck at 256 px (4×4, even 1×1) work too.

``head="linear"`` (the cheap probe used by the layer × timestep sweep)
    global average pool → parameter-free BatchNorm → Linear. It pools *before*
    normalising so that a feature map and its mean-pooled vector (what a feature
    store keeps as ``pooled``) give exactly the same logits; the probe can then
    be trained on pooled vectors and applied to maps.

The model carries its :class:`~revelio_hub.recipe.FeatureRecipe` in
``config.json`` so features from the wrong backbone, layer, timestep or image
size are refused with a clear error instead of yielding confident nonsense.
Loading is strict: a checkpoint whose tensors do not match the architecture in
its config is an error, never a silently half-initialised model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from revelio_hub.hub_model import StrictHubMixin
from revelio_hub.recipe import FeatureRecipe

HEADS = ("conv", "linear")
#: Number of stride-2 blocks after the first convolution (the paper uses 3).
NUM_DOWN_BLOCKS = 3

RecipeLike = Union[FeatureRecipe, dict, None]


def _conv_block(c_in: int, c_out: int, stride: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


class DiffC(
    nn.Module,
    StrictHubMixin,
    library_name="revelio-hub",
    tags=["revelio-hub", "diffusion-features", "image-classification", "diff-c"],
    pipeline_tag="image-classification",
):
    """Classifier head over a diffusion block's feature map.

    Args:
        in_channels: channels C of the feature map (e.g. 1280 for SD1.5 ``up_ft1``).
        class_names: one name per output, in label order.
        head: ``"conv"`` (paper head, needs N×C×H×W maps) or ``"linear"``
            (pooled probe, takes maps or N×C pooled vectors).
        hidden: width of the conv head.
        dropout: probability used by every Dropout2d and the final Dropout (conv head only).
        recipe: the feature recipe (``FeatureRecipe.to_dict()``) the head was trained on,
            or ``None`` when unknown (then only the channel count is checked).
    """

    def __init__(
        self,
        in_channels: int,
        class_names: list[str],
        head: str = "conv",
        hidden: int = 1024,
        dropout: float = 0.3,
        recipe: Optional[dict] = None,
        training_recipe: Optional[str] = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"Unknown Diff-C head {head!r}; valid heads: {list(HEADS)}.")
        if int(in_channels) <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}.")
        class_names = [str(c) for c in class_names]
        if len(class_names) < 2:
            raise ValueError(f"Diff-C needs at least two classes, got {class_names}.")
        if len(set(class_names)) != len(class_names):
            raise ValueError("class_names must be unique.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if isinstance(recipe, FeatureRecipe):
            recipe = recipe.to_dict()
        if recipe is not None:
            parsed = FeatureRecipe.from_dict(recipe)  # validates the keys
            if parsed.d_in != int(in_channels):
                raise ValueError(
                    f"recipe.d_in={parsed.d_in} disagrees with in_channels={in_channels}."
                )
        self.in_channels = int(in_channels)
        self.class_names = class_names
        self.head = head
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.recipe: Optional[dict] = dict(recipe) if recipe is not None else None
        self.training_recipe = training_recipe  # "paper" / "default" (revelio_hub.training_recipes), None: unknown
        # What save_pretrained writes to config.json: the normalised arguments,
        # whatever form they were passed in (e.g. a FeatureRecipe object).
        self._hub_mixin_config = {
            "in_channels": self.in_channels,
            "class_names": list(self.class_names),
            "head": self.head,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "recipe": self.recipe,
        }
        if training_recipe is not None:
            self._hub_mixin_config["training_recipe"] = training_recipe

        n_classes = len(class_names)
        if head == "conv":
            # Diffusion activations have wildly different scales per channel;
            # a parameter-free BN standardises them without adding capacity.
            self.input_norm: nn.Module = nn.BatchNorm2d(self.in_channels, affine=False)
            blocks = [_conv_block(self.in_channels, self.hidden, 1, self.dropout)]
            blocks += [
                _conv_block(self.hidden, self.hidden, 2, self.dropout) for _ in range(NUM_DOWN_BLOCKS)
            ]
            self.blocks = nn.Sequential(*blocks)
            self.head_dropout = nn.Dropout(self.dropout)
            self.fc = nn.Linear(self.hidden, n_classes)
        else:
            self.input_norm = nn.BatchNorm1d(self.in_channels, affine=False)
            self.fc = nn.Linear(self.in_channels, n_classes)

    # ------------------------------------------------------------------ checks

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def feature_recipe(self) -> Optional[FeatureRecipe]:
        """The recipe this head was trained on, as a :class:`FeatureRecipe` (``None`` if unknown)."""
        return FeatureRecipe.from_dict(self.recipe) if self.recipe is not None else None

    def _recipe_text(self) -> str:
        if self.recipe is None:
            return "an unrecorded feature recipe"
        r = self.recipe
        return (
            f"backbone={r.get('backbone')!r}, layer={r.get('layer')!r}, t={r.get('timestep')}, "
            f"image_size={r.get('image_size')}"
        )

    def check_recipe(self, recipe: RecipeLike) -> None:
        """Raise ``ValueError`` if features made with ``recipe`` cannot be fed to this head.

        Compares backbone, layer, timestep, image size and channel count (see
        :meth:`FeatureRecipe.check_compatible`). A head without a recorded
        recipe only checks the channel count.
        """
        if recipe is None:
            return
        other = recipe if isinstance(recipe, FeatureRecipe) else FeatureRecipe.from_dict(recipe)
        mine = self.feature_recipe()
        if mine is None:
            if other.d_in != self.in_channels:
                raise ValueError(
                    f"Diff-C expects {self.in_channels}-channel features, the recipe gives {other.d_in}."
                )
            return
        mine.check_compatible(other, what="features for this Diff-C head")

    def _check_input(self, maps: torch.Tensor) -> torch.Tensor:
        if not isinstance(maps, torch.Tensor):
            raise ValueError(f"Diff-C expects a torch.Tensor of features, got {type(maps).__name__}.")
        if maps.ndim == 4:
            channels = maps.shape[1]
        elif maps.ndim == 2:
            if self.head == "conv":
                raise ValueError(
                    "The conv Diff-C head needs unpooled feature maps N×C×H×W, got pooled vectors "
                    f"of shape {tuple(maps.shape)}; only head='linear' accepts N×C."
                )
            channels = maps.shape[1]
        else:
            raise ValueError(
                f"Diff-C expects feature maps N×C×H×W (or N×C for the linear head), got shape {tuple(maps.shape)}."
            )
        if channels != self.in_channels:
            raise ValueError(
                f"Diff-C expects {self.in_channels} channels, got {channels} (input shape "
                f"{tuple(maps.shape)}). It was trained on {self._recipe_text()}; extract features "
                "with that recipe."
            )
        if not maps.is_floating_point():
            raise ValueError(f"Diff-C expects floating-point features, got dtype {maps.dtype}.")
        return maps

    # ----------------------------------------------------------------- forward

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``N×num_classes`` for feature maps ``N×C×H×W`` (or pooled ``N×C``, linear head)."""
        maps = self._check_input(maps)
        param = self.fc.weight
        maps = maps.to(device=param.device, dtype=param.dtype)
        if self.head == "linear":
            pooled = maps.mean(dim=(2, 3)) if maps.ndim == 4 else maps
            return self.fc(self.input_norm(pooled))
        x = self.blocks(self.input_norm(maps))
        return self.fc(self.head_dropout(x.mean(dim=(2, 3))))

    @torch.no_grad()
    def predict_proba(self, maps: torch.Tensor, batch_size: int = 64, recipe: RecipeLike = None) -> torch.Tensor:
        """Class probabilities ``N×num_classes`` (eval mode, batched, float32 on CPU).

        Pass the features' ``recipe`` to have it checked against the head's (see :meth:`check_recipe`).
        """
        self.check_recipe(recipe)
        if isinstance(maps, torch.Tensor) and (
            (maps.ndim == 3 and self.head == "conv") or (maps.ndim == 1 and self.head == "linear")
        ):
            maps = maps.unsqueeze(0)  # a single map / vector
        self._check_input(maps)
        was_training = self.training
        self.eval()
        try:
            out = [
                torch.softmax(self(maps[i : i + batch_size]).float(), dim=-1).cpu()
                for i in range(0, maps.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def predict(self, maps: torch.Tensor, top_k: int = 5, recipe: RecipeLike = None) -> list[dict[str, float]]:
        """For each input, ``{class_name: probability}`` of the ``top_k`` classes, most likely first.

        ``maps``: ``N×C×H×W`` (or one ``C×H×W`` map; pooled ``N×C``/``C`` for the linear head).
        ``recipe``: the features' recipe, checked against the head's when given.
        """
        if int(top_k) < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}.")
        probs = self.predict_proba(maps, recipe=recipe)
        k = min(int(top_k), self.num_classes)
        values, indices = probs.topk(k, dim=-1)
        return [
            {self.class_names[int(i)]: float(v) for v, i in zip(row_v, row_i)}
            for row_v, row_i in zip(values, indices)
        ]

    # --------------------------------------------------------------- loading

    _hub_kind = "Diff-C head"

    def _describe_architecture(self) -> str:
        return f"head={self.head!r}, in_channels={self.in_channels}, hidden={self.hidden}"


__all__ = ["DiffC", "HEADS"]
