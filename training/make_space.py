#!/usr/bin/env python
"""Publish a release as a Hugging Face Space running the Revelio Hub app (or write the Space folder locally).

Thin command-line wrapper over :mod:`revelio_hub.space`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from revelio_hub.cli import add_options, option
from revelio_hub.space import SpaceError, SpaceSpec, hardware_choices, publish_space, write_space_folder

EPILOG = """\
examples:
  # the free shared GPU (ZeroGPU): the backbone pass borrows a GPU per analysis
  python training/make_space.py --release you/revelio-sd15-oxford-pets --space you/revelio-pets --hardware zero-a10g

  # free CPU hardware, private Space
  python training/make_space.py --release you/revelio-sd15-oxford-pets --space you/revelio-pets --private

  # look at the files first (nothing is created on the Hub)
  python training/make_space.py --release you/revelio-sd15-oxford-pets --hardware t4-small --dry-run space-out

  # preview offline, before pushing: the folder bundles a copy of the local release
  python training/make_space.py --release releases/toy-shapes --dry-run space-preview
  cd space-preview && pip install -r requirements.txt && REVELIO_RELEASE=releases/toy-shapes python app.py

To publish, the release must already be on the Hub (python training/make_release.py ... --push you/name): the
Space reads it from there, named by its REVELIO_RELEASE variable. Rerunning updates the Space in place (its app files are
replaced, stale ones deleted; files you added yourself stay). The token comes from --token, HF_TOKEN or
`hf auth login`. Hardware other than cpu-basic and zero-a10g is billed by the Hub.
"""


@dataclass(kw_only=True)
class SpaceRun:
    """Which release the Space serves, where it goes, and on what hardware (see :class:`SpaceSpec`)."""

    release: str = field(metadata=option(
        "Hub repo id of the release to serve; with --dry-run also a local release folder (an "
        "offline preview that bundles a copy of it).", metavar="OWNER/NAME"))
    space: Optional[str] = field(default=None, metadata=option(
        "Space to create or update (required unless --dry-run).", metavar="OWNER/NAME"))
    hardware: str = field(default="cpu-basic", metadata=option(
        "Space hardware: cpu-basic (free), zero-a10g (free shared GPU, ZeroGPU), t4-small, ... "
        f"(one of: {', '.join(hardware_choices())}). Default: %(default)s.",
        choices=hardware_choices(), metavar="FLAVOR"))
    private: bool = field(default=False, metadata=option("Create the Space private."))
    title: Optional[str] = field(default=None, metadata=option(
        "Space title (default: 'Revelio Hub: <release name>')."))
    dry_run: Optional[str] = field(default=None, metadata=option(
        "Write the Space's files into FOLDER and stop: nothing is created on the Hub.", metavar="FOLDER"))
    token: Optional[str] = field(default=None, metadata=option(
        "Hub token with write access (default: HF_TOKEN or the stored login)."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Create (or update) a Gradio Space that serves a Revelio Hub release: app.py, the package, "
        "requirements for the chosen hardware and a README whose front matter links the release.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, SpaceRun)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = SpaceSpec(release=args.release, hardware=args.hardware, space=args.space, private=args.private,
                         title=args.title, preview=bool(args.dry_run))
        if args.dry_run:
            files = write_space_folder(spec, args.dry_run, token=args.token)
            kind = "a preview bundling the local release" if spec.bundles_release else f"hardware {spec.hardware}"
            print(f"Wrote {len(files)} files to {args.dry_run} ({kind}); nothing was created on the Hub.")
            print(f"Variables to set on the Space: {spec.variables}")
            print(f"Run it: cd {args.dry_run} && pip install -r requirements.txt && "
                  f"REVELIO_RELEASE={spec.variables['REVELIO_RELEASE']} python app.py")
            return 0
        url = publish_space(spec, token=args.token)
    except SpaceError as error:
        print(f"make_space.py: error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
