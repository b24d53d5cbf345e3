#!/usr/bin/env python
"""Build the bundled toy release end to end: shapes → toy DDPM → features → k-SAEs → Diff-C → atlases → release.

Thin CLI over :func:`revelio_hub.toy.pipeline.build_toy_release`. The full build
(default) reproduces the committed ``releases/toy-shapes`` in about half an hour
on two CPU cores; ``--smoke`` runs every stage with tiny sizes in well under two
minutes (CI). Intermediate products live in ``--work`` and are reused when their
settings match, so a killed build resumes and a finished one only reassembles
the release.

Examples:
    python training/build_toy_release.py                       # full build into releases/toy-shapes
    python training/build_toy_release.py --smoke --out /tmp/toy --work /tmp/toy-work
    # after an SAE/atlas change: keep the committed backbone and Diff-C heads, rebuild the rest
    python training/build_toy_release.py --reuse-from releases/toy-shapes --out /tmp/toy-new
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from revelio_hub.cli import HelpFormatter, add_options, option
from revelio_hub.toy.pipeline import ToyBuildConfig, build_toy_release
from revelio_hub.training_recipes import SAE_VARIANTS


@dataclass(kw_only=True)
class ToyReleaseRun:
    """Where the toy release and its intermediate products go, and what the build skips or reuses."""

    out: str = field(default="releases/toy-shapes", metadata=option("release folder to write"))
    work: Optional[str] = field(default=None, metadata=option(
        "folder for intermediate products (default: runs/toy-build, or runs/toy-build-smoke with --smoke)"))
    smoke: bool = field(default=False, metadata=option(
        "tiny sizes: checks the wiring in < 2 minutes, not a useful model"))
    threads: Optional[int] = field(default=None, metadata=option("torch CPU threads (default: torch's choice)"))
    report: Optional[str] = field(default=None, metadata=option(
        "also write the build report (metrics, timings) to this JSON file"))
    no_benchmark: bool = field(default=False, metadata=option(
        "skip the monosemanticity benchmark normally added to the card"))
    no_progress: bool = field(default=False, metadata=option("hide progress bars"))
    sae_variant: Optional[str] = field(default=None, metadata=option(
        "sparsity rule of the release's SAEs (revelio_hub.sae.variants; default: the build config's, chosen by "
        "benchmarks/bench_sae_variants.py); recorded in toy_build.json", choices=list(SAE_VARIANTS)))
    reuse_from: Optional[str] = field(default=None, metadata=option(
        "seed the work folder with this toy release's trained backbone and Diff-C heads when they "
        "were built with the same settings (skips the ~20-minute backbone training); must not be --out itself",
        metavar="RELEASE"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_options(p, ToyReleaseRun)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = ToyBuildConfig.smoke() if a.smoke else ToyBuildConfig.full()
    if a.sae_variant is not None:
        config = replace(config, sae_variant=a.sae_variant)
    work = a.work or os.path.join("runs", "toy-build-smoke" if a.smoke else "toy-build")
    if a.reuse_from and os.path.realpath(a.reuse_from) == os.path.realpath(a.out):
        p.error("--reuse-from must differ from --out: the release folder is rewritten while it is read")
    report = build_toy_release(config, a.out, work, progress=not a.no_progress, benchmark=not a.no_benchmark,
                               reuse_from=a.reuse_from)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2, default=str)
    print(f"toy release written to {a.out} in {report['timings_s']['total']:.0f} s")


if __name__ == "__main__":
    main()
