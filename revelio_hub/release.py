"""Release bundles: one backbone × dataset, several (layer, timestep) entries, on the Hub or on disk.

A release is what users and the app load: per entry a k-SAE, optionally a
Diff-C head, and a neuron atlas (with thumbnails, so no dataset is needed).
Layout::

    README.md                    model card (YAML metadata + metrics table + figure)
    release.json                 backbone id/revision (or embedded folder), image size, prompt,
                                 noise seed, dataset, entries with their metrics, examples
    figures/metrics.png          sigma_label and Diff-C accuracy by layer × timestep
    backbone/                    optional embedded backbone (the toy release)
    examples/                    optional example images for the app
    <layer>/t<t>/sae/            config.json + model.safetensors (+ eval.json): a standalone mixin folder
    <layer>/t<t>/diffc/          same, for the Diff-C head
    <layer>/t<t>/atlas/          stats.safetensors, atlas.json, thumbnails/
    <layer>/t<t>/reliability/    reliability.json (+ references.safetensors): the calibrated "Diff-C is wrong" score

:meth:`Release.from_pretrained` reads only ``release.json`` and ``README.md``;
:meth:`Release.load` downloads one entry's folder (``allow_patterns``), so a
user of ``up_ft1/t25`` never fetches the other entries. Remote releases are
pinned to the commit resolved on first access, and cached like any Hub file.

:func:`assemble_release` builds the folder from training outputs; see
``training/make_release.py`` for the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from revelio_hub import __version__
from revelio_hub.hub import download, is_local, push_folder
from revelio_hub.interpret.reliability import RELIABILITY_DIR, RELIABILITY_FILE, ReliabilityModel
from revelio_hub.layer_names import canonical_layer

__all__ = [
    "Release",
    "ReleaseEntry",
    "EntrySource",
    "assemble_release",
    "check_release_inputs",
    "default_examples",
    "push_release",
    "RELEASE_FILE",
    "CARD_FILE",
    "FIGURE_FILE",
]

RELEASE_FILE = "release.json"
CARD_FILE = "README.md"
FIGURE_FILE = "figures/metrics.png"
BACKBONE_DIR = "backbone"
EXAMPLES_DIR = "examples"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: What is copied from a trainer's output folder: the loadable model, its metrics and plots.
#: Checkpoints (optimizer state) stay behind.
_MODEL_FILES = (CONFIG, WEIGHTS, "eval.json", "train_config.json", "metrics.jsonl", "confusion.png", "README.md")

PathLike = Union[str, os.PathLike]


def entry_path(layer: str, timestep: int) -> str:
    """Relative folder of one entry, e.g. ``up_ft1/t25``."""
    return f"{layer}/t{int(timestep)}"


# ---------------------------------------------------------------------- loading


@dataclass
class ReleaseEntry:
    """The models of one (layer, timestep) entry of a release."""

    layer: str
    timestep: int
    sae: Any
    diffc: Any
    atlas: Any
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    #: The entry's calibrated reliability score (:class:`revelio_hub.interpret.reliability.ReliabilityModel`),
    #: or ``None`` for an entry without Diff-C or a release calibrated before it existed.
    reliability: Any = None

    #: ``(layer, t)`` of the release's entries that have a Diff-C head (for error messages).
    diffc_entries: list[tuple[str, int]] = field(default_factory=list, repr=False)

    def __iter__(self):  # allows ``sae, diffc, atlas = release.load(...)``
        return iter((self.sae, self.diffc, self.atlas))

    def attribute(self, features: Any, target: Any = None, top: Optional[int] = 10, **kwargs: Any) -> list:
        """Which SAE neurons made this entry's Diff-C predict ``target`` (default: its top class), per image.

        Features are the Diff-C's input maps (reused: no backbone pass). Exact
        removal effects for the ``top`` neurons, first-order estimates for all
        active ones; see :func:`revelio_hub.interpret.attribution.attribute`.
        """
        if self.sae is None or self.diffc is None:
            missing = "k-SAE" if self.sae is None else "Diff-C head"
            both = ", ".join(f"{l} t={t}" for l, t in self.diffc_entries) or "none"
            raise ValueError(
                f"Entry {self.layer} t={self.timestep} has no {missing}, so its predictions cannot be attributed "
                f"to neurons. Entries with both a k-SAE and a Diff-C: {both}."
            )
        from revelio_hub.interpret.attribution import attribute

        kwargs.setdefault("atlas", self.atlas)
        return attribute(self.sae, self.diffc, features, target, top, layer=self.layer, timestep=self.timestep, **kwargs)


def _read_json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{what}: {file} is missing")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); the release is corrupted") from error


def _check_model_folder(folder: Path, kind: str) -> None:
    """Fail with the file's name if a mixin folder's config or weights are missing or unreadable."""
    _read_json(folder / CONFIG, f"the {kind} of this release entry is incomplete")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"the {kind} of this release entry is incomplete: {weights} is missing")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # reading every tensor validates offsets against the file size
                f.get_slice(key)
    except Exception as error:
        raise ValueError(f"{weights} is corrupt or truncated ({type(error).__name__}: {error})") from error


def _load_model(cls: Any, folder: Path, kind: str, device: Union[str, torch.device]) -> Any:
    _check_model_folder(folder, kind)
    try:
        model = cls.from_pretrained(str(folder))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as error:  # safetensors errors on a file that passed the header check
        raise ValueError(f"Cannot load the {kind} in {folder}: {type(error).__name__}: {error}") from error
    return model.to(device).eval()


class Release:
    """A release opened from a local folder or a Hub repo (see the module docstring for the layout).

    Attributes:
        id: the repo id or folder as given.
        path: local folder holding the files fetched so far (the snapshot in the
            Hub cache for a remote release).
        revision: the commit a remote release is pinned to (``None`` for folders).
        config: the parsed ``release.json``.
        card: the model card text (``README.md``).
    """

    def __init__(self, id: str, path: Path, config: dict[str, Any], card: str, *, remote: bool,
                 revision: Optional[str] = None, token: Optional[Union[str, bool]] = None,
                 cache_dir: Optional[PathLike] = None) -> None:
        self.id = id
        self.path = path
        self.config = config
        self.card = card
        self.remote = remote
        self.revision = revision
        self._token = token
        self._cache_dir = cache_dir
        self._validate_config()

    # ------------------------------------------------------------------ opening
    @classmethod
    def from_pretrained(cls, repo_id_or_path: PathLike, revision: Optional[str] = None,
                        token: Optional[Union[str, bool]] = None, cache_dir: Optional[PathLike] = None,
                        local_files_only: bool = False) -> "Release":
        """Open a release; only ``release.json`` and ``README.md`` are read (downloaded) now."""
        ident = os.fspath(repo_id_or_path)
        if is_local(ident):
            if revision is not None:
                raise ValueError(f"revision={revision!r} only applies to Hub repos, but {ident!r} is a local folder")
            root = Path(ident).expanduser()
            remote, pinned = False, None
        else:
            if ident.count("/") != 1 or ident.startswith(("/", ".", "~")):
                raise ValueError(
                    f"{ident!r} is not an existing folder nor a Hub repo id of the form 'owner/name'"
                )
            try:
                root = download(ident, [RELEASE_FILE, CARD_FILE], revision=revision, token=token,
                                cache_dir=cache_dir, local_files_only=local_files_only)
            except ValueError as error:  # say both halves: a user who meant a folder learns it is not there
                raise ValueError(
                    f"There is no local folder {ident!r} (looked for {Path(ident).expanduser().absolute()}), "
                    f"and as a Hub repo: {error}"
                ) from error
            remote, pinned = True, root.name  # snapshot folders are named after the commit
        config_file = root / RELEASE_FILE
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{ident!r} is not a Revelio Hub release: {RELEASE_FILE} is missing"
                + (f" (looked in {root})" if not remote else "")
            )
        config = _read_json(config_file, "not a release")
        card_file = root / CARD_FILE
        card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
        return cls(ident, root, config, card, remote=remote, revision=pinned, token=token, cache_dir=cache_dir)

    def _validate_config(self) -> None:
        file = self.path / RELEASE_FILE
        if not isinstance(self.config, dict):
            raise ValueError(f"{file} must hold a JSON object")
        entries = self.config.get("entries")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{file} lists no entries (expected 'entries': [{{'layer': ..., 'timestep': ...}}, ...])")
        for item in entries:
            if not isinstance(item, dict) or "layer" not in item or "timestep" not in item:
                raise ValueError(f"{file} has a malformed entry {item!r}: each needs 'layer' and 'timestep'")

    def _fetch(self, patterns: Sequence[str]) -> Path:
        """Make sure files matching ``patterns`` are local (download them for a remote release)."""
        if not self.remote:
            return self.path
        return download(self.id, patterns, revision=self.revision, token=self._token, cache_dir=self._cache_dir)

    # ------------------------------------------------------------------ metadata
    def __repr__(self) -> str:
        where = f"{self.id}@{self.revision[:8]}" if self.remote and self.revision else self.id
        return f"Release({where!r}, backbone={self.backbone_id!r}, entries={self.entries})"

    @property
    def name(self) -> str:
        return str(self.config.get("name") or Path(self.id).name)

    @property
    def entries(self) -> list[tuple[str, int]]:
        """The (layer, timestep) pairs this release provides, in release order."""
        return [(str(e["layer"]), int(e["timestep"])) for e in self.config["entries"]]

    @property
    def backbone_id(self) -> str:
        """The backbone's id as recorded in every recipe of this release."""
        return str(self.config.get("backbone"))

    @property
    def backbone_revision(self) -> Optional[str]:
        return self.config.get("backbone_revision")

    @property
    def embedded_backbone(self) -> Optional[str]:
        """Relative folder of an embedded backbone (``"backbone"``), or ``None``."""
        return self.config.get("embedded_backbone")

    @property
    def class_names(self) -> list[str]:
        return list((self.config.get("dataset") or {}).get("class_names") or [])

    @property
    def examples(self) -> list[tuple[str, str]]:
        """``(local image path, caption)`` of the example images listed in ``release.json`` (downloaded)."""
        items = self.config.get("examples") or []
        if not items:
            return []
        root = self._fetch([f"{EXAMPLES_DIR}/**"])
        out = []
        for item in items:
            file = item["file"] if isinstance(item, dict) else str(item)
            caption = (item.get("label") or item.get("caption")) if isinstance(item, dict) else None
            if (root / file).is_file():
                out.append((str(root / file), str(caption or Path(file).stem)))
        return out

    @property
    def diffc_entries(self) -> list[tuple[str, int]]:
        """The (layer, timestep) entries that have both a k-SAE and a Diff-C head, per ``release.json``."""
        return [(str(e["layer"]), int(e["timestep"])) for e in self.config["entries"]
                if e.get("diffc") and e.get("sae", True)]

    def entry_metrics(self, layer: str, timestep: int) -> dict[str, Any]:
        return dict(self._entry_config(layer, timestep).get("metrics") or {})

    def _entry_config(self, layer: str, timestep: int) -> dict[str, Any]:
        try:
            timestep = int(timestep)
        except (TypeError, ValueError):
            raise ValueError(f"timestep must be an integer, got {timestep!r}") from None
        layer = canonical_layer(layer)
        for item in self.config["entries"]:
            if str(item["layer"]) == layer and int(item["timestep"]) == timestep:
                return item
        offered = ", ".join(f"({l}, {t})" for l, t in self.entries)
        raise ValueError(f"Release {self.name!r} has no entry ({layer}, {timestep}); it offers: {offered}")

    # ------------------------------------------------------------------ entries
    def load(self, layer: str, timestep: int, *, device: Union[str, torch.device] = "cpu",
             load_atlas: bool = True) -> ReleaseEntry:
        """Load the SAE, Diff-C (or ``None``) and atlas (or ``None``) of one entry.

        Only ``<layer>/t<timestep>/**`` is downloaded. Missing or corrupt files
        raise an error naming the file.
        """
        from revelio_hub.interpret.atlas_model import NeuronAtlas
        from revelio_hub.diffc.model import DiffC
        from revelio_hub.sae.model import KSparseAutoencoder

        item = self._entry_config(layer, timestep)
        layer = str(item["layer"])
        rel = item.get("path") or entry_path(layer, timestep)
        root = self._fetch([f"{rel}/**"])
        folder = root / rel
        if not folder.is_dir():
            raise FileNotFoundError(f"Release {self.name!r} lists entry {rel} but its folder {folder} is missing")
        sae = _load_model(KSparseAutoencoder, folder / "sae", "k-SAE", device) if item.get("sae", True) else None
        diffc = None
        if item.get("diffc", (folder / "diffc").is_dir()):
            diffc = _load_model(DiffC, folder / "diffc", "Diff-C head", device)
        atlas = None
        if load_atlas and item.get("atlas", (folder / "atlas").is_dir()):
            atlas = NeuronAtlas.load(folder / "atlas")
        if sae is not None and atlas is not None and atlas.num_neurons != sae.n_latents:
            raise ValueError(
                f"{folder / 'atlas'} describes {atlas.num_neurons} neurons but the SAE has {sae.n_latents}; "
                "rebuild the atlas for this SAE"
            )
        reliability = None
        if item.get("reliability", False) or (folder / RELIABILITY_DIR / RELIABILITY_FILE).is_file():
            reliability = ReliabilityModel.load(folder / RELIABILITY_DIR)
        return ReleaseEntry(layer=layer, timestep=int(timestep), sae=sae, diffc=diffc, atlas=atlas, path=folder,
                            metrics=dict(item.get("metrics") or {}), diffc_entries=self.diffc_entries,
                            reliability=reliability)

    def load_backbone(self, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                      image_size: Optional[int] = None, **opts: Any) -> Any:
        """The diffusion backbone the entries were trained on.

        An embedded ``backbone/`` folder is loaded from the release and given the
        release's backbone id as its name, so feature recipes match the SAEs';
        otherwise the recorded Hub id and revision are loaded. ``image_size``
        defaults to the release's (the SAEs'); pass an entry's
        ``image_size["diffc"]`` when its Diff-C was trained at another size.
        """
        from revelio_hub.backbones import load_backbone

        image_size = image_size or self.config.get("image_size")
        if self.embedded_backbone:
            root = self._fetch([f"{self.embedded_backbone}/**"])
            folder = root / self.embedded_backbone
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"Release {self.name!r} embeds its backbone, but {folder / 'model_index.json'} is missing"
                )
            backbone = load_backbone(str(folder), device=device, dtype=dtype, image_size=image_size, **opts)
            backbone.name = self.backbone_id
            backbone.revision = self.backbone_revision
            return backbone
        return load_backbone(self.backbone_id, device=device, dtype=dtype, revision=self.backbone_revision,
                             image_size=image_size, **opts)


