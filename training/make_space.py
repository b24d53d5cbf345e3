#!/usr/bin/env python
"""Publish a release as a Hugging Face Space running the Revelio Hub app (or write the Space folder locally).

Thin command-line wrapper over :mod:`revelio_hub.space`.
"""

from __future__ import annotations

import argparse
import sys

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revelio_hub.space import hardware_choices

    p = argparse.ArgumentParser(
        description="Create (or update) a Gradio Space that serves a Revelio Hub release: app.py, the package, "
        "requirements for the chosen hardware and a README whose front matter links the release.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--release", required=True, metavar="OWNER/NAME",
                   help="Hub repo id of the release to serve; with --dry-run also a local release folder (an "
                   "offline preview that bundles a copy of it).")
    p.add_argument("--space", default=None, metavar="OWNER/NAME", help="Space to create or update (required unless --dry-run).")
    p.add_argument("--hardware", default="cpu-basic", choices=hardware_choices(), metavar="FLAVOR",
                   help="Space hardware: cpu-basic (free), zero-a10g (free shared GPU, ZeroGPU), t4-small, ... "
                   f"(one of: {', '.join(hardware_choices())}). Default: %(default)s.")
    p.add_argument("--private", action="store_true", help="Create the Space private.")
    p.add_argument("--title", default=None, help="Space title (default: 'Revelio Hub: <release name>').")
    p.add_argument("--dry-run", default=None, metavar="FOLDER",
                   help="Write the Space's files into FOLDER and stop: nothing is created on the Hub.")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the stored login).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from revelio_hub.space import SpaceError, SpaceSpec, publish_space, write_space_folder

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
