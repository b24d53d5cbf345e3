"""Small helpers around ``huggingface_hub``: local-or-remote resolution, partial downloads, pushing.

A release is used either from a local folder or from a Hub repo; these helpers
hide that difference and turn the client's exceptions into messages that say
what the user should do. Everything goes through the real client, so caching,
``HF_ENDPOINT``, ``HF_TOKEN``/``hf auth login`` and offline mode behave as for
any Hub model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


def is_local(id_or_path: PathLike) -> bool:
    """True when ``id_or_path`` names an existing local folder (which wins over a Hub id)."""
    return Path(os.fspath(id_or_path)).expanduser().is_dir()


def download(
    repo_id: str,
    patterns: Sequence[str],
    *,
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: bool = False,
) -> Path:
    """Download only the files matching ``patterns`` from a model repo; return the snapshot folder.

    The snapshot folder is named after the resolved commit, so later partial
    downloads with ``revision=<that commit>`` land in the same folder and stay
    consistent even if the repo moves on.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=list(patterns),
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{repo_id!r} is neither a local folder nor a Hub repo you can access "
            "(check the spelling, or log in with `hf auth login` / HF_TOKEN for a private repo)."
        ) from error
    except LocalEntryNotFoundError as error:
        raise ValueError(
            f"Cannot fetch {list(patterns)} of {repo_id!r}: the Hub is unreachable (or HF_HUB_OFFLINE is set) "
            "and the files are not in the local cache."
        ) from error
    except HfHubHTTPError as error:
        raise ValueError(f"Downloading {list(patterns)} from {repo_id!r} failed: {error}") from error
    return Path(path)


def push_folder(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[Union[str, bool]] = None,
    commit_message: str = "Upload Revelio Hub release",
    revision: Optional[str] = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; return the commit URL.

    The token comes from ``token``, else the usual login / ``HF_TOKEN``.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Cannot push {folder}: it is not a folder")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision, ignore_patterns=[".cache/**", "**/.cache/**", "**/__pycache__/**"])
    return str(info.commit_url)