# ---------------------------------------------------------------------- assembling


@dataclass
class EntrySource:
    """Trained artifacts of one entry, as the trainers wrote them.

    ``layer``/``timestep`` default to the recipe in the SAE's (else Diff-C's) ``config.json``.
    """

    sae: Optional[PathLike] = None
    diffc: Optional[PathLike] = None
    atlas: Optional[PathLike] = None
    layer: Optional[str] = None
    timestep: Optional[int] = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EntrySource":
        known = {"sae", "diffc", "atlas", "layer", "timestep"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in entry {data}; valid keys: {sorted(known)}")
        return cls(**data)


def _model_info(folder: Optional[PathLike], kind: str) -> tuple[Optional[Path], dict[str, Any], dict[str, Any]]:
    """(folder, config.json, eval.json) of a trainer output folder, validated."""
    if folder is None:
        return None, {}, {}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {folder} does not exist")
    _check_model_folder(folder, kind)
    config = _read_json(folder / CONFIG, kind)
    evals = _read_json(folder / "eval.json", kind) if (folder / "eval.json").is_file() else {}
    return folder, config, evals


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _finite(x: Any) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def _averaged_neurons(summary: dict[str, Any]) -> Optional[int]:
    asked = summary.get("summary_neurons")
    if asked is None or summary.get("num_neurons") is None:
        return asked
    return min(int(asked), int(summary["num_neurons"]) - int(summary.get("dead_count") or 0))


def _entry_metrics(sae_cfg: dict, sae_eval: dict, diffc_cfg: dict, diffc_eval: dict,
                   atlas_meta: dict) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if sae_cfg:
        metrics["sae"] = {
            "d_in": sae_cfg.get("d_in"), "n_latents": sae_cfg.get("n_latents"), "k": sae_cfg.get("k"),
            "granularity": sae_cfg.get("granularity"),
            "training_recipe": sae_cfg.get("training_recipe"),
            **{k: _finite(sae_eval.get(k)) for k in ("fvu", "explained_variance", "l0", "dead_fraction", "cosine",
                                                      "original_l0_dense_pre_topk",
                                                      "original_dead_fraction_dense_pre_topk",
                                                      "original_explained_variance_uncentred")
               if k in sae_eval},
        }
        metrics["sae"] = {k: v for k, v in metrics["sae"].items() if v is not None or k != "training_recipe"}
    if diffc_cfg:
        metrics["diffc"] = {
            "head": diffc_cfg.get("head"), "num_classes": len(diffc_cfg.get("class_names") or []),
            **({"training_recipe": diffc_cfg["training_recipe"]} if diffc_cfg.get("training_recipe") else {}),
            **{k: _finite(diffc_eval.get(k)) for k in ("top1", "top5") if k in diffc_eval},
        }
        if diffc_eval.get("split"):
            metrics["diffc"]["split"] = diffc_eval["split"]
    if atlas_meta:
        summary = atlas_meta.get("summary") or {}
        metrics["atlas"] = {
            "num_images": atlas_meta.get("num_images"),
            "sigma_label": _finite(summary.get("sigma_label")),
            "sigma_label_neurons": summary.get("sigma_label_neurons"),
            "sigma_label_shuffled": _finite(summary.get("sigma_label_shuffled")),
            "topk_sigma_label": _finite(summary.get("topk_sigma_label")),
            "topk_sigma_label_neurons": summary.get("topk_sigma_label_neurons"),
            "top_images_activations": atlas_meta.get("top_images_activations"),
            "mean_purity": _finite(summary.get("mean_purity")),
            "mean_entropy": _finite(summary.get("mean_entropy")),
            "dead_fraction": _finite(summary.get("dead_fraction")),
            # the purity average covers the most frequent *live* neurons: fewer than asked on a small SAE
            "summary_neurons": _averaged_neurons(summary),
            "named_fraction": _finite(summary.get("named_fraction_alive")),
            "dense_count": summary.get("dense_count"),
            "label_columns": list((atlas_meta.get("label_columns") or {}).keys()) or None,
            "examples": atlas_meta.get("example_summaries") or None,
            # how its claims were checked, so the card can say so (version and config of the stored table)
            "claim_calibration": _claims_config(atlas_meta.get("claim_calibration")),
        }
        metrics["atlas"] = {k: v for k, v in metrics["atlas"].items() if v is not None or k == "mean_purity"}
    return metrics


def _claims_config(table: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``{"version", **config}`` of an atlas' claim table, ``None`` without one (uncalibrated summaries)."""
    if not table or not isinstance(table.get("config"), dict):
        return None
    return {"version": table.get("version"), **table["config"]}


def _hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it can only mean a Hub repo id (valid id, no local file or folder of that name), else ``None``."""
    if not name:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(name)
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def default_examples(dataset: str, split: str = "test", count: int = 4) -> list[tuple[Any, str]]:
    """``count`` images of ``dataset[split]`` for the app's example gallery: one per class, in class order.

    Returns ``(PIL image, class name)`` pairs (``assemble_release`` accepts them as examples).
    """
    import numpy as np

    from revelio_hub.data import open_image_dataset

    source = open_image_dataset(dataset, split=split)
    picked: list[tuple[Any, str]] = []
    seen: set[int] = set()
    for image_id, label in enumerate(np.asarray(source.labels).tolist()):
        if len(picked) >= count:
            break
        if label in seen and len(seen) < len(source.class_names):
            continue
        image = source.load_image(image_id)
        if image is None:
            continue
        seen.add(label)
        name = source.class_names[label] if 0 <= label < len(source.class_names) else f"image {image_id}"
        picked.append((image, str(name)))
    return picked


@dataclass
class _PlannedEntry:
    key: tuple[str, int]
    sae: Optional[Path]
    diffc: Optional[Path]
    atlas: Optional[Path]
    sizes: dict[str, Any]
    metrics: dict[str, Any]


def _plan_entries(sources: Sequence[EntrySource]) -> tuple[list[_PlannedEntry], list[dict], list[str], Optional[str]]:
    """Validate every entry's folders (read only); returns (plan, recipes, class names, dataset from the atlases)."""
    from revelio_hub.interpret.atlas_config import ATLAS_FILE
    from revelio_hub.interpret.atlas_model import NeuronAtlas

    planned: list[_PlannedEntry] = []
    recipes: list[dict] = []
    class_names: list[str] = []
    dataset: Optional[str] = None
    seen = set()
    for src in sources:
        if src.sae is None and src.diffc is None:
            raise ValueError(f"entry {src} has neither an SAE nor a Diff-C folder")
        sae_dir, sae_cfg, sae_eval = _model_info(src.sae, "k-SAE")
        diffc_dir, diffc_cfg, diffc_eval = _model_info(src.diffc, "Diff-C head")
        atlas_meta: dict[str, Any] = {}
        if src.atlas is not None:
            if not Path(src.atlas).is_dir():
                raise FileNotFoundError(f"atlas folder {src.atlas} does not exist")
            NeuronAtlas.load(src.atlas)  # validates; raises naming the broken file
            atlas_meta = _read_json(Path(src.atlas) / ATLAS_FILE, "atlas")
        recipe = sae_cfg.get("recipe") or diffc_cfg.get("recipe") or atlas_meta.get("recipe") or {}
        layer = src.layer or recipe.get("layer")
        t = src.timestep if src.timestep is not None else recipe.get("timestep")
        if layer is None or t is None:
            raise ValueError(
                f"cannot tell the layer/timestep of entry {src}: its config has no recipe; give layer= and timestep="
            )
        for other_cfg, kind in ((diffc_cfg, "Diff-C"), (atlas_meta, "atlas")):
            other = other_cfg.get("recipe") or {}
            if other and (other.get("layer"), other.get("timestep")) != (layer, int(t)):
                raise ValueError(
                    f"entry ({layer}, {t}): the {kind} was trained on ({other.get('layer')}, {other.get('timestep')})"
                )
        key = (str(layer), int(t))
        if key in seen:
            raise ValueError(f"entry ({layer}, {t}) is listed twice")
        seen.add(key)
        if recipe:
            recipes.append(recipe)
        class_names = class_names or list(diffc_cfg.get("class_names") or atlas_meta.get("class_names") or [])
        dataset = dataset or atlas_meta.get("dataset")
        sizes = {kind: (cfg.get("recipe") or {}).get("image_size") for kind, cfg in (("sae", sae_cfg), ("diffc", diffc_cfg))
                 if cfg.get("recipe")}
        planned.append(_PlannedEntry(key, sae_dir, diffc_dir, Path(src.atlas) if src.atlas is not None else None,
                                     sizes, _entry_metrics(sae_cfg, sae_eval, diffc_cfg, diffc_eval, atlas_meta)))
    return planned, recipes, class_names, dataset


def _plan_examples(examples: Sequence[Any]) -> list[tuple[Any, str, str]]:
    """Check every example before anything is written: ``(path or PIL image, file name, label)``."""
    from PIL import Image

    planned, names = [], set()
    for i, item in enumerate(examples):
        image, label = item if isinstance(item, (tuple, list)) else (item, None)
        if isinstance(image, Image.Image):
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(label or "example"))
            name = f"{i:02d}_{stem}.png"
        else:
            path = Path(image)
            if not path.is_file():
                hint = " (a shell pattern that matched nothing is passed on unexpanded)" if any(
                    c in str(path) for c in "*?[") else ""
                raise FileNotFoundError(f"example image {path} does not exist{hint}")
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as error:
                raise ValueError(f"example image {path} is not a readable image ({error})") from None
            image, name = path, path.name
        if name in names:
            raise ValueError(f"two example images are named {name}")
        names.add(name)
        planned.append((image, name, str(label or Path(name).stem)))
    return planned


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / RELEASE_FILE).is_file():
            raise ValueError(f"refusing to delete {out}: it is not empty and not a release folder (no {RELEASE_FILE})")


