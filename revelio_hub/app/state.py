"""What the app keeps in memory between requests, and why each cache exists.

One process serves many users, so three things are loaded or computed once:

* **Releases** (:class:`LoadedRelease`): the metadata (``release.json``, card,
  examples) is read at start-up; each ``(layer, t)`` entry's SAE, Diff-C and
  atlas are loaded on first use and kept.
* **Backbones** (:class:`BackboneCache`): the diffusion model is by far the
  largest object. It is cached by backbone id (plus device and dtype), so
  switching layer, timestep, or even between two releases of the same backbone
  never reloads it.
* **Features** (:class:`FeatureCache`): one backbone pass per image and
  timestep. The pass reads every layer the release offers at that timestep, so
  switching layer, selecting another neuron, or asking for the heat map reuses
  the stored maps (LRU keyed by image hash, release and t).

All three are guarded by locks: the Gradio queue runs several events at once,
and loads of any kind run one at a time (``from_pretrained`` patches global
torch state while it builds a model). Backbone passes run side by side on the
one shared model: each pass captures its layers into a store of its own
(:mod:`revelio_hub.backbones.capture`), so a cached feature map is always the
one computed for its key's image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional, Sequence

import torch

from revelio_hub.app.decoded_images import DecodedImages
from revelio_hub.app.gpu import GPU_DURATION_S, call_device, gpu_task, load_device
from revelio_hub.app.workers import BackboneWorkers
from revelio_hub.layer_names import canonical_layer
from revelio_hub.release import Release

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

#: Environment variable naming releases (comma-separated ids or paths) when ``--release`` is not given.
RELEASE_ENV = "REVELIO_RELEASE"
_REPO_ROOT = Path(__file__).resolve().parents[2]
#: The bundled default release (the toy shapes model), used when no release is named.
DEFAULT_RELEASE_PATH = _REPO_ROOT / "releases" / "toy-shapes"

_DTYPES = ("float32", "float16", "bfloat16")

#: Held while any model is loaded. ``from_pretrained`` of diffusers (and of other
#: Hub mixins) patches process-wide state while it builds a model: torch's
#: ``nn.init`` functions, accelerate's empty-weight parameter registration, the
#: default dtype. A k-SAE built in one thread while a backbone loads in another
#: came out with meta tensors ("Cannot copy out of meta tensor"), so loads of
#: any kind run one at a time. Backbone passes do not take it.
_LOAD_LOCK = threading.RLock()


#: Other layers' SAEs join the out-of-distribution check only when this small (d_in × n_latents), so a
#: release of paper-sized SAEs (1280 × 81,920) never loads extra SAEs for it; the toy release checks all.
OOD_EXTRA_SAE_MAX_PARAMS = 20_000_000

#: Gradio temp-file cleanup, ``(frequency, age)`` in seconds: every 10 minutes, delete the
#: uploads and generated images older than an hour (see :mod:`revelio_hub.app.temp_files`).
DEFAULT_DELETE_CACHE = (600, 3600)


def default_release_ids() -> list[str]:
    """Release ids from ``$REVELIO_RELEASE`` (comma-separated), else the bundled toy release."""
    env = os.environ.get(RELEASE_ENV, "")
    ids = [part.strip() for part in env.split(",") if part.strip()]
    return ids or [str(DEFAULT_RELEASE_PATH)]


def default_concurrency() -> int:
    """How many analyses may run at once: one per core (at most 4).

    One request is one image: intra-op parallelism inside a single small
    forward pass buys little and, on a busy machine, costs a lot (threads
    spin-waiting for each other: measured 219 ms vs 3.7 ms per toy analysis on
    a loaded 2-core box with 2 vs 1 torch threads). Running requests side by
    side, one thread each, uses the cores better. See :func:`default_threads`.
    """
    return max(1, min(4, os.cpu_count() or 1))


def default_threads(concurrency: int) -> int:
    """torch CPU threads per process so that ``concurrency`` requests share the cores without oversubscription."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


