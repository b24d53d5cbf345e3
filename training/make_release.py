#!/usr/bin/env python
"""Assemble a Revelio Hub release folder from trained artifacts, render its card, optionally push it.

Thin command-line wrapper over :func:`revelio_hub.release.assemble_release` and
:func:`revelio_hub.release.push_release`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from revelio_hub.cli import HelpFormatter, add_options, option, usage_error

EPILOG = """\
examples:
  # one entry per --sae; --diffc/--atlas attach to the --sae before them (or use --config)
  python training/make_release.py --out releases/revelio-sd15-oxford-pets \\
      --sae runs/sae/up_ft1_t25 --diffc runs/diffc/up_ft1_t25 --atlas runs/atlas/up_ft1_t25 \\
      --sae runs/sae/bottleneck_t25 --atlas runs/atlas/bottleneck_t25 \\
      --dataset timm/oxford-iiit-pet --push me/revelio-sd15-oxford-pets

  # the same from a config file
  python training/make_release.py --config release.json5 --out releases/pets --push me/pets --private

config file (JSON):
  {"entries": [{"sae": "runs/sae/up_ft1_t25", "diffc": "...", "atlas": "...",
                "layer": "up_ft1", "timestep": 25}],       # layer/timestep optional (read from the recipe)
   "backbone": "stable-diffusion-v1-5/stable-diffusion-v1-5", # optional (read from the recipes)
   "embed_backbone": "path/to/backbone",                      # optional: copy a backbone folder into the release
   "base_model": "owner/name", "dataset_id": "owner/name",   # optional: Hub ids for the card's metadata
   "examples": ["img1.jpg", ["img2.jpg", "caption"]],         # optional example images for the app
   "dataset": "timm/oxford-iiit-pet", "dataset_split": "test", "name": "...", "license": "apache-2.0"}