def _move_into_place(built: Path, out: Path) -> None:
    """Swap the finished folder in: the old release (if any) is moved aside first, then deleted."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _entry_sources(entries: Sequence[Union[EntrySource, dict]]) -> list[EntrySource]:
    sources = [e if isinstance(e, EntrySource) else EntrySource.from_dict(e) for e in entries]
    if not sources:
        raise ValueError("a release needs at least one entry (an SAE, Diff-C or atlas folder)")
    return sources


def _check_embedded_backbone(embed_backbone: Optional[PathLike]) -> None:
    if embed_backbone is not None and not (Path(embed_backbone) / "model_index.json").is_file():
        raise ValueError(f"--embed-backbone {embed_backbone} is not a diffusers-layout folder (no model_index.json)")


def check_release_inputs(out: PathLike, entries: Sequence[Union[EntrySource, dict]], *, overwrite: bool = False,
                         embed_backbone: Optional[PathLike] = None) -> None:
    """The local checks of :func:`assemble_release` alone: the target folder, every entry's folders, the backbone.

    Reads local files only. ``make_release.py`` runs it before anything that may
    touch the network (opening ``--dataset`` for default examples), so a
    mistyped folder fails at once instead of after the Hub's retries.
    """
    _check_target(Path(out), overwrite)
    _plan_entries(_entry_sources(entries))
    _check_embedded_backbone(embed_backbone)


def assemble_release(
    out: PathLike,
    entries: Sequence[Union[EntrySource, dict]],
    *,
    backbone: Optional[str] = None,
    backbone_revision: Optional[str] = None,
    embed_backbone: Optional[PathLike] = None,
    examples: Sequence[Union[PathLike, tuple[Any, str]]] = (),
    dataset: Optional[str] = None,
    dataset_split: Optional[str] = None,
    name: Optional[str] = None,
    license: str = "apache-2.0",
    repo_id: Optional[str] = None,
    description: Optional[str] = None,
    overwrite: bool = False,
    figure: bool = True,
    base_model: Optional[str] = None,
    dataset_id: Optional[str] = None,
) -> Path:
    """Assemble a release folder from trainer outputs; returns ``out``.

    Every input (entry folders, atlas, backbone folder, example images, the
    target) is checked before anything is written; the release is then built in
    a hidden temporary folder next to ``out`` and moved into place only when
    complete, so a failure leaves no half-written release (and an existing one
    untouched). Each entry's ``sae``/``diffc`` folder is copied as a standalone
    ``PyTorchModelHubMixin`` folder (config, weights, eval.json; no optimizer
    checkpoints), its atlas as is. ``release.json`` records the backbone (taken
    from the SAE recipes unless ``backbone`` is given), image size, prompt,
    noise seed, dataset, entries and their metrics; the card and figure are
    rendered from them. ``repo_id`` is only used in the card's loading snippet.

    The card's Hub metadata names Hub repos only: ``base_model`` (default: the
    backbone, when it is a Hub id and not embedded) and ``dataset_id`` (default:
    ``dataset``, when it is a Hub id). Local folders are never written there.
    Examples are image paths, ``(path, label)`` or ``(PIL image, label)`` pairs.
    """
    from revelio_hub.cards import render_card, render_figure

    out = Path(out)
    _check_target(out, overwrite)
    planned, recipes, class_names, atlas_dataset = _plan_entries(_entry_sources(entries))
    backbone = _release_backbone(backbone, recipes)
    _check_embedded_backbone(embed_backbone)
    for given, what in ((base_model, "base_model (--base-model)"), (dataset_id, "dataset_id (--dataset-id)")):
        if given is not None and _hub_id(given) is None:
            raise ValueError(f"{what} must be a Hub repo id like 'owner/name', got {given!r}")
    example_plan = _plan_examples(examples)
    # The paper reads k-SAE features at 256 px and Diff-C features at 512 px: sizes may differ per model,
    # so each entry records its own and the release-level size is the first SAE's (what load_backbone uses).
    first = recipes[0] if recipes else {}

    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        embedded = _copy_embedded_backbone(embed_backbone, build)
        dataset = dataset or atlas_dataset
        config = {
            "format_version": FORMAT_VERSION,
            "name": name or out.name,
            "description": description,
            "backbone": backbone,
            "backbone_revision": backbone_revision if backbone_revision is not None else first.get("revision"),
            "base_model": base_model or (None if embedded else _hub_id(backbone)),
            "family": first.get("family"),
            "embedded_backbone": embedded,
            "image_size": first.get("image_size"),
            "prompt": first.get("prompt", ""),
            "noise_seed": first.get("noise_seed", 0),
            "ensemble": first.get("ensemble", 1),
            "dataset": {"id": dataset, "hub_id": dataset_id or _hub_id(dataset), "split": dataset_split,
                        "class_names": class_names},
            "license": license,
            "entries": _copy_entries(planned, build),
            "examples": _copy_examples(example_plan, build),
            "figure": None,
            "created_with": f"revelio-hub {__version__}",
        }
        if figure and render_figure(config, build / FIGURE_FILE):
            config["figure"] = FIGURE_FILE
        (build / RELEASE_FILE).write_text(json.dumps(config, indent=2))
        render_card(config, repo_id=repo_id).save(str(build / CARD_FILE))
        _move_into_place(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def _release_backbone(backbone: Optional[str], recipes: Sequence[dict]) -> str:
    """The one backbone the entries were trained on (or ``backbone``, when their recipes agree with it)."""
    backbones = sorted({str(r.get("backbone")) for r in recipes})
    if backbone is None:
        if len(backbones) != 1:
            raise ValueError(f"the entries were trained on different or unknown backbones {backbones}; "
                             "a release holds one backbone (pass backbone= to name it)")
        return backbones[0]
    if recipes and backbones != [backbone]:
        raise ValueError(f"backbone={backbone!r} but the entries' recipes name {backbones}")
    return backbone


def _copy_entries(planned: Sequence["_PlannedEntry"], build: Path) -> list[dict]:
    """Copy each entry's models and atlas into ``build``; returns the entries' ``release.json`` items."""
    items = []
    for plan in planned:
        layer, t = plan.key
        rel = entry_path(layer, t)
        if plan.sae is not None:
            _copy_model(plan.sae, build / rel / "sae")
        if plan.diffc is not None:
            _copy_model(plan.diffc, build / rel / "diffc")
        if plan.atlas is not None:
            shutil.copytree(plan.atlas, build / rel / "atlas")
        items.append({"layer": layer, "timestep": t, "path": rel, "sae": plan.sae is not None,
                      "diffc": plan.diffc is not None, "atlas": plan.atlas is not None,
                      "image_size": plan.sizes, "metrics": plan.metrics})
    return items


def _copy_embedded_backbone(embed_backbone: Optional[PathLike], build: Path) -> Optional[str]:
    """Copy the backbone folder into ``build`` (without training checkpoints); returns its path in the release."""
    if embed_backbone is None:
        return None
    shutil.copytree(Path(embed_backbone), build / BACKBONE_DIR,
                    ignore=shutil.ignore_patterns("checkpoint*", "*.ckpt", ".cache"))
    return BACKBONE_DIR


def _copy_examples(example_plan: Sequence[tuple[Any, str, Optional[str]]], build: Path) -> list[dict]:
    """Copy (or save) the example images into ``build``; returns their ``release.json`` items."""
    items = []
    for image, file_name, label in example_plan:
        (build / EXAMPLES_DIR).mkdir(exist_ok=True)
        target = build / EXAMPLES_DIR / file_name
        if isinstance(image, Path):
            shutil.copy2(image, target)
        else:
            image.convert("RGB").save(target)
        items.append({"file": f"{EXAMPLES_DIR}/{file_name}", "label": label})
    return items


def push_release(folder: PathLike, repo_id: str, *, private: bool = False,
                 token: Optional[Union[str, bool]] = None, commit_message: Optional[str] = None) -> str:
    """Check that ``folder`` opens as a release, then create ``repo_id`` and upload it; returns the commit URL."""
    release = Release.from_pretrained(folder)
    return push_folder(folder, repo_id, private=private, token=token,
                       commit_message=commit_message or f"Upload release {release.name} ({len(release.entries)} entries)")
