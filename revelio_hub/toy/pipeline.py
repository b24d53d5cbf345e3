"""End-to-end build of the toy release: shapes → backbone → features → k-SAEs → Diff-C → atlases → release.

Every stage calls the project's own library entry points (the same code the
real SD releases go through), writes into a work directory and is skipped or
resumed when its output already exists with the same settings, so rerunning a
killed build continues where it stopped and rerunning a finished one only
rebuilds the release folder.

Sizes: :meth:`ToyBuildConfig.full` fits in about 30 minutes on two CPU cores
(the backbone training is most of it); :meth:`ToyBuildConfig.smoke` runs the
same stages with tiny sizes in well under two minutes for CI.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from revelio_hub.toy.backbone_training import (
    SAMPLE_GRID_FILE,
    ensure_sample_grid,
    is_trained_backbone,
    train_toy_backbone,
)
from revelio_hub.toy.build_recipe import (
    TOY_BACKBONE_NAME,
    TOY_BUILD_FILE,
    ToyBuildConfig,
    load_toy_backbone,
    train_toy_sae,
)
from revelio_hub.toy.monosemanticity import BenchmarkConfig, markdown_summary, run_benchmark, save_heatmap
from revelio_hub.toy.shapes import FACTORS, make_shapes_dataset

logger = logging.getLogger(__name__)

LABEL_FACTOR = "shape"
#: Bumped when the SAE trainer changes what it produces (2: AuxK over the centred residual variance, the
#: dead set refreshed every step, dead fraction over all rows): a work folder's older SAEs are retrained.
#: 3: the default recipe became the paper's (no input normalisation, Kaiming-uniform untied init, plain TopK, no
#: AuxK, no hold-out: evaluated on the test split's tokens), measured in benchmarks/bench_paper_recipe.py.
SAE_TRAINER_VERSION = 3


@dataclass
class BuildPaths:
    """Where each stage writes inside the work directory."""

    work: Path

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def backbone(self) -> Path:
        return self.work / "backbone"

    def store(self, split: str) -> Path:
        return self.work / "features" / split

    def sae(self, layer: str, t: int) -> Path:
        return self.work / "sae" / layer / f"t{t}"

    def diffc(self, layer: str, t: int) -> Path:
        return self.work / "diffc" / layer / f"t{t}"

    def atlas(self, layer: str, t: int) -> Path:
        return self.work / "atlas" / layer / f"t{t}"


def _stage(name: str, log: Callable[[str], None]):
    class _Timer:
        def __enter__(self):
            self.t0 = time.perf_counter()
            log(f"[toy build] {name} ...")
            return self

        def __exit__(self, *exc):
            log(f"[toy build] {name} done in {time.perf_counter() - self.t0:.1f} s")

    return _Timer()


def make_splits(config: ToyBuildConfig, folder: Path) -> dict[str, Any]:
    """Generate (or reuse) the train/test shape datasets, saved with ``save_to_disk``."""
    import datasets

    out = {}
    for split, n, seed in (("train", config.train_images, config.train_seed), ("test", config.test_images, config.test_seed)):
        path = folder / split
        meta = {"n": n, "seed": seed, "image_size": config.backbone.image_size}
        meta_file = folder / f"{split}.json"
        if path.exists() and meta_file.exists() and json.loads(meta_file.read_text()) == meta:
            out[split] = datasets.load_from_disk(str(path))
            continue
        if path.exists():
            shutil.rmtree(path)
        ds = make_shapes_dataset(n, seed=seed, image_size=config.backbone.image_size)
        ds.save_to_disk(str(path))
        meta_file.write_text(json.dumps(meta))
        out[split] = datasets.load_from_disk(str(path))
    return out


def factor_labels(dataset, image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """All factor labels of the given dataset rows (feature stores only carry the shape label)."""
    ids = image_ids.long().tolist()
    cols = {f: torch.tensor(dataset[f], dtype=torch.long) for f in FACTORS}
    return {f: col[ids] for f, col in cols.items()}


def train_entry_sae(config: ToyBuildConfig, store, layer: str, t: int, out: Path, progress: bool = False,
                    test_store: Any = None):
    """The release SAE of one (layer, t), trained on the train store's spatial maps (positions or their mean, per
    :meth:`ToyBuildConfig.sae_granularity`), evaluated on the test store's."""
    from revelio_hub.sae.model import KSparseAutoencoder

    marker = out / "toy_stage.json"
    granularity = config.sae_granularity(layer)
    keys = ["sae_expansion", "sae_k", "sae_steps", "sae_batch_size", "sae_lr", "sae_warmup_steps", "sae_aux_k",
            "sae_aux_coef", "sae_variant", "seed"]
    if granularity == "token":  # how positions are drawn says nothing about a pooled SAE
        keys += ["sae_tokens_per_image", "sae_token_sampling"]
    settings = {**{k: getattr(config, k) for k in keys}, "layer": layer, "timestep": t, "train": str(store.path),
                "trainer": SAE_TRAINER_VERSION, "granularity": granularity}
    if marker.exists() and json.loads(marker.read_text()) == settings and (out / "eval.json").exists():
        return _Reused(KSparseAutoencoder.from_pretrained(str(out)), json.loads((out / "eval.json").read_text()))
    if out.exists():
        shutil.rmtree(out)
    maps = store.load(layer, t, kind="spatial", views=0).features
    eval_maps = test_store.load(layer, t, kind="spatial", views=0).features if test_store is not None else None
    res = train_toy_sae(config, layer, maps, store.recipe(layer, t, granularity).to_dict(), out, progress, eval_maps)
    marker.write_text(json.dumps(settings))
    return res