Command-line flags override the file. The token for --push comes from `hf auth login` or HF_TOKEN.
"""


@dataclass(kw_only=True)
class ReleaseRun:
    """Every option of make_release.py: the entries' folders, what the card records, where the release goes."""

    out: str = field(metadata=option("Release folder to write."))
    config: Optional[str] = field(default=None, metadata=option(
        "JSON file listing the entries and options (see below)."))
    sae: list[str] = field(default_factory=list, metadata=option(
        "k-SAE output folder (config.json + model.safetensors + eval.json); starts a new entry.",
        repeat=True, metavar="DIR"))
    diffc: list[str] = field(default_factory=list, metadata=option(
        "Diff-C output folder for the current entry (or a Diff-C-only entry if no --sae precedes).",
        repeat=True, metavar="DIR"))
    atlas: list[str] = field(default_factory=list, metadata=option(
        "Atlas folder (training/build_atlas.py) for the current entry.", repeat=True, metavar="DIR"))
    backbone: Optional[str] = field(default=None, metadata=option(
        "Backbone id to record (default: from the SAE recipes)."))
    backbone_revision: Optional[str] = field(default=None, metadata=option(
        "Backbone revision to record (default: from the recipes)."))
    embed_backbone: Optional[str] = field(default=None, metadata=option(
        "Copy this diffusers-layout backbone folder into the release, so it loads without the "
        "original (small models only; default: the release names the backbone and users load it).", metavar="FOLDER"))
    base_model: Optional[str] = field(default=None, metadata=option(
        "Hub id for the card's base_model (default: the backbone when it is a Hub id; a local "
        "backbone folder is never written there).", metavar="HUB_ID"))
    examples: Optional[list[str]] = field(default=None, metadata=option(
        "Example images the app offers (files; your shell expands patterns such as dir/*.jpg). "
        "Default: 4 images of --dataset's --dataset-split, one per class; --examples alone: none.",
        nargs="*", metavar="IMAGE"))
    dataset: Optional[str] = field(default=None, metadata=option(
        "Dataset the metrics were measured on: Hub id or local folder, shown in the card and the "
        "source of the default examples (default: the one recorded in the atlases)."))
    dataset_id: Optional[str] = field(default=None, metadata=option(
        "Hub dataset id for the card's datasets metadata (default: --dataset when it is a Hub id).",
        metavar="HUB_ID"))
    dataset_split: Optional[str] = field(default=None, metadata=option(
        "Split the metrics were measured on (default: none; the default examples come from 'test')."))
    name: Optional[str] = field(default=None, metadata=option("Release name (default: the --out folder name)."))
    license: Optional[str] = field(default=None, metadata=option("License id for the card (default: apache-2.0)."))
    overwrite: bool = field(default=False, metadata=option("Replace an existing release folder at --out."))
    push: Optional[str] = field(default=None, metadata=option(
        "Create this Hub repo and upload the release (default: none, local folder only).", metavar="REPO_ID"))
    atlas_dataset: Optional[str] = field(default=None, metadata=option(
        "Also write the atlases as a Hub dataset (parquet, thumbnails as Image columns, a dataset "
        "card; datasets.load_dataset reads it) into DIR (default: <--out>-atlas). With --push it is "
        "uploaded to the dataset repo <REPO_ID>-atlas.", nargs="?", const="", metavar="DIR"))
    private: bool = field(default=False, metadata=option("With --push: create the repo as private."))
    token: Optional[str] = field(default=None, metadata=option("Hub token (default: the saved login or HF_TOKEN)."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Assemble a release folder (<layer>/t<t>/{sae,diffc,atlas}/, release.json, model card, "
        "metrics figure) from k-SAE, Diff-C and atlas outputs, and optionally push it to the Hugging Face Hub. "
        "Every input is checked before anything is written, and the release is built in a temporary folder "
        "next to --out that replaces it only when complete.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_options(p, ReleaseRun)
    return p.parse_args(argv)


def _entries_from_flags(argv: list[str]) -> list[dict]:
    """Group --sae/--diffc/--atlas in command-line order: each --sae starts an entry."""
    entries: list[dict] = []
    flags = {"--sae": "sae", "--diffc": "diffc", "--atlas": "atlas"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, value = None, None
        if arg in flags and i + 1 < len(argv):
            key, value = flags[arg], argv[i + 1]
            i += 2
        elif "=" in arg and arg.split("=", 1)[0] in flags:
            key, value = flags[arg.split("=", 1)[0]], arg.split("=", 1)[1]
            i += 1
        else:
            i += 1
            continue
        if key == "sae" or not entries or key in entries[-1]:
            entries.append({})
        entries[-1][key] = value
    return entries


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    from revelio_hub.interpret.atlas_dataset import check_output, push_atlas_dataset, write_release_atlas_dataset
    from revelio_hub.release import Release, assemble_release, check_release_inputs, default_examples, push_release

    config: dict = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            usage_error("make_release.py", f"cannot read --config {args.config}: {error}")
    entries = _entries_from_flags(argv) or config.get("entries") or []
    if not entries:
        usage_error("make_release.py", "no entries: give --sae/--diffc/--atlas folders or a --config listing them")

    def pick(name: str, default=None):
        value = getattr(args, name)
        return value if value is not None else config.get(name, default)

    try:  # local inputs first: a mistyped folder should not wait for the Hub (default examples below)
        check_release_inputs(args.out, entries, overwrite=args.overwrite, embed_backbone=pick("embed_backbone"))
    except (ValueError, FileNotFoundError) as error:
        usage_error("make_release.py", error)

    atlas_dataset = None
    if args.atlas_dataset is not None:  # checked before the release is built: a mistake leaves nothing behind
        try:
            atlas_dataset = check_output(args.atlas_dataset or f"{Path(args.out)}-atlas", args.overwrite)
        except ValueError as error:
            raise SystemExit(f"error: --atlas-dataset: {error}")
    examples = pick("examples")
    if examples is None and pick("dataset"):
        split = pick("dataset_split") or "test"
        try:
            examples = default_examples(pick("dataset"), split)
        except (ValueError, OSError) as error:  # examples are optional: say so and go on
            print(f"warning: no example images ({pick('dataset')}[{split}] could not be opened: {error}); "
                  "pass --examples to add some", file=sys.stderr)
    examples = [tuple(e) if isinstance(e, list) else e for e in examples or []]
    try:
        out = assemble_release(
            args.out, entries,
            backbone=pick("backbone"), backbone_revision=pick("backbone_revision"),
            embed_backbone=pick("embed_backbone"), examples=examples,
            dataset=pick("dataset"), dataset_split=pick("dataset_split"), name=pick("name"),
            license=pick("license", "apache-2.0"), repo_id=args.push or config.get("repo_id"),
            overwrite=args.overwrite, base_model=pick("base_model"), dataset_id=pick("dataset_id"),
        )
    except (ValueError, FileNotFoundError) as error:
        usage_error("make_release.py", error)
    release = Release.from_pretrained(out)
    print(f"wrote {out}: {len(release.entries)} entries {release.entries}")
    for layer, t in release.entries:
        print(f"  {layer} t={t}: {json.dumps(release.entry_metrics(layer, t))}")
    if atlas_dataset is not None:
        data_repo = f"{args.push}-atlas" if args.push else None
        try:
            write_release_atlas_dataset(release, atlas_dataset, release_repo=args.push, overwrite=args.overwrite)
        except ValueError as error:
            raise SystemExit(f"error: --atlas-dataset: {error}")
        print(f"wrote the atlas dataset {atlas_dataset}")
    if args.push:
        url = push_release(out, args.push, private=args.private, token=args.token)
        print(f"pushed to {args.push}: {url}")
        if atlas_dataset is not None:
            url = push_atlas_dataset(atlas_dataset, data_repo, private=args.private, token=args.token)
            print(f"pushed the atlas dataset to {data_repo}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
