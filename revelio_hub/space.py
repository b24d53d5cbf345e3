"""Publish a release as a Hugging Face Space running the Revelio Hub app, in one call.

A Space needs four things, and :func:`write_space_folder` writes exactly those:

* ``app.py`` and the ``revelio_hub`` package (no tests, no caches): the app itself;
* ``requirements.txt``: every dependency the app imports, gradio pinned to the
  front matter's ``sdk_version`` (so ``python app.py`` runs in the folder after
  ``pip install -r requirements.txt``), torch pinned to the version this checkout
  runs, from the CPU wheel index on CPU hardware (a plain ``torch`` requirement
  pulls a multi-GB CUDA build), and ``spaces`` on ZeroGPU;
* ``README.md``: the Space's front matter (Gradio SDK at the installed version,
  ``models: [release]`` so the Hub links the Space and the release).

A published Space does *not* hold the release: it reads it from the Hub, named
by the ``REVELIO_RELEASE`` Space variable. A *preview* (``--dry-run`` of a local
release folder) is built offline, before anything is pushed: it bundles a copy
of the release under ``releases/<folder name>`` and says so in its README, so the
folder runs on its own with ``python app.py``. :func:`publish_space` checks the token
and the release before creating anything, then creates (or updates in place)
the Space through ``huggingface_hub``'s API: ``create_repo``, Space variables,
hardware, ``upload_folder`` with deletions of stale app files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from revelio_hub.cards import PAPER_TITLE, PAPER_URL
from revelio_hub.hub import is_local

#: The checkout holding ``app.py`` (the package lives in its ``revelio_hub/``).
SOURCE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(__file__).resolve().parent
#: Where the CPU builds of torch live (small wheels, no CUDA libraries).
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
#: ZeroGPU hardware: the app's backbone pass borrows a GPU through ``spaces.GPU``.
ZERO_GPU = "zero-a10g"
#: Flavors the Spaces configuration reference accepts for ``suggested_hardware``
#: (ZeroGPU is granted per Space, so it cannot be suggested to people who duplicate it).
SUGGESTABLE_HARDWARE = (
    "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4",
    "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
)
#: Files of the Space this tool owns: a rerun replaces them and deletes stale ones, and leaves the rest alone.
OWNED_PATTERNS = ["app.py", "requirements.txt", "README.md", "revelio_hub/**"]
#: Left out of the copied package.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".pytest_cache", ".DS_Store")


class SpaceError(ValueError):
    """A problem the user can fix (bad id, unknown release, no token); the message is one line."""


def hardware_choices() -> list[str]:
    """Every Space hardware flavor the installed ``huggingface_hub`` knows."""
    from huggingface_hub import SpaceHardware

    return [h.value for h in SpaceHardware]


def is_gpu(hardware: str) -> bool:
    return not hardware.startswith("cpu-")


@dataclass
class SpaceSpec:
    """What to publish.

    Attributes:
        release: Hub repo id of the release the Space serves.
        hardware: Space hardware flavor (``cpu-basic``, ``zero-a10g``, ``t4-small``...).
        space: ``owner/name`` of the Space (only needed to publish).
        private: create the Space private.
        title: display title (default: from the release name).
        preview: a local preview (``--dry-run``): ``release`` may then be a
            local release folder, which the folder bundles instead of naming a Hub repo.
    """

    release: str
    hardware: str = "cpu-basic"
    space: Optional[str] = None
    private: bool = False
    title: Optional[str] = None
    preview: bool = False

    def __post_init__(self) -> None:
        choices = hardware_choices()
        if self.hardware not in choices:
            raise SpaceError(f"Unknown hardware {self.hardware!r}; choose one of: {', '.join(choices)}.")
        if self.bundles_release and not self.preview:
            raise SpaceError(
                f"--release {self.release!r} is a local folder, but a published Space reads its release from the Hub: "
                "push it first (python training/make_release.py ... --push you/name) and pass that id, "
                "or preview the Space offline with --dry-run FOLDER."
            )
        if self.bundles_release and not (Path(self.release) / "release.json").is_file():
            raise SpaceError(f"--release {self.release!r} is a folder without release.json, not a Revelio Hub release.")
        if not self.bundles_release:
            _check_repo_id(self.release, "--release")
        if self.space is not None:
            _check_repo_id(self.space, "--space")

    @property
    def bundles_release(self) -> bool:
        """True when ``release`` is a local folder: the written folder then carries a copy of it."""
        return is_local(self.release)

    @property
    def release_in_space(self) -> str:
        """How the app in the written folder names the release: the Hub id, or the bundled copy's relative path."""
        if self.bundles_release:
            return f"releases/{Path(self.release).expanduser().resolve().name}"
        return self.release

    @property
    def variables(self) -> dict[str, str]:
        """Space variables (environment of the app): which release, and the device.

        ``auto`` on GPU hardware (ZeroGPU or a dedicated GPU alike); ``cpu`` on
        CPU hardware, where ``app.py`` then runs the backbone in a worker
        process so the Space's second vCPU is used (:mod:`revelio_hub.app.workers`).
        """
        from revelio_hub.app.state import RELEASE_ENV

        return {RELEASE_ENV: self.release_in_space, "REVELIO_DEVICE": "auto" if is_gpu(self.hardware) else "cpu"}


