"""The common interface of every diffusion backbone: images in, block outputs out.

A :class:`Backbone` owns a denoiser (UNet or transformer), an optional VAE, the
forward-noising schedule and a conditioning computed once at load time. The
family subclasses only say how to call their denoiser and where their layers
are; the expensive, easy-to-get-wrong parts live here once:

* VAE latents are computed once per batch and reused for every timestep,
  ensemble member and layer (the VAE encoder is the largest single cost);
* every requested layer is captured in one pass that stops after the deepest
  requested block, into a store private to the call, so any number of threads
  may share one backbone (:mod:`.capture`);
* noise is drawn per image from a hash of ``(seed, image_id, t, member)``
  (:mod:`.noise`), so features do not depend on batching;
* results come back float32 on the CPU whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..images import RESIZES, _as_list, to_model_tensor
from ..layer_names import canonical_layer
from ..recipe import FeatureRecipe
from .capture import LayerTaps
from .noise import batch_noise

LayerKey = tuple[str, int]


def _forward_noiser(scheduler: Any) -> Any:
    """A ``DDPMScheduler`` with the checkpoint's beta schedule, used only for ``add_noise``.

    Checkpoints ship samplers (PNDM, DDIM, Euler...) whose ``add_noise`` differ
    in what they need set up first; the forward process q(x_t | x_0) is the same
    DDPM one for all of them, so we rebuild it from the shared config keys.
    """
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
    config = {k: scheduler.config[k] for k in keys if k in scheduler.config}
    return DDPMScheduler(**config)


def resolve_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    """``torch.float32/float16/bfloat16`` or their names ("bfloat16", "torch.float16"); else ``ValueError``."""
    if isinstance(dtype, str):  # from CLIs and configs
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}.")
    return dtype


class Backbone:
    """A diffusion model read as a feature extractor.

    Attributes:
        name: Hub id or local path as given to :func:`load_backbone`.
        revision: Hub revision, if any.
        family: ``sd``, ``sdxl``, ``dit``, ``pixart`` or ``pixel``.
        layers: canonical layer names in execution order.
        image_size: side of the square input in pixels.
        num_train_timesteps: valid timesteps are ``range(num_train_timesteps)``.
        device, dtype: where and in which precision the networks run.
        channels_last: run convolutions in NHWC layout (faster on GPUs).
        early_exit: stop the pass after the deepest requested block (turn off
            only to check that it changes nothing).
        prompt: the conditioning prompt ("" in the paper).
    """

    family: str = ""
    #: The precomputed text conditioning as float32 CPU tensors, keyed like the family
    #: constructor's arguments (``prompt_embeds``...), so it can be cached and reused.
    conditioning: dict[str, torch.Tensor] = {}

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        scheduler: Any,
        vae: Optional[nn.Module] = None,
        name: str = "in-memory",
        revision: Optional[str] = None,
        image_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[torch.dtype, str] = torch.float32,
        channels_last: bool = False,
        early_exit: bool = True,
        prompt: str = "",
        resize: str = "bicubic",
    ) -> None:
        dtype = resolve_dtype(dtype)
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}.")
        self.resize = resize
        self.name = str(name)
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.early_exit = bool(early_exit)
        self.prompt = prompt
        self.denoiser = self._prepare(denoiser, dtype)
        self.vae = None
        self.vae_dtype = dtype
        if vae is not None:
            # SDXL's VAE overflows in fp16 (config force_upcast); bf16 has fp32's range.
            if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
                self.vae_dtype = torch.float32
            self.vae = self._prepare(vae, self.vae_dtype)
            self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            self.vae_factor = 1
        self.noise_scheduler = _forward_noiser(scheduler)
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self._layer_modules = self._make_layer_modules()
        self.layers: list[str] = list(self._layer_modules)
        # Hooks registered once; each call captures into its own store, so threads can share the model.
        self._taps = LayerTaps(self._layer_modules)
        self.image_size = self._check_image_size(image_size if image_size is not None else self.default_image_size())
        self._shapes = self._feature_shapes()

    # ------------------------------------------------------------ family hooks

    def _make_layer_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def default_image_size(self) -> int:
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE factor × the denoiser's own stride)."""
        raise NotImplementedError

    def _feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        raise NotImplementedError

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> Any:
        """Run the denoiser on ``noisy`` at ``timesteps`` with the cached conditioning."""
        raise NotImplementedError

    def _to_map(self, layer: str, output: torch.Tensor) -> torch.Tensor:
        """Turn a captured block output into a B×C×H×W map."""
        return output

    def compile(self, vae: bool = True, denoiser: bool = True, **compile_kwargs: Any) -> "Backbone":
        """``torch.compile`` the VAE encoder and the denoiser's inner modules, in place.

        The VAE encoder is the largest single cost, so it is the biggest lever
        (docs/benchmarks.md, GPU figures). The denoiser is compiled piecewise — the resnets,
        attentions and resamplers *inside* each block, or each transformer
        block's children — so the block-level hooks, and with them early exit,
        stay outside the compiled graphs. ``compile_kwargs`` go to
        ``torch.compile`` (``mode``, ``backend``, ``dynamic``...). Returns self.

        Piecewise compilation compiles one code object (``ResnetBlock2D.forward``...)
        once per distinct instance shape: SD 1.5's path to ``up_ft1`` alone has 9
        resnet shapes per image size, more than dynamo's default recompile limit (8),
        past which the remaining instances silently run eager. So this raises
        ``torch._dynamo.config.recompile_limit`` (process-wide) to cover every
        compiled module.
        """
        modules = []
        if denoiser:
            for block in self._layer_modules.values():
                for child in block.children():
                    modules += list(child) if isinstance(child, nn.ModuleList) else [child]
        if modules:
            import torch._dynamo

            config = torch._dynamo.config
            # (torch < 2.7 calls them cache_size_limit / accumulated_cache_size_limit)
            for names, wanted in ((("recompile_limit", "cache_size_limit"), 2 * len(modules)),
                                  (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8 * len(modules))):
                name = next((n for n in names if hasattr(config, n)), None)
                if name is not None:
                    setattr(config, name, max(getattr(config, name), wanted))
        if vae and self.vae is not None:
            self.vae.encoder.compile(**compile_kwargs)
        for module in modules:
            module.compile(**compile_kwargs)
        return self

    # --------------------------------------------------------------- helpers

    def _prepare(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        current = next(module.parameters(), None)
        if current is not None and current.dtype != dtype:
            module = module.to(dtype=dtype)
        module = module.to(device=self.device).eval().requires_grad_(False)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def _check_image_size(self, size: int) -> int:
        size = int(size)
        multiple = self.size_multiple()
        if size <= 0 or size % multiple:
            raise ValueError(
                f"image_size={size} is not valid for {self.name!r}: it must be a positive multiple of "
                f"{multiple} (VAE factor {self.vae_factor} × the denoiser's stride), e.g. "
                f"{max(multiple, size // multiple * multiple)} or {(size // multiple + 1) * multiple}."
            )
        return size

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor

    def check_layers(self, layers: Union[str, Iterable[str]]) -> list[str]:
        """Validate layer names (diffusers aliases such as ``mid_block`` become canonical); ``ValueError`` lists the valid ones."""
        names = [canonical_layer(n) for n in ([layers] if isinstance(layers, str) else list(layers))]
        if not names:
            raise ValueError(f"No layer requested; valid layers of {self.name!r}: {', '.join(self.layers)}.")
        unknown = [n for n in names if n not in self._layer_modules]
        if unknown:
            raise ValueError(
                f"Unknown layer(s) {unknown} for {self.name!r} ({self.family}); valid layers: "
                f"{', '.join(self.layers)}."
            )
        return list(dict.fromkeys(names))

    def check_timesteps(self, timesteps: Union[int, Iterable[int]]) -> list[int]:
        """Validate timesteps (an int or a sequence of ints); ``ValueError`` gives the valid range."""
        if isinstance(timesteps, (str, bytes)):
            values: list[Any] = [timesteps]
        else:
            try:
                values = list(timesteps)  # type: ignore[arg-type]
            except TypeError:
                values = [timesteps]
        if not values:
            raise ValueError(f"No timestep requested; valid timesteps are integers 0..{self.num_train_timesteps - 1}.")
        out = []
        for t in values:
            try:
                ok = not isinstance(t, (bool, str, bytes)) and int(t) == t and 0 <= int(t) < self.num_train_timesteps
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(
                    f"Timestep {t!r} is not valid for {self.name!r}: timesteps must be integers "
                    f"in [0, {self.num_train_timesteps}) i.e. 0..{self.num_train_timesteps - 1}."
                )
            out.append(int(t))
        return list(dict.fromkeys(out))

    def feature_shape(self, layer: str) -> tuple[int, int, int]:
        """C×H×W of ``layer`` at :attr:`image_size` (from the config, no forward pass)."""
        return self._shapes[self.check_layers(layer)[0]]

    def channels(self, layer: str) -> int:
        """Channel count C of ``layer`` (the ``d_in`` of a pooled SAE on it)."""
        return self.feature_shape(layer)[0]

    def recipe(
        self, layer: str, t: int, granularity: str = "pooled", ensemble: int = 1, seed: int = 0
    ) -> FeatureRecipe:
        """The :class:`FeatureRecipe` of features from :meth:`extract` with these settings."""
        layer = self.check_layers(layer)[0]
        t = self.check_timesteps(t)[0]
        if granularity not in ("pooled", "token", "spatial"):
            raise ValueError(f"granularity must be 'pooled', 'token' or 'spatial', got {granularity!r}.")
        return FeatureRecipe(
            backbone=self.name, layer=layer, timestep=t, image_size=self.image_size,
            d_in=self.channels(layer), granularity=granularity, revision=self.revision,
            prompt=self.prompt, noise_seed=int(seed), ensemble=int(ensemble), family=self.family,
            resize=self.resize,
        )

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (PIL any mode, arrays, tensors) -> B×3×S×S float32 in [-1, 1] on the CPU."""
        return to_model_tensor(images, self.image_size, self.resize)

    # ------------------------------------------------------------ extraction

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×S×S pixels in [-1, 1] -> float32 latents (``latent_dist.mode() × scaling_factor``)."""
        if self.vae is None:
            return pixels.to(self.device, torch.float32)
        x = pixels.to(self.device, self.vae_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        latents = self.vae.encode(x).latent_dist.mode().float()
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor

    @torch.inference_mode()
    def features_at(
        self, latents: torch.Tensor, image_ids: Sequence[int], t: int, layers: Sequence[str],
        seed: int = 0, member: int = 0,
    ) -> dict[str, torch.Tensor]:
        """One noise draw: noise ``latents`` to ``t`` and return the requested maps (float32, on device)."""
        noise = batch_noise(latents.shape[1:], seed, image_ids, t, member).to(latents.device)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents.float(), noise, steps)
        noisy = noisy.to(self.dtype)
        if self.channels_last and noisy.ndim == 4:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        store = self._taps.run(lambda: self._denoise(noisy, steps), layers, early_exit=self.early_exit)
        return {name: self._to_map(name, store[name]).float() for name in layers}

    def extract(
        self,
        images: Any,
        layers: Union[str, Sequence[str]],
        timesteps: Union[int, Sequence[int]],
        pool: Optional[str] = None,
        seed: int = 0,
        ensemble: int = 1,
        batch_size: int = 8,
        image_ids: Optional[Sequence[int]] = None,
        progress: bool = False,
    ) -> dict[LayerKey, torch.Tensor]:
        """Features of ``images`` at every requested (layer, timestep).

        Returns ``{(layer, t): tensor}``, float32 on the CPU: ``B×C×H×W`` maps,
        or ``B×C`` with ``pool="mean"``. ``image_ids`` (default ``range(B)``)
        seed each image's noise, so an image gets the same features in any batch.
        ``ensemble=n`` averages the features over n noise draws. Images are
        preprocessed batch by batch (see :meth:`preprocess`).
        """
        items = _as_list(images)
        return self._extract(len(items), lambda a, b: self.preprocess(items[a:b]), layers, timesteps,
                             pool, seed, ensemble, batch_size, image_ids, progress)

    def extract_pixels(
        self,
        pixels: torch.Tensor,
        layers: Union[str, Sequence[str]],
        timesteps: Union[int, Sequence[int]],
        pool: Optional[str] = None,
        seed: int = 0,
        ensemble: int = 1,
        batch_size: int = 8,
        image_ids: Optional[Sequence[int]] = None,
        progress: bool = False,
    ) -> dict[LayerKey, torch.Tensor]:
        """:meth:`extract` on already preprocessed ``B×3×S×S`` pixels in ``[-1, 1]``.

        For pipelines that preprocess in data-loader workers (``to_model_tensor``)
        so the accelerator never waits for image decoding and resizing.
        """
        expected = (3, self.image_size, self.image_size)
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"pixels must be a B×{expected[0]}×{expected[1]}×{expected[2]} tensor in [-1, 1] "
                             f"(see Backbone.preprocess), got {shape}.")
        return self._extract(pixels.shape[0], lambda a, b: pixels[a:b], layers, timesteps,
                             pool, seed, ensemble, batch_size, image_ids, progress)

    def _extract(self, count: int, get_pixels: Any, layers: Any, timesteps: Any, pool: Optional[str],
                 seed: int, ensemble: int, batch_size: int, image_ids: Optional[Sequence[int]],
                 progress: bool) -> dict[LayerKey, torch.Tensor]:
        layers = self.check_layers(layers)
        steps = self.check_timesteps(timesteps)
        if pool not in (None, "mean"):
            raise ValueError(f"pool must be None (full maps) or 'mean' (B×C vectors), got {pool!r}.")
        if int(ensemble) < 1:
            raise ValueError(f"ensemble must be a positive number of noise draws, got {ensemble}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if count == 0:
            raise ValueError("No images given.")
        ids = list(range(count)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != count:
            raise ValueError(f"Got {len(ids)} image_ids for {count} images; give one id per image.")
        batch_size, ensemble = int(batch_size), int(ensemble)

        results: dict[LayerKey, list[torch.Tensor]] = {(l, t): [] for l in layers for t in steps}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=count, desc=f"extract {self.family}", unit="img")
        try:
            for start in range(0, count, batch_size):
                chunk_ids = ids[start:start + batch_size]
                latents = self.encode(get_pixels(start, start + batch_size))  # once per batch, reused below
                for t in steps:
                    sums: dict[str, torch.Tensor] = {}
                    for member in range(ensemble):
                        feats = self.features_at(latents, chunk_ids, t, layers, seed=seed, member=member)
                        for name, value in feats.items():
                            sums[name] = value if name not in sums else sums[name] + value
                    for name, total in sums.items():
                        value = total / ensemble if ensemble > 1 else total
                        if pool == "mean":
                            value = value.mean(dim=(-2, -1))
                        results[(name, t)].append(value.cpu().contiguous())
                if bar is not None:
                    bar.update(len(chunk_ids))
        finally:
            if bar is not None:
                bar.close()
        return {key: torch.cat(chunks) for key, chunks in results.items()}

    def to(self, device: Union[str, torch.device]) -> "Backbone":
        """Move the networks and the cached conditioning to ``device``, in place; returns self.

        The app loads on the CPU and moves here inside its GPU call (ZeroGPU's
        pattern). Dtypes stay as they are; :attr:`conditioning` stays on the CPU
        (it is the cacheable copy).
        """
        device = torch.device(device)
        if device == self.device:
            return self
        for name, value in list(vars(self).items()):
            if name == "conditioning":
                continue
            if isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, name, value.to(device))
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                setattr(self, name, {k: v.to(device) for k, v in value.items()})
        self.device = device
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, image_size={self.image_size}, "
                f"layers={self.layers}, device={str(self.device)!r}, dtype={self.dtype})")