@dataclass
class AppConfig:
    """Settings of one app process (mirrors ``app.py``'s command line).

    Attributes:
        releases: release ids (Hub) or local folders; the first is the default.
        device: torch device for the backbone (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or ``auto``: load on
            the CPU and run the backbone on CUDA when the GPU call finds it (ZeroGPU, :mod:`revelio_hub.app.gpu`).
        dtype: backbone dtype; SAE/Diff-C/atlas always run in float32.
        feature_cache_size: images × timesteps whose feature maps are kept (LRU).
        top_neurons: how many of an image's strongest neurons are listed.
        top_images: how many top-activating dataset images are shown per neuron.
        top_classes: how many predicted classes are shown.
        concurrency: events run at once (``None``: :func:`default_concurrency`).
        queue_size: requests waiting beyond that before new ones are refused.
        workers: processes that run the backbone passes (CPU only; 0: passes run in this process).
            Python in one process takes turns on one lock, so a worker lets a CPU server use a
            second core (:mod:`revelio_hub.app.workers`; ``app.py`` picks one on 2+ cores).
        delete_cache: ``(frequency, age)`` in seconds, as Gradio's ``delete_cache``:
            every ``frequency`` s, uploads and generated images older than ``age`` s are
            deleted, and the empty folders they leave (:mod:`revelio_hub.app.temp_files`);
            ``None`` keeps them forever.
    """

    releases: list[str] = field(default_factory=default_release_ids)
    device: str = "cpu"
    dtype: str = "float32"
    feature_cache_size: int = 64
    top_neurons: int = 10
    top_images: int = 10
    top_classes: int = 5
    concurrency: Optional[int] = None
    queue_size: int = 64
    workers: int = 0
    delete_cache: Optional[tuple[int, int]] = DEFAULT_DELETE_CACHE

    def __post_init__(self) -> None:
        if not self.releases:
            raise ValueError("At least one release is needed (a Hub id or a local release folder).")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}.")
        if self.feature_cache_size < 1:
            raise ValueError(f"feature_cache_size must be at least 1, got {self.feature_cache_size}.")
        for name in ("top_neurons", "top_images", "top_classes", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.concurrency is None:
            self.concurrency = default_concurrency()
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be a whole number ≥ 0, got {self.workers!r}.")
        if self.workers and self.device != "cpu":
            raise ValueError(
                f"Backbone worker processes run on the CPU only (device is {self.device!r}); use workers=0 "
                "(on a GPU the kernels already run outside Python's lock)."
            )
        if self.delete_cache is not None:
            pair = tuple(self.delete_cache)
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
                raise ValueError(
                    f"delete_cache must be (frequency, age), two positive whole numbers of seconds, or None; "
                    f"got {self.delete_cache!r}."
                )
            self.delete_cache = pair

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class FeatureCache:
    """A thread-safe LRU map from a hashable key to computed feature maps."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = int(maxsize)
        self._data: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data


class FeatureMaps(dict):
    """``{layer: 1×C×H×W map}`` of one backbone pass, kept with what was computed on them in the same call.

    ``errors``: ``{layer: SAE reconstruction error}`` of the release's small
    SAEs when a backbone worker ran the pass (it computes them next to the
    pass, :mod:`revelio_hub.app.workers`); empty when the pass ran in this
    process. One cache entry holds both, so they cannot drift apart.
    """

    def __init__(self, maps: dict[str, "torch.Tensor"], errors: Optional[dict[str, float]] = None) -> None:
        super().__init__(maps)
        self.errors: dict[str, float] = dict(errors or {})


class BackboneCache:
    """One backbone per key (backbone id, device, dtype, image size) for the life of the process.

    ``loads`` counts real loads, so tests (and curious operators) can check that
    switching layer, timestep or release did not reload the model.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, ...], Any] = {}
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._guard = threading.Lock()
        self.loads = 0

    def get(self, key: tuple[str, ...], loader: Callable[[], Any]) -> Any:
        model = self._models.get(key)
        if model is not None:
            return model
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # only one thread loads a given backbone; the others wait for it
            model = self._models.get(key)
            if model is None:
                logger.info("Loading backbone %s", " / ".join(map(str, key)))
                with _LOAD_LOCK:
                    model = loader()
                self._models[key] = model
                self.loads += 1
        return model

    def __len__(self) -> int:
        return len(self._models)