def _check_repo_id(repo_id: str, flag: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SpaceError(f"{flag} {repo_id!r} is not a Hub repo id: {str(error).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise SpaceError(f"{flag} {repo_id!r} must be of the form 'owner/name'.")


def resolve_token(token: Optional[str] = None) -> str:
    """``token``, else ``$HF_TOKEN`` / the stored login; a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise SpaceError("No Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login` first.")
    return token


def open_release(release_id: str, token: Optional[str] = None) -> Any:
    """The release's metadata from the Hub (``release.json`` + card); a one-line error when it is not there."""
    from revelio_hub.release import Release

    try:
        return Release.from_pretrained(release_id, token=token)
    except (ValueError, FileNotFoundError) as error:
        raise SpaceError(f"Cannot use release {release_id!r}: {str(error).splitlines()[0]}") from None


# ------------------------------------------------------------------- contents


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _package_requirements() -> list[str]:
    """The package's own dependencies (pyproject.toml of this checkout, else the installed metadata)."""
    pyproject = SOURCE_ROOT / "pyproject.toml"
    try:
        import tomllib

        return list(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"])
    except (ImportError, OSError, KeyError):
        from importlib.metadata import requires

        return [r for r in (requires("revelio-hub") or []) if "extra ==" not in r]


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def space_requirements(hardware: str) -> str:
    """``requirements.txt`` of the Space for ``hardware``.

    Complete on its own (no ``-e .``: a Space installs requirements before the
    code is copied in; the package is importable because ``app.py`` sits next
    to it). gradio is pinned to the front matter's ``sdk_version``, so the
    folder also runs with plain ``python app.py`` after installing this file.
    """
    import gradio

    lines = ["# Written by training/make_space.py for hardware " + hardware + "."]
    if not is_gpu(hardware):
        lines += ["# CPU hardware: torch's CPU build (a plain `torch` pulls multi-GB CUDA libraries).",
                  f"--extra-index-url {CPU_TORCH_INDEX}"]
    lines.append(f"torch=={_torch_version()}")
    # the sdk_version of README.md's front matter; the mcp extra lets the Space's variable REVELIO_MCP=1 serve MCP tools
    lines.append(f"gradio[mcp]=={gradio.__version__}")
    if hardware == ZERO_GPU:
        lines.append("spaces  # ZeroGPU: the backbone pass holds a GPU through spaces.GPU")
    for req in _package_requirements():
        if _requirement_name(req) not in ("torch", "gradio", "spaces"):
            lines.append(req)
    return "\n".join(lines) + "\n"


def space_card(spec: SpaceSpec, release: Any) -> str:
    """The Space's ``README.md``: front matter (built with ``huggingface_hub.SpaceCardData``) and a short body."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    name = str(getattr(release, "name", "") or spec.release_in_space.split("/")[-1])
    models = [] if spec.bundles_release else [spec.release]
    backbone = getattr(release, "backbone_id", None)
    if backbone and not getattr(release, "embedded_backbone", None) and str(backbone).count("/") == 1:
        models.append(str(backbone))  # the Hub links the Space from the diffusion model's page too
    extra: dict[str, Any] = {"models": models} if models else {}
    if spec.hardware in SUGGESTABLE_HARDWARE:
        extra["suggested_hardware"] = spec.hardware
    title = spec.title or f"Revelio Hub: {name}"
    data = SpaceCardData(
        title=f"{title} (preview)" if spec.bundles_release else title,
        sdk="gradio",
        sdk_version=gradio.__version__,
        python_version="3.11",
        app_file="app.py",
        license=str((release.config or {}).get("license") or "apache-2.0"),
        tags=["revelio-hub", "interpretability", "sparse-autoencoder", "diffusion"],
        emoji="🔍",
        colorFrom="indigo",
        colorTo="yellow",
        pinned=False,
        short_description=f"Diffusion-model neurons: {name}"[:60],
        **extra,
    )
    template = "---\n{{ card_data }}\n---\n{{ body }}"
    return str(SpaceCard.from_template(data, template_str=template, body=_card_body(spec, name)))


def _card_body(spec: SpaceSpec, name: str) -> str:
    """The README below the front matter; a preview says it is one, first, and how to publish for real."""
    from huggingface_hub import constants

    hub = constants.ENDPOINT.rstrip("/")
    zero = (
        "\nOn ZeroGPU the backbone pass borrows a GPU for each analysis (`spaces.GPU`); everything else runs on the CPU.\n"
        if spec.hardware == ZERO_GPU else ""
    )
    if spec.bundles_release:
        source = (
            f"> **Preview, built offline** from a local release folder, bundled here as `{spec.release_in_space}`.\n"
            "> Run it with `pip install -r requirements.txt && "
            f"REVELIO_RELEASE={spec.release_in_space} python app.py`. To publish, push the release "
            "(`python training/make_release.py ... --push you/name`) and run "
            "`python training/make_space.py --release you/name --space you/space`: "
            "a published Space reads its release from the Hub and holds no copy of it.\n\n"
        )
    else:
        source = f"- Release (k-SAEs, Diff-C, neuron atlases): [{spec.release}]({hub}/{spec.release})\n"
    rerun = "" if spec.bundles_release else (
        f"\nPublished with `python training/make_space.py --release {spec.release} --hardware {spec.hardware}`;\n"
        "rerun it to update this Space in place.\n"
    )
    return f"""
# Revelio Hub: {name}

Upload an image, pick a layer and a timestep, and see which k-sparse-autoencoder neurons of a diffusion
model it lights up, where they fire, what they mean, and the classes Diff-C reads from the same features.

{source}- Paper: [*{PAPER_TITLE}*]({PAPER_URL}) (ICCV 2025)
- Hardware: `{spec.hardware}`; the app reads the release named by the `REVELIO_RELEASE` variable.
{zero}{rerun}"""


def write_space_folder(spec: SpaceSpec, out: os.PathLike | str, release: Any = None, *, token: Optional[str] = None) -> list[str]:
    """Write the Space's files into ``out`` (created; must be empty or absent); returns their relative paths.

    ``release`` is the opened release (``open_release``); it is opened when not
    given: from the Hub, or offline from the local folder of a preview, whose
    copy then goes to ``out/releases/<folder name>`` (no network at all).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpaceError(f"{out} exists and is not an empty folder; pick a new --dry-run folder.")
    app_file = SOURCE_ROOT / "app.py"
    if not app_file.is_file():
        raise SpaceError(f"app.py not found next to the package ({SOURCE_ROOT}); run from a Revelio Hub checkout.")
    release = release if release is not None else open_release(spec.release, token)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(app_file, out / "app.py")
    shutil.copytree(PACKAGE_DIR, out / "revelio_hub", ignore=IGNORED)
    if spec.bundles_release:
        shutil.copytree(Path(spec.release).expanduser(), out / spec.release_in_space, ignore=IGNORED)
    (out / "requirements.txt").write_text(space_requirements(spec.hardware), encoding="utf-8")
    (out / "README.md").write_text(space_card(spec, release), encoding="utf-8")
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def space_url(space_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/spaces/{space_id}"


def publish_space(spec: SpaceSpec, *, token: Optional[str] = None, progress: Any = print) -> str:
    """Create or update the Space ``spec.space`` serving ``spec.release``; returns the Space URL.

    Checks first (token, then the release on the Hub), so a bad call creates nothing.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if spec.space is None:
        raise SpaceError("--space owner/name is required to publish (or use --dry-run FOLDER).")
    token = resolve_token(token)
    release = open_release(spec.release, token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="revelio-space-") as tmp:
        files = write_space_folder(spec, Path(tmp) / "space", release)
        try:
            repo = api.create_repo(spec.space, repo_type="space", space_sdk="gradio", private=spec.private,
                                   exist_ok=True)
            space_id = repo.repo_id or spec.space
            progress(f"Space {space_id}: setting variables {sorted(spec.variables)}")
            for key, value in spec.variables.items():
                api.add_space_variable(space_id, key, value)
            progress(f"Space {space_id}: requesting hardware {spec.hardware}")
            api.request_space_hardware(space_id, spec.hardware)
            if api.model_info(spec.release).private:
                progress(f"Note: {spec.release} is private, so the Space cannot read it until you add a read token "
                         "as the Space secret HF_TOKEN (Settings > Variables and secrets) or make the release public.")
            progress(f"Space {space_id}: uploading {len(files)} files")
            api.upload_folder(
                repo_id=space_id, repo_type="space", folder_path=Path(tmp) / "space",
                delete_patterns=OWNED_PATTERNS,
                commit_message=f"Revelio Hub app for {spec.release} ({spec.hardware})",
            )
        except HfHubHTTPError as error:
            raise SpaceError(f"The Hub refused: {str(error).splitlines()[0]}") from None
    return space_url(space_id)


__all__ = [
    "SpaceSpec", "SpaceError", "publish_space", "write_space_folder", "space_card", "space_requirements",
    "resolve_token", "open_release", "hardware_choices", "space_url", "ZERO_GPU", "OWNED_PATTERNS",
]
