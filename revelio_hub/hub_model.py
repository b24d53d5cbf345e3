"""Strict Hub loading shared by every model we publish (k-SAE, Diff-C).

``PyTorchModelHubMixin`` loads non-strictly and can fall back to pickles; a model
whose weights do not match its config would then run with random layers and
produce plausible-looking garbage. :class:`StrictHubMixin` keeps the mixin's
save/push/config machinery and changes only loading: safetensors only,
``load_state_dict(strict=True)``, clear ``ValueError`` naming the file, and a
``subfolder=`` argument that downloads just that folder of a repo (one entry of
a release, not the whole release).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from huggingface_hub import PyTorchModelHubMixin, constants, snapshot_download
from safetensors.torch import load_file

T = TypeVar("T", bound="StrictHubMixin")


class StrictHubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` with strict, safetensors-only, subfolder-aware loading.

    Subclasses set ``_hub_kind`` (a human name used in messages) and may override
    :meth:`_describe_architecture` to say which config a mismatch is against.
    """

    _hub_kind: str = "model"

    def _describe_architecture(self) -> str:
        return ""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[T],
        pretrained_model_name_or_path: Union[str, Path],
        *,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: Optional[Union[str, bool]] = None,
        **model_kwargs: Any,
    ) -> T:
        """Load from a local folder, a Hub repo id, or a ``subfolder`` of either.

        Only that folder's ``config.json`` and ``model.safetensors`` are
        downloaded (``allow_patterns``), so ``subfolder="up_ft1/t25/sae"`` does
        not fetch the rest of a release. Loading is strict (see :meth:`_from_pretrained`).
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            folder = os.path.join(path, subfolder) if subfolder else path
        else:
            prefix = f"{subfolder.strip('/')}/" if subfolder else ""
            root = snapshot_download(
                repo_id=path,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=[prefix + constants.CONFIG_NAME, prefix + constants.SAFETENSORS_SINGLE_FILE],
            )
            folder = os.path.join(root, subfolder) if subfolder else root
        for name in (constants.CONFIG_NAME, constants.SAFETENSORS_SINGLE_FILE):
            if not os.path.isfile(os.path.join(folder, name)):
                where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
                raise ValueError(f"No {cls._hub_kind} at {where}: {name} is missing.")
        return super().from_pretrained(folder, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: Optional[str] = None,
        cache_dir: Any = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: Any = None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> T:
        """Strict safetensors load: a missing, unexpected or mis-shaped tensor is an error."""
        model = cls(**model_kwargs)
        weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
        state = load_file(weights, device=str(map_location))
        expected, got = set(model.state_dict()), set(state)
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            arch = model._describe_architecture()
            raise ValueError(
                f"{weights} does not match the {cls._hub_kind} in its config.json"
                + (f" ({arch})" if arch else "")
                + f": missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}."
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{weights} does not match its config.json: {exc}") from exc
        model.to(map_location)
        model.eval()
        return model