def image_digest(image: "Image.Image") -> str:
    """A content hash of an RGB image: the same pixels give the same key, whatever the file name."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class LoadedRelease:
    """A release as the app uses it: metadata now, entries on demand.

    Attributes:
        id: the id or path the user gave (what the release dropdown and ``/analyze_json`` accept).
        name: a short display name (the folder or repo name).
        release: the :class:`revelio_hub.release.Release`.
    """

    def __init__(self, release_id: str, release: Any) -> None:
        self.id = release_id
        self.release = release
        self.name = str(getattr(release, "name", "") or Path(release_id.rstrip("/\\")).name or release_id)
        self._entries: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, release_id: str) -> "LoadedRelease":
        return cls(release_id, Release.from_pretrained(release_id))

    # ----------------------------------------------------------------- metadata

    @property
    def entries(self) -> list[tuple[str, int]]:
        """``(layer, t)`` pairs in the release's own order."""
        return [(str(layer), int(t)) for layer, t in self.release.entries]

    @property
    def layers(self) -> list[str]:
        seen: list[str] = []
        for layer, _ in self.entries:
            if layer not in seen:
                seen.append(layer)
        return seen

    def timesteps(self, layer: Optional[str] = None) -> list[int]:
        """Timesteps offered for ``layer`` (all timesteps when ``layer`` is None), ascending."""
        return sorted({t for l, t in self.entries if layer is None or l == layer})

    def default_entry(self) -> tuple[str, int]:
        entries = self.entries
        if not entries:
            raise ValueError(f"Release {self.name!r} has no entries.")
        return entries[0]

    def check_entry(self, layer: str, t: int) -> tuple[str, int]:
        """Validate a (layer, t) choice (diffusers layer names become canonical); the error lists what this release offers."""
        layer = canonical_layer(layer)
        try:
            t = int(t)
        except (TypeError, ValueError):
            raise ValueError(f"Timestep must be an integer, got {t!r}.") from None
        if (layer, t) not in self.entries:
            offered = ", ".join(f"{l} t={tt}" for l, tt in self.entries)
            if layer not in self.layers:
                shown = repr(layer) if len(repr(layer)) <= 60 else repr(str(layer)[:57]) + "…"
                raise ValueError(f"Layer {shown} is not in release {self.name!r}; it offers: {offered}.")
            raise ValueError(
                f"Timestep {t} is not available for layer {layer!r} in release {self.name!r}; "
                f"available: {', '.join(map(str, self.timesteps(layer)))}."
            )
        return layer, t

    def small_sae_layers(self, t: int, max_params: Optional[int] = None) -> list[str]:
        """Layers at ``t`` with an atlas and an SAE of at most ``max_params`` (d_in × n_latents) weights.

        Their reconstruction errors join the out-of-distribution check of every
        layer at ``t``; ``max_params`` defaults to :data:`OOD_EXTRA_SAE_MAX_PARAMS`.
        """
        limit = OOD_EXTRA_SAE_MAX_PARAMS if max_params is None else max_params
        out = []
        for item in (getattr(self.release, "config", None) or {}).get("entries", []):
            sae = (item.get("metrics") or {}).get("sae") or {}
            size = (sae.get("d_in") or 0) * (sae.get("n_latents") or 0)
            if int(item["timestep"]) == int(t) and item.get("atlas") and 0 < size <= limit:
                out.append(str(item["layer"]))
        return out

    @property
    def image_size(self) -> Optional[int]:
        """Input size the release's SAEs were trained at (``release.json``), if recorded."""
        size = (getattr(self.release, "config", None) or {}).get("image_size")
        return int(size) if size else None

    @property
    def card(self) -> str:
        """The model card's markdown, without its YAML metadata block (the About tab shows the prose)."""
        text = str(self.release.card or "")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            if end != -1:
                text = text[end + 4:].lstrip("\n")
        return text

    @property
    def examples(self) -> list[tuple[str, str]]:
        """``(image path, caption)`` pairs the release ships as examples."""
        return [(str(path), str(caption)) for path, caption in (self.release.examples or [])]

    @property
    def local_dir(self) -> Optional[Path]:
        """The folder holding the release's files (a local release, or its Hub download in the cache)."""
        for attr in ("path",):
            value = getattr(self.release, attr, None)
            if isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
                return Path(value).resolve()
        if Path(self.id).is_dir():
            return Path(self.id).resolve()
        return None

    # ------------------------------------------------------------------ entries

    def entry(self, layer: str, t: int) -> Any:
        """The ``ReleaseEntry(sae, diffc, atlas)`` of ``(layer, t)``, loaded once, in eval mode."""
        key = self.check_entry(layer, t)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                with _LOAD_LOCK:
                    entry = self.release.load(*key)
                for module in (getattr(entry, "sae", None), getattr(entry, "diffc", None)):
                    if module is not None and hasattr(module, "eval"):
                        module.eval()
                self._entries[key] = entry
        return entry

    def backbone_key(self, device: str, dtype: str) -> tuple[str, str, str]:
        """Cache key of this release's backbone: releases sharing a backbone share one model.

        A Hub backbone is identified by id and revision; an embedded backbone
        folder belongs to its release (two releases may embed different weights
        under the same recorded id).
        """
        rel = self.release
        embedded = getattr(rel, "embedded_backbone", None)
        if embedded:
            ident = str((Path(rel.path) / embedded).resolve())
        else:
            ident = str(rel.backbone_id)
            revision = getattr(rel, "backbone_revision", None)
            if revision:
                ident = f"{ident}@{revision}"
        return (ident, device, dtype)