def train_entry_diffc(config: ToyBuildConfig, train_store, test_store, layer: str, t: int, out: Path,
                      progress: bool = False):
    """Diff-C (conv head) on the shape label of one (layer, t); evaluated on the test split."""
    from revelio_hub.diffc.training import DiffCTrainConfig, train_diffc_from_store

    cfg = toy_diffc_config(config)
    # Reuse a finished run with identical settings; otherwise start clean (a
    # half-written run from other settings must never be resumed).
    marker = out / "toy_stage.json"
    settings = {"diffc": asdict(cfg), "layer": layer, "timestep": t, "train": str(train_store.path)}
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings)) \
            and (out / "eval.json").exists():
        from revelio_hub.diffc.model import DiffC

        return _Reused(DiffC.from_pretrained(str(out)), json.loads((out / "eval.json").read_text()))
    if out.exists():
        shutil.rmtree(out)
    res = train_diffc_from_store(train_store, out, layer, t, cfg, test_store=test_store, progress=progress)
    marker.write_text(json.dumps(settings))
    return res


def toy_diffc_config(config: ToyBuildConfig):
    """The toy's Diff-C settings: the default recipe, CPU-sized, on the stored plain view of each image.

    Online extraction (the recipe's) would run the backbone 30 times per image; the toy trains on one
    cached view instead and says so in the recorded config (``online=False``).
    """
    from revelio_hub.diffc.training import DiffCTrainConfig

    return DiffCTrainConfig(head="conv", hidden=config.diffc_hidden, epochs=config.diffc_epochs,
                            batch_size=config.diffc_batch_size, lr=config.diffc_lr, dropout=config.diffc_dropout,
                            seed=config.seed, checkpoint_every=max(1, config.diffc_epochs), online=False,
                            fresh_noise=False)


@dataclass
class _Reused:
    """A finished stage output loaded back instead of retrained."""

    model: Any
    eval: dict


def build_entry_atlas(config: ToyBuildConfig, store, dataset, layer: str, t: int, paths: BuildPaths):
    """Neuron atlas of one entry's SAE over the test split, with all five factors as label columns.

    The test split keeps the number of distinct thumbnails (and so the release) small;
    thumbnails are the 32-px images themselves.
    """
    from revelio_hub.interpret.atlas_builder import build_atlas
    from revelio_hub.interpret.atlas_config import AtlasConfig
    from revelio_hub.sae.model import KSparseAutoencoder

    sae = KSparseAutoencoder.from_pretrained(str(paths.sae(layer, t)))
    fs = store.load(layer, t, kind="spatial", views=0, image_ids=range(config.atlas_images))

    factors = factor_labels(dataset, fs.image_ids)

    def batches():
        for i in range(0, len(fs.image_ids), 256):
            yield (fs.features[i : i + 256].float(), {f: v[i : i + 256] for f, v in factors.items()},
                   fs.image_ids[i : i + 256])

    cfg = AtlasConfig(top_n=config.atlas_top_k, purity_top=min(10, config.atlas_top_k),
                      thumbnail_size=config.backbone.image_size, summary_neurons=1000)
    out = paths.atlas(layer, t)
    if out.exists():
        shutil.rmtree(out)
    return build_atlas(
        batches(), sae=sae, config=cfg, label_columns={f: list(v) for f, v in FACTORS.items()},
        thumbnails=lambda i: dataset[int(i)]["image"], out=out,
        extra_meta={"recipe": store.recipe(layer, t, sae.granularity).to_dict(), "layer": layer, "timestep": t,
                    "dataset": "revelio-hub toy shapes (test split)"},
    )


