#!/usr/bin/env python
"""What would the app's neuron names be with another SAE at one toy entry? Train it, build its atlas, score both.

The toy release's SAEs share one recipe (``ToyBuildConfig``: k, expansion,
steps, seed). This trains one entry's SAE with some of those settings changed
(``--set sae_k=4``; any field of ``ToyBuildConfig``), on the toy build's own
features, builds its atlas (calibrated claims included) as the build does, puts
both into a copy of the release, and scores the copy and the release itself at
that entry with ``bench_explain.py`` on tuning images (generator seed 5 by
default; never the reporting seed 7): coverage and precision of the listed
neurons' names, the oracle ceiling, and "Why this class?". The new SAE's
held-out FVU, L0 and dead fraction are reported beside the release's.

The copy's reliability calibration is the release's (it was fitted with the
release's SAEs), so only the names are compared.

Example:
    python benchmarks/bench_entry_sae.py --work runs/toy-build --layer down_ft1 --set sae_k=4
    python benchmarks/bench_entry_sae.py --work runs/toy-build --layer up_ft1 --set sae_pooled_layers=
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import runpy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch

from revelio_hub.features import FeatureStore
from revelio_hub.toy.build_recipe import ToyBuildConfig
from revelio_hub.toy.pipeline import BuildPaths, build_entry_atlas, train_entry_sae

HERE = Path(__file__).resolve().parent
EXPLAIN = runpy.run_path(str(HERE / "bench_explain.py"))


def parse_setting(text: str) -> tuple[str, Any]:
    """``"sae_k=4"`` → ("sae_k", 4), typed like the ``ToyBuildConfig`` field it names."""
    key, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(ToyBuildConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a ToyBuildConfig field, got {text!r}; fields: "
                                         + ", ".join(n for n in fields if n.startswith(("sae_", "seed"))))
    default = getattr(ToyBuildConfig(), key)
    if isinstance(default, tuple):  # "sae_pooled_layers=up_ft1,down_ft1"; "sae_pooled_layers=" for none
        return key, tuple(v for v in value.split(",") if v)
    kind = type(default) if default is not None and not isinstance(default, bool) else str
    try:
        return key, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} takes a {kind.__name__}, got {value!r}") from None


def candidate_release(config: ToyBuildConfig, work: Path, release: Path, layer: str, t: int, out: Path) -> dict:
    """A copy of ``release`` at ``out`` whose ``layer``/t SAE and atlas are retrained with ``config``; its SAE eval."""
    shutil.copytree(release, out)
    paths = BuildPaths(out / "_work")
    train, test = FeatureStore(work / "features" / "train"), FeatureStore(work / "features" / "test")
    res = train_entry_sae(config, train, layer, t, paths.sae(layer, t), test_store=test)
    build_entry_atlas(config, test, datasets.load_from_disk(str(work / "data" / "test")), layer, t, paths)
    entry = out / layer / f"t{t}"
    for part in ("sae", "atlas"):
        shutil.rmtree(entry / part)
        shutil.copytree(getattr(paths, part)(layer, t), entry / part, ignore=shutil.ignore_patterns("checkpoint*"))
    shutil.rmtree(paths.work)
    return dict(res.eval)


def score(release: Path, layer: str, t: int, a: argparse.Namespace) -> dict[str, Any]:
    """``bench_explain.py``'s figures for one entry of ``release``."""
    argv = ["--release", str(release), "--layers", layer, "--timesteps", str(t), "--seed", str(a.seed),
            "--images", str(a.images), "--why", str(a.why), "--ood-images", "0", "--json"]
    with contextlib.redirect_stdout(io.StringIO()):  # only this script's report is printed
        report = EXPLAIN["main"](argv)
    entry = report["entries"][f"{layer}/t{t}"]
    keep = ("coverage", "precision", "oracle_coverage_at_0.85", "oracle_coverage_at_0.9")
    out = {k: entry["default"][k] for k in keep}
    if entry.get("why"):
        out["why_top3_names_class"] = entry["why"]["top3_names_class"]
    return out


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/toy-build", help="toy build work folder (default: %(default)s)")
    p.add_argument("--release", default=str(HERE.parent / "releases" / "toy-shapes"), help="toy release folder")
    p.add_argument("--layer", required=True, help="entry layer, e.g. down_ft1")
    p.add_argument("--timestep", type=int, default=25)
    p.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="FIELD=VALUE",
                   help="a ToyBuildConfig field to change for the new SAE (repeatable), e.g. sae_k=4, seed=1")
    p.add_argument("--seed", type=int, default=5, help="generator seed of the tuning images (default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="tuning images (default: %(default)s)")
    p.add_argument("--why", type=int, default=100, help="images scored for \"Why this class?\" (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.seed in (0, 1, 7):
        p.error("--seed 0/1 are the release's own images and 7 is bench_explain's reporting seed; tune on another")
    if a.threads:
        torch.set_num_threads(a.threads)
    work, release = Path(a.work), Path(a.release)
    config = ToyBuildConfig.from_dict(json.loads((release / "toy_build.json").read_text()))
    changed = dataclasses.replace(config, **dict(a.settings))
    t0 = time.perf_counter()
    sae_eval = json.loads((release / a.layer / f"t{a.timestep}" / "sae" / "eval.json").read_text())
    report: dict[str, Any] = {"entry": f"{a.layer}/t{a.timestep}", "settings": dict(a.settings), "seed": a.seed,
                              "release": {"sae": _sae_figures(sae_eval), **score(release, a.layer, a.timestep, a)}}
    with tempfile.TemporaryDirectory() as tmp:
        new_eval = candidate_release(changed, work, release, a.layer, a.timestep, Path(tmp) / "release")
        report["new"] = {"sae": _sae_figures(new_eval), **score(Path(tmp) / "release", a.layer, a.timestep, a)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return report


def _sae_figures(eval_: dict) -> dict[str, float]:
    return {k: round(float(eval_[k]), 4) for k in ("fvu", "l0", "dead_fraction") if k in eval_}


if __name__ == "__main__":
    main()