class AppState:
    """Everything one app process holds: the releases and the shared caches.

    Create it with :meth:`from_config`; the UI and the API functions in
    :mod:`revelio_hub.app.analysis` take it as their first argument.
    """

    def __init__(self, config: AppConfig, releases: Sequence[LoadedRelease]) -> None:
        if not releases:
            raise ValueError("AppState needs at least one release.")
        self.config = config
        self.releases: dict[str, LoadedRelease] = {}
        taken: set[str] = set()
        for rel in releases:
            # Users (dropdown, API, errors) see names, never server paths: make them unique.
            base, n = rel.name, 1
            while rel.name in taken:
                n += 1
                rel.name = f"{base} ({n})"
            taken.add(rel.name)
            self.releases[rel.id] = rel
        self.default_id = releases[0].id
        self.backbones = BackboneCache()
        self.features = FeatureCache(config.feature_cache_size)
        # Uploads decoded once: naming one upload again costs a hash of its bytes (decoded_images.py).
        self.decoded = DecodedImages()
        self.backbone_calls = 0  # backbone passes run (cache misses), for tests and the benchmark
        self._move_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        # The one GPU-holding step (ZeroGPU's spaces.GPU when installed, else the plain method).
        self._gpu_backbone_pass = gpu_task(GPU_DURATION_S)(self._backbone_pass)
        # CPU: backbone passes in worker processes, which hold the backbone (see revelio_hub.app.workers).
        self.workers = None
        if config.workers:
            # Each worker builds a state of its own from the same settings, with no workers of its own.
            self.workers = BackboneWorkers(partial(AppState.from_config, replace(config, workers=0)), config.workers)

    @classmethod
    def from_config(cls, config: AppConfig) -> "AppState":
        loaded = []
        for rid in config.releases:
            if Path(rid) == DEFAULT_RELEASE_PATH and not (DEFAULT_RELEASE_PATH / "release.json").is_file():
                raise ValueError(
                    f"The bundled toy release is missing ({DEFAULT_RELEASE_PATH}). Build it with "
                    "`python training/build_toy_release.py`, or name a release with --release / $REVELIO_RELEASE."
                )
            try:
                loaded.append(LoadedRelease.open(rid))
            except Exception as exc:  # say which release failed, keep the cause
                raise ValueError(f"Could not load release {rid!r}: {exc}") from exc
        return cls(config, loaded)

    # ------------------------------------------------------------------ lookup

    @property
    def release_ids(self) -> list[str]:
        return list(self.releases)

    @property
    def release_names(self) -> list[str]:
        """The names users see (unique within the app; ids may be server paths and are never shown)."""
        return [rel.name for rel in self.releases.values()]

    def get_release(self, release_id: Optional[str] = None) -> LoadedRelease:
        """The release named ``release_id`` (its name, id or path); ``None``/``""`` is the default.

        The error lists release *names* only: ids may be server paths.
        """
        if not release_id:
            return self.releases[self.default_id]
        release_id = str(release_id).strip()
        for rel in self.releases.values():  # names first: they are unique, ids' folder names may not be
            if release_id == rel.name:
                return rel
        if release_id in self.releases:
            return self.releases[release_id]
        for rel in self.releases.values():
            if release_id == Path(rel.id.rstrip("/\\")).name or (
                os.path.normpath(release_id) == os.path.normpath(rel.id)
            ):
                return rel
        shown = repr(release_id) if len(release_id) <= 60 else repr(release_id[:59] + "…")
        raise ValueError(
            f"Unknown release {shown}; this app serves: {', '.join(self.release_names)} "
            "(or pass \"\" for the default)."
        )

    # ----------------------------------------------------------------- compute

    def backbone(self, rel: LoadedRelease, image_size: Optional[int] = None) -> Any:
        """The release's backbone, loaded once per (backbone, device, dtype, image size) for the process."""
        cfg = self.config
        size = int(image_size or rel.image_size or 0) or None
        key = rel.backbone_key(cfg.device, cfg.dtype) + (str(size),)
        return self.backbones.get(
            key, lambda: rel.release.load_backbone(device=load_device(cfg.device), dtype=cfg.torch_dtype, image_size=size)
        )

    def warmup(self) -> None:
        """Load the default release's backbone and first entry (run in the background after launch)."""
        try:
            rel = self.get_release()
            if self.workers is not None:
                self.workers.load(rel.id, rel.image_size)
            else:
                self.backbone(rel)
            rel.entry(*rel.default_entry())
        except Exception:  # the first request will report the problem to the user
            logger.exception("Warm-up failed")

    def close(self) -> None:
        """Stop the backbone worker processes, if any (the server is shutting down)."""
        if self.workers is not None:
            self.workers.close()

    @staticmethod
    def feature_key(digest: str, rel: LoadedRelease, t: int, recipe: Optional[dict] = None) -> tuple:
        """Feature-cache key: image content, release, t, and the recipe's image size, noise seed and ensemble."""
        recipe = recipe or {}
        size = int(recipe.get("image_size") or rel.image_size or 0) or None
        return (digest, rel.id, int(t), size, int(recipe.get("noise_seed") or 0), int(recipe.get("ensemble") or 1))

    def feature_maps(
        self,
        image: "Image.Image",
        rel: LoadedRelease,
        t: int,
        recipe: Optional[dict] = None,
        *,
        digest: Optional[str] = None,
        progress: Optional[Callable[[float, str], None]] = None,
    ) -> FeatureMaps:
        """Unpooled ``1×C×H×W`` maps of every layer ``rel`` offers at ``t``, from the cache when possible.

        One backbone pass captures all those layers at once, so switching layer
        afterwards is free. ``recipe`` (the consuming model's feature recipe)
        supplies the image size, noise seed and ensemble size, so the app sees
        the features the SAE or Diff-C was trained on.
        """
        digest = digest or image_digest(image)
        key = self.feature_key(digest, rel, t, recipe)
        _, _, _, size, seed, ensemble = key
        maps = self.features.get(key)
        if maps is not None:
            return maps
        layers = [l for l, tt in rel.entries if tt == int(t)]
        if progress:
            progress(0.1, "Loading the diffusion backbone…")
        if self.workers is None:
            self.backbone(rel, size)  # load here (CPU under ZeroGPU), so the GPU worker inherits it
        if progress:
            progress(0.4, f"Running the backbone at t={t}…")
        if self.workers is not None:
            # The worker also runs the small SAEs of the OOD check on the maps: less work in this process.
            small = [l for l in rel.small_sae_layers(int(t)) if l in layers]
            maps = FeatureMaps(*self.workers.features(rel.id, image, layers, int(t), size, seed, ensemble, small))
        else:
            maps = FeatureMaps(self._gpu_backbone_pass(rel.id, image, layers, int(t), size, seed, ensemble))
        with self._calls_lock:
            self.backbone_calls += 1
        self.features.put(key, maps)
        return maps

    def _backbone_pass(
        self, release_id: str, image: "Image.Image", layers: list[str], t: int, size: Optional[int], seed: int, ensemble: int
    ) -> dict[str, "torch.Tensor"]:
        """One backbone pass: ``{layer: 1×C×H×W}`` float32 CPU maps. The step that holds a GPU.

        Pure by design: on ZeroGPU it runs in a worker process, so it takes and
        returns picklable values and leaves caching to the caller.
        """
        backbone = self.backbone(self.get_release(release_id), size)
        device = call_device(self.config.device)
        if backbone.device != torch.device(device):
            with self._move_lock:
                backbone.to(device)
        with torch.inference_mode():
            out = backbone.extract([image], layers, [t], pool=None, seed=seed, ensemble=ensemble)
        return {layer: out[(layer, t)].float().cpu() for layer in layers}


__all__ = [
    "AppConfig",
    "AppState",
    "BackboneCache",
    "FeatureCache",
    "FeatureMaps",
    "LoadedRelease",
    "DEFAULT_RELEASE_PATH",
    "OOD_EXTRA_SAE_MAX_PARAMS",
    "RELEASE_ENV",
    "default_release_ids",
    "DEFAULT_DELETE_CACHE",
    "default_concurrency",
    "default_threads",
    "image_digest",
]