def _example_images(dataset, folder: Path, per_shape: int = 1) -> list[tuple[Path, str]]:
    """One test image per shape, upscaled 4× (nearest) so the app shows them at a readable size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = FACTORS["shape"]
    picked: dict[int, int] = {}
    for i, s in enumerate(dataset["shape"]):
        if s not in picked:
            picked[s] = i
        if len(picked) == len(names):
            break
    out = []
    for s, i in sorted(picked.items()):
        row = dataset[i]
        caption = f"{FACTORS['color'][row['color']]} {FACTORS['size'][row['size']]} {names[s]}, " \
                  f"{FACTORS['position'][row['position']].replace('_', ' ')}, {FACTORS['background'][row['background']]} background"
        img = row["image"].resize((row["image"].width * 4, row["image"].height * 4), Image.Resampling.NEAREST)
        path = folder / f"{names[s]}.png"
        img.save(path)
        out.append((path, caption))
    return out


def assemble(config: ToyBuildConfig, paths: BuildPaths, out: Path, test_dataset, report: dict[str, Any]) -> Path:
    """Write the release folder via :func:`revelio_hub.release.assemble_release`, backbone embedded."""
    from revelio_hub.release import EntrySource, assemble_release

    entries = [EntrySource(sae=paths.sae(l, t), diffc=paths.diffc(l, t) if l in config.diffc_layers else None,
                           atlas=paths.atlas(l, t), layer=l, timestep=t)
               for l in config.layers for t in config.timesteps]
    examples = _example_images(test_dataset, paths.work / "examples")
    assemble_release(
        out, entries, backbone=TOY_BACKBONE_NAME, embed_backbone=paths.backbone, examples=examples,
        dataset="revelio-hub toy shapes (procedural; labels: shape)", dataset_split="test", name="toy-shapes",
        description=("The embedded default of Revelio Hub: a small pixel-space DDPM trained on procedural shapes "
                     "(shape, colour, size, position, background known for every image), with k-SAEs, "
                     "Diff-C shape classifiers and neuron atlases. Built on CPU by training/build_toy_release.py."),
        overwrite=True,
    )
    grid = paths.backbone / SAMPLE_GRID_FILE
    if grid.exists():
        (out / "figures").mkdir(exist_ok=True)
        shutil.copy2(grid, out / "figures" / "samples.png")
        _append_card(out, report)
    return out


def _append_card(out: Path, report: dict[str, Any]) -> None:
    """Add the toy-specific section (samples, how it was built) to the rendered card."""
    card = out / "README.md"
    text = card.read_text() if card.exists() else ""
    cfg = report["config"]
    bb = cfg["backbone"]
    text += (
        "\n## The toy backbone\n\n"
        f"A `UNet2DConditionModel` (block widths {tuple(bb['block_out_channels'])}, cross-attention only at the lowest "
        f"resolution, learned constant null conditioning) trained as a pixel-space DDPM on {bb['image_size']}-px "
        f"procedural shapes for {bb['steps']} steps of batch {bb['batch_size']}. Ancestral DDPM samples "
        f"({bb['sample_steps']} steps):\n\n![samples](figures/samples.png)\n\n"
        "Entries: k-SAEs (k = {k}, {e}× expansion) trained on {what} of "
        "{tr} training images; Diff-C conv heads (hidden {h}) on the shape label for {dl} (tested on "
        "{te} test images); atlases over {ai} test images. "
        "Ground-truth monosemanticity (best single neuron AUROC per factor value): "
        "`python benchmarks/bench_monosemanticity.py --release <this folder>`.\n"
    ).format(k=cfg["sae_k"], e=cfg["sae_expansion"], what=_sae_inputs(cfg), tr=cfg["train_images"],
             h=cfg["diffc_hidden"], te=cfg["test_images"],
             dl=", ".join(cfg["diffc_layers"]), ai=min(cfg["atlas_images"], cfg["test_images"]))
    mono = report.get("monosemanticity")
    if mono:
        text += "\n" + mono + "\n"
    card.write_text(text)


def _sae_inputs(cfg: dict[str, Any]) -> str:
    """What the card says the SAEs were trained on, per granularity."""
    pooled = [l for l in cfg["layers"] if l in cfg.get("sae_pooled_layers", ())]
    token = [l for l in cfg["layers"] if l not in pooled]
    parts = []
    if token:
        drawn = ("drawn in proportion to their squared distance from the map's mean"
                 if cfg.get("sae_token_sampling") == "deviation" else "drawn uniformly")
        parts.append(f"{cfg['sae_tokens_per_image']} positions per image, {drawn} (token level; {', '.join(token)})")
    if pooled:
        parts.append(f"each image's mean-pooled vector (the paper's granularity; {', '.join(pooled)})")
    return " and ".join(parts)


def _store_complete(path: Path, config: ToyBuildConfig) -> bool:
    summary = path / "summary.json"
    if not summary.exists():
        return False
    s = json.loads(summary.read_text())
    return bool(s.get("complete")) and s.get("layers") == list(config.layers) and \
        s.get("timesteps") == list(config.timesteps)


def extract_stores(config: ToyBuildConfig, backbone, paths: BuildPaths, progress: bool = False) -> dict[str, Any]:
    """Spatial + pooled features of both splits at every (layer, t), in resumable feature stores."""
    from revelio_hub.data import open_image_dataset
    from revelio_hub.features import FeatureStore, extract_to_store

    stores = {}
    for split in ("train", "test"):
        out = paths.store(split)
        if _store_complete(out, config):
            stores[split] = FeatureStore(out)
            continue
        source = open_image_dataset(str(paths.data / split), label_column=LABEL_FACTOR)
        stores[split] = extract_to_store(
            backbone, source, out, list(config.layers), list(config.timesteps), spatial=True, views=1,
            batch_size=config.extract_batch_size, seed=config.noise_seed, progress=progress, overwrite=True,
            num_workers=0,
        )
    return stores


def seed_from_release(config: ToyBuildConfig, release: str | Path, paths: BuildPaths,
                      log: Callable[[str], None] = print) -> list[str]:
    """Start a work folder from a built release: its embedded backbone and its Diff-C heads.

    Only what the release provably built with the same settings is reused (its
    ``toy_build.json`` must match ``config`` for the backbone and Diff-C
    fields), so a rebuild after library changes to the SAE or atlas retrains
    those and skips the half hour of backbone training. Returns what was seeded.
    """
    from revelio_hub.toy.backbone_training import TRAINING_CONFIG_FILE

    release = Path(release)
    built_file = release / TOY_BUILD_FILE
    if not built_file.exists():
        raise ValueError(f"{release} is not a toy release built by build_toy_release ({TOY_BUILD_FILE} is missing)")
    built = ToyBuildConfig.from_dict(json.loads(built_file.read_text()))
    seeded: list[str] = []
    if built.backbone.to_dict() != config.backbone.to_dict():
        log(f"[toy build] {release}'s backbone was trained with other settings: not reused")
        return seeded
    src = release / "backbone"
    if not (src / TRAINING_CONFIG_FILE).exists():
        raise ValueError(f"{src} holds no toy backbone ({TRAINING_CONFIG_FILE} is missing)")
    if not is_trained_backbone(paths.backbone, config.backbone):
        if paths.backbone.exists():
            shutil.rmtree(paths.backbone)
        shutil.copytree(src, paths.backbone)
        seeded.append("backbone")
    keys = ("diffc_hidden", "diffc_epochs", "diffc_batch_size", "diffc_lr", "diffc_dropout", "seed", "train_images",
            "train_seed", "noise_seed", "layers", "timesteps")
    if any(getattr(built, k) != getattr(config, k) for k in keys):
        return seeded
    for layer in config.diffc_layers:
        for t in config.timesteps:
            src = release / layer / f"t{t}" / "diffc"
            out = paths.diffc(layer, t)
            if not (src / "eval.json").exists() or not (src / "model.safetensors").exists() or \
                    (out / "toy_stage.json").exists():
                continue
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(src, out)
            cfg = toy_diffc_config(config)
            settings = {"diffc": asdict(cfg), "layer": layer, "timestep": t, "train": str(paths.store("train"))}
            (out / "toy_stage.json").write_text(json.dumps(settings))
            seeded.append(f"diffc {layer}/t{t}")
    return seeded


def _load_done(out: Path, marker: str) -> Optional[dict]:
    f = out / marker
    return json.loads(f.read_text()) if f.exists() else None


def build_toy_release(
    config: ToyBuildConfig,
    out: str | Path,
    work: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    benchmark: bool = True,
    reuse_from: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Run every stage and write the release folder ``out``; returns the build report (metrics, timings).

    ``work`` keeps the intermediate products (datasets, backbone checkpoints,
    feature stores, training runs); a finished stage whose settings match is
    reused, so a rerun after a kill resumes and a rerun after success only
    re-assembles the release. ``reuse_from`` (a release folder built by this
    function) seeds the work folder with that release's backbone and Diff-C
    heads when they were built with the same settings (:func:`seed_from_release`).
    """
    paths = BuildPaths(Path(work))
    paths.work.mkdir(parents=True, exist_ok=True)
    if reuse_from is not None:
        seeded = seed_from_release(config, reuse_from, paths, log)
        log(f"[toy build] reused from {reuse_from}: {', '.join(seeded) or 'nothing (settings differ)'}")
    (paths.work / TOY_BUILD_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"config": config.to_dict(), "timings_s": timings, "entries": {}}
    t_start = time.perf_counter()

    def timed(name: str):
        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log(f"[toy build] {name} ...")

            def __exit__(self, *exc):
                timings[name] = round(time.perf_counter() - self.t0, 2)
                if exc[0] is None:
                    log(f"[toy build] {name}: {timings[name]:.1f} s")

        return _T()

    with timed("shapes"):
        splits = make_splits(config, paths.data)
    with timed("backbone"):
        if is_trained_backbone(paths.backbone, config.backbone):
            log(f"[toy build] reusing the backbone trained with identical settings in {paths.backbone}")
        else:
            train_toy_backbone(config.backbone, paths.backbone, progress=progress)
        ensure_sample_grid(paths.backbone, config.backbone)
    backbone = load_toy_backbone(paths.backbone)
    with timed("features"):
        stores = extract_stores(config, backbone, paths, progress=progress)
    with timed("sae"):
        for layer in config.layers:
            for t in config.timesteps:
                res = train_entry_sae(config, stores["train"], layer, t, paths.sae(layer, t), progress=False,
                                      test_store=stores["test"])
                report["entries"].setdefault(f"{layer}/t{t}", {})["sae"] = res.eval
                log(f"[toy build] SAE {layer} t={t}: FVU {res.eval.get('fvu', float('nan')):.3f}, "
                    f"L0 {res.eval.get('l0', float('nan')):.1f}, dead {res.eval.get('dead_fraction', float('nan')):.2%}")
    with timed("diffc"):
        for layer in config.diffc_layers:
            for t in config.timesteps:
                res = train_entry_diffc(config, stores["train"], stores["test"], layer, t, paths.diffc(layer, t))
                report["entries"][f"{layer}/t{t}"]["diffc"] = {k: res.eval.get(k) for k in ("top1", "top5", "best_epoch")}
                log(f"[toy build] Diff-C {layer} t={t}: test top-1 {res.eval.get('top1', float('nan')):.3f}")
    with timed("atlas"):
        for layer in config.layers:
            for t in config.timesteps:
                build_entry_atlas(config, stores["test"], splits["test"], layer, t, paths)
    with timed("release"):
        assemble(config, paths, Path(out), splits["test"], report)
        (Path(out) / TOY_BUILD_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if config.reliability_images:
        with timed("reliability"):
            report["reliability"] = calibrate_toy_release(config, Path(out), paths, log)
    if benchmark:
        with timed("benchmark"):
            report["benchmark"] = add_benchmark(config, Path(out), report, log)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    return report


def calibrate_toy_release(config: ToyBuildConfig, out: Path, paths: BuildPaths,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate the reliability score of every Diff-C entry on the test split's first images.

    The same library call as ``training/calibrate_release.py``: generic shifts
    only, nothing from the shape generator (so it works as it would on Pets).
    """
    from revelio_hub.data import open_image_dataset
    from revelio_hub.interpret.calibration import CalibrationConfig, calibrate_release

    source = open_image_dataset(str(paths.data / "test"), label_column=LABEL_FACTOR)
    cal = CalibrationConfig(seed=config.seed, max_images=min(config.reliability_images, config.test_images))
    return calibrate_release(out, source, cal, log=lambda m: log(f"[toy build] {m}"))


def add_benchmark(config: ToyBuildConfig, out: Path, report: dict[str, Any], log: Callable[[str], None]) -> dict:
    """Run the monosemanticity benchmark on the fresh release; add its JSON, heat map and table to the release."""

    bench = run_benchmark(str(out), BenchmarkConfig(num_images=config.bench_images,
                                                    random_train_images=config.bench_random_train_images),
                          log=lambda m: log(f"[toy build] {m}"))
    results = bench.pop("_results")
    bench["release"] = out.name  # the report lives in the release: its folder's name, not where it was built
    (out / "figures").mkdir(exist_ok=True)
    save_heatmap(results, list(FACTORS), str(out / "figures" / "monosemanticity.png"))
    (out / "monosemanticity.json").write_text(json.dumps(bench, indent=2) + "\n")
    table = markdown_summary(bench) + "\n\n![monosemanticity](figures/monosemanticity.png)\n"
    card = out / "README.md"
    card.write_text(card.read_text() + "\n" + table)
    return {"summary": bench["summary"], "checks": bench["checks"], "diffc_shape_accuracy": bench["diffc_shape_accuracy"]}
